//! Unit tests and property tests for the planner.
//!
//! The property tests generate random topologies (regions, RTTs, node capacities, fan-out and
//! depth bounds, tracks) and random operation sequences (joins, leaves, node failures, new
//! nodes, new and removed tracks), and check every invariant after every step. The number of
//! cases follows `PROPTEST_CASES` (default 256 here; run with `PROPTEST_CASES=5000` for a
//! long soak).

use super::*;
use crate::nodes::{Load, NodeId, NodeSpec, RegionId, RttMatrix};
use proptest::prelude::*;
use std::collections::BTreeMap;

fn matrix(names: &[&str], pairs: &[(&str, &str, u32)]) -> RttMatrix {
    RttMatrix::from_pairs(
        names.iter().map(|s| s.to_string()).collect(),
        &pairs
            .iter()
            .map(|(a, b, r)| (a.to_string(), b.to_string(), *r, 0))
            .collect::<Vec<_>>(),
        (1_000, 0),
    )
    .expect("valid test matrix")
}

fn node(id: u32, region: u16, kbps: u64) -> NodeSpec {
    NodeSpec {
        id: NodeId(id),
        region: RegionId(region),
        capacity: Load::new(kbps, kbps),
        egress_micro_usd_per_gb: 50_000,
    }
}

fn track(id: u32, origin: u32) -> TrackSpec {
    TrackSpec {
        id: TrackId(id),
        origin: NodeId(origin),
        relay_load: Load::new(4_000, 4_000),
        viewer_load: Load::new(2_500, 2_500),
    }
}

fn two_regions() -> RttMatrix {
    // New York–Paris round trip 78 ms (WonderProxy, see design notes).
    matrix(&["nyc", "par"], &[("nyc", "par", 78_000)])
}

fn config() -> PlannerConfig {
    PlannerConfig {
        max_fanout: 2,
        max_depth: 4,
        hop_processing_us: 1_000,
        cross_region_penalty_us: 5_000,
        viewer_share_percent: 90,
    }
}

fn assert_make_before_break(diff: &Diff) {
    let first_break = diff.actions.iter().position(|a| !a.is_make());
    if let Some(i) = first_break {
        assert!(
            diff.actions[i..].iter().all(|a| !a.is_make()),
            "make step after a break step: {:?}",
            diff.actions
        );
    }
    // Upstream first: a new link into `c` precedes any new link out of `c` (same track), so
    // a node forwards a track only after it receives it.
    for (i, a) in diff.actions.iter().enumerate() {
        if let Action::Link { track, child, .. } = a {
            for b in &diff.actions[..i] {
                if let Action::Link {
                    track: t2,
                    parent: p2,
                    ..
                } = b
                {
                    assert!(
                        !(t2 == track && p2 == child),
                        "link out of {child} listed before the link into it: {:?}",
                        diff.actions
                    );
                }
            }
        }
    }
}

#[test]
fn viewers_fill_nearest_node_first_and_trees_follow() {
    // Node capacity 100 000 kbit/s, share 90 % → 90 000 / 2 500 = 36 viewers per node.
    let mut p = Planner::new(config(), two_regions()).expect("config");
    p.add_node(node(0, 0, 100_000)).expect("n0");
    p.add_node(node(1, 1, 100_000)).expect("n1");
    p.add_node(node(2, 1, 100_000)).expect("n2");
    p.add_track(track(0, 0)).expect("track");
    assert_eq!(p.viewer_room(NodeId(1)), 36);

    let d = p.join(ViewerId(1), RegionId(1)).expect("join");
    assert_eq!(
        d.actions,
        vec![
            Action::Link {
                track: TrackId(0),
                parent: NodeId(0),
                child: NodeId(1)
            },
            Action::AttachViewer {
                viewer: ViewerId(1),
                node: NodeId(1)
            },
        ]
    );
    // Path delay = one-way NYC→Paris (39 ms) + 1 ms processing.
    let tree = p.tree(TrackId(0)).expect("tree");
    assert_eq!(tree.path_us(NodeId(1)), Some(40_000));
    for v in 2..=36 {
        p.join(ViewerId(v), RegionId(1)).expect("join");
    }
    assert_eq!(p.viewer_room(NodeId(1)), 0);
    // The 37th Paris viewer goes to n2, which hangs off n1 (intra-region hop), not off the
    // origin: 40 ms + 0.5 ms + 1 ms beats 39 ms + 1 ms + 5 ms penalty.
    p.join(ViewerId(37), RegionId(1)).expect("join");
    assert_eq!(p.viewer_node(ViewerId(37)), Some(NodeId(2)));
    let tree = p.tree(TrackId(0)).expect("tree");
    assert_eq!(tree.parent(NodeId(2)), Some(NodeId(1)));
    assert_eq!(tree.path_us(NodeId(2)), Some(41_500));
    // n1 carries 36 viewers and one relay stream.
    let n1 = p.node(NodeId(1)).expect("n1");
    assert_eq!(n1.load, Load::new(36 * 2_500 + 4_000, 36 * 2_500 + 4_000));
    p.check_invariants().expect("invariants");
}

