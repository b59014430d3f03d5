//! Sagas on PostgreSQL: the repository's versions, queries and unreadable rows; the saga's
//! row and its messages committed together through the consumer outbox (pessimistic locks
//! included); a database outage mid-event; and two processes sharing 10,000 events.

use std::future::IntoFuture;
use std::process::Stdio;
use std::time::Duration;

use busway::outbox::sqlx::{self, PgPool};
use busway::outbox::{EndpointOutboxExt, Outbox, OutboxOptions, PostgresStore};
use busway::prelude::*;
use busway::saga::testing::{expect_exists, expect_state};
use busway::saga::{EndpointSagaExt, PostgresSagaRepository, Query, StateMachine};
use busway::transport::QueueAdmin;
use busway::{TransportMessage, headers::names};
use busway_integration_tests::db::{postgres_pool, postgres_url};
use busway_integration_tests::rabbit;
use busway_integration_tests::saga_worker::{SagaTick, SagaTickAck, TickState};
use busway_integration_tests::support::{Recorder, ToggleProxy, init_tracing, take_from, unique};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);

macro_rules! contracts {
    ($($name:ident),* $(,)?) => {$(
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, busway::Message)]
        #[serde(rename_all = "camelCase")]
        struct $name {
            order_id: Uuid,
            n: u32,
        }
    )*};
}

contracts!(PgPlaced, PgPaid, PgNotified, PgByNumber);

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PgOrder {
    order_number: String,
    paid: u32,
}

fn fast_outbox() -> OutboxOptions {
    OutboxOptions {
        poll_interval: Duration::from_millis(20),
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
        ..OutboxOptions::default()
    }
}

/// A fresh saga table (dropped first if a failed run left it).
async fn table(pool: &PgPool, tag: &str) -> String {
    let name = unique(tag).replace('-', "_");
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {name}")))
        .execute(pool)
        .await
        .expect("drop");
    name
}

/// `PgPaid` fails while `n` is 0: the behavior publishes, then errors.
fn order_machine() -> StateMachine<PgOrder> {
    let mut m = StateMachine::<PgOrder>::new("PgOrderStateMachine");
    let open = m.state("Open");
    let paid = m.state("Paid");
    let placed = m.event::<PgPlaced>("Placed", |e| e.correlate_by(|m| m.order_id));
    let payment = m.event::<PgPaid>("Paid", |e| e.correlate_by(|m| m.order_id));
    let by_number = m.event::<PgByNumber>("ByNumber", |e| {
        e.correlate_by_query(|m| Query::eq("orderNumber", format!("PO-{}", m.n)))
    });
    m.initially().when(placed, |b| {
        b.then(|ctx| {
            ctx.saga.order_number = format!("PO-{}", ctx.message().n);
            Ok(())
        })
        .transition_to(open)
    });
    m.during(open)
        .when(payment, |b| {
            b.then(|ctx| {
                ctx.saga.paid += ctx.message().n;
                Ok(())
            })
            .publish(|ctx| PgNotified {
                order_id: ctx.correlation_id(),
                n: ctx.saga.paid,
            })
            .then(|ctx| {
                if ctx.message().n == 0 {
                    Err(ConsumeError::msg("a payment of nothing"))
                } else {
                    Ok(())
                }
            })
            .transition_to(paid)
        })
        .when(by_number, |b| {
            b.then(|ctx| {
                ctx.saga.paid += 100;
                Ok(())
            })
        });
    m.during(paid).ignore(by_number);
    m
}

async fn take(t: &InMemory, queue: &str, count: usize) -> Vec<TransportMessage> {
    take_from("in-memory", t, queue, count, WAIT).await
}

