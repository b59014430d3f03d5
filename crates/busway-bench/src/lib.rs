//! busway's benchmarks: each scenario runs busway and a hand-written baseline on the raw
//! client (tokio channels, lapin, rdkafka, a direct publish) alternately, in the same
//! process and run, and reports every pair and the median ratio busway / raw.
//!
//! Run `cargo run --release -p busway-bench -- all` (see `docs/performance.md`).

mod counting;
pub mod measure;
pub mod message;
pub mod report;
pub mod scenarios;

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use busway::BoxError;
use serde::Serialize;

use crate::measure::{Latency, Phase, measure, median};

/// Benchmark settings (command-line options).
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// Messages per phase; `None`: calibrated so a raw run takes about `seconds`.
    pub messages: Option<usize>,
    /// Target seconds per phase when `messages` is not given.
    pub seconds: f64,
    /// Payload bytes per message.
    pub payload: usize,
    /// busway/raw pairs per scenario.
    pub pairs: usize,
    /// Publishes in flight at once (publisher-confirm window).
    pub window: usize,
    /// Prefetch (unacknowledged deliveries per consumer).
    pub prefetch: u16,
    /// Open-loop latency rate as a fraction of the slower side's end-to-end rate in each pair.
    pub latency_fraction: f64,
    /// Messages in the backlog scenario.
    pub backlog: usize,
    /// Where results go (`docs/performance`).
    pub out: PathBuf,
    /// Write PNG plots.
    pub plots: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            messages: None,
            seconds: 3.0,
            payload: 256,
            pairs: 5,
            window: 64,
            prefetch: 64,
            latency_fraction: 0.5,
            backlog: 1_000_000,
            out: PathBuf::from("docs/performance"),
            plots: true,
        }
    }
}

/// One side of a comparison: busway or the raw client, set up for one scenario.
#[async_trait]
pub trait Side: Send {
    /// Publishes `n` messages with no consumer running (fills a backlog).
    async fn publish(&mut self, n: usize) -> Result<(), BoxError>;
    /// Consumes the backlog of `n` messages that [`Side::publish`] left; returns the time
    /// from the first message consumed to the last (start-up excluded).
    async fn consume(&mut self, n: usize) -> Result<Duration, BoxError>;
    /// Publishes `n` messages while consuming them; returns the time from the first publish
    /// to the last message consumed (the consumer is ready before the first publish).
    async fn end_to_end(&mut self, n: usize) -> Result<Duration, BoxError>;
    /// Publishes `n` messages at `rate` per second on a fixed schedule while consuming them;
    /// returns each message's latency from its scheduled send time, in nanoseconds.
    async fn latency(&mut self, n: usize, rate: f64) -> Result<Vec<u64>, BoxError>;
    /// Removes what the side created.
    async fn cleanup(&mut self) {}
}

/// Makes fresh sides for each run.
#[async_trait]
pub trait Scenario: Send + Sync {
    /// The scenario's name (`rabbitmq`).
    fn name(&self) -> &'static str;
    /// What is compared, in one line.
    fn description(&self) -> String;
    /// `Err(reason)` when the service it needs is not reachable.
    async fn available(&self) -> Result<(), String>;
    /// A busway side.
    async fn busway(&self, settings: &Settings) -> Result<Box<dyn Side>, BoxError>;
    /// A raw-client side.
    async fn raw(&self, settings: &Settings) -> Result<Box<dyn Side>, BoxError>;
    /// Names of the two sides for the report.
    fn sides(&self) -> (&'static str, &'static str) {
        ("busway", "raw")
    }
}

/// Everything one run of one side measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Run {
    /// `busway` or the raw side's name.
    pub side: String,
    /// Publish while consuming.
    pub end_to_end: Phase,
    /// Publish with no consumer (fills the backlog).
    pub publish: Phase,
    /// Drain the backlog.
    pub consume: Phase,
    /// Open-loop latency.
    pub latency: Latency,
}

/// One scenario's results.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScenarioResult {
    /// Scenario name.
    pub name: String,
    /// What was compared.
    pub description: String,
    /// Why it did not run, if it did not.
    pub skipped: Option<String>,
    /// Messages per phase.
    pub messages: usize,
    /// (busway, raw) runs, in the order they ran.
    pub pairs: Vec<(Run, Run)>,
    /// Median ratios busway / raw: end-to-end, publish, consume rates.
    pub ratio_end_to_end: f64,
    /// See `ratio_end_to_end`.
    pub ratio_publish: f64,
    /// See `ratio_end_to_end`.
    pub ratio_consume: f64,
    /// Extra numbers a scenario reports (mediator ns per dispatch, backlog peak RSS).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

const PHASE_TIMEOUT: Duration = Duration::from_secs(600);

async fn timed<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, BoxError>>,
) -> Result<T, BoxError> {
    match tokio::time::timeout(PHASE_TIMEOUT, f).await {
        Ok(r) => r,
        Err(_) => Err(format!("{what} did not finish within {PHASE_TIMEOUT:?}").into()),
    }
}

/// A side's throughput figures and the side, kept for its latency phase.
type Measured = (Run, Box<dyn Side>);