#[test]
fn leave_prunes_empty_leaves_and_relays() {
    let mut p = Planner::new(config(), two_regions()).expect("config");
    p.add_node(node(0, 0, 100_000)).expect("n0");
    p.add_node(node(1, 1, 10_000)).expect("n1");
    p.add_track(track(0, 0)).expect("track");
    p.join(ViewerId(1), RegionId(1)).expect("join");
    let d = p.leave(ViewerId(1)).expect("leave");
    assert_eq!(
        d.actions,
        vec![
            Action::Unlink {
                track: TrackId(0),
                parent: NodeId(0),
                child: NodeId(1)
            },
            Action::DetachViewer {
                viewer: ViewerId(1),
                node: NodeId(1)
            },
        ]
    );
    assert_eq!(p.tree(TrackId(0)).map(|t| t.len()), Some(1));
    assert_eq!(p.node(NodeId(0)).map(|n| n.load), Some(Load::ZERO));
    assert_eq!(
        p.leave(ViewerId(1)),
        Err(PlannerError::UnknownViewer(ViewerId(1)))
    );
    p.check_invariants().expect("invariants");
}

#[test]
fn spills_to_next_region_when_home_is_full() {
    let mut p = Planner::new(config(), two_regions()).expect("config");
    p.add_node(node(0, 0, 100_000)).expect("n0");
    p.add_node(node(1, 1, 3_000)).expect("n1 fits one viewer");
    p.add_track(track(0, 0)).expect("track");
    p.join(ViewerId(1), RegionId(1))
        .expect("first fits at home");
    p.join(ViewerId(2), RegionId(1)).expect("second spills");
    assert_eq!(p.viewer_node(ViewerId(2)), Some(NodeId(0)));
}

#[test]
fn rehome_brings_spilled_viewers_back_make_before_break() {
    let mut p = Planner::new(config(), two_regions()).expect("config");
    p.add_node(node(0, 0, 100_000)).expect("n0");
    p.add_node(node(1, 1, 3_000)).expect("n1 fits one viewer");
    p.add_track(track(0, 0)).expect("track");
    p.join(ViewerId(1), RegionId(1)).expect("home");
    p.join(ViewerId(2), RegionId(1)).expect("spills to nyc");
    assert_eq!(p.viewer_node(ViewerId(2)), Some(NodeId(0)));
    assert!(p.rehome(10).is_empty(), "no room at home yet");
    p.add_node(node(2, 1, 3_000))
        .expect("capacity arrives in Paris");
    let d = p.rehome(10);
    // n1 is too full to relay, so the new Paris edge hangs off the origin.
    assert_eq!(
        d.actions,
        vec![
            Action::Link {
                track: TrackId(0),
                parent: NodeId(0),
                child: NodeId(2)
            },
            Action::MoveViewer {
                viewer: ViewerId(2),
                from: NodeId(0),
                to: NodeId(2)
            },
        ]
    );
    assert_make_before_break(&d);
    p.check_invariants().expect("invariants");
}

