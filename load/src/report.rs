//! One row per measured step, printed as a table, written as CSV and plotted as SVG.

use std::io::Write;
use std::path::Path;

use crate::LoadError;

/// What one step of a scenario measured.
#[derive(Debug, Clone, Default)]
pub struct Row {
    /// System under test: `arbor`, `relay`, `janus`.
    pub target: String,
    pub scenario: String,
    /// Step parameter: subscribers (livestream), rooms (conference), churning subscribers.
    pub step: usize,
    pub participants: usize,
    /// Subscribed tracks (one subscriber of video + audio counts 2).
    pub subscriptions: usize,
    /// Server CPU over the measurement window, percent of one core.
    pub server_cpu_pct: f64,
    /// Packets per second the subscribers received (= forwarded and delivered).
    pub fwd_pps: f64,
    /// Server CPU microseconds per forwarded packet.
    pub cpu_us_per_pkt: f64,
    /// Server RSS growth since before the first participant, KiB per subscription.
    pub rss_kib_per_sub: f64,
    pub server_rss_mib: f64,
    /// Packets lost (sequence gaps) / expected, percent.
    pub loss_pct: f64,
    /// Mean RFC 3550 jitter over subscribed tracks, ms.
    pub jitter_ms: f64,
    pub join_p50_ms: f64,
    pub join_p95_ms: f64,
    pub join_failures: u64,
    /// Load generator's own CPU, percent of one core (to show it was not the bottleneck).
    pub client_cpu_pct: f64,
    /// Media time delivered per wall time over the window, percent, averaged over the tracks
    /// that received something (100 = real time). Below 100 the server is falling behind:
    /// it queues what it cannot send, which `loss_pct` (sequence gaps) does not show.
    pub realtime_pct: f64,
}

pub const HEADER: &str = "target,scenario,step,participants,subscriptions,server_cpu_pct,fwd_pps,cpu_us_per_pkt,rss_kib_per_sub,server_rss_mib,loss_pct,jitter_ms,join_p50_ms,join_p95_ms,join_failures,client_cpu_pct,realtime_pct";

impl Row {
    pub fn csv(&self) -> String {
        format!(
            "{},{},{},{},{},{:.1},{:.0},{:.2},{:.1},{:.1},{:.3},{:.2},{:.0},{:.0},{},{:.1},{:.1}",
            self.target,
            self.scenario,
            self.step,
            self.participants,
            self.subscriptions,
            self.server_cpu_pct,
            self.fwd_pps,
            self.cpu_us_per_pkt,
            self.rss_kib_per_sub,
            self.server_rss_mib,
            self.loss_pct,
            self.jitter_ms,
            self.join_p50_ms,
            self.join_p95_ms,
            self.join_failures,
            self.client_cpu_pct,
            self.realtime_pct
        )
    }

    /// Parses a line written by [`Row::csv`].
    pub fn parse(line: &str) -> Option<Self> {
        let f: Vec<&str> = line.trim().split(',').collect();
        // 16 fields: files written before `realtime_pct` existed.
        if f.len() != 16 && f.len() != 17 {
            return None;
        }
        let n = |i: usize| f[i].parse::<f64>().ok();
        Some(Self {
            target: f[0].to_string(),
            scenario: f[1].to_string(),
            step: f[2].parse().ok()?,
            participants: f[3].parse().ok()?,
            subscriptions: f[4].parse().ok()?,
            server_cpu_pct: n(5)?,
            fwd_pps: n(6)?,
            cpu_us_per_pkt: n(7)?,
            rss_kib_per_sub: n(8)?,
            server_rss_mib: n(9)?,
            loss_pct: n(10)?,
            jitter_ms: n(11)?,
            join_p50_ms: n(12)?,
            join_p95_ms: n(13)?,
            join_failures: f[14].parse().ok()?,
            client_cpu_pct: n(15)?,
            realtime_pct: if f.len() == 17 { n(16)? } else { 0.0 },
        })
    }
}

