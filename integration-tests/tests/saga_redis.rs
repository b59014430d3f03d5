//! Sagas on the real Redis (127.0.0.1:6379): two buses with their own connections sharing
//! 2,000 events without a lost update, a hash that no longer reads, correlation by query
//! refused with a clear fault, and Redis going away mid-run.

use std::time::Duration;

use busway::prelude::*;
use busway::saga::testing::expect_state;
use busway::saga::{EndpointSagaExt, Query, RedisSagaRepository, StateMachine};
use busway::{TransportMessage, headers::names};
use busway_integration_tests::db::{redis_url, require_redis};
use busway_integration_tests::saga_worker::{TickState, competing_ticks};
use busway_integration_tests::support::{ToggleProxy, init_tracing, take_from, unique};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);

async fn repo<S: busway::saga::SagaState>(url: &str, prefix: &str) -> RedisSagaRepository<S> {
    require_redis();
    RedisSagaRepository::connect(url, prefix)
        .await
        .unwrap_or_else(|e| panic!("Redis at {url}: {e}"))
}

async fn take(t: &InMemory, queue: &str, count: usize) -> Vec<TransportMessage> {
    take_from("in-memory", t, queue, count, WAIT).await
}

/// Two buses, each with its own Redis connection (two processes' worth), compete for one
/// queue: 2,000 ticks for 20 instances in random order, every counter exact, each ack once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_connections_on_one_redis_lose_no_update() {
    init_tracing();
    let prefix = unique("ticks");
    let repos = [
        repo::<TickState>(&redis_url(), &prefix).await,
        repo::<TickState>(&redis_url(), &prefix).await,
    ];
    competing_ticks("redis-ticks", repos, 20, 100).await;
    let client = redis::Client::open(redis_url()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("Redis connection");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    assert_eq!(keys.len(), 20, "one hash per instance");
    let _: i64 = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .expect("DEL");
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, busway::Message)]
#[serde(rename_all = "camelCase")]
struct RedisOpened {
    order_id: Uuid,
    amount: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, busway::Message)]
#[serde(rename_all = "camelCase")]
struct RedisByNumber {
    number: String,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct RedisOrder {
    amount: u32,
}

fn order_machine() -> StateMachine<RedisOrder> {
    let mut m = StateMachine::<RedisOrder>::new("RedisOrderStateMachine");
    let open = m.state("Open");
    let opened = m.event::<RedisOpened>("Opened", |e| e.correlate_by(|m| m.order_id));
    let by_number = m.event::<RedisByNumber>("ByNumber", |e| {
        e.correlate_by_query(|m| Query::eq("number", m.number.clone()))
    });
    let step = |b: busway::saga::Activities<RedisOrder, RedisOpened>| {
        b.then(|ctx| {
            ctx.saga.amount += ctx.message().amount;
            Ok(())
        })
    };
    m.initially()
        .when(opened, move |b| step(b).transition_to(open));
    m.during(open).when(opened, step).ignore(by_number);
    m
}

/// A hash that no longer reads, and an event that correlates by query (which Redis cannot
/// do), each go to `_error` with a reason; Redis going away faults events with the
/// repository's error (none lost), and the saga recovers when it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_faults_say_why_and_the_saga_recovers_from_an_outage() {
    init_tracing();
    require_redis();
    let prefix = unique("redis-orders");
    let proxy = ToggleProxy::start("127.0.0.1:6379").await;
    let repo = repo::<RedisOrder>(&format!("redis://127.0.0.1:{}", proxy.port()), &prefix).await;
    let transport = InMemory::new();
    let bus = Bus::builder()
        .transport(transport.clone())
        .receive_endpoint("redis-orders", {
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
    let to = "queue:redis-orders";
    let id = Uuid::now_v7();
    bus.send(
        to,
        RedisOpened {
            order_id: id,
            amount: 3,
        },
    )
    .await
    .expect("send");
    let i = expect_state(&repo, id, "Open", WAIT).await.expect("open");
    assert_eq!((i.version, i.data.amount), (1, 3));
    // A hash with a field that no longer fits.
    let broken = Uuid::now_v7();
    let client = redis::Client::open(redis_url()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("Redis connection");
    let _: () = redis::cmd("HSET")
        .arg(repo.key(broken))
        .arg(&[
            "state",
            "Open",
            "version",
            "1",
            "meta",
            "{}",
            "data",
            r#"{"amount":"x"}"#,
        ])
        .query_async(&mut conn)
        .await
        .expect("HSET");
    bus.send(
        to,
        RedisOpened {
            order_id: broken,
            amount: 1,
        },
    )
    .await
    .expect("send");
    bus.send(
        to,
        RedisByNumber {
            number: "PO-1".into(),
        },
    )
    .await
    .expect("send");
    let errors = take(&transport, "redis-orders_error", 2).await;
    let mut reasons: Vec<(String, String)> = errors
        .iter()
        .map(|m| {
            (
                m.headers
                    .get_str(names::FAULT_EXCEPTION_TYPE)
                    .unwrap_or_default()
                    .into_owned(),
                m.headers
                    .get_str(names::FAULT_MESSAGE)
                    .unwrap_or_default()
                    .into_owned(),
            )
        })
        .collect();
    reasons.sort();
    assert_eq!(reasons[0].0, "busway::saga::CorruptInstance");
    assert!(reasons[0].1.contains(&broken.to_string()), "{reasons:?}");
    assert_eq!(reasons[1].0, "busway::saga::RepositoryError");
    assert!(reasons[1].1.contains("by query"), "{reasons:?}");
    proxy.down();
    for amount in 1..=3 {
        bus.send(
            to,
            RedisOpened {
                order_id: id,
                amount,
            },
        )
        .await
        .expect("send");
    }
    let errors = take(&transport, "redis-orders_error", 3).await;
    for e in &errors {
        assert_eq!(
            e.headers.get_str(names::FAULT_EXCEPTION_TYPE).as_deref(),
            Some("busway::saga::RepositoryError")
        );
        assert!(
            e.headers
                .get_str(names::FAULT_MESSAGE)
                .is_some_and(|m| m.contains("Redis")),
            "the reason names Redis"
        );
    }
    proxy.up();
    let deadline = tokio::time::Instant::now() + WAIT;
    // The connection manager reconnects; events sent once it has succeed.
    loop {
        bus.send(
            to,
            RedisOpened {
                order_id: id,
                amount: 10,
            },
        )
        .await
        .expect("send");
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Ok(Some(i)) = busway::saga::testing::InspectSagas::instance(&repo, id).await
            && i.data.amount >= 13
        {
            assert_eq!(i.data.amount % 10, 3, "only whole events applied");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the saga never recovered"
        );
    }
    let _: () = redis::cmd("DEL")
        .arg(repo.key(id))
        .arg(repo.key(broken))
        .query_async(&mut conn)
        .await
        .expect("DEL");
    running.shutdown().await.expect("shutdown");
}