/// Versions, correlation by query (`jsonb` path), and a row that no longer reads as the
/// state type, on a repository without the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_repository_versions_queries_and_unreadable_rows() {
    init_tracing();
    let pool = postgres_pool().await;
    let name = table(&pool, "pg_orders").await;
    let repo = PostgresSagaRepository::<PgOrder>::new(pool.clone(), &name).expect("table name");
    repo.create_schema().await.expect("schema");
    repo.create_schema()
        .await
        .expect("schema again (idempotent)");
    let transport = InMemory::new();
    let bus = Bus::builder()
        .transport(transport.clone())
        .receive_endpoint("pg-orders", {
            let repo = repo.clone();
            move |e| e.state_machine(order_machine(), repo)
        })
        .build()
        .await
        .expect("build");
    let running = bus.start().await.expect("start");
    let id = Uuid::now_v7();
    bus.send(
        "queue:pg-orders",
        PgPlaced {
            order_id: id,
            n: 42,
        },
    )
    .await
    .expect("send");
    let i = expect_state(&repo, id, "Open", WAIT).await.expect("open");
    assert_eq!((i.version, i.data.order_number.as_str()), (1, "PO-42"));
    bus.send(
        "queue:pg-orders",
        PgByNumber {
            order_id: Uuid::nil(),
            n: 42,
        },
    )
    .await
    .expect("send");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let i = expect_exists(&repo, id, WAIT).await.expect("exists");
        if i.data.paid == 100 {
            assert_eq!(i.version, 2);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the query never matched"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (state, version, data): (String, i64, serde_json::Value) =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT current_state, version, data FROM {name} WHERE correlation_id = $1"
        )))
        .bind(id)
        .fetch_one(&pool)
        .await
        .expect("the row");
    assert_eq!((state.as_str(), version), ("Open", 2));
    assert_eq!(data["orderNumber"], "PO-42", "the state is a jsonb column");
    // A schema change: the row no longer reads as PgOrder.
    let broken = Uuid::now_v7();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {name} (correlation_id, current_state, version, data) \
         VALUES ($1, 'Open', 3, '{{\"paid\": \"lots\"}}')"
    )))
    .bind(broken)
    .execute(&pool)
    .await
    .expect("insert");
    bus.send(
        "queue:pg-orders",
        PgPaid {
            order_id: broken,
            n: 1,
        },
    )
    .await
    .expect("send");
    let errors = take(&transport, "pg-orders_error", 1).await;
    assert_eq!(
        errors[0]
            .headers
            .get_str(names::FAULT_EXCEPTION_TYPE)
            .as_deref(),
        Some("busway::saga::CorruptInstance")
    );
    assert!(
        errors[0]
            .headers
            .get_str(names::FAULT_MESSAGE)
            .is_some_and(|m| m.contains(&broken.to_string())),
        "the fault names the instance"
    );
    running.shutdown().await.expect("shutdown");
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {name}")))
        .execute(&pool)
        .await
        .expect("drop");
}

/// Through the consumer outbox, with pessimistic locks: a behavior that publishes and then
/// fails leaves neither the new state nor its message; one that succeeds commits both; the
/// message reaches its consumer once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_saga_row_and_its_messages_commit_together() {
    init_tracing();
    let pool = postgres_pool().await;
    let name = table(&pool, "pg_atomic").await;
    let prefix = format!("{name}_");
    let repo = PostgresSagaRepository::<PgOrder>::new(pool.clone(), &name)
        .expect("table name")
        .pessimistic();
    repo.create_schema().await.expect("schema");
    let transport = InMemory::new();
    let delivery = Bus::builder()
        .transport(transport.clone())
        .build()
        .await
        .expect("delivery bus");
    let store = PostgresStore::new(pool.clone())
        .tables(None, &prefix)
        .expect("prefix");
    let outbox = Outbox::with_options(store, &delivery, fast_outbox())
        .await
        .expect("migrate");
    let dispatcher = outbox.start_dispatcher();
    let notified = Recorder::<u32>::default();
    let bus = Bus::builder()
        .transport(transport.clone())
        .receive_endpoint("pg-atomic", {
            let repo = repo.clone();
            move |e| {
                e.transactional_outbox(&outbox)
                    .state_machine(order_machine(), repo)
            }
        })
        .receive_endpoint("pg-notified", {
            let notified = notified.clone();
            move |e| e.handler(notified.record(|c: &ConsumeContext<PgNotified>| c.message().n))
        })
        .build()
        .await
        .expect("build");
    let running = bus.start().await.expect("start");
    let id = Uuid::now_v7();
    bus.send("queue:pg-atomic", PgPlaced { order_id: id, n: 1 })
        .await
        .expect("send");
    expect_state(&repo, id, "Open", WAIT).await.expect("open");
    bus.send("queue:pg-atomic", PgPaid { order_id: id, n: 0 })
        .await
        .expect("send");
    let errors = take(&transport, "pg-atomic_error", 1).await;
    assert_eq!(
        errors[0].headers.get_str(names::FAULT_MESSAGE).as_deref(),
        Some("a payment of nothing")
    );
    let i = expect_state(&repo, id, "Open", WAIT)
        .await
        .expect("still open");
    assert_eq!(i.version, 1, "the failed behavior saved nothing");
    bus.send("queue:pg-atomic", PgPaid { order_id: id, n: 7 })
        .await
        .expect("send");
    let i = expect_state(&repo, id, "Paid", WAIT).await.expect("paid");
    assert_eq!((i.version, i.data.paid), (2, 7));
    assert_eq!(
        notified.wait_for(1, WAIT, "the committed publish").await,
        [7]
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        notified.entries(),
        [7],
        "the failed attempt published nothing"
    );
    let stored: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {prefix}outbox"
    )))
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(stored, 1, "one message went through the outbox table");
    running.shutdown().await.expect("shutdown");
    dispatcher.stop().await;
    for t in [
        name.clone(),
        format!("{prefix}outbox"),
        format!("{prefix}outbox_state"),
        format!("{prefix}inbox"),
        format!("{prefix}migrations"),
    ] {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {t}")))
            .execute(&pool)
            .await;
    }
}