/// The throughput phases of one side: publish (backlog), consume, end-to-end. The side is
/// kept for its latency phase, which runs once both sides of the pair have these figures.
async fn run_throughput(
    mut side: Box<dyn Side>,
    name: &str,
    n: usize,
) -> Result<Measured, BoxError> {
    let (publish, ()) = measure(n, timed("publish", side.publish(n))).await?;
    let (mut consume, active) = measure(n, timed("consume", side.consume(n))).await?;
    consume.set_active(active);
    let (mut end_to_end, active) = measure(n, timed("end-to-end", side.end_to_end(n))).await?;
    end_to_end.set_active(active);
    let run = Run {
        side: name.to_string(),
        end_to_end,
        publish,
        consume,
        latency: Latency::default(),
    };
    Ok((run, side))
}

/// The open-loop latency phase of one side, then its cleanup.
async fn run_latency(
    mut side: Box<dyn Side>,
    run: &mut Run,
    rate: f64,
    n: usize,
) -> Result<(), BoxError> {
    let nanos = timed("latency", side.latency(n, rate)).await?;
    side.cleanup().await;
    run.latency = Latency::from_nanos(rate, nanos);
    Ok(())
}

/// Runs a scenario: calibrates the message count on the raw side, then `pairs` pairs,
/// alternating which side goes first.
pub async fn run_scenario(scenario: &dyn Scenario, settings: &Settings) -> ScenarioResult {
    let mut result = ScenarioResult {
        name: scenario.name().to_string(),
        description: scenario.description(),
        ..ScenarioResult::default()
    };
    if let Err(reason) = scenario.available().await {
        eprintln!("{}: skipped: {reason}", scenario.name());
        result.skipped = Some(reason);
        return result;
    }
    match run_pairs(scenario, settings, &mut result).await {
        Ok(()) => {}
        Err(e) => {
            eprintln!("{}: failed: {e}", scenario.name());
            result.skipped = Some(format!("failed: {e}"));
        }
    }
    result
}

async fn run_pairs(
    scenario: &dyn Scenario,
    settings: &Settings,
    result: &mut ScenarioResult,
) -> Result<(), BoxError> {
    let (busway_name, raw_name) = scenario.sides();
    // Calibrate: a short raw end-to-end run gives the raw rate, which sets the message
    // count (about `seconds` per phase).
    let probe = settings.messages.unwrap_or(2_000).min(2_000);
    let mut raw = scenario.raw(settings).await?;
    let (mut phase, active) = measure(probe, timed("calibration", raw.end_to_end(probe))).await?;
    phase.set_active(active);
    raw.cleanup().await;
    let n = settings
        .messages
        .unwrap_or_else(|| ((phase.rate * settings.seconds) as usize).clamp(1_000, 2_000_000));
    let latency_floor = 10.0;
    result.messages = n;
    eprintln!(
        "{}: {n} messages per phase (raw calibration {:.0} msg/s), latency at {:.0}% of each pair's slower end-to-end rate",
        scenario.name(),
        phase.rate,
        settings.latency_fraction * 100.0
    );
    for i in 0..settings.pairs {
        let busway_first = i % 2 == 0;
        let mut pair: (Option<Measured>, Option<Measured>) = (None, None);
        for busway_turn in [busway_first, !busway_first] {
            if busway_turn {
                let side = scenario.busway(settings).await?;
                pair.0 = Some(run_throughput(side, busway_name, n).await?);
            } else {
                let side = scenario.raw(settings).await?;
                pair.1 = Some(run_throughput(side, raw_name, n).await?);
            }
        }
        let (Some((mut b, b_side)), Some((mut r, r_side))) = pair else {
            return Err("a side of the pair did not run".into());
        };
        // Open-loop latency at a fraction of what this pair sustained end to end (the
        // slower side's rate): the calibration probe overstates it once the broker holds the
        // phases' backlogs, and a schedule at the sustained maximum measures a growing queue.
        let latency_rate = (b.end_to_end.rate.min(r.end_to_end.rate) * settings.latency_fraction)
            .max(latency_floor);
        let latency_n = ((latency_rate * settings.seconds.min(5.0)) as usize)
            .clamp(100, 200_000)
            .min(n.max(100));
        if busway_first {
            run_latency(b_side, &mut b, latency_rate, latency_n).await?;
            run_latency(r_side, &mut r, latency_rate, latency_n).await?;
        } else {
            run_latency(r_side, &mut r, latency_rate, latency_n).await?;
            run_latency(b_side, &mut b, latency_rate, latency_n).await?;
        }
        eprintln!(
            "{} pair {}: end-to-end {:.0} vs {:.0} msg/s ({:.2}); publish {:.0} vs {:.0}; consume {:.0} vs {:.0}; p99 {:.0} vs {:.0} us",
            scenario.name(),
            i + 1,
            b.end_to_end.rate,
            r.end_to_end.rate,
            b.end_to_end.rate / r.end_to_end.rate.max(1e-9),
            b.publish.rate,
            r.publish.rate,
            b.consume.rate,
            r.consume.rate,
            b.latency.p99_us,
            r.latency.p99_us
        );
        result.pairs.push((b, r));
    }
    let ratio = |f: fn(&Run) -> f64| {
        let ratios: Vec<f64> = result
            .pairs
            .iter()
            .map(|(b, r)| f(b) / f(r).max(1e-9))
            .collect();
        median(&ratios)
    };
    result.ratio_end_to_end = ratio(|r| r.end_to_end.rate);
    result.ratio_publish = ratio(|r| r.publish.rate);
    result.ratio_consume = ratio(|r| r.consume.rate);
    Ok(())
}
