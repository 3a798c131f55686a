//! Configuration: arbitrary YAML plus `ARBOR_*` environment variables, through the same
//! `Config::from_sources` + `validate` the binary runs at start-up.
//!
//! Input layout: the YAML text, then optionally `\0` followed by `NAME=value` lines that become
//! environment variables (names get the `ARBOR_` prefix), so the env-override path is reached too.
#![no_main]
#![allow(dead_code)]
use libfuzzer_sys::fuzz_target;

// The `arbor` package is a binary; compile its modules here as they are.
#[path = "../../src/config.rs"]
mod config;
#[path = "../../src/webhook.rs"]
mod webhook;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (yaml, env) = match text.split_once('\0') {
        Some((y, e)) => (y, e),
        None => (&*text, ""),
    };
    let env: Vec<(String, String)> = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (format!("ARBOR_{k}"), v.to_string()))
        .collect();
    let path = std::path::Path::new("fuzz.yaml");
    if let Ok(cfg) = config::Config::from_sources(Some((yaml, path)), false, env) {
        let _ = cfg.validate();
        let _ = cfg.webhook_key();
    }
});
