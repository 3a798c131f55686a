//! SVG plots of the time series (plotters, SVG backend only: no font files, no bitmaps).

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::report::{Report, SeriesRow};
use super::SimError;

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

type Series = (String, Vec<(f64, f64)>);

fn per_region(report: &Report, value: impl Fn(&SeriesRow) -> f64) -> Vec<Series> {
    report
        .region_names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let pts = report
                .series
                .iter()
                .filter(|r| r.region == i)
                .map(|r| (r.t_s, value(r)))
                .collect();
            (name.clone(), pts)
        })
        .collect()
}

fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<(), SimError> {
    let err = |e: String| SimError::Plot(path.display().to_string(), e);
    let x_max = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let y_max = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    let y_max = if y_max <= 0.0 { 1.0 } else { y_max * 1.08 };
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// Writes `nodes.svg`, `viewers.svg`, `egress.svg`, `latency_p95.svg` (over time, per
/// region) and `join_times.svg` (join time by percentile, per region) into `dir`.
pub fn write_plots(report: &Report, dir: &Path) -> Result<Vec<PathBuf>, SimError> {
    std::fs::create_dir_all(dir).map_err(|e| SimError::Io(dir.display().to_string(), e))?;
    let charts: [(&str, &str, &str, Vec<Series>); 4] = [
        (
            "nodes.svg",
            "Media nodes per region (online + booting)",
            "nodes",
            per_region(report, |r| f64::from(r.nodes_online + r.nodes_booting)),
        ),
        (
            "viewers.svg",
            "Viewers served per region",
            "viewers",
            per_region(report, |r| r.viewers_hosted as f64),
        ),
        (
            "egress.svg",
            "Egress per region",
            "Gbit/s",
            per_region(report, |r| r.egress_mbps / 1000.0),
        ),
        (
            "latency_p95.svg",
            "Glass-to-glass latency p95 by viewer home region",
            "ms",
            per_region(report, |r| r.lat_p95_ms),
        ),
    ];
    let mut out = Vec::new();
    for (file, title, y, series) in charts {
        let p = dir.join(file);
        line_chart(&p, title, "time (s)", y, &series)?;
        out.push(p);
    }
    let joins: Vec<Series> = report
        .regions
        .iter()
        .map(|r| {
            let pts = r
                .join_cdf
                .iter()
                .enumerate()
                .map(|(i, ms)| ((i + 1) as f64, *ms))
                .collect();
            (r.name.clone(), pts)
        })
        .collect();
    let p = dir.join("join_times.svg");
    line_chart(&p, "Join time by percentile", "percentile", "ms", &joins)?;
    out.push(p);
    Ok(out)
}
