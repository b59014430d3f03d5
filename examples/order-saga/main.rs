//! Order fulfillment as a saga: `OrderPlaced` starts an order, `PaymentReceived` pays it,
//! `ItemShipped` completes it, and an order not paid within two seconds is cancelled by a
//! payment timeout. Every transition is printed.
//!
//! Instances live in a SQLite file in a temporary directory, or in PostgreSQL when
//! `DATABASE_URL` names one; messages go through the in-memory transport, or RabbitMQ with
//! `--rabbitmq` (`BUSWAY_RABBITMQ_URL`, default the local guest user):
//!
//! ```text
//! cargo run --example order-saga --features saga
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo run --example order-saga --features saga -- --rabbitmq
//! ```

use std::time::Duration;

use busway::outbox::sqlx::postgres::PgPoolOptions;
use busway::outbox::sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use busway::prelude::*;
use busway::saga::{
    Activities, BehaviorContext, BusBuilderSagaExt, PostgresSagaRepository, SqliteSagaRepository,
    StateMachine,
};
use busway::{BoxError, BusBuilder};
use busway_examples::OrderPlaced;
use chrono::Utc;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use uuid::Uuid;

/// A payment for an order.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Contracts:PaymentReceived")]
pub struct PaymentReceived {
    /// The order.
    pub order_id: Uuid,
    /// The amount paid.
    pub amount: Decimal,
}

/// The order's items left the warehouse.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Contracts:ItemShipped")]
pub struct ItemShipped {
    /// The order.
    pub order_id: Uuid,
}

/// The saga's timeout: the order was not paid in time.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
pub struct PaymentTimeout {
    /// The order.
    pub order_id: Uuid,
}

/// Published when an order ends: completed or cancelled.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
pub struct OrderClosed {
    /// The order.
    pub order_id: Uuid,
    /// `completed` or `cancelled`.
    pub outcome: String,
}

/// What the saga keeps about an order.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderState {
    /// The order total.
    pub total: Decimal,
    /// Paid so far.
    pub paid: Decimal,
}

/// Prints the transition the activities before it made.
fn show<M: Send + Sync + 'static>(
    event: &'static str,
) -> impl Fn(&mut BehaviorContext<OrderState, M>) -> Result<(), ConsumeError> + Send + Sync {
    move |ctx| {
        let id = ctx.correlation_id().to_string();
        println!(
            "order {}: {event} -> {} (paid {} of {})",
            &id[id.len() - 6..],
            ctx.state(),
            ctx.saga.paid,
            ctx.saga.total
        );
        Ok(())
    }
}

fn closed<M: Send + Sync + 'static>(
    b: Activities<OrderState, M>,
    outcome: &'static str,
) -> Activities<OrderState, M> {
    b.publish(move |ctx| OrderClosed {
        order_id: ctx.correlation_id(),
        outcome: outcome.to_string(),
    })
}

/// The order state machine, as a MassTransit `OrderStateMachine` would read.
fn order_state_machine() -> StateMachine<OrderState> {
    let mut m = StateMachine::<OrderState>::new("OrderStateMachine");
    let submitted = m.state("Submitted");
    let paid = m.state("Paid");
    let cancelled = m.state("Cancelled");
    // OrderPlaced carries its own correlation id (#[message(correlation_id)]).
    let placed = m.event::<OrderPlaced>("OrderPlaced", |e| e);
    let payment = m.event::<PaymentReceived>("PaymentReceived", |e| e.correlate_by(|m| m.order_id));
    let shipped = m.event::<ItemShipped>("ItemShipped", |e| e.correlate_by(|m| m.order_id));
    let timeout = m.schedule::<PaymentTimeout>("PaymentTimeout", Duration::from_secs(2), |e| {
        e.correlate_by(|m| m.order_id)
    });
    m.initially().when(placed, |b| {
        b.then(|ctx| {
            ctx.saga.total = ctx.message().total;
            Ok(())
        })
        .schedule(&timeout, |ctx| PaymentTimeout {
            order_id: ctx.correlation_id(),
        })
        .transition_to(submitted)
        .then(show("OrderPlaced"))
    });
    m.during(submitted)
        .when(payment, |b| {
            b.then(|ctx| {
                ctx.saga.paid += ctx.message().amount;
                Ok(())
            })
            .when_true(
                |ctx| ctx.saga.paid >= ctx.saga.total,
                |b| b.unschedule(&timeout).transition_to(paid),
            )
            .then(show("PaymentReceived"))
        })
        .when(timeout.received(), |b| {
            closed(b.transition_to(cancelled), "cancelled").then(show("PaymentTimeout"))
        });
    m.during(paid).when(shipped, |b| {
        closed(b.finalize(), "completed").then(show("ItemShipped"))
    });
    m.during_states(&[paid, cancelled])
        .ignore(timeout.received())
        .ignore(payment);
    m.delete_when_finalized();
    m
}