pub fn table_header() -> String {
    format!(
        "{:<7} {:<10} {:>5} {:>5} {:>6} {:>6} {:>8} {:>7} {:>8} {:>7} {:>6} {:>7} {:>7} {:>7} {:>5} {:>6} {:>6}",
        "target", "scenario", "step", "parts", "subs", "cpu%", "fwd/s", "us/pkt", "KiB/sub", "RSS MiB",
        "loss%", "jit ms", "join50", "join95", "fail", "cli%", "rt%"
    )
}

pub fn table_row(r: &Row) -> String {
    format!(
        "{:<7} {:<10} {:>5} {:>5} {:>6} {:>6.1} {:>8.0} {:>7.2} {:>8.1} {:>7.1} {:>6.2} {:>7.2} {:>7.0} {:>7.0} {:>5} {:>6.1} {:>6.1}",
        r.target,
        r.scenario,
        r.step,
        r.participants,
        r.subscriptions,
        r.server_cpu_pct,
        r.fwd_pps,
        r.cpu_us_per_pkt,
        r.rss_kib_per_sub,
        r.server_rss_mib,
        r.loss_pct,
        r.jitter_ms,
        r.join_p50_ms,
        r.join_p95_ms,
        r.join_failures,
        r.client_cpu_pct,
        r.realtime_pct
    )
}

/// Appends rows to `path`, writing the header if the file is new or empty.
pub fn append_csv(path: &Path, rows: &[Row]) -> Result<(), LoadError> {
    let new = std::fs::metadata(path)
        .map(|m| m.len() == 0)
        .unwrap_or(true);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| LoadError::Io(format!("{}: {e}", path.display())))?;
    let mut s = String::new();
    if new {
        s.push_str(HEADER);
        s.push('\n');
    }
    for r in rows {
        s.push_str(&r.csv());
        s.push('\n');
    }
    f.write_all(s.as_bytes())
        .map_err(|e| LoadError::Io(format!("{}: {e}", path.display())))
}

/// Reads every row of a CSV written by [`append_csv`] (bad lines are skipped).
pub fn read_csv(path: &Path) -> Result<Vec<Row>, LoadError> {
    let s = std::fs::read_to_string(path)
        .map_err(|e| LoadError::Io(format!("{}: {e}", path.display())))?;
    Ok(s.lines().skip(1).filter_map(Row::parse).collect())
}

/// Plots CPU µs per forwarded packet against forwarded packets/s, one line per
/// (target, scenario), into an SVG file.
pub fn plot(path: &Path, rows: &[Row]) -> Result<(), LoadError> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| LoadError::Io(format!("plot: {e}"));
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let xmax = rows.iter().map(|r| r.fwd_pps).fold(1.0, f64::max) * 1.05;
    let ymax = rows
        .iter()
        .map(|r| r.cpu_us_per_pkt)
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Server CPU per forwarded packet (lower is better)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("forwarded packets/s (received by subscribers)")
        .y_desc("server CPU µs / packet")
        .draw()
        .map_err(|e| err(&e))?;
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for r in rows {
        let key = format!("{} {}", r.target, r.scenario);
        let pt = (r.fwd_pps, r.cpu_us_per_pkt);
        match series.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(pt),
            None => series.push((key, vec![pt])),
        }
    }
    for (i, (name, pts)) in series.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_round_trip() {
        let r = Row {
            target: "arbor".into(),
            scenario: "livestream".into(),
            step: 50,
            participants: 51,
            subscriptions: 100,
            server_cpu_pct: 12.5,
            fwd_pps: 5500.0,
            cpu_us_per_pkt: 22.75,
            ..Row::default()
        };
        let back = Row::parse(&r.csv()).unwrap();
        assert_eq!(back.step, 50);
        assert_eq!(back.target, "arbor");
        assert!((back.cpu_us_per_pkt - 22.75).abs() < 0.01);
        assert!(Row::parse("garbage").is_none());
    }
}