/// The database goes away while events arrive: each ends in `_error` with the repository's
/// reason (after the endpoint's retries), none is lost, and events after the database comes
/// back are applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_faults_events_into_error_and_the_saga_recovers() {
    init_tracing();
    let direct = postgres_pool().await;
    let name = table(&direct, "pg_outage").await;
    let proxy = ToggleProxy::start("127.0.0.1:5432").await;
    let url = postgres_url().replace("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port()));
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(1))
        .connect(&url)
        .await
        .expect("a pool through the proxy");
    let repo = PostgresSagaRepository::<PgOrder>::new(pool, &name).expect("table name");
    repo.create_schema().await.expect("schema");
    let transport = InMemory::new();
    let bus = Bus::builder()
        .transport(transport.clone())
        .receive_endpoint("pg-outage", {
            let repo = repo.clone();
            move |e| {
                e.retry(Retry::interval(2, Duration::from_millis(50)))
                    .state_machine(order_machine(), repo)
            }
        })
        .build()
        .await
        .expect("build");
    let running = bus.start().await.expect("start");
    let id = Uuid::now_v7();
    bus.send("queue:pg-outage", PgPlaced { order_id: id, n: 5 })
        .await
        .expect("send");
    expect_state(&repo, id, "Open", WAIT).await.expect("open");
    proxy.down();
    for n in 1..=3 {
        bus.send("queue:pg-outage", PgPaid { order_id: id, n })
            .await
            .expect("send");
    }
    let errors = take(&transport, "pg-outage_error", 3).await;
    for e in &errors {
        assert_eq!(
            e.headers.get_str(names::FAULT_EXCEPTION_TYPE).as_deref(),
            Some("busway::saga::RepositoryError")
        );
        assert!(
            e.headers
                .get_str(names::FAULT_MESSAGE)
                .is_some_and(|m| m.contains("PostgreSQL")),
            "the reason names the database"
        );
        assert_eq!(
            e.headers.get_str(names::FAULT_RETRY_COUNT).as_deref(),
            Some("2")
        );
    }
    proxy.up();
    bus.send("queue:pg-outage", PgPaid { order_id: id, n: 9 })
        .await
        .expect("send");
    let i = expect_state(&repo, id, "Paid", WAIT).await.expect("paid");
    assert_eq!(
        (i.version, i.data.paid),
        (2, 9),
        "the faulted events changed nothing"
    );
    running.shutdown().await.expect("shutdown");
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {name}")))
        .execute(&direct)
        .await;
}

struct Worker(tokio::process::Child);

impl Worker {
    async fn spawn(n: u32, queue: &str, table: &str, prefix: &str) -> Worker {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_saga-worker"))
            .args([&n.to_string(), queue, table, prefix])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn saga-worker");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("the worker says ready within 20 s")
            .expect("read");
        assert_eq!(ready.as_deref(), Some("ready"), "worker {n}");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Worker(child)
    }

    async fn stop(mut self) {
        if let Some(pid) = self.0.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let _ = tokio::time::timeout(WAIT, self.0.wait()).await;
    }
}