#[test]
fn optimize_relays_through_a_better_connected_region() {
    // a–b is slow (100 ms), but a–c and c–b are 20 ms each: b is best reached through c.
    let rtt = matrix(
        &["a", "b", "c"],
        &[("a", "b", 100_000), ("a", "c", 20_000), ("b", "c", 20_000)],
    );
    let mut p = Planner::new(config(), rtt).expect("config");
    p.add_node(node(0, 0, 100_000)).expect("origin in a");
    p.add_node(node(1, 2, 100_000)).expect("c");
    p.add_node(node(2, 1, 100_000)).expect("b");
    p.add_track(track(0, 0)).expect("track");
    // b's viewer arrives first: the only member is the origin, 50 + 1 ms away.
    p.join(ViewerId(1), RegionId(1)).expect("b viewer");
    p.join(ViewerId(2), RegionId(2)).expect("c viewer");
    let t = p.tree(TrackId(0)).expect("tree");
    assert_eq!(t.parent(NodeId(2)), Some(NodeId(0)));
    assert_eq!(t.path_us(NodeId(2)), Some(51_000));
    assert_eq!(t.path_us(NodeId(1)), Some(11_000));
    // Through c: 11 + 10 + 1 = 22 ms.
    let d = p.optimize(10, 1_000);
    assert_eq!(
        d.actions,
        vec![
            Action::Link {
                track: TrackId(0),
                parent: NodeId(1),
                child: NodeId(2)
            },
            Action::Unlink {
                track: TrackId(0),
                parent: NodeId(0),
                child: NodeId(2)
            },
        ]
    );
    assert_eq!(
        p.tree(TrackId(0)).and_then(|t| t.path_us(NodeId(2))),
        Some(22_000)
    );
    assert!(
        p.optimize(10, 1_000).is_empty(),
        "a second pass finds nothing"
    );
    p.check_invariants().expect("invariants");
}

#[test]
fn relay_failure_reparents_make_before_break() {
    // Fan-out 2 forces a chain: origin n0 → n1 → n2 (all in Paris except the origin).
    let mut cfg = config();
    cfg.max_fanout = 1;
    cfg.viewer_share_percent = 50;
    let mut p = Planner::new(cfg, two_regions()).expect("config");
    p.add_node(node(0, 0, 100_000)).expect("n0");
    for i in 1..=3 {
        p.add_node(node(i, 1, 12_000)).expect("node");
    }
    p.add_track(track(0, 0)).expect("track");
    // Each Paris node takes 2 viewers (5 000 kbit/s ≤ 50 % of 12 000) and keeps room for
    // one 4 000 kbit/s relay stream.
    for v in 0..6 {
        p.join(ViewerId(v), RegionId(1)).expect("join");
    }
    let t = p.tree(TrackId(0)).expect("tree");
    assert_eq!(
        t.path(NodeId(3)),
        vec![NodeId(0), NodeId(1), NodeId(2), NodeId(3)]
    );

    // n2 fails: n3 must re-attach to n1 (the only member with a free slot after n2 leaves).
    let r = p.remove_node(NodeId(2)).expect("remove");
    assert_make_before_break(&r.diff);
    let t = p.tree(TrackId(0)).expect("tree");
    assert_eq!(t.parent(NodeId(3)), Some(NodeId(1)));
    let link = r.diff.actions.iter().position(|a| {
        *a == Action::Link {
            track: TrackId(0),
            parent: NodeId(1),
            child: NodeId(3),
        }
    });
    let unlink = r.diff.actions.iter().position(|a| {
        *a == Action::Unlink {
            track: TrackId(0),
            parent: NodeId(2),
            child: NodeId(3),
        }
    });
    assert!(link.is_some() && unlink.is_some() && link < unlink);
    // n2's two viewers fit nowhere in Paris (full) and go to the origin in NYC.
    assert!(r.unplaced.is_empty());
    assert_eq!(p.viewers_on(NodeId(0)).count(), 2);
    p.check_invariants().expect("invariants");
}

