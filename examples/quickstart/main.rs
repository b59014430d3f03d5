//! The seed scenario on the in-memory transport, start to finish.
//!
//! Run with `cargo run --example quickstart`.
//!
//! 1. `PlaceOrderHandler` saves an order; the order's domain event is dispatched in-process
//!    (no transport, no serialization) and the `OrderPlaced` integration event is published.
//! 2. `SendConfirmationEmail` consumes `OrderPlaced` and publishes `ConfirmationSent`.
//! 3. A request/response round trip: `CheckOrderStatus` → `OrderStatus`.
//! 4. `ReserveInventory` fails for an out-of-stock item: two immediate retries, then the
//!    message lands in `reserve-inventory_error` with fault headers and a
//!    `Fault<OrderPlaced>` is published, which `AlertOperations` consumes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use busway::headers::names;
use busway::prelude::*;
use busway::{BoxError, Fault};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use uuid::Uuid;

// ---- message contracts -------------------------------------------------------------------

/// Published when an order has been placed.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Contracts:OrderPlaced")]
pub struct OrderPlaced {
    /// The order.
    #[message(correlation_id)]
    pub order_id: Uuid,
    /// Who ordered.
    pub customer_id: Uuid,
    /// What was ordered.
    pub sku: String,
    /// Order total.
    pub total: Decimal,
    /// When.
    pub occurred_at: DateTime<Utc>,
}

/// Published when the confirmation email went out.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Contracts:ConfirmationSent")]
pub struct ConfirmationSent {
    /// The order.
    pub order_id: Uuid,
}

/// A request for an order's status.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Contracts:CheckOrderStatus")]
pub struct CheckOrderStatus {
    /// The order.
    pub order_id: Uuid,
}

/// The response to [`CheckOrderStatus`].
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Contracts:OrderStatus")]
pub struct OrderStatus {
    /// The order.
    pub order_id: Uuid,
    /// Its status.
    pub status: String,
}

// ---- the domain: an aggregate that records domain events ---------------------------------

/// In-process domain event, never serialized.
#[derive(Debug)]
struct OrderWasPlaced {
    order_id: Uuid,
    total: Decimal,
}

struct Order {
    id: Uuid,
    customer_id: Uuid,
    sku: String,
    total: Decimal,
    events: DomainEvents,
}

impl Order {
    fn place(customer_id: Uuid, sku: &str, total: Decimal) -> Self {
        let id = Uuid::now_v7();
        let mut events = DomainEvents::default();
        events.record(OrderWasPlaced {
            order_id: id,
            total,
        });
        Self {
            id,
            customer_id,
            sku: sku.to_string(),
            total,
            events,
        }
    }
}

#[derive(Clone, Default)]
struct OrderRepository(Arc<Mutex<HashMap<Uuid, String>>>);

impl OrderRepository {
    fn save(&self, order: &Order) {
        if let Ok(mut orders) = self.0.lock() {
            orders.insert(order.id, "placed".to_string());
        }
    }

    fn status(&self, id: Uuid) -> String {
        self.0
            .lock()
            .ok()
            .and_then(|o| o.get(&id).cloned())
            .unwrap_or_else(|| "unknown".to_string())
    }
}

/// The application service: save, dispatch domain events in-process, publish the
/// integration event.
struct PlaceOrderHandler {
    repository: OrderRepository,
    mediator: Mediator,
    bus: Bus,
}

impl PlaceOrderHandler {
    async fn handle(&self, customer_id: Uuid, sku: &str, total: Decimal) -> Result<Uuid, BoxError> {
        let mut order = Order::place(customer_id, sku, total);
        self.repository.save(&order);
        self.mediator.dispatch_all(order.events.take()).await?;
        self.bus
            .publish(OrderPlaced {
                order_id: order.id,
                customer_id: order.customer_id,
                sku: order.sku.clone(),
                total: order.total,
                occurred_at: Utc::now(),
            })
            .await?;
        Ok(order.id)
    }
}

struct UpdateSalesStatistics(mpsc::UnboundedSender<String>);

impl DomainEventHandler<OrderWasPlaced> for UpdateSalesStatistics {
    async fn handle(&self, event: &OrderWasPlaced) -> Result<(), BoxError> {
        let _ = self.0.send(format!(
            "domain event: sales statistics updated in-process for order {} ({})",
            event.order_id, event.total
        ));
        Ok(())
    }
}

// ---- consumers ---------------------------------------------------------------------------

struct SendConfirmationEmail(mpsc::UnboundedSender<String>);

impl Consumer<OrderPlaced> for SendConfirmationEmail {
    async fn consume(&self, ctx: &ConsumeContext<OrderPlaced>) -> Result<(), ConsumeError> {
        let order = ctx.message();
        let _ = self.0.send(format!(
            "consumed OrderPlaced on `send-confirmation-email`: emailing customer {} about order {} (total {})",
            order.customer_id, order.order_id, order.total
        ));
        ctx.publish(ConfirmationSent {
            order_id: order.order_id,
        })
        .await?;
        Ok(())
    }
}

struct AuditConfirmations(mpsc::UnboundedSender<String>);

impl Consumer<ConfirmationSent> for AuditConfirmations {
    async fn consume(&self, ctx: &ConsumeContext<ConfirmationSent>) -> Result<(), ConsumeError> {
        let _ = self.0.send(format!(
            "consumed ConfirmationSent for order {} (same conversation {}: {})",
            ctx.message().order_id,
            ctx.conversation_id()
                .map(|c| c.to_string())
                .unwrap_or_default(),
            ctx.headers()
                .get_str(names::TRACEPARENT)
                .unwrap_or_default()
        ));
        Ok(())
    }
}

