//! One SVG bar chart per metric: the median of each configuration, with its
//! min–max range as an error bar; the baseline in grey.

use std::path::Path;

use plotters::prelude::*;

use crate::{BenchError, Result, results::Metric};

const BAR: RGBColor = RGBColor(0x2b, 0x6c, 0xb0);
const BASELINE_BAR: RGBColor = RGBColor(0x9a, 0x9a, 0x9a);

/// Draws `metric` into `path` (SVG). Metrics without any summary are not drawn.
pub fn draw(metric: &Metric, baseline: &str, path: &Path) -> Result<bool> {
    let bars: Vec<(&str, f64, f64, f64)> = metric
        .series
        .iter()
        .filter_map(|s| {
            let summary = s.summary?;
            Some((
                s.configuration.as_str(),
                summary.median,
                summary.min,
                summary.max,
            ))
        })
        .collect();
    if bars.is_empty() {
        return Ok(false);
    }
    let top = bars.iter().map(|b| b.3).fold(0.0_f64, f64::max).max(1e-9) * 1.15;
    let plot_error =
        |e: &dyn std::fmt::Display| BenchError::Report(format!("{}: {e}", path.display()));

    let root = SVGBackend::new(path, (720, 380)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_error(&e))?;
    let direction = if metric.higher_is_better {
        "higher is better"
    } else {
        "lower is better"
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{} ({direction})", metric.title),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..bars.len() as f64, 0.0..top)
        .map_err(|e| plot_error(&e))?;
    let labels: Vec<String> = bars.iter().map(|b| b.0.to_string()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let centre = x - 0.5;
            let index = centre.round();
            if (centre - index).abs() < 1e-6 && index >= 0.0 {
                labels.get(index as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(metric.unit.as_str())
        .draw()
        .map_err(|e| plot_error(&e))?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (name, median, _, _))| {
            let colour = if *name == baseline { BASELINE_BAR } else { BAR };
            let x = i as f64;
            Rectangle::new([(x + 0.2, 0.0), (x + 0.8, *median)], colour.filled())
        }))
        .map_err(|e| plot_error(&e))?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (_, median, min, max))| {
            ErrorBar::new_vertical(
                i as f64 + 0.5,
                *min,
                *median,
                *max,
                BLACK.stroke_width(2),
                12,
            )
        }))
        .map_err(|e| plot_error(&e))?;
    root.present().map_err(|e| plot_error(&e))?;
    Ok(true)
}
