//! A full broker restart (`rabbitmqctl stop_app`, 5 s, `start_app`) while 3,000 messages
//! stream through a busway publisher and consumer: none is lost. Its own test binary, so no
//! other test shares the broker while it is down (test binaries run one after another).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use busway::prelude::*;
use busway::rabbitmq::RabbitMq;
use busway_integration_tests::rabbit::{TestVhost, rabbitmqctl, require_broker};
use busway_integration_tests::support::{init_tracing, unique, wait_until};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Reliability:Streamed")]
struct Streamed {
    n: u32,
}

const MESSAGES: u32 = 3_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_stream_loses_nothing() {
    init_tracing();
    let vhost = TestVhost::create("restart");
    let transport = RabbitMq::builder(&vhost.url())
        .connection_name("busway-tests-restart")
        .publish_timeout(Duration::from_secs(30))
        .reconnect_backoff(Duration::from_millis(100), Duration::from_secs(1))
        .build()
        .expect("url");
    let queue = unique("streamed");
    let seen: Arc<Mutex<(HashSet<u32>, usize)>> = Arc::default();
    let s = seen.clone();
    let bus = Bus::builder()
        .transport(transport)
        .receive_endpoint(queue.clone(), move |e| {
            e.prefetch(32)
                .handler(move |ctx: ConsumeContext<Streamed>| {
                    let mut seen = s.lock().expect("lock");
                    seen.0.insert(ctx.message().n);
                    seen.1 += 1;
                    std::future::ready(Ok(()))
                })
        })
        .build()
        .await
        .expect("build");
    let running = bus.start().await.expect("start");

    let publisher = {
        let bus = bus.clone();
        let queue = queue.clone();
        tokio::spawn(async move {
            let mut failed_sends = 0u32;
            for n in 0..MESSAGES {
                // A send that fails was not accepted: the application sends it again. Each
                // attempt is bounded by the publish timeout; 20 attempts bound the loop.
                let mut attempts = 0;
                while let Err(err) = bus.send(format!("queue:{queue}"), Streamed { n }).await {
                    failed_sends += 1;
                    attempts += 1;
                    assert!(attempts < 20, "send {n} kept failing: {err}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                if n % 100 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            failed_sends
        })
    };

    wait_until(
        Duration::from_secs(60),
        "a third of the stream was consumed",
        || seen.lock().expect("lock").0.len() >= 1_000,
    )
    .await;
    rabbitmqctl(&["-q", "stop_app"]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    rabbitmqctl(&["-q", "start_app"]);
    rabbitmqctl(&["-q", "await_startup"]);
    require_broker();

    let failed_sends = tokio::time::timeout(Duration::from_secs(180), publisher)
        .await
        .expect("the publisher finished within 180 s")
        .expect("the publisher task");
    wait_until(
        Duration::from_secs(120),
        "every message was consumed",
        || seen.lock().expect("lock").0.len() == MESSAGES as usize,
    )
    .await;
    let (distinct, deliveries) = {
        let seen = seen.lock().expect("lock");
        (seen.0.len(), seen.1)
    };
    eprintln!(
        "restart: {distinct} of {MESSAGES} consumed, {} duplicate deliveries, {failed_sends} sends retried",
        deliveries - distinct
    );
    assert_eq!(distinct, MESSAGES as usize);
    running.shutdown().await.expect("shutdown");
}
