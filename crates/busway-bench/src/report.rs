//! The report: JSON results, a Markdown summary, and PNG plots (throughput with ratios,
//! latency CDFs), with the machine, versions and settings.

use std::fmt::Write as _;
use std::path::Path;

use busway::BoxError;
use plotters::prelude::*;
use serde::Serialize;

use crate::measure::median;
use crate::{Run, ScenarioResult, Settings};

/// Where and with what the benchmark ran.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// When (UTC, RFC 3339).
    pub date: String,
    /// CPU model.
    pub cpu: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// Memory (MiB).
    pub memory_mib: u64,
    /// Kernel.
    pub kernel: String,
    /// `rustc --version`.
    pub rustc: String,
    /// busway's version.
    pub busway: String,
    /// librdkafka's version.
    pub librdkafka: String,
    /// Build profile.
    pub profile: String,
}

impl Machine {
    /// Reads what it can about this machine.
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|k| k.parse::<u64>().ok())
            })
            .unwrap_or(0)
            / 1024;
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let rustc = std::process::Command::new("rustc")
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        Self {
            date: chrono::Utc::now().to_rfc3339(),
            cpu,
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            memory_mib,
            kernel,
            rustc,
            busway: env!("CARGO_PKG_VERSION").into(),
            librdkafka: rdkafka::util::get_rdkafka_version().1,
            profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
            .into(),
        }
    }
}

/// Everything a run of the benchmark produced.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The machine.
    pub machine: Machine,
    /// The settings.
    pub settings: Settings,
    /// Each scenario.
    pub scenarios: Vec<ScenarioResult>,
}

fn med(runs: &[&Run], f: impl Fn(&Run) -> f64) -> f64 {
    median(&runs.iter().map(|r| f(r)).collect::<Vec<_>>())
}

