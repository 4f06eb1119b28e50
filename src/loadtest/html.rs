//! `--html FILE.html`: the report as one self-contained page (inline SVG plots drawn with
//! plotters, no script, no network): the line and the sessions held, arrivals and admissions
//! per second against plan and configuration, latency over time, and the figures in tables.

use anyhow::Context;
use minijinja::{context, Environment};
use plotters::prelude::*;

use super::report::{Report, Second};

const TEMPLATE: &str = include_str!("report.html");

/// A plotted series: name, colour, a value per second (gaps where there is none).
type Series<'a> = (&'a str, RGBColor, Vec<Option<f64>>);

/// Render the page.
pub fn render(report: &Report, title: &str) -> anyhow::Result<String> {
    let rows = &report.timeline;
    let column = |f: &dyn Fn(&Second) -> Option<f64>| rows.iter().map(f).collect::<Vec<_>>();
    let flat = |value: f64| vec![Some(value); rows.len()];
    let mut line = vec![
        ("waiting in line", BLUE, column(&|r| Some(r.waiting as f64))),
        ("admitted sessions", GREEN, column(&|r| Some(r.sessions as f64))),
    ];
    let mut flow = vec![
        ("planned arrivals", RGBColor(150, 150, 150), column(&|r| Some(r.planned_rate))),
        ("arrivals", BLUE, column(&|r| Some(r.arrivals as f64))),
        ("admissions", GREEN, column(&|r| Some(r.admissions as f64))),
        ("errors", RED, column(&|r| Some(r.errors as f64))),
    ];
    if let Some(room) = report.configured {
        line.push(("max_active", RED, flat(room.max_active.into())));
        flow.push(("configured admissions", RGBColor(0, 100, 0), flat(room.admit_per_minute as f64 / 60.0)));
    }
    let latency = vec![
        ("join p50", BLUE, column(&|r| r.join_p50_ms)),
        ("join p99", RGBColor(120, 0, 200), column(&|r| r.join_p99_ms)),
        ("forwarded p99", GREEN, column(&|r| r.forwarded_p99_ms)),
    ];
    let plots = [
        plot("Line length and admitted sessions", "visitors", &line)?,
        plot("Arrivals and admissions per second", "per second", &flow)?,
        plot("Latency by second", "ms", &latency)?,
    ];
    let mut environment = Environment::new();
    environment.add_template("report.html", TEMPLATE)?;
    let page = environment
        .get_template("report.html")?
        .render(context! { title, report => minijinja::value::Serde(report), plots })?;
    Ok(page)
}

/// Write the page.
pub fn write(report: &Report, title: &str, path: &std::path::Path) -> anyhow::Result<()> {
    std::fs::write(path, render(report, title)?).with_context(|| format!("cannot write {}", path.display()))
}

/// One chart as SVG text.
fn plot(title: &str, unit: &str, series: &[Series<'_>]) -> anyhow::Result<String> {
    let seconds = series.first().map_or(0, |s| s.2.len()).max(1) as f64;
    let top = series.iter().flat_map(|s| s.2.iter().flatten()).fold(0.0f64, |a, &b| a.max(b));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 320)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..seconds, 0f64..(top * 1.1).max(1.0))?;
        chart.configure_mesh().x_desc("seconds").y_desc(unit).light_line_style(WHITE).draw()?;
        for (name, color, values) in series {
            let color = *color;
            // A gap (a second with no value) breaks the line: draw each run on its own.
            let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
            for (second, value) in values.iter().enumerate() {
                match value {
                    Some(v) => runs.last_mut().expect("a run").push((second as f64 + 0.5, *v)),
                    None if runs.last().is_some_and(|r| !r.is_empty()) => runs.push(Vec::new()),
                    None => {}
                }
            }
            let mut drawn = None;
            for run in runs.into_iter().filter(|r| !r.is_empty()) {
                drawn = Some(chart.draw_series(LineSeries::new(run, color.stroke_width(2)))?);
            }
            if let Some(drawn) = drawn {
                drawn
                    .label(*name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}
