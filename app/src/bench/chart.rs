//! The chart: upsert throughput against batch size, one line per protocol,
//! one panel per run (backend × added latency × dimension), log–log, as SVG.

use std::path::Path;

use plotters::prelude::*;

use super::report::Run;

const PANEL: (u32, u32) = (520, 360);

/// Each protocol's line colour.
const COLORS: [(&str, RGBColor); 6] = [
    ("raw", RGBColor(31, 119, 180)),
    ("raw-overlapped", RGBColor(148, 103, 189)),
    ("naive", RGBColor(214, 39, 40)),
    ("tandem", RGBColor(44, 160, 44)),
    ("raw-insert", RGBColor(127, 127, 127)),
    ("deferred", RGBColor(255, 127, 14)),
];

/// Draws every run's upsert throughput into one SVG file.
pub fn throughput_svg(runs: &[Run], path: &Path) -> Result<(), String> {
    let runs: Vec<&Run> = runs
        .iter()
        .filter(|r| r.cases.iter().any(|c| c.operation == "upsert"))
        .collect();
    if runs.is_empty() {
        return Err("no upsert results to chart".into());
    }
    let mut dims: Vec<usize> = runs.iter().map(|r| r.dim).collect();
    dims.sort_unstable();
    dims.dedup();
    let cols = dims.len().clamp(1, 3);
    let rows = runs.len().div_ceil(cols);
    let size = (PANEL.0 * cols as u32, PANEL.1 * rows as u32);
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let panels = root.split_evenly((rows, cols));
    for (area, run) in panels.iter().zip(&runs) {
        panel(area, run).map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    run: &Run,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let upserts: Vec<_> = run
        .cases
        .iter()
        .filter(|c| c.operation == "upsert")
        .collect();
    let xs = upserts
        .iter()
        .filter_map(|c| c.batch_size)
        .map(|b| b as f64);
    let (xmin, xmax) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let ys = upserts.iter().map(|c| c.throughput).filter(|t| *t > 0.0);
    let (ymin, ymax) = ys.fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
    let (xmin, xmax) = if xmin < xmax {
        (xmin, xmax)
    } else {
        (xmin * 0.5, xmin * 2.0)
    };
    let (ymin, ymax) = if ymin < ymax {
        (ymin, ymax)
    } else {
        (ymin * 0.5, ymin * 2.0)
    };
    let title = if run.backend == "servers" {
        format!(
            "servers, +{} ms one-way, dim {}",
            run.added_latency_ms, run.dim
        )
    } else {
        format!("{}, dim {}", run.backend, run.dim)
    };
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (xmin * 0.8..xmax * 1.25).log_scale(),
            (ymin * 0.5..ymax * 2.0).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("batch size (records)")
        .y_desc("records/s")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    for (proto, color) in COLORS {
        let mut points: Vec<(f64, f64)> = upserts
            .iter()
            .filter(|c| c.protocol == proto)
            .filter_map(|c| {
                c.batch_size
                    .map(|b| (b as f64, c.throughput.max(ymin * 0.5)))
            })
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let style = color.stroke_width(2);
        chart
            .draw_series(LineSeries::new(points.clone(), style))?
            .label(proto)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 4, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::{Case, Pass};

    #[test]
    fn draws_one_line_per_protocol() {
        let mut cases = Vec::new();
        for (proto, base) in [
            ("raw", 1000.0),
            ("raw-overlapped", 1200.0),
            ("naive", 100.0),
            ("tandem", 900.0),
            ("raw-insert", 3000.0),
            ("deferred", 2500.0),
        ] {
            for b in [1usize, 10, 100] {
                let pass = Pass {
                    items: (base * b as f64) as u64,
                    batches: 1,
                    seconds: 1.0,
                    ..Pass::default()
                };
                cases.push(Case::from_passes(
                    "upsert",
                    proto,
                    Some(b),
                    "rec/s",
                    &[pass],
                ));
            }
        }
        let run = Run {
            backend: "embedded",
            metadata_store: "m".into(),
            vector_index: "i".into(),
            added_latency_ms: 0.0,
            measured_round_trip_ms: None,
            dim: 8,
            cases,
            targets: Vec::new(),
            reindex: None,
            consistent_after: true,
            seconds: 1.0,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.svg");
        throughput_svg(&[run], &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..50.min(svg.len())]);
        for label in [
            "raw-overlapped",
            "naive",
            "tandem",
            "raw-insert",
            "deferred",
            "embedded, dim 8",
        ] {
            assert!(svg.contains(label), "{label} missing");
        }
        // Per protocol: its line and its legend mark, and one dot per batch size.
        for (_, RGBColor(r, g, b)) in COLORS {
            let hex = format!("#{r:02X}{g:02X}{b:02X}");
            assert_eq!(
                svg.matches(&format!("stroke=\"{hex}\"")).count(),
                2,
                "{hex}"
            );
            assert_eq!(svg.matches(&format!("fill=\"{hex}\"")).count(), 3, "{hex}");
        }
    }
}
