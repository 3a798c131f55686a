//! `arbor-sim`: capacity planning for global live events.
//!
//! ```text
//! arbor-sim scenarios/global-keynote.toml [--seed N] [--out DIR] [--scale F]
//! ```
//!
//! Prints the plan and a summary table on stdout, writes CSV files and SVG plots into the
//! output directory (default `sim-out/`). A progress bar is drawn on stderr only when stderr
//! is a terminal, so redirected runs produce byte-identical output for the same seed.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use arbor_simulations::capacity;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser, Debug)]
#[command(
    name = "arbor-sim",
    version,
    about = "Relay-tree capacity planner and simulator"
)]
struct Args {
    /// Scenario file (TOML).
    scenario: PathBuf,
    /// Random seed (default: the scenario's `seed`).
    #[arg(long)]
    seed: Option<u64>,
    /// Output directory for CSV files and plots.
    #[arg(long, default_value = "sim-out")]
    out: PathBuf,
    /// Multiply every audience's viewer count by this factor (e.g. 10 for a 1M variant of
    /// a 100k scenario, 0.01 for a quick check).
    #[arg(long)]
    scale: Option<f64>,
    /// Skip the SVG plots.
    #[arg(long)]
    no_plots: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut model = capacity::load(&args.scenario)
        .with_context(|| format!("loading {}", args.scenario.display()))?;
    if let Some(f) = args.scale {
        capacity::model::scale_audience(&mut model, f)?;
    }
    let seed = args.seed.unwrap_or(model.file.seed);
    let bar = if std::io::stderr().is_terminal() {
        let b = ProgressBar::new(model.duration_us / 1_000_000);
        b.set_style(
            ProgressStyle::with_template("{spinner} simulated {pos}/{len} s [{bar:40}] {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let report = capacity::run(&model, seed, |now_us| bar.set_position(now_us / 1_000_000))?;
    bar.finish_and_clear();
    print!("{}", report.table(seed));
    let mut files = report.write_csv(&args.out)?;
    if !args.no_plots {
        files.extend(capacity::plot::write_plots(&report, &args.out)?);
    }
    println!("\nWrote:");
    for f in files {
        println!("  {}", f.display());
    }
    Ok(())
}
