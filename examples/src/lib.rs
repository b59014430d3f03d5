//! Shared code for the examples: the `OrderPlaced` contract and the `publish` / `consume`
//! command line used by every transport's orders example.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use busway::prelude::*;
use busway::{BoxError, ConsumeErrorKind, Transport};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use uuid::Uuid;

/// Published when an order is placed; the same contract as a .NET `Contracts.OrderPlaced`.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Contracts:OrderPlaced")]
pub struct OrderPlaced {
    /// The order.
    #[message(correlation_id)]
    pub order_id: Uuid,
    /// The customer.
    #[message(key)]
    pub customer_id: Uuid,
    /// The order total.
    pub total: Decimal,
    /// When the order was placed.
    pub occurred_at: DateTime<Utc>,
}

/// What the command line asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Publish `count` orders.
    Publish(usize),
    /// Consume `count` orders, printing each as a JSON line.
    Consume(usize),
}

/// Parses `publish --count N` or `consume --count N`.
pub fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Mode, String> {
    let args: Vec<String> = args.into_iter().collect();
    let usage = "usage: <publish|consume> --count N";
    let mode = args.first().ok_or(usage)?;
    let count = match (args.get(1).map(String::as_str), args.get(2)) {
        (Some("--count"), Some(n)) => n
            .parse::<usize>()
            .map_err(|_| format!("--count takes a number; {usage}"))?,
        (None, None) => 1,
        _ => return Err(usage.to_string()),
    };
    match mode.as_str() {
        "publish" => Ok(Mode::Publish(count)),
        "consume" => Ok(Mode::Consume(count)),
        _ => Err(usage.to_string()),
    }
}

/// Prints consumed orders as JSON lines until `limit` were printed; later ones are handed
/// back to the broker for the next consumer.
struct PrintOrders {
    printed: Arc<AtomicUsize>,
    limit: usize,
    done: Arc<Notify>,
}

impl Consumer<OrderPlaced> for PrintOrders {
    async fn consume(&self, ctx: &ConsumeContext<OrderPlaced>) -> Result<(), ConsumeError> {
        let slot = self.printed.fetch_add(1, Ordering::SeqCst);
        if slot >= self.limit {
            self.printed.fetch_sub(1, Ordering::SeqCst);
            return Err(ConsumeError::with_kind(
                ConsumeErrorKind::Cancelled,
                "busway::Stopping",
                "enough orders were printed; returning this one to the queue",
            ));
        }
        let line = serde_json::to_string(ctx.message())?;
        println!("{line}");
        if slot + 1 == self.limit {
            self.done.notify_one();
        }
        Ok(())
    }
}

/// Runs the orders example on `transport`.
pub async fn run(transport: impl Transport, mode: Mode) -> Result<(), BoxError> {
    match mode {
        Mode::Publish(count) => {
            let bus = Bus::builder().transport(transport).build().await?;
            for _ in 0..count {
                bus.publish(OrderPlaced {
                    order_id: Uuid::now_v7(),
                    customer_id: Uuid::now_v7(),
                    total: Decimal::new(fastrand_cents(), 2),
                    occurred_at: Utc::now(),
                })
                .await?;
            }
            eprintln!("published {count} OrderPlaced");
            bus.transport().close().await?;
        }
        Mode::Consume(count) => {
            let done = Arc::new(Notify::new());
            let bus = Bus::builder()
                .transport(transport)
                .receive_endpoint("order-confirmation", |e| {
                    e.consumer(PrintOrders {
                        printed: Arc::default(),
                        limit: count,
                        done: done.clone(),
                    })
                })
                .build()
                .await?;
            let running = bus.start().await?;
            if count > 0 {
                done.notified().await;
            }
            running.shutdown_within(Duration::from_secs(10)).await?;
            eprintln!("consumed {count} OrderPlaced");
        }
    }
    Ok(())
}

fn fastrand_cents() -> i64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    i64::from(nanos % 100_000) + 100
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_command_line() {
        let args = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        assert_eq!(parse_args(args("publish --count 5")), Ok(Mode::Publish(5)));
        assert_eq!(parse_args(args("consume --count 2")), Ok(Mode::Consume(2)));
        assert_eq!(parse_args(args("consume")), Ok(Mode::Consume(1)));
        assert!(parse_args(args("dance")).is_err());
        assert!(parse_args(args("publish --count x")).is_err());
    }
}
