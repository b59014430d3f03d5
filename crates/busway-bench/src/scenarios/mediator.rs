//! `mediator`: in-process domain-event dispatch through busway's `Mediator` (type lookup,
//! every handler, failures collected) vs calling the one handler directly through a trait
//! object. Reported as nanoseconds per dispatch.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use busway::BoxError;
use busway::mediator::{DomainEventHandler, Mediator};

use crate::measure::median;
use crate::{ScenarioResult, Settings};

/// The event dispatched.
#[derive(Debug)]
pub struct OrderCounted {
    /// An order number.
    pub order: u64,
}

/// Adds the order number to a sum (so the work is not optimised away).
#[derive(Debug, Clone, Default)]
pub struct Sum(Arc<AtomicU64>);

impl DomainEventHandler<OrderCounted> for Sum {
    async fn handle(&self, event: &OrderCounted) -> Result<(), BoxError> {
        self.0.fetch_add(event.order, Ordering::Relaxed);
        Ok(())
    }
}

async fn through_mediator(n: u64) -> Result<f64, BoxError> {
    let sum = Sum::default();
    let mediator = Mediator::builder().handler(sum.clone()).build();
    let start = Instant::now();
    for order in 0..n {
        mediator.dispatch(&OrderCounted { order }).await?;
    }
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    check(&sum, n)?;
    Ok(ns)
}

/// The baseline's handler call: through a trait object, with the future boxed (what a
/// hand-written event bus over `dyn` handlers does).
trait DynHandler: Send + Sync {
    fn handle_boxed<'a>(
        &'a self,
        event: &'a OrderCounted,
    ) -> futures_util::future::BoxFuture<'a, Result<(), BoxError>>;
}

impl DynHandler for Sum {
    fn handle_boxed<'a>(
        &'a self,
        event: &'a OrderCounted,
    ) -> futures_util::future::BoxFuture<'a, Result<(), BoxError>> {
        Box::pin(self.handle(event))
    }
}

async fn direct(n: u64) -> Result<f64, BoxError> {
    let sum = Sum::default();
    let handler: Arc<dyn DynHandler> = Arc::new(sum.clone());
    let start = Instant::now();
    for order in 0..n {
        handler.handle_boxed(&OrderCounted { order }).await?;
    }
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    check(&sum, n)?;
    Ok(ns)
}

fn check(sum: &Sum, n: u64) -> Result<(), BoxError> {
    let expected = n * n.saturating_sub(1) / 2;
    let got = sum.0.load(Ordering::Relaxed);
    if got != expected {
        return Err(format!("handler saw a sum of {got}, expected {expected}").into());
    }
    Ok(())
}

/// Runs `pairs` alternating pairs of 1,000,000 dispatches (fewer with `--messages`).
pub async fn run(settings: &Settings) -> ScenarioResult {
    let n = settings.messages.unwrap_or(1_000_000).max(1) as u64;
    let mut result = ScenarioResult {
        name: "mediator".into(),
        description: "busway Mediator::dispatch to one handler vs a direct call through an Arc<dyn> handler with a boxed future".into(),
        messages: usize::try_from(n).unwrap_or(usize::MAX),
        ..ScenarioResult::default()
    };
    let mut mediator_ns = Vec::new();
    let mut direct_ns = Vec::new();
    let mut pairs = Vec::new();
    for i in 0..settings.pairs {
        let order = if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        let (mut m, mut d) = (0.0, 0.0);
        for use_mediator in order {
            let r = if use_mediator {
                through_mediator(n).await
            } else {
                direct(n).await
            };
            match (r, use_mediator) {
                (Ok(ns), true) => m = ns,
                (Ok(ns), false) => d = ns,
                (Err(e), _) => {
                    result.skipped = Some(format!("failed: {e}"));
                    return result;
                }
            }
        }
        eprintln!(
            "mediator pair {}: {m:.1} ns vs {d:.1} ns per dispatch",
            i + 1
        );
        mediator_ns.push(m);
        direct_ns.push(d);
        pairs.push(serde_json::json!({"mediator_ns": m, "direct_ns": d}));
    }
    let (m, d) = (median(&mediator_ns), median(&direct_ns));
    result.ratio_end_to_end = d / m.max(1e-9);
    result
        .extra
        .insert("mediator_ns_per_dispatch".into(), m.into());
    result.extra.insert("direct_ns_per_call".into(), d.into());
    result.extra.insert("pairs".into(), pairs.into());
    result
}
