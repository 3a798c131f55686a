//! The relay fabric's I/O glue: the room directory (Raft) and room links (quinn streams) behind
//! the actors' [`Directory`] trait, the acceptor for links peers open to us, and the hand-over
//! of node connections to the media thread (which sends and reads media datagrams itself).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::Addr;
use arbor_actors::fabric::{BoxFuture, Directory, LinkIo, Resolved, LINK_QUEUE};
use arbor_actors::manager::{AcceptLink, RoomManager};
use arbor_actors::media::MediaPlane;
use arbor_proto::relay::encode_link_frame;
use arbor_topology::transport::{read_link_frame, NetHandle};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use arbor_topology::nodes::{Load, NodeId, NodeSpec, RegionId, RttMatrix};
use arbor_topology::planner::{Planner, PlannerConfig, TrackId, TrackSpec, ViewerId};
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::cluster::{ClusterHandle, RegionRtt};

/// Round trip assumed between two different regions that `region_rtt` does not list.
pub const DEFAULT_CROSS_REGION_RTT_MS: u32 = 100;
/// Round trip assumed inside one region.
pub const INTRA_REGION_RTT_MS: u32 = 1;
/// Rooms whose planned tree is remembered for `/cluster/fabric` (oldest forgotten first).
const MAX_PLANNED_ROOMS: usize = 1024;

/// How long opening a room link waits for the QUIC connection to the peer (the room retries,
/// re-resolving the origin, so a dead origin costs little).
const LINK_CONNECT_WAIT: Duration = Duration::from_secs(1);
/// Room links peers opened and not yet handed to a room.
const ACCEPT_QUEUE: usize = 256;
/// How often the media thread is told about new or replaced node connections.
const CONNECTION_SYNC: Duration = Duration::from_millis(200);
/// Longest room name accepted on a link.
const MAX_ROOM_NAME: usize = 256;

/// [`Directory`] over this node's cluster member.
pub struct ClusterDirectory {
    cluster: ClusterHandle,
    net: NetHandle,
    region_rtt: Vec<RegionRtt>,
    /// Per room: the tree last planned here and the parent the room actually linked to.
    rooms: Arc<Mutex<BTreeMap<String, RoomTree>>>,
}

/// What `/cluster/fabric` reports for one room on this node.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RoomTree {
    /// The room's origin when the tree was planned.
    pub origin: u64,
    /// The planner's tree: node → parent (`None` for the origin).
    pub planned: BTreeMap<u64, Option<u64>>,
    /// The node this room's upstream link is open to (`None`: no upstream link now).
    pub upstream: Option<u64>,
}

impl ClusterDirectory {
    pub fn new(cluster: ClusterHandle, net: NetHandle, region_rtt: Vec<RegionRtt>) -> Arc<Self> {
        Arc::new(ClusterDirectory {
            cluster,
            net,
            region_rtt,
            rooms: Arc::new(Mutex::new(BTreeMap::new())),
        })
    }

    fn record(&self, room: &str, f: impl FnOnce(&mut RoomTree)) {
        record(&self.rooms, room, f);
    }

