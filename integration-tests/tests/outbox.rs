//! The transactional outbox and inbox against a real PostgreSQL (127.0.0.1:5432, database
//! `test`) and a SQLite file. Every test runs on both, with its own table prefix (PostgreSQL)
//! or its own file (SQLite).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use busway::outbox::sqlx::{self, AssertSqlSafe, Database, Row};
use busway::outbox::{
    EndpointOutboxExt, Outbox, OutboxOptions, OutboxStore, PostgresStore, SqliteStore, transaction,
};
use busway::prelude::*;
use busway_integration_tests::db::{SqliteFile, postgres_pool};
use busway_integration_tests::rabbit::TestVhost;
use busway_integration_tests::support::{Counter, ToggleProxy, init_tracing, unique, wait_until};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
struct OrderPlaced {
    n: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
struct PlaceOrder {
    n: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
struct OrderConfirmed {
    n: u32,
}

const WAIT: Duration = Duration::from_secs(30);

/// One database for one test.
#[async_trait]
trait TestDb: Send + Sync + Sized + 'static {
    type Db: Database;
    type Store: OutboxStore<Database = Self::Db> + Clone + std::fmt::Debug;

    async fn open() -> Self;
    fn store(&self) -> Self::Store;
    /// A store on a pool of its own, as a second process would have.
    async fn second_store(&self) -> Self::Store;
    fn table(&self, name: &str) -> String;
    async fn begin(&self) -> sqlx::Transaction<'static, Self::Db>;
    async fn execute(&self, conn: &mut <Self::Db as Database>::Connection, sql: &str);
    async fn scalar(&self, sql: &str) -> i64;
    async fn scalar_in(&self, conn: &mut <Self::Db as Database>::Connection, sql: &str) -> i64;
    async fn close(&self);
}

struct Pg {
    pool: sqlx::PgPool,
    prefix: String,
}

#[async_trait]
impl TestDb for Pg {
    type Db = sqlx::Postgres;
    type Store = PostgresStore;

