//! The `arbor-load` binary's offline commands, run as a user would run them.
//!
//! Building this test also makes `cargo test --workspace` produce `target/debug/arbor-load` with
//! the workspace's unified features, which the e2e smoke test (`tests/e2e/test_load_tool.py`)
//! then runs without a second, differently-featured build of the webrtc stack.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_arbor-load");

#[test]
fn report_summarises_the_recorded_benchmark() {
    let csv = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/bench/results.csv");
    let svg = std::env::temp_dir().join(format!("arbor-load-cli-{}.svg", std::process::id()));
    let out = Command::new(BIN)
        .args(["report", "--csv", csv, "--svg"])
        .arg(&svg)
        .output()
        .expect("run arbor-load");
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("relay"),
        "no relay rows in the report:\n{text}"
    );
    let plot = std::fs::read_to_string(&svg).expect("svg written");
    let _ = std::fs::remove_file(&svg);
    assert!(
        plot.starts_with("<svg") || plot.contains("<svg"),
        "not an SVG"
    );
}

#[test]
fn a_missing_csv_is_a_clear_error() {
    let out = Command::new(BIN)
        .args(["report", "--csv", "/nonexistent/arbor-load.csv"])
        .output()
        .expect("run arbor-load");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("arbor-load.csv"),
        "error does not name the file: {err}"
    );
}
