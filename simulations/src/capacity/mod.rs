//! Capacity-planning simulator for global live events.
//!
//! Operators describe an event in a scenario file ([`scenario::ScenarioFile`], TOML): regions
//! and machine types with prices, the RTT matrix, the bitrate ladder, publishers, viewer
//! arrival curves per region and failure events. [`run`] turns it into a [`report::Report`]:
//! nodes per region over time, egress per region and per inter-region link, cost,
//! glass-to-glass latency percentiles per region, tree depth, join times, and what each
//! failure did.
//!
//! The simulator is seeded and deterministic: the same scenario and seed give byte-identical
//! output. Every placement and tree decision is made by [`arbor_topology::planner::Planner`],
//! the code the relay fabric runs; see [`engine`] for the event loop.

pub mod engine;
pub mod model;
pub mod plot;
pub mod report;
pub mod scenario;

use std::path::Path;

use arbor_topology::planner::PlannerError;
use thiserror::Error;

pub use model::Model;
pub use report::Report;
pub use scenario::ScenarioFile;

/// Errors of the capacity simulator.
#[derive(Debug, Error)]
pub enum SimError {
    /// The scenario (or RTT file) is malformed or inconsistent.
    #[error("scenario: {0}")]
    Scenario(String),
    /// The planner refused an operation the simulator expected to succeed.
    #[error("planner: {0}")]
    Planner(#[from] PlannerError),
    /// A file could not be read or written.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// A plot could not be drawn.
    #[error("plot {0}: {1}")]
    Plot(String, String),
    /// A bookkeeping invariant of the simulator broke (a bug).
    #[error("internal: {0}")]
    Internal(String),
}

/// Reads a scenario file and the RTT file it names (`"world"` = built in).
pub fn load(path: &Path) -> Result<Model, SimError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| SimError::Io(path.display().to_string(), e))?;
    let file = ScenarioFile::parse(&text)?;
    let rtt_text = if file.network.rtt_file == "world" {
        model::WORLD_RTT.to_string()
    } else {
        let p = path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(&file.network.rtt_file);
        std::fs::read_to_string(&p).map_err(|e| SimError::Io(p.display().to_string(), e))?
    };
    Model::build(file, &rtt_text)
}

/// Runs a model with a seed. `progress` receives the simulated time in µs after each sample.
pub fn run(model: &Model, seed: u64, progress: impl FnMut(u64)) -> Result<Report, SimError> {
    engine::Engine::new(model, seed)?.run(progress)
}