    /// The trees of the rooms this node planned (for `/cluster/fabric`).
    pub fn trees(&self) -> BTreeMap<String, RoomTree> {
        self.rooms.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

fn record(rooms: &Mutex<BTreeMap<String, RoomTree>>, room: &str, f: impl FnOnce(&mut RoomTree)) {
    {
        let Ok(mut rooms) = rooms.lock() else {
            return;
        };
        if !rooms.contains_key(room) && rooms.len() >= MAX_PLANNED_ROOMS {
            if let Some(k) = rooms.keys().next().cloned() {
                rooms.remove(&k);
            }
        }
        f(rooms.entry(room.to_string()).or_default());
    }
}

/// `GET /cluster/fabric`: each room's planned relay tree and this node's actual upstream.
pub fn routes(dir: Arc<ClusterDirectory>) -> Router {
    Router::new()
        .route("/cluster/fabric", get(fabric_handler))
        .with_state(dir)
}

async fn fabric_handler(State(d): State<Arc<ClusterDirectory>>) -> Json<FabricReport> {
    Json(FabricReport {
        node: d.net.node_id(),
        rooms: d.trees(),
    })
}

#[derive(Serialize)]
struct FabricReport {
    node: u64,
    rooms: BTreeMap<String, RoomTree>,
}

/// Plans a room's relay tree with the relay-tree planner (`arbor_topology::planner`): node
/// `(id, region)` pairs from the registry, the origin, and the RTTs between regions. Returns
/// node → parent (`None` for the origin).
///
/// How the fabric maps onto the planner's model: a room link carries every track of the room
/// through the origin (the hub), so the room is planned as **one track rooted at the origin**.
/// Every registry node is planned as serving the room (**one viewer each**, joined in id order
/// from the node's own region): the tree is then a pure function of the registry, so every
/// node computes the same tree without talking to the others, and no node's parent depends on
/// who joined first. Each node gets exactly one viewer slot (capacity = one viewer plus relay
/// head-room for `max_fanout` children), so the viewer joined from a node's region lands on
/// that node (the planner fills a region's lowest id first, and the earlier ones are full).
/// Relay trees are then the planner's greedy choice: latency from the origin plus a
/// cross-region penalty, which builds one trunk per region and fans out inside it.
pub fn plan_tree(
    origin: u64,
    nodes: &[(u64, String)],
    region_rtt: &[RegionRtt],
) -> Result<BTreeMap<u64, Option<u64>>, String> {
    let config = PlannerConfig::default();
    let mut regions: Vec<String> = nodes.iter().map(|(_, r)| r.clone()).collect();
    regions.sort();
    regions.dedup();
    let mut pairs = Vec::new();
    for (i, a) in regions.iter().enumerate() {
        for b in &regions[i + 1..] {
            let ms = region_rtt
                .iter()
                .find(|r| (&r.a == a && &r.b == b) || (&r.a == b && &r.b == a))
                .map_or(DEFAULT_CROSS_REGION_RTT_MS, |r| r.rtt_ms);
            pairs.push((a.clone(), b.clone(), ms.saturating_mul(1000), 0));
        }
    }
    let rtt = RttMatrix::from_pairs(regions.clone(), &pairs, (INTRA_REGION_RTT_MS * 1000, 0))
        .map_err(|e| e.to_string())?;
    let region_of = |name: &str| -> Result<RegionId, String> {
        rtt.region(name)
            .ok_or_else(|| format!("unknown region {name}"))
    };
    let id = |n: u64| {
        u32::try_from(n)
            .map(NodeId)
            .map_err(|_| format!("node id {n} too large for the planner"))
    };
    // One viewer per node: a viewer costs more than half of 90% of the capacity; a relay hop
    // costs little, so `max_fanout` children always fit in the rest.
    let viewer_load = Load::new(600_000, 60_000);
    let relay_load = Load::new(1_000, 100);
    let capacity = Load::new(1_000_000, 100_000);
    let mut p = Planner::new(config, rtt.clone()).map_err(|e| e.to_string())?;
    let mut sorted: Vec<&(u64, String)> = nodes.iter().collect();
    sorted.sort();
    let origin_region = sorted
        .iter()
        .find(|(n, _)| *n == origin)
        .map(|(_, r)| r.clone())
        .ok_or_else(|| format!("origin {origin} is not in the registry"))?;
    let spec = |n: u64, region: RegionId| -> Result<NodeSpec, String> {
        Ok(NodeSpec {
            id: id(n)?,
            region,
            capacity,
            egress_micro_usd_per_gb: 0,
        })
    };
    p.add_node(spec(origin, region_of(&origin_region)?)?)
        .map_err(|e| e.to_string())?;
    p.add_track(TrackSpec {
        id: TrackId(0),
        origin: id(origin)?,
        relay_load,
        viewer_load,
    })
    .map_err(|e| e.to_string())?;
    let mut next = 0u64;
    let mut join = |p: &mut Planner, region: RegionId| -> Result<(), String> {
        p.join(ViewerId(next), region).map_err(|e| e.to_string())?;
        next += 1;
        Ok(())
    };
    join(&mut p, region_of(&origin_region)?)?;
    for (n, region) in sorted {
        if *n == origin {
            continue;
        }
        let r = region_of(region)?;
        p.add_node(spec(*n, r)?).map_err(|e| e.to_string())?;
        join(&mut p, r)?;
    }
    let tree = p.tree(TrackId(0)).ok_or("the planner lost the track")?;
    Ok(tree
        .members()
        .map(|(n, m)| (u64::from(n.0), m.parent.map(|p| u64::from(p.0))))
        .collect())
}

impl Directory for ClusterDirectory {
    fn node_id(&self) -> u64 {
        self.net.node_id()
    }

    fn resolve(&self, room: String) -> BoxFuture<Result<Resolved, String>> {
        let c = self.cluster.clone();
        let resolved = |r: &crate::cluster::RoomEntry| Resolved {
            origin: r.origin_node,
            sid: r.sid.clone(),
            created_ms: r.created_ms,
        };
        Box::pin(async move {
            // The applied state usually knows the room; only new rooms cost a Raft write.
            let known = c.list_rooms().await.map_err(|e| e.to_string())?;
            if let Some(r) = known.iter().find(|r| r.name == room) {
                return Ok(resolved(r));
            }
            let (r, _) = c
                .create_room_with(&room, None)
                .await
                .map_err(|e| e.to_string())?;
            Ok(resolved(&r))
        })
    }

    fn parent(&self, room: String, origin: u64) -> BoxFuture<Result<u64, String>> {
        let c = self.cluster.clone();
        let me = self.net.node_id();
        let net = self.net.clone();
        let rtts = self.region_rtt.clone();
        let rooms = self.rooms.clone();
        Box::pin(async move {
            let status = c.status().await.map_err(|e| e.to_string())?;
            // Liveness: a member whose QUIC connection to us is down (closed by the idle
            // timeout, `link_idle_timeout_ms`, or never established) is left out of the plan,
            // so a child of a dead relay gets a live parent. The registry itself keeps a dead
            // node until it is removed, and its heartbeat goes stale only after `node_ttl_ms`;
            // the connection knows sooner. The origin stays in (it comes from the lease, which
            // the directory moves when the origin dies).
            let nodes: Vec<(u64, String)> = status
                .members
                .iter()
                .filter(|m| !m.quic_addr.is_empty())
                .filter(|m| m.id == me || m.id == origin || net.connection(m.id).is_some())
                .map(|m| (m.id, m.region.clone()))
                .collect();
            let planned = plan_tree(origin, &nodes, &rtts)?;
            let parent = planned.get(&me).copied().flatten().unwrap_or(origin);
            record(&rooms, &room, |t| {
                t.origin = origin;
                t.planned = planned;
            });
            Ok(parent)
        })
    }

    fn upstream(&self, room: &str, peer: Option<u64>) {
        self.record(room, |t| t.upstream = peer);
    }

    fn open_link(&self, peer: u64, room: String) -> BoxFuture<Result<LinkIo, String>> {
        let net = self.net.clone();
        Box::pin(async move {
            let (send, recv) = net
                .open_link(peer, &room, LINK_CONNECT_WAIT)
                .await
                .map_err(|e| e.to_string())?;
            Ok(bridge(peer, send, recv))
        })
    }
}

/// Turns a link stream into two bounded queues (see [`LinkIo`]): a writer task encodes what
/// the room sends, a reader task decodes what the peer sends (back-pressure: a slow room
/// stalls the reader, and QUIC flow control the peer). Either end closing ends both.
fn bridge(peer: u64, mut send: quinn::SendStream, mut recv: quinn::RecvStream) -> LinkIo {
    let (to_net, mut to_net_rx) = mpsc::channel(LINK_QUEUE);
    let (from_net_tx, from_net) = mpsc::channel(LINK_QUEUE);
    tokio::spawn(async move {
        while let Some(m) = to_net_rx.recv().await {
            let Ok(bytes) = encode_link_frame(m) else {
                tracing::warn!(peer, "room link frame too large; dropped");
                continue;
            };
            if send.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = send.shutdown().await;
    });
    tokio::spawn(async move {
        loop {
            match read_link_frame(&mut recv).await {
                Ok(Some(m)) => {
                    if from_net_tx.send(m).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(peer, error = %e, "room link closed");
                    break;
                }
            }
        }
        let _ = recv.stop(0u32.into());
    });
    LinkIo {
        tx: to_net,
        rx: from_net,
    }
}

/// Starts the fabric's background tasks: accepting room links, and keeping the media thread's
/// set of node connections current.
pub fn start(net: NetHandle, manager: Addr<RoomManager>, media: MediaPlane) {
    let mut inbound = net.accept_links(ACCEPT_QUEUE);
    tokio::spawn(async move {
        while let Some(l) = inbound.recv().await {
            if l.hello.room.is_empty() || l.hello.room.len() > MAX_ROOM_NAME {
                tracing::warn!(peer = l.peer, "room link with a bad room name; dropped");
                continue;
            }
            let io = bridge(l.peer, l.send, l.recv);
            manager.do_send(AcceptLink {
                room: l.hello.room,
                peer: l.peer,
                io,
            });
        }
    });
    tokio::spawn(async move {
        let mut known: std::collections::BTreeMap<u64, usize> = Default::default();
        let mut tick = tokio::time::interval(CONNECTION_SYNC);
        loop {
            tick.tick().await;
            for (node, conn) in net.connections() {
                if known.get(&node) == Some(&conn.stable_id()) {
                    continue;
                }
                let id = conn.stable_id();
                if media.relay_connection(node, &conn).is_ok() {
                    known.insert(node, id);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtt(a: &str, b: &str, ms: u32) -> RegionRtt {
        RegionRtt {
            a: a.into(),
            b: b.into(),
            rtt_ms: ms,
        }
    }

    fn nodes(list: &[(u64, &str)]) -> Vec<(u64, String)> {
        list.iter().map(|(n, r)| (*n, r.to_string())).collect()
    }

    /// The topology of `tests/e2e/test_fabric.py::test_planner_tree_five_nodes`: the origin in
    /// `a`, one node each in `b` and `c`, two in the far region `d`. The planner makes the
    /// lower-id far node the region's trunk and hangs the other one below it.
    #[test]
    fn far_region_gets_one_trunk() {
        let rtts = [
            rtt("a", "b", 40),
            rtt("a", "c", 40),
            rtt("a", "d", 120),
            rtt("b", "c", 80),
            rtt("b", "d", 120),
            rtt("c", "d", 120),
        ];
        let n = nodes(&[(1, "a"), (2, "b"), (3, "c"), (4, "d"), (5, "d")]);
        let tree = plan_tree(1, &n, &rtts).expect("plan");
        let want: BTreeMap<u64, Option<u64>> = [
            (1, None),
            (2, Some(1)),
            (3, Some(1)),
            (4, Some(1)),
            (5, Some(4)),
        ]
        .into_iter()
        .collect();
        assert_eq!(tree, want);
        // The origin moves to 5 (say after 1 died): 4 now hangs below 5, the rest below 5 too.
        let tree = plan_tree(5, &n, &rtts).expect("plan");
        assert_eq!(tree.get(&5), Some(&None));
        assert_eq!(tree.get(&4), Some(&Some(5)));
    }

    /// The topology of `tests/e2e/test_fabric.py::test_relay_death_children_reparent`: origin
    /// 1 in `a`, relay 2 and edge 3 in the far region `d`, node 4 in `b`. Node 3 hangs below
    /// node 2; with node 2 dead (left out of the plan, as `parent` does for members whose
    /// connection is down) node 3 becomes region d's trunk below the origin.
    #[test]
    fn dead_relay_is_planned_around() {
        let rtts = [rtt("a", "d", 120), rtt("a", "b", 40), rtt("b", "d", 120)];
        let all = nodes(&[(1, "a"), (2, "d"), (3, "d"), (4, "b")]);
        let tree = plan_tree(1, &all, &rtts).expect("plan");
        let want: BTreeMap<u64, Option<u64>> =
            [(1, None), (2, Some(1)), (3, Some(2)), (4, Some(1))]
                .into_iter()
                .collect();
        assert_eq!(tree, want);
        let live = nodes(&[(1, "a"), (3, "d"), (4, "b")]);
        let tree = plan_tree(1, &live, &rtts).expect("plan");
        assert_eq!(tree.get(&3), Some(&Some(1)));
        assert!(!tree.contains_key(&2));
    }

    /// Nodes join the plan in id order and attach below members already in it, so every
    /// parent is the origin or a node with a lower id. Two nodes that momentarily disagree
    /// about who is alive therefore still never link in a cycle: along any chain of upstream
    /// links the ids fall until the origin, which links nowhere.
    #[test]
    fn parents_have_lower_ids_or_are_the_origin() {
        let regions = ["a", "b", "c", "d"];
        let rtts = [
            rtt("a", "b", 40),
            rtt("a", "c", 90),
            rtt("a", "d", 150),
            rtt("b", "c", 60),
            rtt("b", "d", 120),
            rtt("c", "d", 30),
        ];
        // A small seeded generator (no dependency needed): xorshift64.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..300 {
            let n = 2 + (next() % 12) as usize;
            let mut list = Vec::new();
            let mut id = 0u64;
            for _ in 0..n {
                id += 1 + next() % 3;
                list.push((id, regions[(next() % 4) as usize].to_string()));
            }
            let origin = list[(next() % n as u64) as usize].0;
            let tree = plan_tree(origin, &list, &rtts).expect("plan");
            assert_eq!(tree.len(), n, "every node is planned");
            for (node, parent) in &tree {
                match parent {
                    None => assert_eq!(*node, origin),
                    Some(p) => assert!(*p == origin || p < node, "{node} below {p}: {tree:?}"),
                }
            }
        }
    }

    /// One region: everybody links straight to the origin (the star the fabric had before).
    #[test]
    fn one_region_is_a_star() {
        let n = nodes(&[(1, "x"), (2, "x"), (3, "x"), (7, "x")]);
        let tree = plan_tree(2, &n, &[]).expect("plan");
        let want: BTreeMap<u64, Option<u64>> =
            [(1, Some(2)), (2, None), (3, Some(2)), (7, Some(2))]
                .into_iter()
                .collect();
        assert_eq!(tree, want);
    }

    /// Unlisted region pairs use the default RTT; a missing origin or an id the planner cannot
    /// hold is an error, not a panic.
    #[test]
    fn bad_inputs_are_errors() {
        let n = nodes(&[(1, "a"), (2, "b")]);
        let tree = plan_tree(1, &n, &[]).expect("default rtt");
        assert_eq!(tree.get(&2), Some(&Some(1)));
        assert!(plan_tree(9, &n, &[]).is_err());
        let big = nodes(&[(1, "a"), (u64::from(u32::MAX) + 1, "a")]);
        assert!(plan_tree(1, &big, &[]).is_err());
    }
}