/// The Markdown summary.
pub fn markdown(report: &Report) -> String {
    let m = &report.machine;
    let s = &report.settings;
    let mut out = String::new();
    let _ = writeln!(out, "# busway benchmark results\n");
    let _ = writeln!(
        out,
        "{} · {} ({} CPUs, {} MiB) · Linux {} · {} · busway {} · librdkafka {} · {} build\n",
        m.date, m.cpu, m.cpus, m.memory_mib, m.kernel, m.rustc, m.busway, m.librdkafka, m.profile
    );
    let _ = writeln!(
        out,
        "Settings: payload {} B, {} pairs (busway and raw alternate, the first side alternates per pair), window {} publishes in flight, prefetch {}, open-loop latency at {:.0}% of each pair's slower end-to-end rate.\n",
        s.payload,
        s.pairs,
        s.window,
        s.prefetch,
        s.latency_fraction * 100.0
    );
    let _ = writeln!(
        out,
        "| scenario | messages | end-to-end msg/s (busway / raw) | ratio | publish ratio | consume ratio | p50 µs | p99 µs | p99.9 µs | CPU µs/msg | allocs/msg |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in &report.scenarios {
        if let Some(reason) = &r.skipped {
            let _ = writeln!(out, "| {} | not run: {reason} | | | | | | | | | |", r.name);
            continue;
        }
        if r.pairs.is_empty() {
            continue;
        }
        let b: Vec<&Run> = r.pairs.iter().map(|(b, _)| b).collect();
        let w: Vec<&Run> = r.pairs.iter().map(|(_, w)| w).collect();
        let pair = |f: &dyn Fn(&Run) -> f64| format!("{:.0} / {:.0}", med(&b, f), med(&w, f));
        let pair1 = |f: &dyn Fn(&Run) -> f64| format!("{:.1} / {:.1}", med(&b, f), med(&w, f));
        let _ = writeln!(
            out,
            "| {} | {} | {} | **{:.2}** | {:.2} | {:.2} | {} | {} | {} | {} | {} |",
            r.name,
            r.messages,
            pair(&|x| x.end_to_end.rate),
            r.ratio_end_to_end,
            r.ratio_publish,
            r.ratio_consume,
            pair(&|x| x.latency.p50_us),
            pair(&|x| x.latency.p99_us),
            pair(&|x| x.latency.p999_us),
            pair1(&|x| x.end_to_end.cpu_us_per_msg),
            pair1(&|x| x.end_to_end.allocs_per_msg),
        );
    }
    let _ = writeln!(out);
    for r in &report.scenarios {
        if r.name == "mediator" && r.skipped.is_none() {
            let _ = writeln!(
                out,
                "**mediator**: {:.1} ns per dispatch through `Mediator::dispatch` vs {:.1} ns for a direct call through a trait object (medians of {} pairs of {} dispatches).\n",
                r.extra
                    .get("mediator_ns_per_dispatch")
                    .and_then(|v| v.as_f64())
                    .unwrap_or(0.0),
                r.extra
                    .get("direct_ns_per_call")
                    .and_then(|v| v.as_f64())
                    .unwrap_or(0.0),
                report.settings.pairs,
                r.messages
            );
        }
        if r.name == "backlog" && r.skipped.is_none() {
            let _ = writeln!(
                out,
                "**backlog** ({} messages, prefetch {}):\n",
                r.messages, report.settings.prefetch
            );
            let _ = writeln!(
                out,
                "| side | RSS at start MiB | fill msg/s | fill peak RSS MiB | drain msg/s | drain peak RSS MiB |"
            );
            let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
            for (side, v) in &r.extra {
                let _ = writeln!(
                    out,
                    "| {side} | {} | {:.0} | {} | {:.0} | {} |",
                    v["rss_before_kb"].as_u64().unwrap_or(0) / 1024,
                    v["fill"]["rate"].as_f64().unwrap_or(0.0),
                    v["fill_peak_rss_kb"].as_u64().unwrap_or(0) / 1024,
                    v["drain"]["rate"].as_f64().unwrap_or(0.0),
                    v["drain_peak_rss_kb"].as_u64().unwrap_or(0) / 1024
                );
            }
            let _ = writeln!(out);
        }
    }
    let _ = writeln!(out, "## Every pair\n");
    for r in report.scenarios.iter().filter(|r| !r.pairs.is_empty()) {
        let _ = writeln!(out, "**{}**: {}\n", r.name, r.description);
        let _ = writeln!(
            out,
            "| pair | side | end-to-end msg/s | publish msg/s | consume msg/s | p50 µs | p99 µs | p99.9 µs | CPU µs/msg | allocs/msg |"
        );
        let _ = writeln!(out, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (i, (b, w)) in r.pairs.iter().enumerate() {
            for run in [b, w] {
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} |",
                    i + 1,
                    run.side,
                    run.end_to_end.rate,
                    run.publish.rate,
                    run.consume.rate,
                    run.latency.p50_us,
                    run.latency.p99_us,
                    run.latency.p999_us,
                    run.end_to_end.cpu_us_per_msg,
                    run.end_to_end.allocs_per_msg
                );
            }
        }
        let _ = writeln!(out);
    }
    out
}

/// Writes `results.json`, `results.md` and (when fonts are found) the PNG plots into `dir`.
pub fn write(report: &Report, dir: &Path, plots: bool) -> Result<Vec<String>, BoxError> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    let json = dir.join("results.json");
    std::fs::write(&json, serde_json::to_vec_pretty(report)?)?;
    written.push(json.display().to_string());
    let md = dir.join("results.md");
    std::fs::write(&md, markdown(report))?;
    written.push(md.display().to_string());
    if plots {
        if let Err(e) = register_font() {
            eprintln!("no plots: {e}");
            return Ok(written);
        }
        let throughput = dir.join("throughput.png");
        throughput_plot(report, &throughput)?;
        written.push(throughput.display().to_string());
        for r in report.scenarios.iter().filter(|r| !r.pairs.is_empty()) {
            let path = dir.join(format!("latency-{}.png", r.name));
            latency_plot(r, &path)?;
            written.push(path.display().to_string());
        }
    }
    Ok(written)
}

const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

fn register_font() -> Result<(), BoxError> {
    static LOADED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| {
            let bytes = FONTS
                .iter()
                .find_map(|p| std::fs::read(p).ok())
                .ok_or("DejaVuSans.ttf not found (apt-get install fonts-dejavu-core)")?;
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| "the font could not be loaded".to_string())
        })
        .clone()
        .map_err(BoxError::from)
}

fn plot_error<E: std::fmt::Display>(e: E) -> BoxError {
    format!("plotting failed: {e}").into()
}