#[test]
fn origin_failure_moves_publisher_to_nearest_node() {
    let rtt = matrix(
        &["a", "b", "c"],
        &[("a", "b", 10_000), ("a", "c", 100_000), ("b", "c", 95_000)],
    );
    let mut p = Planner::new(config(), rtt).expect("config");
    p.add_node(node(0, 0, 100_000)).expect("n0");
    p.add_node(node(1, 1, 100_000)).expect("n1");
    p.add_node(node(2, 2, 100_000)).expect("n2");
    p.add_track(track(7, 0)).expect("track");
    p.join(ViewerId(1), RegionId(2)).expect("join");
    let r = p.remove_node(NodeId(0)).expect("remove origin");
    assert_eq!(r.new_origins, vec![(TrackId(7), NodeId(1))]);
    let t = p.tree(TrackId(7)).expect("tree");
    assert_eq!(t.origin(), NodeId(1));
    assert_eq!(t.parent(NodeId(2)), Some(NodeId(1)));
    assert_make_before_break(&r.diff);
    p.check_invariants().expect("invariants");
    // Removing the last two nodes: the last one cannot go while the track exists.
    p.remove_node(NodeId(2)).expect("remove edge");
    assert_eq!(
        p.remove_node(NodeId(1)),
        Err(PlannerError::NoOriginLeft(TrackId(7)))
    );
}

#[test]
fn depth_bound_is_respected_and_rejects_cleanly() {
    let mut cfg = config();
    cfg.max_fanout = 1;
    cfg.max_depth = 1;
    let mut p = Planner::new(cfg, two_regions()).expect("config");
    p.add_node(node(0, 0, 2_900))
        .expect("n0 has no viewer room after relaying");
    p.add_node(node(1, 1, 3_000)).expect("n1");
    p.add_node(node(2, 1, 3_000)).expect("n2");
    p.add_track(TrackSpec {
        relay_load: Load::new(500, 500),
        ..track(0, 0)
    })
    .expect("track");
    p.join(ViewerId(0), RegionId(1)).expect("n1 at depth 1");
    // n1 is full and n2 would be at depth 2 (origin's only slot is taken): refused.
    let before = p.plan();
    assert_eq!(
        p.join(ViewerId(1), RegionId(1)),
        Err(PlannerError::NoCapacity(RegionId(1)))
    );
    assert_eq!(p.plan(), before, "a refused join changes nothing");
    p.check_invariants().expect("invariants");
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let mut p = Planner::new(config(), two_regions()).expect("config");
    assert_eq!(
        p.add_node(node(0, 9, 1)),
        Err(PlannerError::UnknownRegion(NodeId(0), RegionId(9)))
    );
    p.add_node(node(0, 0, 10)).expect("n0");
    assert_eq!(
        p.add_node(node(0, 0, 10)),
        Err(PlannerError::DuplicateNode(NodeId(0)))
    );
    assert_eq!(
        p.add_track(track(0, 5)),
        Err(PlannerError::UnknownNode(NodeId(5)))
    );
    assert_eq!(
        p.join(ViewerId(0), RegionId(4)),
        Err(PlannerError::UnknownViewerRegion(RegionId(4)))
    );
    assert_eq!(
        p.remove_node(NodeId(3)),
        Err(PlannerError::UnknownNode(NodeId(3)))
    );
    assert!(Planner::new(
        PlannerConfig {
            max_fanout: 0,
            ..config()
        },
        two_regions()
    )
    .is_err());
}

#[test]
fn plan_room_sizes_a_100k_style_tree() {
    // 6 equal regions 100 ms apart; nodes sized for 100 viewers each (scaled-down 100k/2k).
    let names = ["r0", "r1", "r2", "r3", "r4", "r5"];
    let mut pairs = Vec::new();
    for i in 0..6 {
        for j in (i + 1)..6 {
            pairs.push((names[i], names[j], 100_000));
        }
    }
    let rtt = matrix(&names, &pairs);
    let cfg = PlannerConfig {
        max_fanout: 16,
        viewer_share_percent: 50,
        ..PlannerConfig::default()
    };
    // 100 viewers × 2 500 kbit/s = 250 000 = 50 % of 500 000; the other half leaves room for
    // 62 relay streams, so only the fan-out bound (16) limits relaying.
    let nodes: Vec<NodeSpec> = (0..60).map(|i| node(i, (i % 6) as u16, 500_000)).collect();
    let viewers: Vec<(RegionId, u64)> = (0..6).map(|r| (RegionId(r), 500)).collect();
    let (p, plan) = Planner::plan_room(cfg, rtt, &nodes, &[track(0, 0)], &viewers).expect("plan");
    p.check_invariants().expect("invariants");
    // 3 000 viewers / 100 per node = 30 edges, 5 per region.
    let edges = plan.nodes.values().filter(|n| n.viewers > 0).count();
    assert_eq!(edges, 30);
    let tree = &plan.trees[&TrackId(0)];
    assert_eq!(tree.len(), 30);
    // One trunk per remote region: exactly 5 cross-region hops.
    let cross = tree
        .iter()
        .filter(|(n, hop)| {
            hop.parent
                .is_some_and(|p| plan.nodes[&p].region != plan.nodes[*n].region)
        })
        .count();
    assert_eq!(cross, 5);
    // Worst path: 50 ms one-way + 1 ms, then one intra-region hop (0.5 + 1 ms).
    let worst = tree.values().map(|h| h.path_us).max().unwrap_or(0);
    assert_eq!(worst, 52_500);
}