/// Two processes run the tick saga over one queue and one table: 10,000 ticks for 100
/// instances in random order leave every counter exact, and each tick's ack reaches the
/// downstream consumer exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_ten_thousand_events_one_hundred_instances() {
    init_tracing();
    const INSTANCES: usize = 100;
    const PER_INSTANCE: u32 = 100;
    let pool = postgres_pool().await;
    let name = table(&pool, "pg_ticks").await;
    let prefix = format!("{name}_");
    let queue = unique("saga-ticks");
    let acks_queue = unique("saga-tick-acks");
    let repo = PostgresSagaRepository::<TickState>::new(pool.clone(), &name).expect("name");
    repo.create_schema().await.expect("schema");
    let t = rabbit::transport_for(&rabbit::url());
    // The outbox tables exist before two processes start on them.
    let setup = Bus::builder()
        .transport(t.clone())
        .build()
        .await
        .expect("bus");
    let store = PostgresStore::new(pool.clone())
        .tables(None, &prefix)
        .expect("prefix");
    drop(
        Outbox::with_options(store, &setup, fast_outbox())
            .await
            .expect("migrate"),
    );
    let acks = Recorder::<(Uuid, u32)>::default();
    let workers_seen = Recorder::<u32>::default();
    let bus = Bus::builder()
        .transport(t.clone())
        .receive_endpoint(acks_queue.clone(), {
            let (acks, seen) = (acks.clone(), workers_seen.clone());
            move |e| {
                e.prefetch(200)
                    .handler(move |c: ConsumeContext<SagaTickAck>| {
                        acks.push((c.message().counter_id, c.message().n));
                        seen.push(c.message().worker);
                        std::future::ready(Ok(()))
                    })
            }
        })
        .build()
        .await
        .expect("build");
    let running = bus.start().await.expect("start");
    let w1 = Worker::spawn(1, &queue, &name, &prefix).await;
    let w2 = Worker::spawn(2, &queue, &name, &prefix).await;
    let ids: Vec<Uuid> = (0..INSTANCES).map(|_| Uuid::now_v7()).collect();
    let mut ticks: Vec<(Uuid, u32)> = ids
        .iter()
        .flat_map(|id| (1..=PER_INSTANCE).map(move |n| (*id, n)))
        .collect();
    fastrand::shuffle(&mut ticks);
    let started = std::time::Instant::now();
    // 64 sends awaiting their confirm at a time, so the publisher is not what is measured.
    let to = format!("queue:{queue}");
    futures_util::stream::iter(ticks)
        .map(|(counter_id, n)| {
            bus.send(to.clone(), SagaTick { counter_id, n })
                .into_future()
        })
        .buffer_unordered(64)
        .for_each(|sent| {
            sent.expect("send");
            std::future::ready(())
        })
        .await;
    let sent_in = started.elapsed();
    let total = INSTANCES * PER_INSTANCE as usize;
    acks.wait_for(total, Duration::from_secs(240), "every tick's ack")
        .await;
    let elapsed = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut seen = acks.entries();
    assert_eq!(seen.len(), total, "no duplicate downstream");
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), total, "each tick acknowledged once");
    let by_worker = workers_seen.entries();
    let first = by_worker.iter().filter(|w| **w == 1).count();
    assert!(
        first > 0 && first < total,
        "both processes applied ticks (worker 1: {first} of {total})"
    );
    let rows: Vec<(Uuid, i64, serde_json::Value)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT correlation_id, version, data FROM {name}"
    )))
    .fetch_all(&pool)
    .await
    .expect("rows");
    assert_eq!(rows.len(), INSTANCES);
    let sum: u64 = (1..=u64::from(PER_INSTANCE)).sum();
    for (id, version, data) in &rows {
        assert_eq!(version, &i64::from(PER_INSTANCE), "{id}: one save per tick");
        assert_eq!(
            data["count"],
            u64::from(PER_INSTANCE),
            "{id}: no lost update"
        );
        assert_eq!(data["sum"], sum, "{id}");
    }
    println!(
        "two processes: {total} saga events in {elapsed:?} ({:.0}/s; sent in {sent_in:?}), \
         worker 1 applied {first}",
        total as f64 / elapsed.as_secs_f64()
    );
    w1.stop().await;
    w2.stop().await;
    running.shutdown().await.expect("shutdown");
    t.delete_queues(&[
        queue.clone(),
        format!("{queue}_error"),
        format!("{queue}_skipped"),
        acks_queue.clone(),
    ])
    .await
    .expect("delete queues");
    for table in [
        name.clone(),
        format!("{prefix}outbox"),
        format!("{prefix}outbox_state"),
        format!("{prefix}inbox"),
        format!("{prefix}migrations"),
    ] {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}")))
            .execute(&pool)
            .await;
    }
}