/// Adds the machine on the repository `DATABASE_URL` names (PostgreSQL), or on SQLite.
async fn with_repository(builder: BusBuilder) -> Result<(BusBuilder, String), BoxError> {
    match std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| u.starts_with("postgres"))
    {
        Some(url) => {
            let pool = PgPoolOptions::new()
                .max_connections(4)
                .connect(&url)
                .await?;
            let repo = PostgresSagaRepository::new(pool, "example_order_state")?;
            repo.create_schema().await?;
            Ok((
                builder.state_machine(order_state_machine(), repo),
                "PostgreSQL".into(),
            ))
        }
        None => {
            let dir = std::env::temp_dir().join(format!("busway-order-saga-{}", Uuid::now_v7()));
            std::fs::create_dir_all(&dir)?;
            let options = SqliteConnectOptions::new()
                .filename(dir.join("orders.db"))
                .create_if_missing(true);
            let pool = SqlitePoolOptions::new().connect_with(options).await?;
            let repo = SqliteSagaRepository::new(pool, "order_state")?;
            repo.create_schema().await?;
            let at = format!("SQLite at {}", dir.join("orders.db").display());
            Ok((builder.state_machine(order_state_machine(), repo), at))
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let rabbitmq = std::env::args().any(|a| a == "--rabbitmq");
    let (closed_tx, mut closed_rx) = mpsc::unbounded_channel::<OrderClosed>();
    let builder = Bus::builder().receive_endpoint("order-closed", move |e| {
        e.handler(move |ctx: ConsumeContext<OrderClosed>| {
            let _ = closed_tx.send(ctx.message().clone());
            std::future::ready(Ok(()))
        })
    });
    let (builder, store) = with_repository(builder).await?;
    let builder = if rabbitmq {
        builder.transport(busway::rabbitmq::RabbitMq::from_env()?)
    } else {
        builder.transport(InMemory::new())
    };
    let bus = builder.build().await?;
    let running = bus.start().await?;
    println!(
        "order saga on {} with instances in {store}",
        if rabbitmq {
            "RabbitMQ"
        } else {
            "the in-memory transport"
        }
    );

    let paid_order = Uuid::now_v7();
    let unpaid_order = Uuid::now_v7();
    for order_id in [paid_order, unpaid_order] {
        bus.publish(OrderPlaced {
            order_id,
            customer_id: Uuid::now_v7(),
            total: Decimal::new(4250, 2),
            occurred_at: Utc::now(),
        })
        .await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for amount in [Decimal::new(2000, 2), Decimal::new(2250, 2)] {
        bus.publish(PaymentReceived {
            order_id: paid_order,
            amount,
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bus.publish(ItemShipped {
        order_id: paid_order,
    })
    .await?;

    let mut outcomes = Vec::new();
    while outcomes.len() < 2 {
        let closed = tokio::time::timeout(Duration::from_secs(15), closed_rx.recv())
            .await
            .map_err(|_| "the orders did not close within 15 s")?
            .ok_or("the bus stopped")?;
        let which = if closed.order_id == paid_order {
            "paid"
        } else {
            "unpaid"
        };
        println!("the {which} order closed: {}", closed.outcome);
        outcomes.push((which, closed.outcome));
    }
    running.shutdown().await?;
    println!("done");
    Ok(())
}
