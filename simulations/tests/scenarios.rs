//! Runs every shipped scenario (scaled down where large) with planner invariant checks at
//! every sample, and checks that the same seed gives byte-identical output.

use std::path::{Path, PathBuf};

use arbor_simulations::capacity::{self, engine::Engine, model, plot, Model, Report};

fn scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("scenarios")
        .join(name)
}

fn load(name: &str, scale: f64) -> Model {
    let mut m = capacity::load(&scenario(name)).expect("shipped scenario loads");
    if scale != 1.0 {
        model::scale_audience(&mut m, scale).expect("scale");
    }
    m
}

fn run_checked(m: &Model, seed: u64) -> Report {
    Engine::new(m, seed)
        .expect("engine")
        .with_invariant_checks()
        .run(|_| {})
        .expect("run")
}

fn out_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("arbor-sim-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Everything a run writes: the table, then every file in name order with its bytes.
fn outputs(report: &Report, seed: u64, dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = report.write_csv(dir).expect("csv");
    files.extend(plot::write_plots(report, dir).expect("plots"));
    files.sort();
    let mut out = vec![("table".to_string(), report.table(seed).into_bytes())];
    for f in files {
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
        out.push((
            name.unwrap_or_default(),
            std::fs::read(&f).expect("read back"),
        ));
    }
    let _ = std::fs::remove_dir_all(dir);
    out
}

#[test]
fn same_seed_gives_byte_identical_output() {
    let m = load("global-keynote.toml", 0.05);
    let a = capacity::run(&m, 42, |_| {}).expect("run a");
    let b = capacity::run(&m, 42, |_| {}).expect("run b");
    let (oa, ob) = (
        outputs(&a, 42, &out_dir("a")),
        outputs(&b, 42, &out_dir("b")),
    );
    assert_eq!(oa.len(), 14, "table + 8 CSV + 5 SVG");
    for ((na, ba), (nb, bb)) in oa.iter().zip(&ob) {
        assert_eq!(na, nb);
        assert!(ba == bb, "{na} differs between two runs with the same seed");
    }
    // A different seed changes the sampled arrivals and last miles, hence the series.
    let c = capacity::run(&m, 43, |_| {}).expect("run c");
    let oc = outputs(&c, 43, &out_dir("c"));
    let series = |o: &Vec<(String, Vec<u8>)>| {
        o.iter()
            .find(|(n, _)| n == "timeseries.csv")
            .map(|(_, b)| b.clone())
    };
    assert_ne!(series(&oa), series(&oc));
}

#[test]
fn global_keynote_plans_every_viewer() {
    let m = load("global-keynote.toml", 0.1);
    let r = run_checked(&m, 1);
    assert_eq!(r.viewers_total, 10_000);
    let peak = r.peak_plan.as_ref().expect("peak plan");
    assert_eq!(peak.viewers, 10_000, "every viewer is served at the peak");
    assert!(r.regions.iter().all(|x| x.rejected == 0));
    // One video tree reaching all six regions, one trunk per remote region.
    let video = peak.tracks.iter().find(|t| t.video).expect("video track");
    assert!(video.members_per_region.iter().all(|c| *c > 0));
    assert_eq!(video.trunks.len(), 5);
    assert!(video.max_depth <= 4);
}

#[test]
fn webinar_builds_ten_trees() {
    let m = load("webinar-3-regions.toml", 1.0);
    let r = run_checked(&m, 7);
    let peak = r.peak_plan.as_ref().expect("peak plan");
    assert_eq!(peak.tracks.len(), 10, "5 speakers x (video + audio)");
    // Each video tree has its origin in its speaker's region.
    let origins: Vec<&str> = peak
        .tracks
        .iter()
        .filter(|t| t.video)
        .map(|t| r.region_names[usize::from(t.origin_region)].as_str())
        .collect();
    assert_eq!(
        origins,
        [
            "us-east-1",
            "us-east-1",
            "eu-west-1",
            "eu-west-1",
            "ap-northeast-1"
        ]
    );
    assert_eq!(r.viewers_total, 2_000);
}

#[test]
fn flash_crowd_scales_out_and_brings_viewers_home() {
    let m = load("flash-crowd.toml", 0.2);
    let r = run_checked(&m, 3);
    assert_eq!(r.viewers_total, 10_000);
    let east = &r.regions[0];
    assert!(east.peak_nodes > 2, "the autoscaler added nodes");
    assert!(
        r.regions.iter().map(|x| x.rehomed).sum::<u64>() > 0,
        "viewers that spilled during the crowd were moved home"
    );
    // At the end every viewer is served and none waits.
    let last_t = r.series.last().map(|s| s.t_s).unwrap_or(0.0);
    let end: Vec<_> = r.series.iter().filter(|s| s.t_s == last_t).collect();
    assert_eq!(end.iter().map(|s| s.viewers_hosted).sum::<u64>(), 10_000);
    assert_eq!(end.iter().map(|s| s.pending).sum::<u64>(), 0);
}

#[test]
fn region_outage_reports_every_failure() {
    let m = load("region-outage.toml", 0.25);
    let r = run_checked(&m, 11);
    assert_eq!(r.failures.len(), 4);
    let kinds: Vec<&str> = r.failures.iter().map(|f| f.kind.as_str()).collect();
    assert_eq!(kinds, ["node", "region", "drain", "node"]);
    let outage = &r.failures[1];
    assert!(outage.nodes_lost >= 1);
    assert!(
        outage.viewers_direct > 0,
        "viewers of the dark region moved"
    );
    // Crash recovery is at least the detection timeout; a drain has no media gap.
    assert!(outage.recovery_p50_ms >= 3000.0);
    assert_eq!(r.failures[2].recovery_max_ms, 0.0);
    assert!(
        r.failures[3].origin_moved,
        "losing the origin moves the publisher"
    );
    // During the outage nobody is hosted in eu-west-1.
    let during: Vec<_> = r
        .series
        .iter()
        .filter(|s| s.t_s > 1500.0 && s.t_s < 2400.0 && s.region == 2)
        .collect();
    assert!(!during.is_empty());
    assert!(during
        .iter()
        .all(|s| s.viewers_hosted == 0 && s.nodes_online == 0));
}
