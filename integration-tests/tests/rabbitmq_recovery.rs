//! Recovery on a real broker: every client connection is closed three times
//! (`rabbitmqctl close_all_connections`) while 10,000 messages stream through. Every message
//! is consumed at least once; duplicates are counted and reported.
//!
//! This file is its own test binary so closing connections cannot disturb other tests
//! (cargo runs test binaries one after another).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use busway::prelude::*;
use busway::transport::QueueAdmin;
use busway_integration_tests::rabbit::{TestVhost, rabbitmqctl, transport_for};
use busway_integration_tests::support::init_tracing;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
struct Numbered {
    n: u32,
}

const TOTAL: u32 = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_all_connections_closed_three_times() {
    init_tracing();
    let vhost = TestVhost::create("recovery");
    let seen: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
    let s = seen.clone();
    let transport = transport_for(&vhost.url());
    let bus = Bus::builder()
        .transport(transport.clone())
        .receive_endpoint("recovering", move |e| {
            e.prefetch(64)
                .handler(move |ctx: ConsumeContext<Numbered>| {
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

    let started = Instant::now();
    let publisher = {
        let bus = bus.clone();
        tokio::spawn(async move {
            let failed = Arc::new(Mutex::new(0u32));
            futures_util::stream::iter(0..TOTAL)
                .for_each_concurrent(32, |n| {
                    let bus = bus.clone();
                    let failed = failed.clone();
                    async move {
                        // A publish that fails (its deadline passed during an outage) is
                        // retried by the application; none may be silently lost.
                        while let Err(err) = bus.send("queue:recovering", Numbered { n }).await {
                            *failed.lock().expect("lock") += 1;
                            tracing::warn!(n, error = %err, "send failed; retrying");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                })
                .await;
            *failed.lock().expect("lock")
        })
    };

    let mut closes = 0;
    for round in 0..3 {
        // Wait for traffic to be flowing before each cut.
        let target = (round + 1) * TOTAL as usize / 5;
        let deadline = Instant::now() + Duration::from_secs(60);
        while seen.lock().expect("lock").len() < target && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let vhost_name = vhost.name().to_string();
        let out = tokio::task::spawn_blocking(move || {
            rabbitmqctl(&[
                "close_all_connections",
                "-p",
                &vhost_name,
                "busway recovery test",
            ])
        })
        .await
        .expect("rabbitmqctl ran");
        closes += 1;
        tracing::info!(round, output = %out.trim(), "closed all connections");
    }
    let failed_sends = publisher.await.expect("the publisher finished");

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let unique = seen.lock().expect("lock").len() as u32;
        if unique == TOTAL {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {unique} of {TOTAL} messages were consumed after {closes} connection cuts"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = seen.lock().expect("lock").clone();
    let deliveries: u32 = seen.values().sum();
    let duplicates = deliveries - TOTAL;
    println!(
        "recovery: {TOTAL} messages, {closes} connection cuts, {deliveries} deliveries, {duplicates} duplicates, {failed_sends} send retries, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        seen.len() as u32,
        TOTAL,
        "every message consumed at least once"
    );
    assert!((0..TOTAL).all(|n| seen.contains_key(&n)));
    assert_eq!(
        transport
            .queue_depth("recovering_error")
            .await
            .expect("depth"),
        0,
        "nothing faulted"
    );
    running.shutdown().await.expect("shutdown");
}

/// While the broker is unreachable, a publish waits for it up to the publish timeout and then
/// fails with an error that names the broker; once it is back, publishing and consuming
/// resume on their own and the messages sent during the outage arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_wait_for_the_broker_then_fail_clearly() {
    use busway_integration_tests::support::{ToggleProxy, wait_until};
    init_tracing();
    let vhost = TestVhost::create("outage");
    let proxy = ToggleProxy::start("127.0.0.1:5672").await;
    let url = format!(
        "amqp://guest:guest@127.0.0.1:{}/{}",
        proxy.port(),
        vhost.name()
    );
    let transport = busway::rabbitmq::RabbitMq::builder(&url)
        .publish_timeout(Duration::from_secs(2))
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(200))
        .build()
        .expect("url");
    let seen: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
    let s = seen.clone();
    let bus = Bus::builder()
        .transport(transport)
        .receive_endpoint("outage", move |e| {
            e.handler(move |ctx: ConsumeContext<Numbered>| {
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
    bus.send("queue:outage", Numbered { n: 1 })
        .await
        .expect("send while up");
    wait_until(Duration::from_secs(10), "the first message arrives", || {
        seen.lock().expect("lock").contains_key(&1)
    })
    .await;

    proxy.down();
    let begun = Instant::now();
    let err = bus
        .send("queue:outage", Numbered { n: 2 })
        .await
        .expect_err("no broker");
    let waited = begun.elapsed();
    assert!(err.is_transport(), "{err}");
    let text = busway::error::chain_text(&err);
    assert!(text.contains("unavailable"), "{text}");
    assert!(
        text.contains(&format!("127.0.0.1:{}", proxy.port())),
        "{text}"
    );
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(6),
        "failed after {waited:?}"
    );

    // A publish that starts during the outage succeeds when the broker returns in time.
    let late = {
        let bus = bus.clone();
        tokio::spawn(async move { bus.send("queue:outage", Numbered { n: 3 }).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.up();
    late.await
        .expect("joined")
        .expect("sent once the broker is back");
    bus.send("queue:outage", Numbered { n: 4 })
        .await
        .expect("send after recovery");
    wait_until(
        Duration::from_secs(20),
        "messages sent around the outage arrive",
        || {
            let seen = seen.lock().expect("lock");
            seen.contains_key(&3) && seen.contains_key(&4)
        },
    )
    .await;
    running.shutdown().await.expect("shutdown");
}