// ------------------------------------------------------------------ property tests

#[derive(Clone, Debug)]
enum Op {
    Join(u16),
    Leave(usize),
    RemoveNode(usize),
    Cordon(usize),
    Rehome(usize),
    Optimize(usize, u64),
    AddNode(u16, u64),
    AddTrack(usize, u64, u64),
    RemoveTrack(usize),
}

#[derive(Clone, Debug)]
struct World {
    regions: u16,
    rtt: Vec<u32>,
    cfg: PlannerConfig,
    nodes: Vec<(u16, u64, u64)>,
    tracks: Vec<(usize, u64, u64)>,
    ops: Vec<Op>,
}

fn world() -> impl Strategy<Value = World> {
    (1u16..=5).prop_flat_map(|regions| {
        let n = usize::from(regions);
        (
            Just(regions),
            prop::collection::vec(200u32..300_000, n * n),
            (1u32..=6, 1u32..=5, 0u32..3_000, 0u32..20_000, 40u8..=100),
            prop::collection::vec((0..regions, 5_000u64..120_000, 500u64..12_000), 1..40),
            prop::collection::vec((0usize..20, 100u64..3_000, 10u64..300), 1..4),
            prop::collection::vec(
                prop_oneof![
                    12 => (0..regions).prop_map(Op::Join),
                    3 => (0usize..1_000).prop_map(Op::Leave),
                    1 => (0usize..100).prop_map(Op::RemoveNode),
                    1 => (0usize..100).prop_map(Op::Cordon),
                    1 => (1usize..20).prop_map(Op::Rehome),
                    1 => (1usize..20, 0u64..5_000).prop_map(|(n, g)| Op::Optimize(n, g)),
                    1 => (0..regions, 5_000u64..120_000).prop_map(|(r, c)| Op::AddNode(r, c)),
                    1 => (0usize..20, 100u64..3_000, 10u64..300)
                        .prop_map(|(o, k, p)| Op::AddTrack(o, k, p)),
                    1 => (0usize..10).prop_map(Op::RemoveTrack),
                ],
                0..160,
            ),
        )
            .prop_map(
                |(regions, rtt, (f, d, proc_us, pen, share), nodes, tracks, ops)| World {
                    regions,
                    rtt,
                    cfg: PlannerConfig {
                        max_fanout: f,
                        max_depth: d,
                        hop_processing_us: proc_us,
                        cross_region_penalty_us: pen,
                        viewer_share_percent: share,
                    },
                    nodes,
                    tracks,
                    ops,
                },
            )
    })
}

fn build_matrix(w: &World) -> RttMatrix {
    let names: Vec<String> = (0..w.regions).map(|i| format!("r{i}")).collect();
    let n = usize::from(w.regions);
    let mut pairs = Vec::new();
    for i in 0..n {
        for j in i..n {
            // Intra-region round trips are small; inter-region ones anything up to 300 ms.
            let rtt = if i == j {
                w.rtt[i * n + j] % 3_000 + 100
            } else {
                w.rtt[i * n + j]
            };
            pairs.push((names[i].clone(), names[j].clone(), rtt, 0));
        }
    }
    RttMatrix::from_pairs(names, &pairs, (1_000, 0)).expect("generated matrix is valid")
}

