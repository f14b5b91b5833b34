//! Pictures of measurements (SVG, with plotters): `eval --sweep`'s
//! accuracy against budget, `bench throughput`'s full cache against a
//! method at fixed memory.

use plotters::prelude::*;

use super::eval::Score;

/// Accuracy against budget for one task's runs: one line per method, the
/// full cache as a horizontal line, the budget as a share of the full
/// cache's mean sequence length on the x axis (so every method's point at
/// one budget lines up; without a full-cache run, each run's own length).
pub fn accuracy_svg(task: &str, runs: &[&Score]) -> anyhow::Result<String> {
    let full_length = runs
        .iter()
        .find(|s| s.budget.is_none())
        .map(|s| s.mean_final_length.max(1.0));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let points = |label: &str| -> Vec<(f64, f64)> {
            let mut p: Vec<(f64, f64)> = runs
                .iter()
                .filter(|s| s.kv == label)
                .filter_map(|s| {
                    let share = match full_length {
                        Some(len) => s.budget? as f64 / len,
                        None => s.budget_fraction?,
                    };
                    Some((100.0 * share, s.accuracy))
                })
                .collect();
            p.sort_by(|a, b| a.0.total_cmp(&b.0));
            p
        };
        let mut labels: Vec<&str> = runs
            .iter()
            .filter(|s| s.budget.is_some())
            .map(|s| s.kv.as_str())
            .collect();
        labels.sort();
        labels.dedup();
        let x_max = labels
            .iter()
            .flat_map(|l| points(l))
            .map(|p| p.0)
            .fold(1.0f64, f64::max)
            * 1.05;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{task}: accuracy vs KV budget"), ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..x_max, 0.0..1.02)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc(if full_length.is_some() {
                "budget, % of the full cache's mean sequence length (prompt + generated)"
            } else {
                "budget, % of the mean sequence length (prompt + generated)"
            })
            .y_desc("accuracy (pass@1)")
            .draw()
            .map_err(draw_err)?;
        if let Some(full) = runs.iter().find(|s| s.budget.is_none()) {
            let y = full.accuracy;
            chart
                .draw_series(LineSeries::new(
                    [(0.0, y), (x_max, y)],
                    BLACK.stroke_width(2),
                ))
                .map_err(draw_err)?
                .label(format!("full cache ({y:.2})"))
                .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.stroke_width(2)));
        }
        for (i, label) in labels.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let p = points(label);
            chart
                .draw_series(LineSeries::new(p.clone(), color.stroke_width(2)))
                .map_err(draw_err)?
                .label(*label)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart
                .draw_series(p.into_iter().map(|xy| Circle::new(xy, 3, color.filled())))
                .map_err(draw_err)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::MiddleRight)
            .draw()
            .map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

/// Concurrency and throughput at fixed KV memory, side by side: one bar per
/// run (`(label, max concurrent sequences, tok/s)`) in each of two panels.
pub fn throughput_svg(title: &str, runs: &[(String, f64, f64)]) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let root = root.titled(title, ("sans-serif", 20)).map_err(draw_err)?;
        let panels = root.split_evenly((1, 2));
        for (panel, (what, pick)) in panels.iter().zip([
            ("max concurrent sequences", 0usize),
            ("generated tok/s (all sequences)", 1),
        ]) {
            let value = |r: &(String, f64, f64)| if pick == 0 { r.1 } else { r.2 };
            let top = runs.iter().map(value).fold(1e-9f64, f64::max) * 1.15;
            let n = runs.len().max(1);
            let mut chart = ChartBuilder::on(panel)
                .caption(what, ("sans-serif", 16))
                .margin(14)
                .x_label_area_size(30)
                .y_label_area_size(56)
                .build_cartesian_2d((0..n).into_segmented(), 0.0..top)
                .map_err(draw_err)?;
            let labels: Vec<String> = runs.iter().map(|r| r.0.clone()).collect();
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_label_formatter(&|x| match x {
                    SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
                    _ => String::new(),
                })
                .draw()
                .map_err(draw_err)?;
            chart
                .draw_series(runs.iter().enumerate().map(|(i, r)| {
                    let color = Palette99::pick(i).to_rgba();
                    let mut bar = Rectangle::new(
                        [
                            (SegmentValue::Exact(i), 0.0),
                            (SegmentValue::Exact(i + 1), value(r)),
                        ],
                        color.filled(),
                    );
                    bar.set_margin(0, 0, 12, 12);
                    bar
                }))
                .map_err(draw_err)?;
            chart
                .draw_series(runs.iter().enumerate().map(|(i, r)| {
                    Text::new(
                        format!("{:.1}", value(r)),
                        (SegmentValue::CenterOf(i), value(r) + top * 0.02),
                        ("sans-serif", 13),
                    )
                }))
                .map_err(draw_err)?;
        }
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

fn draw_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {e}")
}
