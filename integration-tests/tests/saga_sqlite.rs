//! Sagas on SQLite (a real database file): versions, JSON queries and unreadable rows; the
//! saga's row and its messages committed together through the consumer outbox; and two
//! buses with their own pools on one file sharing 2,000 events without a lost update.

use std::time::Duration;

use busway::outbox::sqlx::{self, SqlitePool};
use busway::outbox::{EndpointOutboxExt, Outbox, OutboxOptions, SqliteStore};
use busway::prelude::*;
use busway::saga::testing::expect_state;
use busway::saga::{EndpointSagaExt, Query, SqliteSagaRepository, StateMachine};
use busway::{TransportMessage, headers::names};
use busway_integration_tests::db::SqliteFile;
use busway_integration_tests::saga_worker::{TickState, competing_ticks};
use busway_integration_tests::support::{Recorder, init_tracing, take_from};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, busway::Message)]
#[serde(rename_all = "camelCase")]
struct LiteOpened {
    order_id: Uuid,
    number: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, busway::Message)]
#[serde(rename_all = "camelCase")]
struct LitePaid {
    number: String,
    amount: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, busway::Message)]
#[serde(rename_all = "camelCase")]
struct LiteReceipt {
    order_id: Uuid,
    paid: u32,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LiteOrder {
    number: String,
    paid: u32,
}

/// Opened by id; paid by query on the order number; a payment of 0 publishes and then
/// fails, so nothing of it may survive.
fn machine() -> StateMachine<LiteOrder> {
    let mut m = StateMachine::<LiteOrder>::new("LiteOrderStateMachine");
    let open = m.state("Open");
    let paid = m.state("Paid");
    let opened = m.event::<LiteOpened>("Opened", |e| e.correlate_by(|m| m.order_id));
    let payment = m.event::<LitePaid>("Paid", |e| {
        e.correlate_by_query(|m| Query::eq("number", m.number.clone()))
    });
    m.initially().when(opened, |b| {
        b.then(|ctx| {
            ctx.saga.number = ctx.message().number.clone();
            Ok(())
        })
        .transition_to(open)
    });
    m.during(open).when(payment, |b| {
        b.then(|ctx| {
            ctx.saga.paid += ctx.message().amount;
            Ok(())
        })
        .publish(|ctx| LiteReceipt {
            order_id: ctx.correlation_id(),
            paid: ctx.saga.paid,
        })
        .then(|ctx| {
            if ctx.message().amount == 0 {
                Err(ConsumeError::msg("a payment of nothing"))
            } else {
                Ok(())
            }
        })
        .transition_to(paid)
    });
    m.during(paid).ignore(payment);
    m
}

async fn repo(pool: &SqlitePool) -> SqliteSagaRepository<LiteOrder> {
    let repo = SqliteSagaRepository::new(pool.clone(), "lite_orders").expect("table name");
    repo.create_schema().await.expect("schema");
    repo.create_schema()
        .await
        .expect("schema again (idempotent)");
    repo
}

async fn take(t: &InMemory, queue: &str, count: usize) -> Vec<TransportMessage> {
    take_from("in-memory", t, queue, count, WAIT).await
}

/// Through the consumer outbox on SQLite: a payment found by its order number; a behavior
/// that publishes and then fails leaves no state change and no message; a row that no
/// longer reads goes to `_error` as `CorruptInstance`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_sagas_query_commit_with_the_outbox_and_fault_on_bad_rows() {
    init_tracing();
    let file = SqliteFile::new("saga");
    let pool = file.pool().await;
    let repo = repo(&pool).await;
    let transport = InMemory::new();
    let delivery = Bus::builder()
        .transport(transport.clone())
        .build()
        .await
        .expect("delivery bus");
    let options = OutboxOptions {
        poll_interval: Duration::from_millis(20),
        ..OutboxOptions::default()
    };
    let outbox = Outbox::with_options(SqliteStore::new(pool.clone()), &delivery, options)
        .await
        .expect("migrate");
    let dispatcher = outbox.start_dispatcher();
    let receipts = Recorder::<u32>::default();
    let bus = Bus::builder()
        .transport(transport.clone())
        .receive_endpoint("lite-orders", {
            let repo = repo.clone();
            move |e| {
                e.transactional_outbox(&outbox)
                    .state_machine(machine(), repo)
            }
        })
        .receive_endpoint("lite-receipts", {
            let receipts = receipts.clone();
            move |e| e.handler(receipts.record(|c: &ConsumeContext<LiteReceipt>| c.message().paid))
        })
        .build()
        .await
        .expect("build");
    let running = bus.start().await.expect("start");
    let id = Uuid::now_v7();
    bus.send(
        "queue:lite-orders",
        LiteOpened {
            order_id: id,
            number: "PO-9".into(),
        },
    )
    .await
    .expect("send");
    expect_state(&repo, id, "Open", WAIT).await.expect("open");
    bus.send(
        "queue:lite-orders",
        LitePaid {
            number: "PO-9".into(),
            amount: 0,
        },
    )
    .await
    .expect("send");
    let errors = take(&transport, "lite-orders_error", 1).await;
    assert_eq!(
        errors[0].headers.get_str(names::FAULT_MESSAGE).as_deref(),
        Some("a payment of nothing")
    );
    let i = expect_state(&repo, id, "Open", WAIT)
        .await
        .expect("still open");
    assert_eq!(
        (i.version, i.data.paid),
        (1, 0),
        "the failed attempt saved nothing"
    );
    bus.send(
        "queue:lite-orders",
        LitePaid {
            number: "PO-9".into(),
            amount: 12,
        },
    )
    .await
    .expect("send");
    let i = expect_state(&repo, id, "Paid", WAIT).await.expect("paid");
    assert_eq!((i.version, i.data.paid), (2, 12));
    assert_eq!(receipts.wait_for(1, WAIT, "the receipt").await, [12]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receipts.entries(), [12], "nothing from the failed attempt");
    let (state, data): (String, String) =
        sqlx::query_as("SELECT current_state, data FROM lite_orders WHERE correlation_id = ?")
            .bind(id)
            .fetch_one(&pool)
            .await
            .expect("the row");
    assert_eq!(state, "Paid");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&data).expect("json")["number"],
        "PO-9"
    );
    let broken = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO lite_orders (correlation_id, current_state, version, data) \
         VALUES (?, 'Open', 1, '{\"number\": 7}')",
    )
    .bind(broken)
    .execute(&pool)
    .await
    .expect("insert");
    bus.send(
        "queue:lite-orders",
        LiteOpened {
            order_id: broken,
            number: "PO-10".into(),
        },
    )
    .await
    .expect("send");
    let errors = take(&transport, "lite-orders_error", 1).await;
    assert_eq!(
        errors[0]
            .headers
            .get_str(names::FAULT_EXCEPTION_TYPE)
            .as_deref(),
        Some("busway::saga::CorruptInstance")
    );
    running.shutdown().await.expect("shutdown");
    dispatcher.stop().await;
}

/// Two buses, each with its own pool on one SQLite file (two processes' worth), compete for
/// one queue: 2,000 ticks for 20 instances in random order, every counter exact, every ack
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_pools_on_one_sqlite_file_lose_no_update() {
    init_tracing();
    let file = SqliteFile::new("saga-shared");
    let mut repos = Vec::new();
    for _ in 0..2 {
        let repo =
            SqliteSagaRepository::<TickState>::new(file.pool().await, "ticks").expect("table name");
        repo.create_schema().await.expect("schema");
        repos.push(repo);
    }
    let repos: [_; 2] = repos.try_into().expect("two repositories");
    competing_ticks("lite-ticks", repos, 20, 100).await;
}
