//! `backlog`: peak resident memory of the process while a large backlog (default 1,000,000
//! messages) fills a RabbitMQ queue and drains, busway vs raw lapin. What bounds memory on
//! the consuming side should be the prefetch, not the backlog.
//!
//! Each side runs in a child process of its own (`busway-bench backlog-side <side>`), so the
//! memory an earlier scenario left with the allocator does not count against either side.

use busway::BoxError;

use crate::measure::{Phase, measure, peak_rss_kb, reset_peak_rss, rss_kb};
use crate::scenarios::rabbitmq::RabbitScenario;
use crate::{Scenario, ScenarioResult, Settings, Side};

async fn one(side: Box<dyn Side>, n: usize) -> Result<serde_json::Value, BoxError> {
    let mut side = side;
    let base = rss_kb();
    reset_peak_rss();
    let (fill, ()) = measure(n, side.publish(n)).await?;
    let fill_peak = peak_rss_kb();
    reset_peak_rss();
    let drain_base = rss_kb();
    let (mut drain, active) = measure(n, side.consume(n)).await?;
    drain.set_active(active);
    let drain_peak = peak_rss_kb();
    side.cleanup().await;
    let json = |p: &Phase| serde_json::to_value(p).unwrap_or_default();
    Ok(serde_json::json!({
        "rss_before_kb": base,
        "fill": json(&fill),
        "fill_peak_rss_kb": fill_peak,
        "drain": json(&drain),
        "drain_start_rss_kb": drain_base,
        "drain_peak_rss_kb": drain_peak,
    }))
}

/// The sides, in the order they run.
pub const SIDES: [&str; 2] = ["busway", "lapin"];

/// Runs one side in this process (the child's half): fills and drains the backlog once and
/// returns the measurements.
pub async fn run_side(settings: &Settings, label: &str) -> Result<serde_json::Value, BoxError> {
    let scenario = RabbitScenario::from_env();
    scenario.available().await?;
    let side = match label {
        "busway" => scenario.busway(settings).await?,
        "lapin" => scenario.raw(settings).await?,
        other => return Err(format!("unknown backlog side `{other}`").into()),
    };
    one(side, settings.backlog).await
}

/// Runs one side in a fresh child process and reads its JSON from the child's stdout.
async fn run_child(settings: &Settings, label: &str) -> Result<serde_json::Value, BoxError> {
    let exe = std::env::current_exe()?;
    let output = tokio::process::Command::new(exe)
        .arg("backlog-side")
        .arg(label)
        .args(["--backlog", &settings.backlog.to_string()])
        .args(["--prefetch", &settings.prefetch.to_string()])
        .args(["--payload", &settings.payload.to_string()])
        .args(["--window", &settings.window.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .await?;
    if !output.status.success() {
        return Err(format!("the {label} child process failed ({})", output.status).into());
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| format!("the {label} child process printed no result"))?;
    Ok(serde_json::from_str(line)?)
}

/// Fills and drains `settings.backlog` messages once per side, each side in its own process.
pub async fn run(settings: &Settings) -> ScenarioResult {
    let scenario = RabbitScenario::from_env();
    let n = settings.backlog;
    let mut result = ScenarioResult {
        name: "backlog".into(),
        description: format!(
            "peak RSS while {n} messages fill a RabbitMQ queue and drain (prefetch {}), busway vs lapin, each side in a fresh process",
            settings.prefetch
        ),
        messages: n,
        ..ScenarioResult::default()
    };
    if let Err(reason) = scenario.available().await {
        eprintln!("backlog: skipped: {reason}");
        result.skipped = Some(reason);
        return result;
    }
    for label in SIDES {
        match run_child(settings, label).await {
            Ok(v) => {
                eprintln!(
                    "backlog {label}: RSS before {} MiB, fill peak {} MiB, drain peak {} MiB",
                    v["rss_before_kb"].as_u64().unwrap_or(0) / 1024,
                    v["fill_peak_rss_kb"].as_u64().unwrap_or(0) / 1024,
                    v["drain_peak_rss_kb"].as_u64().unwrap_or(0) / 1024
                );
                result.extra.insert(label.into(), v);
            }
            Err(e) => {
                result.skipped = Some(format!("failed on the {label} side: {e}"));
                return result;
            }
        }
    }
    result
}