    async fn open() -> Self {
        let prefix = unique("t").replace('-', "_") + "_";
        Self {
            pool: postgres_pool().await,
            prefix,
        }
    }
    fn store(&self) -> PostgresStore {
        PostgresStore::new(self.pool.clone())
            .tables(None, &self.prefix)
            .expect("prefix")
    }
    async fn second_store(&self) -> PostgresStore {
        PostgresStore::new(postgres_pool().await)
            .tables(None, &self.prefix)
            .expect("prefix")
    }
    fn table(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
    async fn begin(&self) -> sqlx::Transaction<'static, sqlx::Postgres> {
        self.pool.begin().await.expect("begin")
    }
    async fn execute(&self, conn: &mut sqlx::PgConnection, sql: &str) {
        sqlx::query(AssertSqlSafe(sql.to_string()))
            .execute(conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    async fn scalar(&self, sql: &str) -> i64 {
        sqlx::query(AssertSqlSafe(sql.to_string()))
            .fetch_one(&self.pool)
            .await
            .and_then(|r| r.try_get::<i64, _>(0))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
    async fn scalar_in(&self, conn: &mut sqlx::PgConnection, sql: &str) -> i64 {
        sqlx::query(AssertSqlSafe(sql.to_string()))
            .fetch_one(conn)
            .await
            .and_then(|r| r.try_get::<i64, _>(0))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
    async fn close(&self) {
        for t in [
            "outbox",
            "outbox_state",
            "inbox",
            "migrations",
            "orders",
            "counters",
        ] {
            let _ = sqlx::query(AssertSqlSafe(format!(
                "DROP TABLE IF EXISTS {}{t}",
                self.prefix
            )))
            .execute(&self.pool)
            .await;
        }
    }
}

struct Lite {
    file: SqliteFile,
    pool: sqlx::SqlitePool,
}

#[async_trait]
impl TestDb for Lite {
    type Db = sqlx::Sqlite;
    type Store = SqliteStore;

    async fn open() -> Self {
        let file = SqliteFile::new("outbox");
        let pool = file.pool().await;
        Self { file, pool }
    }
    fn store(&self) -> SqliteStore {
        SqliteStore::new(self.pool.clone())
    }
    async fn second_store(&self) -> SqliteStore {
        SqliteStore::new(self.file.pool().await)
    }
    fn table(&self, name: &str) -> String {
        format!("busway_{name}")
    }
    async fn begin(&self) -> sqlx::Transaction<'static, sqlx::Sqlite> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .expect("begin")
    }
    async fn execute(&self, conn: &mut sqlx::SqliteConnection, sql: &str) {
        sqlx::query(AssertSqlSafe(sql.to_string()))
            .execute(conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    async fn scalar(&self, sql: &str) -> i64 {
        sqlx::query(AssertSqlSafe(sql.to_string()))
            .fetch_one(&self.pool)
            .await
            .and_then(|r| r.try_get::<i64, _>(0))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
    async fn scalar_in(&self, conn: &mut sqlx::SqliteConnection, sql: &str) -> i64 {
        sqlx::query(AssertSqlSafe(sql.to_string()))
            .fetch_one(conn)
            .await
            .and_then(|r| r.try_get::<i64, _>(0))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
    async fn close(&self) {
        self.pool.close().await;
    }
}

fn fast_options() -> OutboxOptions {
    OutboxOptions {
        poll_interval: Duration::from_millis(50),
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
        ..OutboxOptions::default()
    }
}

/// Waits (up to [`WAIT`]) until the outbox has nothing left to deliver, and asserts it.
async fn assert_nothing_pending<S: OutboxStore>(outbox: &Outbox<S>) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while outbox.pending().await.expect("count") > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        outbox.pending().await.expect("count"),
        0,
        "every row is marked delivered"
    );
}

/// A bus on the in-memory transport whose `counting` endpoint records every `OrderPlaced`.
async fn counting_bus() -> (Bus, busway::RunningBus, Arc<Mutex<HashMap<u32, u32>>>) {
    let seen: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
    let s = seen.clone();
    let bus = Bus::builder()
        .receive_endpoint("counting", move |e| {
            e.handler(move |ctx: ConsumeContext<OrderPlaced>| {
                let s = s.clone();
                async move {
                    *s.lock().expect("lock").entry(ctx.message().n).or_default() += 1;
                    Ok(())
                }
            })
        })
        .build()
        .await
        .expect("build");
    let running = bus.start().await.expect("start");
    (bus, running, seen)
}

/// A rolled-back transaction publishes nothing; a committed one publishes exactly once.
async fn rollback_publishes_nothing_commit_publishes_once<D: TestDb>() {
    init_tracing();
    let db = D::open().await;
    let (bus, running, seen) = counting_bus().await;
    let outbox = Outbox::with_options(db.store(), &bus, fast_options())
        .await
        .expect("migrate");
    let dispatcher = outbox.start_dispatcher();

    let mut tx = db.begin().await;
    outbox
        .publish(&mut tx, OrderPlaced { n: 1 })
        .await
        .expect("store");
    tx.rollback().await.expect("rollback");

    let mut tx = db.begin().await;
    outbox
        .publish(&mut tx, OrderPlaced { n: 2 })
        .await
        .expect("store");
    assert_eq!(
        outbox.pending().await.expect("count"),
        0,
        "uncommitted rows are invisible"
    );
    tx.commit().await.expect("commit");

    wait_until(WAIT, "the committed event is consumed", || {
        seen.lock().expect("lock").contains_key(&2)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.get(&2), Some(&1), "delivered exactly once");
    assert!(
        !seen.contains_key(&1),
        "the rolled-back event was never delivered"
    );
    assert_eq!(outbox.pending().await.expect("count"), 0);
    let delivered = db
        .scalar(&format!(
            "SELECT COUNT(*) FROM {} WHERE delivered_at IS NOT NULL",
            db.table("outbox")
        ))
        .await;
    assert_eq!(delivered, 1, "the row is marked delivered");
    dispatcher.stop().await;
    running.shutdown().await.expect("shutdown");
    db.close().await;
}

/// With the broker unreachable, 1,000 events commit to the outbox; when it comes back, all
/// of them are delivered, none lost.
async fn broker_outage_loses_nothing<D: TestDb>() {
    outage_loses_nothing::<D>(1).await;
}

/// The same outage with 16 deliveries in flight: the sends that were in flight when the
/// broker went away are sent again; none is lost.
async fn broker_outage_with_a_delivery_window_loses_nothing<D: TestDb>() {
    outage_loses_nothing::<D>(16).await;
}

async fn outage_loses_nothing<D: TestDb>(delivery_window: usize) {
    init_tracing();
    let db = D::open().await;
    let vhost = TestVhost::create("outbox");
    let proxy = ToggleProxy::start("127.0.0.1:5672").await;
    let url = format!(
        "amqp://guest:guest@127.0.0.1:{}/{}",
        proxy.port(),
        vhost.name()
    );
    let transport = busway::rabbitmq::RabbitMq::builder(&url)
        .publish_timeout(Duration::from_millis(500))
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(200))
        .build()
        .expect("url");
    // The publishing service reaches the broker through the proxy; the consuming service
    // (another process in real life) is connected directly and stays up.
    let bus = Bus::builder()
        .transport(transport)
        .build()
        .await
        .expect("build while the broker is up");
    let seen: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
    let s = seen.clone();
    let consumer = Bus::builder()
        .transport(busway_integration_tests::rabbit::transport_for(
            &vhost.url(),
        ))
        .receive_endpoint("outbox-outage", move |e| {
            e.prefetch(100)
                .handler(move |ctx: ConsumeContext<OrderPlaced>| {
                    let s = s.clone();
                    async move {
                        *s.lock().expect("lock").entry(ctx.message().n).or_default() += 1;
                        Ok(())
                    }
                })
        })
        .build()
        .await
        .expect("build");
    let running = consumer.start().await.expect("start");
    let options = OutboxOptions {
        delivery_window,
        ..fast_options()
    };
    let outbox = Outbox::with_options(db.store(), &bus, options)
        .await
        .expect("migrate");
    let dispatcher = outbox.start_dispatcher();

    proxy.down();
    for batch in 0..10u32 {
        let mut tx = db.begin().await;
        for i in 0..100u32 {
            outbox
                .publish(&mut tx, OrderPlaced { n: batch * 100 + i })
                .await
                .expect("store while the broker is down");
        }
        tx.commit().await.expect("commit while the broker is down");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pending = outbox.pending().await.expect("count");
    assert_eq!(
        pending, 1000,
        "nothing could be delivered during the outage"
    );
    assert_eq!(
        outbox.parked().await.expect("count"),
        0,
        "an outage never parks messages"
    );

    proxy.up();
    let back = std::time::Instant::now();
    wait_until(
        Duration::from_secs(60),
        "all 1,000 events are consumed",
        || seen.lock().expect("lock").len() == 1000,
    )
    .await;
    let drained = back.elapsed();
    assert_nothing_pending(&outbox).await;
    let duplicates: u32 = seen.lock().expect("lock").values().map(|c| c - 1).sum();
    println!(
        "outbox outage (window {delivery_window}): 1000 events, all consumed {:.1} s after the broker returned, {duplicates} duplicates",
        drained.as_secs_f64()
    );
    dispatcher.stop().await;
    running.shutdown().await.expect("shutdown");
    db.close().await;
}

/// With 32 deliveries in flight, 2,000 events of one outbox reach a one-at-a-time consumer
/// on RabbitMQ in the order they were stored, and every row is marked delivered.
async fn a_delivery_window_keeps_the_order<D: TestDb>() {
    init_tracing();
    let db = D::open().await;
    let vhost = TestVhost::create("outbox-window");
    let order: Arc<Mutex<Vec<u32>>> = Arc::default();
    let o = order.clone();
    let bus = Bus::builder()
        .transport(busway_integration_tests::rabbit::transport_for(
            &vhost.url(),
        ))
        .receive_endpoint("outbox-window", move |e| {
            e.prefetch(1)
                .concurrency_limit(1)
                .handler(move |ctx: ConsumeContext<OrderPlaced>| {
                    let o = o.clone();
                    async move {
                        o.lock().expect("lock").push(ctx.message().n);
                        Ok(())
                    }
                })
        })
        .build()
        .await
        .expect("build");
    let running = bus.start().await.expect("start");
    let options = OutboxOptions {
        delivery_window: 32,
        ..fast_options()
    };
    let outbox = Outbox::with_options(db.store(), &bus, options)
        .await
        .expect("migrate");
    for batch in 0..20u32 {
        let mut tx = db.begin().await;
        for i in 0..100u32 {
            outbox
                .publish(&mut tx, OrderPlaced { n: batch * 100 + i })
                .await
                .expect("store");
        }
        tx.commit().await.expect("commit");
    }
    let dispatcher = outbox.start_dispatcher();
    wait_until(
        Duration::from_secs(60),
        "all 2,000 events are consumed",
        || order.lock().expect("lock").len() >= 2000,
    )
    .await;
    let order = order.lock().expect("lock").clone();
    assert_eq!(order, (0..2000).collect::<Vec<u32>>(), "stored order");
    assert_nothing_pending(&outbox).await;
    dispatcher.stop().await;
    running.shutdown().await.expect("shutdown");
    db.close().await;
}

/// Two dispatchers (two pools, as two processes would have) race over 10,000 rows in 8
/// outboxes: every row is delivered once, each outbox in order.
async fn two_dispatchers_deliver_each_row_once<D: TestDb>() {
    init_tracing();
    let db = D::open().await;
    let order: Arc<Mutex<HashMap<u32, Vec<u32>>>> = Arc::default();
    let seen: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
    let (o, s) = (order.clone(), seen.clone());
    let bus = Bus::builder()
        .receive_endpoint("racing", move |e| {
            e.prefetch(1)
                .handler(move |ctx: ConsumeContext<OrderPlaced>| {
                    let (o, s) = (o.clone(), s.clone());
                    async move {
                        let n = ctx.message().n;
                        *s.lock().expect("lock").entry(n).or_default() += 1;
                        o.lock().expect("lock").entry(n % 8).or_default().push(n);
                        Ok(())
                    }
                })
        })
        .build()
        .await
        .expect("build");
    let running = bus.start().await.expect("start");
    let first = Outbox::with_options(db.store(), &bus, fast_options())
        .await
        .expect("migrate");
    let second = Outbox::with_options(db.second_store().await, &bus, fast_options())
        .await
        .expect("migrate again");
    let outboxes: Vec<_> = (0..8)
        .map(|k| first.with_outbox_id(&format!("outbox-{k}")))
        .collect();
    for chunk in 0..20u32 {
        let mut tx = db.begin().await;
        for i in 0..500u32 {
            let n = chunk * 500 + i;
            outboxes[(n % 8) as usize]
                .publish(&mut tx, OrderPlaced { n })
                .await
                .expect("store");
        }
        tx.commit().await.expect("commit");
    }
    let started = std::time::Instant::now();
    let d1 = first.start_dispatcher();
    let d2 = second.start_dispatcher();
    wait_until(Duration::from_secs(120), "10,000 rows delivered", || {
        seen.lock().expect("lock").len() == 10_000
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 10_000);
    assert!(seen.values().all(|c| *c == 1), "a row was delivered twice");
    for (k, ns) in order.lock().expect("lock").iter() {
        assert!(
            ns.windows(2).all(|w| w[0] < w[1]),
            "outbox-{k} was delivered out of order"
        );
    }
    println!(
        "two dispatchers: 10000 rows in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    d1.stop().await;
    d2.stop().await;
    running.shutdown().await.expect("shutdown");
    db.close().await;
}

/// Creates the consumer's own tables.
async fn consumer_tables<D: TestDb>(db: &D) {
    let mut tx = db.begin().await;
    db.execute(
        &mut tx,
        &format!(
            "CREATE TABLE IF NOT EXISTS {} (n BIGINT PRIMARY KEY, times BIGINT NOT NULL)",
            db.table("counters")
        ),
    )
    .await;
    db.execute(
        &mut tx,
        &format!(
            "CREATE TABLE IF NOT EXISTS {} (n BIGINT NOT NULL)",
            db.table("orders")
        ),
    )
    .await;
    tx.commit().await.expect("commit");
}

/// The same message delivered three times to an endpoint with the inbox changes the
/// consumer's table once and publishes once.
async fn inbox_applies_a_message_once<D: TestDb>() {
    init_tracing();
    let db = Arc::new(D::open().await);
    consumer_tables(&*db).await;
    let confirmed = Counter::default();
    let attempts = Counter::default();
    let transport = InMemory::new();
    let bus = Bus::builder()
        .transport(transport.clone())
        .build()
        .await
        .expect("the bus the outbox delivers through");
    let outbox = Outbox::with_options(db.store(), &bus, fast_options())
        .await
        .expect("migrate");
    let (d, a, c) = (db.clone(), attempts.clone(), confirmed.clone());
    let consuming = Bus::builder()
        .transport(transport.clone())
        .receive_endpoint("place-order", move |e| {
            e.transactional_outbox(&outbox).handler(move |ctx: ConsumeContext<PlaceOrder>| {
                let (d, a) = (d.clone(), a.clone());
                async move {
                    a.incr();
                    let tx = transaction::<<D as TestDb>::Db, _>(&ctx)?;
                    let sql = format!(
                        "INSERT INTO {t} (n, times) VALUES ({n}, 1) ON CONFLICT (n) DO UPDATE SET times = {t}.times + 1",
                        t = d.table("counters"),
                        n = ctx.message().n
                    );
                    d.execute(&mut *tx.lock().await?, &sql).await;
                    ctx.publish(OrderConfirmed { n: ctx.message().n }).await?;
                    Ok(())
                }
            })
        })
        .receive_endpoint("confirmations", move |e| {
            e.handler(move |_: ConsumeContext<OrderConfirmed>| {
                let c = c.clone();
                async move {
                    c.incr();
                    Ok(())
                }
            })
        })
        .build()
        .await
        .expect("build");
    let running = consuming.start().await.expect("start");
    let outbox = Outbox::with_options(db.store(), &bus, fast_options())
        .await
        .expect("migrate");
    let dispatcher = outbox.start_dispatcher();

    let id = busway::new_id();
    for _ in 0..3 {
        bus.send("queue:place-order", PlaceOrder { n: 7 })
            .message_id(id)
            .await
            .expect("send");
    }
    wait_until(WAIT, "the confirmation arrives", || confirmed.get() >= 1).await;
    wait_until(WAIT, "all three deliveries are settled", || {
        transport.queue_len("place-order") == 0 && transport.unacked("place-order") == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        db.scalar(&format!(
            "SELECT times FROM {} WHERE n = 7",
            db.table("counters")
        ))
        .await,
        1,
        "applied once"
    );
    assert_eq!(
        attempts.get(),
        1,
        "the consumer ran once; the duplicates were skipped by the inbox"
    );
    assert_eq!(confirmed.get(), 1, "published once");
    assert_eq!(
        db.scalar(&format!("SELECT COUNT(*) FROM {}", db.table("inbox")))
            .await,
        1
    );
    assert_eq!(transport.queue_len("place-order_error"), 0);
    dispatcher.stop().await;
    running.shutdown().await.expect("shutdown");
    db.close().await;
}

/// A consumer that fails mid-transaction leaves no inbox row, no outbox rows and none of its
/// own writes: the retry starts from a clean slate.
async fn failed_attempts_leave_a_clean_slate<D: TestDb>() {
    init_tracing();
    let db = Arc::new(D::open().await);
    consumer_tables(&*db).await;
    let transport = InMemory::new();
    let bus = Bus::builder()
        .transport(transport.clone())
        .build()
        .await
        .expect("build");
    let outbox = Outbox::with_options(db.store(), &bus, fast_options())
        .await
        .expect("migrate");
    let confirmed = Counter::default();
    let attempts = Counter::default();
    let seen_at_retry: Arc<Mutex<Option<(i64, i64, i64)>>> = Arc::default();
    let (d, a, c, s) = (
        db.clone(),
        attempts.clone(),
        confirmed.clone(),
        seen_at_retry.clone(),
    );
    let consuming = Bus::builder()
        .transport(transport.clone())
        .receive_endpoint("fragile", move |e| {
            e.retry(Retry::immediate(2))
                .transactional_outbox(&outbox)
                .handler(move |ctx: ConsumeContext<PlaceOrder>| {
                    let (d, a, s) = (d.clone(), a.clone(), s.clone());
                    async move {
                        let attempt = a.incr();
                        let tx = transaction::<<D as TestDb>::Db, _>(&ctx)?;
                        let mut conn = tx.lock().await?;
                        if attempt == 2 {
                            // What the retry sees inside its own transaction.
                            let orders = d
                                .scalar_in(
                                    &mut conn,
                                    &format!("SELECT COUNT(*) FROM {}", d.table("orders")),
                                )
                                .await;
                            let inbox = d
                                .scalar_in(
                                    &mut conn,
                                    &format!("SELECT COUNT(*) FROM {}", d.table("inbox")),
                                )
                                .await;
                            let stored = d
                                .scalar_in(
                                    &mut conn,
                                    &format!("SELECT COUNT(*) FROM {}", d.table("outbox")),
                                )
                                .await;
                            *s.lock().expect("lock") = Some((orders, inbox, stored));
                        }
                        d.execute(
                            &mut conn,
                            &format!(
                                "INSERT INTO {} (n) VALUES ({})",
                                d.table("orders"),
                                ctx.message().n
                            ),
                        )
                        .await;
                        drop(conn);
                        ctx.publish(OrderConfirmed { n: ctx.message().n }).await?;
                        if attempt == 1 {
                            return Err(ConsumeError::msg("failed after writing and publishing"));
                        }
                        Ok(())
                    }
                })
        })
        .receive_endpoint("fragile-confirmations", move |e| {
            e.handler(move |_: ConsumeContext<OrderConfirmed>| {
                let c = c.clone();
                async move {
                    c.incr();
                    Ok(())
                }
            })
        })
        .build()
        .await
        .expect("build");
    let running = consuming.start().await.expect("start");
    let dispatcher = Outbox::with_options(db.store(), &bus, fast_options())
        .await
        .expect("migrate")
        .start_dispatcher();

    bus.send("queue:fragile", PlaceOrder { n: 9 })
        .await
        .expect("send");
    wait_until(WAIT, "the confirmation arrives", || confirmed.get() >= 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(attempts.get(), 2);
    let seen = seen_at_retry
        .lock()
        .expect("lock")
        .expect("the retry looked");
    assert_eq!(seen.0, 0, "the failed attempt's own write was rolled back");
    assert_eq!(
        seen.1, 1,
        "only the retry's own inbox row (the failed attempt's was rolled back)"
    );
    assert_eq!(seen.2, 0, "the failed attempt stored no outbox rows");
    assert_eq!(
        db.scalar(&format!("SELECT COUNT(*) FROM {}", db.table("orders")))
            .await,
        1
    );
    assert_eq!(
        db.scalar(&format!("SELECT COUNT(*) FROM {}", db.table("inbox")))
            .await,
        1
    );
    assert_eq!(
        confirmed.get(),
        1,
        "only the successful attempt's message was delivered"
    );
    dispatcher.stop().await;
    running.shutdown().await.expect("shutdown");
    db.close().await;
}

/// A message that can never be delivered (its address is not valid for the transport) is
/// parked after its attempts, and the messages behind it in its outbox still go out.
async fn undeliverable_messages_are_parked<D: TestDb>() {
    init_tracing();
    let db = D::open().await;
    let (bus, running, seen) = counting_bus().await;
    let options = OutboxOptions {
        max_attempts: 2,
        ..fast_options()
    };
    let outbox = Outbox::with_options(db.store(), &bus, options)
        .await
        .expect("migrate");
    let dispatcher = outbox.start_dispatcher();
    let mut tx = db.begin().await;
    outbox
        .send(&mut tx, "rabbitmq://elsewhere/orders", OrderPlaced { n: 1 })
        .await
        .expect("store");
    outbox
        .publish(&mut tx, OrderPlaced { n: 2 })
        .await
        .expect("store");
    tx.commit().await.expect("commit");
    wait_until(WAIT, "the message behind the bad one is delivered", || {
        seen.lock().expect("lock").contains_key(&2)
    })
    .await;
    assert_eq!(outbox.parked().await.expect("count"), 1);
    let error = db
        .scalar(&format!(
            "SELECT COUNT(*) FROM {} WHERE failed_at IS NOT NULL AND last_error LIKE '%scheme%'",
            db.table("outbox")
        ))
        .await;
    assert_eq!(error, 1, "the reason is kept with the parked row");
    dispatcher.stop().await;
    running.shutdown().await.expect("shutdown");
    db.close().await;
}

/// PostgreSQL wakes dispatchers with LISTEN/NOTIFY at commit; SQLite dispatchers wake on
/// `notify()`. With a one-minute poll interval, delivery within seconds proves the wake-up.
async fn stored_messages_wake_the_dispatcher<D: TestDb>() {
    init_tracing();
    let db = D::open().await;
    let (bus, running, seen) = counting_bus().await;
    let options = OutboxOptions {
        poll_interval: Duration::from_secs(60),
        ..fast_options()
    };
    let outbox = Outbox::with_options(db.store(), &bus, options)
        .await
        .expect("migrate");
    let dispatcher = outbox.start_dispatcher();
    // Let the dispatcher go idle (and start listening) first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let begun = std::time::Instant::now();
    let mut tx = db.begin().await;
    outbox
        .publish(&mut tx, OrderPlaced { n: 5 })
        .await
        .expect("store");
    tx.commit().await.expect("commit");
    if std::any::type_name::<D>().ends_with("Lite") {
        outbox.notify();
    }
    wait_until(
        Duration::from_secs(10),
        "delivered without waiting for the poll",
        || seen.lock().expect("lock").contains_key(&5),
    )
    .await;
    assert!(begun.elapsed() < Duration::from_secs(10));
    dispatcher.stop().await;
    running.shutdown().await.expect("shutdown");
    db.close().await;
}

/// Delivered rows are removed after the retention period and inbox rows after the window;
/// undelivered and parked rows stay.
async fn old_rows_are_cleaned_up<D: TestDb>() {
    init_tracing();
    let db = D::open().await;
    let (bus, running, seen) = counting_bus().await;
    let options = OutboxOptions {
        retention: Duration::ZERO,
        inbox_window: Duration::ZERO,
        cleanup_interval: Duration::from_millis(100),
        ..fast_options()
    };
    let outbox = Outbox::with_options(db.store(), &bus, options)
        .await
        .expect("migrate");
    let mut tx = db.begin().await;
    outbox
        .publish(&mut tx, OrderPlaced { n: 1 })
        .await
        .expect("store");
    db.execute(
        &mut tx,
        &format!(
            "INSERT INTO {} (endpoint, message_id, received_at) VALUES ('x', '{}', {})",
            db.table("inbox"),
            busway::new_id(),
            if std::any::type_name::<D>().ends_with("Lite") {
                "0"
            } else {
                "now() - interval '1 day'"
            }
        ),
    )
    .await;
    tx.commit().await.expect("commit");
    let dispatcher = outbox.start_dispatcher();
    wait_until(WAIT, "delivered", || {
        seen.lock().expect("lock").contains_key(&1)
    })
    .await;
    let outbox_table = db.table("outbox");
    let inbox_table = db.table("inbox");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let rows = db
            .scalar(&format!("SELECT COUNT(*) FROM {outbox_table}"))
            .await;
        let inbox = db
            .scalar(&format!("SELECT COUNT(*) FROM {inbox_table}"))
            .await;
        if rows == 0 && inbox == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{rows} outbox and {inbox} inbox rows were not cleaned up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    dispatcher.stop().await;
    running.shutdown().await.expect("shutdown");
    db.close().await;
}

/// A send layer that makes every publish take `delay` (a slow broker).
#[derive(Clone)]
struct SlowSends(Duration);

impl<S> tower::Layer<S> for SlowSends {
    type Service = SlowSend<S>;
    fn layer(&self, inner: S) -> SlowSend<S> {
        SlowSend(inner, self.0)
    }
}

#[derive(Clone)]
struct SlowSend<S>(S, Duration);

impl<S> tower::Service<busway::OutgoingMessage> for SlowSend<S>
where
    S: tower::Service<busway::OutgoingMessage, Response = (), Error = busway::Error>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = busway::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), busway::Error>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), busway::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, m: busway::OutgoingMessage) -> Self::Future {
        let delay = self.1;
        let fut = self.0.call(m);
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            fut.await
        })
    }
}

/// Issue 12.13: a batch that takes longer than its lease (SQLite) keeps the lease by
/// renewing it, so a second dispatcher does not claim the same rows: 60 rows, one at a
/// time at 50 ms each (3 s) against a 1 s lease, each delivered once. Before, the lease ran
/// out after 1 s and the other dispatcher delivered the rest again.
async fn a_batch_slower_than_its_lease_is_delivered_once<D: TestDb>() {
    init_tracing();
    let db = D::open().await;
    let seen: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
    let s = seen.clone();
    let bus = Bus::builder()
        .send_layer(SlowSends(Duration::from_millis(50)))
        .receive_endpoint("slow-batch", move |e| {
            e.handler(move |ctx: ConsumeContext<OrderPlaced>| {
                *s.lock().expect("lock").entry(ctx.message().n).or_default() += 1;
                std::future::ready(Ok(()))
            })
        })
        .build()
        .await
        .expect("build");
    let running = bus.start().await.expect("start");
    let options = OutboxOptions {
        lease: Duration::from_secs(1),
        batch_size: 100,
        delivery_window: 1,
        ..fast_options()
    };
    let first = Outbox::with_options(db.store(), &bus, options.clone())
        .await
        .expect("migrate");
    let second = Outbox::with_options(db.second_store().await, &bus, options)
        .await
        .expect("migrate again");
    let mut tx = db.begin().await;
    for n in 0..60u32 {
        first
            .publish(&mut tx, OrderPlaced { n })
            .await
            .expect("store");
    }
    tx.commit().await.expect("commit");
    let d1 = first.start_dispatcher();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let d2 = second.start_dispatcher();
    wait_until(Duration::from_secs(30), "60 rows delivered", || {
        seen.lock().expect("lock").len() == 60
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let twice: Vec<u32> = seen
        .lock()
        .expect("lock")
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(n, _)| *n)
        .collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    d1.stop().await;
    d2.stop().await;
    running.shutdown().await.expect("shutdown");
    db.close().await;
}

/// Issue 12.13: cleanup runs while the dispatcher always has work (it only ran when a round
/// found nothing): rows stream in for 2 s and the delivered ones are removed meanwhile.
async fn cleanup_runs_under_a_constant_backlog<D: TestDb>() {
    init_tracing();
    let db = D::open().await;
    let (bus, running, seen) = counting_bus().await;
    let options = OutboxOptions {
        retention: Duration::ZERO,
        cleanup_interval: Duration::from_millis(100),
        batch_size: 5,
        ..fast_options()
    };
    let outbox = Outbox::with_options(db.store(), &bus, options)
        .await
        .expect("migrate");
    let dispatcher = outbox.start_dispatcher();
    let outbox_table = db.table("outbox");
    let started = tokio::time::Instant::now();
    let mut n = 0u32;
    let mut peak_removed = 0i64;
    while started.elapsed() < Duration::from_secs(2) {
        let mut tx = db.begin().await;
        for _ in 0..20 {
            outbox
                .publish(&mut tx, OrderPlaced { n })
                .await
                .expect("store");
            n += 1;
        }
        tx.commit().await.expect("commit");
        let rows = db
            .scalar(&format!("SELECT COUNT(*) FROM {outbox_table}"))
            .await;
        peak_removed = peak_removed.max(i64::from(n) - rows);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        peak_removed > 0,
        "no delivered row was removed while {n} rows streamed in"
    );
    wait_until(WAIT, "all delivered", || {
        seen.lock().expect("lock").len() == n as usize
    })
    .await;
    dispatcher.stop().await;
    running.shutdown().await.expect("shutdown");
    db.close().await;
}

/// Issue 12.13: an endpoint whose concurrency (12) is above its pool's size (3 connections,
/// 1 s acquire timeout) consumes every message through the transactional outbox; the
/// attempts beyond the pool wait for a connection. Before, each waited in the pool, timed
/// out after 1 s and faulted: healthy messages in `_error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_endpoint_above_its_pool_size_waits_instead_of_faulting() {
    init_tracing();
    busway_integration_tests::db::require_postgres();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(3)
        .acquire_timeout(Duration::from_secs(1))
        .connect(&busway_integration_tests::db::postgres_url())
        .await
        .expect("a PostgreSQL pool");
    let prefix = unique("pool_").replace('-', "_");
    let store = PostgresStore::new(pool)
        .tables(None, &prefix)
        .expect("prefix");
    let transport = InMemory::new();
    let bus = Bus::builder()
        .transport(transport.clone())
        .build()
        .await
        .expect("the bus the outbox delivers through");
    let outbox = Outbox::with_options(store, &bus, fast_options())
        .await
        .expect("migrate");
    let consumed = Counter::default();
    let c = consumed.clone();
    let queue = unique("pool-limited");
    let consuming = Bus::builder()
        .transport(transport.clone())
        .receive_endpoint(queue.clone(), move |e| {
            e.concurrency_limit(12)
                .prefetch(12)
                .transactional_outbox(&outbox)
                .handler(move |_ctx: ConsumeContext<PlaceOrder>| {
                    let c = c.clone();
                    async move {
                        // Holds the attempt's transaction (and its connection) a while.
                        tokio::time::sleep(Duration::from_millis(400)).await;
                        c.incr();
                        Ok(())
                    }
                })
        })
        .build()
        .await
        .expect("build");
    let running = consuming.start().await.expect("start");
    for n in 0..24 {
        bus.send(format!("queue:{queue}"), PlaceOrder { n })
            .await
            .expect("send");
    }
    wait_until(Duration::from_secs(60), "24 consumed", || {
        consumed.get() == 24
    })
    .await;
    assert_eq!(
        transport.queue_len(&format!("{queue}_error")),
        0,
        "none faulted"
    );
    running.shutdown().await.expect("shutdown");
}

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name::<Pg>().await;
                }
            )*
        }
        mod sqlite {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name::<Lite>().await;
                }
            )*
        }
    };
}

on_both!(
    rollback_publishes_nothing_commit_publishes_once,
    broker_outage_loses_nothing,
    broker_outage_with_a_delivery_window_loses_nothing,
    a_delivery_window_keeps_the_order,
    two_dispatchers_deliver_each_row_once,
    inbox_applies_a_message_once,
    failed_attempts_leave_a_clean_slate,
    undeliverable_messages_are_parked,
    stored_messages_wake_the_dispatcher,
    old_rows_are_cleaned_up,
    a_batch_slower_than_its_lease_is_delivered_once,
    cleanup_runs_under_a_constant_backlog,
);