struct OrderStatusConsumer(OrderRepository);

impl Consumer<CheckOrderStatus> for OrderStatusConsumer {
    async fn consume(&self, ctx: &ConsumeContext<CheckOrderStatus>) -> Result<(), ConsumeError> {
        let id = ctx.message().order_id;
        ctx.respond(OrderStatus {
            order_id: id,
            status: self.0.status(id),
        })
        .await?;
        Ok(())
    }
}

#[derive(Debug)]
struct OutOfStock(String);

impl std::fmt::Display for OutOfStock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} is out of stock", self.0)
    }
}

impl std::error::Error for OutOfStock {}

struct ReserveInventory(mpsc::UnboundedSender<String>);

impl Consumer<OrderPlaced> for ReserveInventory {
    async fn consume(&self, ctx: &ConsumeContext<OrderPlaced>) -> Result<(), ConsumeError> {
        let order = ctx.message();
        if order.sku == "UNOBTAINIUM" {
            let _ = self.0.send(format!(
                "ReserveInventory attempt {} failed: {} is out of stock",
                ctx.retry_attempt() + 1,
                order.sku
            ));
            return Err(OutOfStock(order.sku.clone()).into());
        }
        let _ = self
            .0
            .send(format!("inventory reserved for order {}", order.order_id));
        Ok(())
    }
}

struct AlertOperations(mpsc::UnboundedSender<String>);

impl Consumer<Fault<OrderPlaced>> for AlertOperations {
    async fn consume(&self, ctx: &ConsumeContext<Fault<OrderPlaced>>) -> Result<(), ConsumeError> {
        let fault = ctx.message();
        let _ = self.0.send(format!(
            "consumed Fault<OrderPlaced> for order {}: {}",
            fault.message.order_id,
            fault
                .exceptions
                .first()
                .map(|e| e.message.as_str())
                .unwrap_or("")
        ));
        Ok(())
    }
}

/// Prints event lines until one containing each of `wanted` has been seen, in any order.
async fn expect(rx: &mut mpsc::UnboundedReceiver<String>, wanted: &[&str]) -> Result<(), BoxError> {
    let mut missing: Vec<&str> = wanted.to_vec();
    while !missing.is_empty() {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(line)) => {
                println!("  {line}");
                missing.retain(|w| !line.contains(w));
            }
            Ok(None) => return Err("the event channel closed".into()),
            Err(_) => return Err(format!("timed out waiting for {missing:?}").into()),
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into()),
        )
        .init();

    let (tx, mut rx) = mpsc::unbounded_channel();
    let repository = OrderRepository::default();
    let transport = InMemory::new();

    let bus = Bus::builder()
        .transport(transport.clone())
        .consumer(SendConfirmationEmail(tx.clone()))
        .consumer(AuditConfirmations(tx.clone()))
        .consumer(OrderStatusConsumer(repository.clone()))
        .consumer(AlertOperations(tx.clone()))
        .receive_endpoint("reserve-inventory", |e| {
            e.consumer(ReserveInventory(tx.clone()))
                .retry(Retry::immediate(2))
        })
        .build()
        .await?;

    println!("topology:\n{}", bus.topology_text());
    let running = bus.start().await?;

    let mediator = Mediator::builder()
        .handler(UpdateSalesStatistics(tx.clone()))
        .build();
    let place_order = PlaceOrderHandler {
        repository: repository.clone(),
        mediator,
        bus: bus.clone(),
    };

    println!("1. place an order");
    let order_id = place_order
        .handle(Uuid::now_v7(), "WIDGET-1", Decimal::new(4250, 2))
        .await?;
    expect(&mut rx, &["domain event"]).await?;
    println!("2. consumers react");
    expect(
        &mut rx,
        &["consumed ConfirmationSent", "inventory reserved"],
    )
    .await?;

    println!("3. request/response");
    let client = bus.request_client::<CheckOrderStatus>();
    let response = client
        .get_response::<OrderStatus>(CheckOrderStatus { order_id })
        .await?;
    println!("  order {} is {}", response.order_id, response.status);

    println!("4. a failing consumer");
    place_order
        .handle(Uuid::now_v7(), "UNOBTAINIUM", Decimal::new(999, 0))
        .await?;
    expect(
        &mut rx,
        &[
            "attempt 3 failed",
            "consumed Fault<OrderPlaced>",
            "consumed ConfirmationSent",
        ],
    )
    .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while transport.queue_len("reserve-inventory_error") == 0 {
        if tokio::time::Instant::now() > deadline {
            return Err("the failed message never reached reserve-inventory_error".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for message in transport.messages("reserve-inventory_error") {
        let h = &message.headers;
        println!(
            "  reserve-inventory_error holds message {}: {}={}, {}={}, {}={}",
            message.message_id.as_deref().unwrap_or("?"),
            names::REASON,
            h.get_str(names::REASON).unwrap_or_default(),
            names::FAULT_MESSAGE,
            h.get_str(names::FAULT_MESSAGE).unwrap_or_default(),
            names::FAULT_RETRY_COUNT,
            h.get_str(names::FAULT_RETRY_COUNT).unwrap_or_default(),
        );
    }

    running.shutdown().await?;
    println!("done: the bus shut down cleanly");
    Ok(())
}
