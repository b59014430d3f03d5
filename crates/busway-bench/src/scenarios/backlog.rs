//! `backlog`: peak resident memory of the process while a large backlog (default 1,000,000
//! messages) fills a RabbitMQ queue and drains, busway vs raw lapin. What bounds memory on
//! the consuming side should be the prefetch, not the backlog.

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

/// Fills and drains `settings.backlog` messages once per side.
pub async fn run(settings: &Settings) -> ScenarioResult {
    let scenario = RabbitScenario::from_env();
    let n = settings.backlog;
    let mut result = ScenarioResult {
        name: "backlog".into(),
        description: format!(
            "peak RSS while {n} messages fill a RabbitMQ queue and drain (prefetch {}), busway vs lapin",
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
    for (label, side) in [
        ("busway", scenario.busway(settings).await),
        ("lapin", scenario.raw(settings).await),
    ] {
        let outcome = match side {
            Ok(side) => one(side, n).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(v) => {
                eprintln!(
                    "backlog {label}: fill peak {} MiB, drain peak {} MiB",
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
