//! A migration's timeline as a PNG (plotters, the bundled DejaVu Sans: no system fonts):
//! from the report `pagewise migrate --json` prints, panels over one time axis (seconds
//! since the start) with the pause and the resumption marked: bytes/s on the link, pages/s
//! sent by kind, pages/s the guest dirtied, demand faults/s, and the destination's fault
//! latency (p50/p99 of each 200 ms interval).

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("the report has no timeline (a report of pagewise migrate --json is needed)")]
    NoTimeline,
    #[error("drawing {path}: {why}")]
    Draw { path: String, why: String },
}

/// One named line.
struct Line {
    name: &'static str,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

/// Per-second rates of the counter `key` between consecutive samples.
fn rate(samples: &[Value], t0: f64, key: &str, scale: f64) -> Vec<(f64, f64)> {
    samples
        .windows(2)
        .filter_map(|w| {
            let (t1, t2) = (num(&w[0], "at_ms")?, num(&w[1], "at_ms")?);
            let dt = (t2 - t1) / 1e3;
            let dv = num(&w[1], key)? - num(&w[0], key)?;
            (dt > 0.0).then(|| ((t2 - t0) / 1e3, (dv.max(0.0) / dt) * scale))
        })
        .collect()
}

fn level(samples: &[Value], t0: f64, key: &str) -> Vec<(f64, f64)> {
    samples
        .iter()
        .filter_map(|s| Some(((num(s, "at_ms")? - t0) / 1e3, num(s, key)?)))
        .collect()
}

fn font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bundled font is valid TrueType; a failure leaves text undrawn, not the plot.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

/// Draw the timeline of `report` into `path` (PNG), titled `title`.
pub fn migration_timeline(report: &Value, path: &Path, title: &str) -> Result<(), PlotError> {
    let src = report["timeline"].as_array().filter(|t| t.len() >= 2);
    let src = src.ok_or(PlotError::NoTimeline)?;
    let t0 = num(report, "started_at_ms")
        .or_else(|| num(&src[0], "at_ms"))
        .unwrap_or(0.0);
    let empty = Vec::new();
    let dst = report["destination"]["timeline"]
        .as_array()
        .unwrap_or(&empty);
    let marks: Vec<(f64, &str)> = [
        ("paused_at_ms", "paused"),
        ("resumed_at_ms", "running there"),
    ]
    .iter()
    .filter_map(|(k, name)| Some(((num(report, k)? - t0) / 1e3, *name)))
    .collect();
    let panels: Vec<(&str, Vec<Line>)> = vec![
        (
            "link (MB/s)",
            vec![Line {
                name: "sent",
                color: BLUE,
                points: rate(src, t0, "bytes", 1e-6),
            }],
        ),
        (
            "pages sent (pages/s)",
            vec![
                Line {
                    name: "data",
                    color: BLUE,
                    points: rate(src, t0, "data_pages", 1.0),
                },
                Line {
                    name: "zero",
                    color: GREEN,
                    points: rate(src, t0, "zero_pages", 1.0),
                },
                Line {
                    name: "in the shared device (not sent)",
                    color: MAGENTA,
                    points: rate(src, t0, "stored_pages", 1.0),
                },
            ],
        ),
        (
            "guest writes (pages dirtied/s)",
            vec![Line {
                name: "dirtied",
                color: RED,
                points: rate(src, t0, "dirtied_pages", 1.0),
            }],
        ),
        (
            "demand faults (/s)",
            vec![
                Line {
                    name: "destination faults to the source",
                    color: RED,
                    points: rate(dst, t0, "demand_faults", 1.0),
                },
                Line {
                    name: "source requests answered",
                    color: BLUE,
                    points: rate(src, t0, "demand_requests", 1.0),
                },
            ],
        ),
        (
            "destination fault latency (us)",
            vec![
                Line {
                    name: "p50",
                    color: BLUE,
                    points: level(dst, t0, "p50_us"),
                },
                Line {
                    name: "p99",
                    color: RED,
                    points: level(dst, t0, "p99_us"),
                },
            ],
        ),
    ];
    let t_max = panels
        .iter()
        .flat_map(|(_, lines)| lines.iter().flat_map(|l| l.points.iter().map(|p| p.0)))
        .chain(marks.iter().map(|m| m.0))
        .fold(1.0f64, f64::max);
    draw(path, title, &panels, &marks, t_max).map_err(|why| PlotError::Draw {
        path: path.display().to_string(),
        why,
    })
}

fn draw(
    path: &Path,
    title: &str,
    panels: &[(&str, Vec<Line>)],
    marks: &[(f64, &str)],
    t_max: f64,
) -> Result<(), String> {
    font();
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let root = BitMapBackend::new(path, (1200, 260 * panels.len() as u32 + 50)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let (head, body) = root.split_vertically(50);
    head.draw_text(
        title,
        &("sans-serif", 20).into_font().color(&BLACK),
        (20, 15),
    )
    .map_err(|x| e(&x))?;
    for (area, (name, lines)) in body.split_evenly((panels.len(), 1)).iter().zip(panels) {
        let y_max = lines
            .iter()
            .flat_map(|l| l.points.iter().map(|p| p.1))
            .fold(1.0f64, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(area)
            .margin(8)
            .caption(*name, ("sans-serif", 16))
            .x_label_area_size(28)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..t_max, 0f64..y_max)
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_desc("seconds since the start")
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(|x| e(&x))?;
        for l in lines {
            let color = l.color;
            chart
                .draw_series(LineSeries::new(
                    l.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|x| e(&x))?
                .label(l.name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
        }
        for &(t, mark) in marks {
            chart
                .draw_series(LineSeries::new(
                    [(t, 0.0), (t, y_max)],
                    BLACK.stroke_width(1),
                ))
                .map_err(|x| e(&x))?
                .label(mark)
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK));
        }
        chart
            .configure_series_labels()
            .label_font(("sans-serif", 12))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn draws_a_png_of_a_report_and_refuses_one_without_a_timeline() {
        let samples: Vec<Value> = (0..20u64)
            .map(|i| {
                json!({"at_ms": 1000 + i * 200, "bytes": i * i * 100_000, "data_pages": i * 50,
                       "zero_pages": i * 10, "stored_pages": 0, "dirtied_pages": i * 7,
                       "demand_requests": i.saturating_sub(10) * 3})
            })
            .collect();
        let dest: Vec<Value> = (10..20u64)
            .map(|i| json!({"at_ms": 1000 + i * 200, "demand_faults": i * 3, "p50_us": 120, "p99_us": 900}))
            .collect();
        let report = json!({"started_at_ms": 1000, "paused_at_ms": 2900, "resumed_at_ms": 3000,
                            "timeline": samples, "destination": {"timeline": dest}});
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("t.png");
        migration_timeline(&report, &png, "test").unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(bytes.len() > 10_000, "{} bytes", bytes.len());
        assert!(matches!(
            migration_timeline(&json!({"status": "completed"}), &png, "x"),
            Err(PlotError::NoTimeline)
        ));
    }
}