/// For each region: is there a node with room that is already in every tree (so a join
/// from a region at least as far must not skip it)?
fn ready_regions(p: &Planner) -> Vec<bool> {
    let mut ready = vec![false; p.rtt().len()];
    for id in p.node_ids() {
        let Some(st) = p.node(id) else { continue };
        if p.viewer_room(id) >= 1 && p.trees().all(|t| t.contains(id)) {
            ready[st.region.index()] = true;
        }
    }
    ready
}

fn run_world(w: World) -> Result<(), TestCaseError> {
    let mut p = Planner::new(w.cfg, build_matrix(&w)).expect("generated config is valid");
    let mut next_node = 0u32;
    for (r, kbps, pps) in &w.nodes {
        p.add_node(NodeSpec {
            id: NodeId(next_node),
            region: RegionId(*r),
            capacity: Load::new(*kbps, *pps),
            egress_micro_usd_per_gb: 0,
        })
        .expect("fresh id");
        next_node += 1;
    }
    let mut next_track = 0u32;
    let mut add_track = |p: &mut Planner, o: usize, k: u64, pps: u64| -> Option<Diff> {
        let ids: Vec<NodeId> = p.node_ids().collect();
        if ids.is_empty() {
            return None;
        }
        let spec = TrackSpec {
            id: TrackId(next_track),
            origin: ids[o % ids.len()],
            relay_load: Load::new(k * 3 / 2, pps * 3 / 2),
            viewer_load: Load::new(k, pps),
        };
        next_track += 1;
        p.add_track(spec).ok()
    };
    for (o, k, pps) in &w.tracks {
        add_track(&mut p, *o, *k, *pps);
    }
    p.check_invariants().map_err(TestCaseError::fail)?;
    let mut joined: Vec<ViewerId> = Vec::new();
    let mut homes: BTreeMap<ViewerId, RegionId> = BTreeMap::new();
    let mut next_viewer = 0u64;
    for op in w.ops {
        let before = p.plan();
        let before_viewers = p.viewer_count();
        let result: Result<Diff, PlannerError> = match op {
            Op::Join(r) => {
                let ready = ready_regions(&p);
                let v = ViewerId(next_viewer);
                next_viewer += 1;
                let res = p.join(v, RegionId(r));
                if res.is_ok() {
                    joined.push(v);
                    homes.insert(v, RegionId(r));
                    // Nearest-first: no strictly nearer region had a ready node.
                    let node = p.viewer_node(v).expect("joined viewer has a node");
                    let got = p.node(node).expect("node exists").region;
                    let got_rtt = p.rtt().rtt_us(RegionId(r), got);
                    for other in p.rtt().regions() {
                        if p.rtt().rtt_us(RegionId(r), other) < got_rtt {
                            prop_assert!(
                                !ready[other.index()],
                                "viewer from r{r} placed in {got:?} but nearer {other:?} had room"
                            );
                        }
                    }
                    for t in p.trees() {
                        prop_assert!(t.contains(node));
                        let path = t.path(node);
                        prop_assert_eq!(path.first().copied(), Some(t.origin()));
                        prop_assert!(path.len() as u32 <= w.cfg.max_depth + 1);
                    }
                }
                res
            }
            Op::Leave(i) if !joined.is_empty() => {
                let v = joined.swap_remove(i % joined.len());
                if p.viewer_node(v).is_some() {
                    p.leave(v)
                } else {
                    Ok(Diff::default())
                }
            }
            Op::Leave(_) => Ok(Diff::default()),
            Op::RemoveNode(i) => {
                let ids: Vec<NodeId> = p.node_ids().collect();
                if ids.is_empty() {
                    Ok(Diff::default())
                } else {
                    let victim = ids[i % ids.len()];
                    let on_victim = p.viewers_on(victim).count();
                    match p.remove_node(victim) {
                        Ok(r) => {
                            // Every viewer is still placed or reported unplaced.
                            prop_assert_eq!(
                                p.viewer_count() + r.unplaced.len(),
                                before_viewers,
                                "viewers lost during removal of {} ({} on it)",
                                victim,
                                on_victim
                            );
                            for (v, _) in &r.unplaced {
                                prop_assert!(p.viewer_node(*v).is_none());
                            }
                            prop_assert!(p.node(victim).is_none());
                            Ok(r.diff)
                        }
                        Err(e) => Err(e),
                    }
                }
            }
            Op::Cordon(i) => {
                let ids: Vec<NodeId> = p.node_ids().collect();
                if ids.is_empty() {
                    Ok(Diff::default())
                } else {
                    let n = ids[i % ids.len()];
                    p.cordon(n).map(|_| {
                        assert_eq!(p.viewer_room(n), 0);
                        Diff::default()
                    })
                }
            }
            Op::Rehome(n) => {
                let before_nodes: BTreeMap<ViewerId, NodeId> = (0..next_viewer)
                    .filter_map(|v| p.viewer_node(ViewerId(v)).map(|n| (ViewerId(v), n)))
                    .collect();
                let d = p.rehome(n);
                let mut moved = 0;
                for a in &d.actions {
                    if let Action::MoveViewer { viewer, from, to } = a {
                        moved += 1;
                        // Strictly nearer to the viewer's home than before.
                        prop_assert_eq!(before_nodes.get(viewer), Some(from));
                        prop_assert_eq!(p.viewer_node(*viewer), Some(*to));
                        let home = homes[viewer];
                        let rf = before.nodes[from].region;
                        let rt = p.node(*to).expect("new edge exists").region;
                        prop_assert!(p.rtt().rtt_us(home, rt) < p.rtt().rtt_us(home, rf));
                    }
                    prop_assert!(
                        !matches!(a, Action::AttachViewer { .. } | Action::DetachViewer { .. }),
                        "rehome only moves viewers"
                    );
                }
                prop_assert!(moved <= n);
                prop_assert_eq!(p.viewer_count(), before_viewers);
                Ok(d)
            }
            Op::Optimize(n, gain) => {
                let d = p.optimize(n, gain);
                let mut moved = 0;
                for a in &d.actions {
                    prop_assert!(
                        matches!(a, Action::Link { .. } | Action::Unlink { .. }),
                        "optimize only re-links and prunes"
                    );
                    if matches!(a, Action::Link { .. }) {
                        moved += 1;
                    }
                }
                prop_assert!(moved <= n);
                // No member's modelled delay grows; only pure relays may leave a tree.
                for (tid, tree) in &before.trees {
                    let now = &p.plan().trees[tid];
                    for (node, hop) in tree {
                        match now.get(node) {
                            Some(h) => prop_assert!(h.path_us <= hop.path_us),
                            None => prop_assert_eq!(before.nodes[node].viewers, 0),
                        }
                    }
                }
                Ok(d)
            }
            Op::AddNode(r, c) => {
                let id = NodeId(next_node);
                next_node += 1;
                p.add_node(NodeSpec {
                    id,
                    region: RegionId(r),
                    capacity: Load::new(c, c / 10),
                    egress_micro_usd_per_gb: 0,
                })
                .map(|_| Diff::default())
            }
            Op::AddTrack(o, k, pps) => Ok(add_track(&mut p, o, k, pps).unwrap_or_default()),
            Op::RemoveTrack(i) => {
                let ids: Vec<TrackId> = p.trees().map(|t| t.spec().id).collect();
                // Keep at least one track so later operations exercise trees.
                if ids.len() <= 1 {
                    Ok(Diff::default())
                } else {
                    p.remove_track(ids[i % ids.len()])
                }
            }
        };
        match result {
            Ok(diff) => assert_make_before_break(&diff),
            Err(_) => {
                prop_assert_eq!(&p.plan(), &before, "a refused operation changed the plan");
            }
        }
        p.check_invariants().map_err(TestCaseError::fail)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(256)
    ))]

    /// Every viewer reachable, no node over capacity, no cycles, depth and degree bounds,
    /// nearest-region placement, make-before-break diffs, atomic refusals — on random
    /// topologies under random joins, leaves, failures, new nodes and track changes.
    #[test]
    fn invariants_hold_on_random_topologies(w in world()) {
        run_world(w)?;
    }
}
