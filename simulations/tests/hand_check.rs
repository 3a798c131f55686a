//! The worked check of `docs/capacity-planning.md`, as a test: for the global keynote, the
//! simulator's node counts, egress and per-hop latency equal the hand calculation.

use std::path::Path;

use arbor_simulations::capacity;

fn approx(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

#[test]
fn global_keynote_matches_the_hand_calculation() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/global-keynote.toml");
    let m = capacity::load(&path).expect("scenario");
    let r = capacity::run(&m, 1, |_| {}).expect("run");

    // One viewer: video at the layer mix 0.7*2500 + 0.2*800 + 0.1*200 = 1930 kbit/s,
    // ceil(1930 * 1000 / 8 / 1100) = 220 pkt/s; audio 32 kbit/s, 50 pkt/s.
    assert_eq!((r.per_viewer_kbps, r.per_viewer_pps), (1962, 270));
    // Node: 90 % of 640 000 pkt/s = 576 000; / 270 = 2133 viewers (bandwidth would allow
    // 9 000 000 / 1962 = 4587, so packets/s bind).
    let per_node = 576_000 / 270;
    assert_eq!(per_node, 2133);

    let audience = [30_000u64, 15_000, 20_000, 15_000, 10_000, 10_000];
    let peak = r.peak_plan.as_ref().expect("peak plan");
    let video = &peak.tracks[0];
    let audio = &peak.tracks[1];
    assert!(video.video && !audio.video);
    let last_t = r.series.last().map(|s| s.t_s).expect("series");
    for (i, n) in audience.iter().enumerate() {
        let name = &r.region_names[i];
        // Nodes: the autoscaler keeps ceil(viewers / (2133 * 0.70)) once arrivals stop.
        let want_nodes = (*n as f64 / (per_node as f64 * 0.70)).ceil() as u32;
        let end = r
            .series
            .iter()
            .find(|s| s.t_s == last_t && s.region == i)
            .expect("final row");
        assert_eq!(end.nodes_online, want_nodes, "{name}: nodes");
        // Edges: first-fit packing fills ceil(viewers / 2133) nodes.
        let edges = n.div_ceil(per_node) as u32;
        assert_eq!(
            video.members_per_region[i], edges,
            "{name}: edges in the tree"
        );
        // Egress at steady state: viewers * 1962 kbit/s, plus one relay stream per hop whose
        // parent is here (video 3500 kbit/s = sum of the layers, audio 32 kbit/s).
        let origin_here = u32::from(i == 0);
        let out_trunks: u32 = video
            .trunks
            .iter()
            .filter(|((a, _), _)| usize::from(*a) == i)
            .map(|(_, c)| c)
            .sum();
        let in_trunks: u32 = video
            .trunks
            .iter()
            .filter(|((_, b), _)| usize::from(*b) == i)
            .map(|(_, c)| c)
            .sum();
        let hops = u64::from(edges - origin_here - in_trunks + out_trunks);
        let want_mbps = (n * 1962 + hops * (3500 + 32)) as f64 / 1000.0;
        assert!(
            approx(end.egress_mbps, want_mbps, 1e-6),
            "{name}: egress {} vs hand {want_mbps}",
            end.egress_mbps
        );
        assert_eq!(end.viewers_hosted, *n);
    }
    // Trunks: exactly one cross-region hop from the origin region to each other region.
    assert_eq!(
        video.trunks,
        vec![
            ((0, 1), 1),
            ((0, 2), 1),
            ((0, 3), 1),
            ((0, 4), 1),
            ((0, 5), 1)
        ]
    );
    // Latency per hop = RTT / 2 + 1 ms processing; inside a region the RTT is 1.0 ms.
    // Worst node per region = trunk hop + one intra-region hop (0.5 + 1 ms).
    let rtt_from_us_east = [1.0, 72.2, 80.5, 88.6, 145.3, 229.9];
    for (i, rtt) in rtt_from_us_east.iter().enumerate() {
        let trunk = if i == 0 { 0.0 } else { rtt / 2.0 + 1.0 };
        let want = trunk + 2.0 * 1.5 - if i == 0 { 0.0 } else { 1.5 };
        assert!(
            approx(video.worst_path_ms_per_region[i], want, 1e-9),
            "{}: worst path {} vs {want}",
            r.region_names[i],
            video.worst_path_ms_per_region[i]
        );
    }
    // Total egress over the hour: viewers arrive on a symmetric trapezoid centred on
    // t = 450 s and stay to 3600 s, so each is present 3150 s on average:
    // 100 000 * 1962 kbit/s * 3150 s = 77 253.75 GB, plus relay streams and the sampling
    // step (each arrival counts from the end of its 10 s sample interval: about +0.16 %).
    let total_gb: f64 = r.regions.iter().map(|x| x.egress_gb).sum();
    let viewers_gb = 100_000.0 * 1962.0 * 3150.0 / 8.0 / 1e6;
    assert!(
        total_gb > viewers_gb && total_gb < viewers_gb * 1.004,
        "total {total_gb} GB vs hand {viewers_gb} GB"
    );
}
