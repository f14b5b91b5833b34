//! The sweep's accuracy-vs-budget plot (SVG, with plotters): one line per
//! method, the full cache as a horizontal line, the budget as a share of
//! the mean sequence length on the x axis.

use plotters::prelude::*;

use super::Score;

/// The plot of one task's runs, as SVG text.
pub fn accuracy_svg(task: &str, runs: &[&Score]) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let points = |label: &str| -> Vec<(f64, f64)> {
            let mut p: Vec<(f64, f64)> = runs
                .iter()
                .filter(|s| s.kv == label)
                .filter_map(|s| Some((100.0 * s.budget_fraction?, s.accuracy)))
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
            .x_desc("budget, % of the mean sequence length (prompt + generated)")
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
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

fn draw_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {e}")
}