fn throughput_plot(report: &Report, path: &Path) -> Result<(), BoxError> {
    let rows: Vec<(&ScenarioResult, f64, f64)> = report
        .scenarios
        .iter()
        .filter(|r| !r.pairs.is_empty())
        .map(|r| {
            let b: Vec<&Run> = r.pairs.iter().map(|(b, _)| b).collect();
            let w: Vec<&Run> = r.pairs.iter().map(|(_, w)| w).collect();
            (
                r,
                med(&b, |x| x.end_to_end.rate),
                med(&w, |x| x.end_to_end.rate),
            )
        })
        .collect();
    let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    // Each scenario relative to its raw client (raw = 1.0); absolute rates in the labels.
    let ymax = rows
        .iter()
        .map(|(r, _, _)| r.ratio_end_to_end)
        .fold(1.0, f64::max)
        * 1.3;
    let k = rows.len().max(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "End-to-end throughput relative to the raw client (median ratio of pairs)",
            ("sans-serif", 22),
        )
        .margin(20)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..k, 0f64..ymax)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("busway / raw")
        .y_label_formatter(&|v| format!("{v:.1}"))
        .draw()
        .map_err(plot_error)?;
    let busway_color = RGBColor(31, 119, 180);
    let raw_color = RGBColor(255, 127, 14);
    for (i, (r, b, w)) in rows.iter().enumerate() {
        let x = i as f64;
        chart
            .draw_series([
                Rectangle::new(
                    [(x + 0.12, 0.0), (x + 0.48, r.ratio_end_to_end)],
                    busway_color.filled(),
                ),
                Rectangle::new([(x + 0.52, 0.0), (x + 0.88, 1.0)], raw_color.filled()),
            ])
            .map_err(plot_error)?;
        let top = r.ratio_end_to_end.max(1.0);
        chart
            .draw_series([
                Text::new(
                    format!("{} ×{:.2}", r.name, r.ratio_end_to_end),
                    (x + 0.12, top + ymax * 0.09),
                    ("sans-serif", 17),
                ),
                Text::new(
                    format!("{b:.0} vs {w:.0} msg/s"),
                    (x + 0.12, top + ymax * 0.04),
                    ("sans-serif", 13),
                ),
            ])
            .map_err(plot_error)?;
    }
    chart
        .draw_series([Rectangle::new(
            [(0.0, 0.0), (0.0, 0.0)],
            busway_color.filled(),
        )])
        .map_err(plot_error)?
        .label("busway")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], busway_color.filled()));
    chart
        .draw_series([Rectangle::new([(0.0, 0.0), (0.0, 0.0)], raw_color.filled())])
        .map_err(plot_error)?
        .label("raw client (1.0)")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], raw_color.filled()));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

fn latency_plot(r: &ScenarioResult, path: &Path) -> Result<(), BoxError> {
    // The pair whose busway p99 is the median one.
    let mut order: Vec<usize> = (0..r.pairs.len()).collect();
    order.sort_by(|a, b| {
        r.pairs[*a]
            .0
            .latency
            .p99_us
            .total_cmp(&r.pairs[*b].0.latency.p99_us)
    });
    let (b, w) = &r.pairs[order[order.len() / 2]];
    let all: Vec<f64> = b
        .latency
        .cdf_us
        .iter()
        .chain(&w.latency.cdf_us)
        .copied()
        .filter(|v| *v > 0.0)
        .collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(1.0);
    let hi = all.iter().copied().fold(1.0, f64::max) * 1.2;
    let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{}: latency CDF at {:.0} msg/s (open loop)",
                r.name, b.latency.rate
            ),
            ("sans-serif", 22),
        )
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((lo..hi.max(lo * 2.0)).log_scale(), 0f64..1f64)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("latency (µs, log scale)")
        .y_desc("fraction of messages")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(plot_error)?;
    for (run, color) in [(b, RGBColor(31, 119, 180)), (w, RGBColor(255, 127, 14))] {
        let n = run.latency.cdf_us.len().max(2) - 1;
        let points: Vec<(f64, f64)> = run
            .latency
            .cdf_us
            .iter()
            .enumerate()
            .map(|(i, us)| (us.max(lo), i as f64 / n as f64))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(plot_error)?
            .label(format!("{} (p99 {:.0} µs)", run.side, run.latency.p99_us))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}
