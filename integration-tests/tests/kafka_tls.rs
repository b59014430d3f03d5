//! The Kafka transport over TLS (`security.protocol=SSL`, feature `kafka-tls`) against a
//! nisshi broker whose only listener speaks TLS, with a certificate made for the test.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use busway::kafka::Kafka;
use busway::prelude::*;
use busway_integration_tests::kafka::TlsBroker;
use busway_integration_tests::support::{init_tracing, unique, wait_until};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:BuswayTests:Sealed")]
struct Sealed {
    n: u32,
}

fn tls_transport(broker: &TlsBroker, ca: &str) -> Kafka {
    Kafka::builder(&broker.brokers())
        .topic_prefix(&format!("{}.", unique("tls")))
        .partitions(2)
        .publish_timeout(Duration::from_secs(10))
        .property("security.protocol", "SSL")
        .property("ssl.ca.location", ca)
        .consumer_property("session.timeout.ms", "6000")
        .consumer_property("heartbeat.interval.ms", "1000")
        .build()
        .expect("a valid Kafka configuration")
}

/// Sends and consumes through the TLS listener: every message arrives once. The listener
/// refuses plaintext, so nothing here can have gone around TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_flow_over_a_tls_listener() {
    init_tracing();
    let broker = TlsBroker::start();
    let kafka = tls_transport(&broker, &broker.ca());
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let endpoint = unique("sealed");
    let bus = Bus::builder()
        .transport(kafka)
        .receive_endpoint(endpoint.clone(), move |e| {
            e.handler(move |_ctx: ConsumeContext<Sealed>| {
                c.fetch_add(1, Ordering::SeqCst);
                std::future::ready(Ok(()))
            })
        })
        .build()
        .await
        .expect("build over TLS");
    let running = bus.start().await.expect("start over TLS");
    for n in 0..20 {
        bus.send(format!("queue:{endpoint}"), Sealed { n })
            .await
            .expect("a send over TLS");
    }
    wait_until(Duration::from_secs(60), "20 consumed over TLS", || {
        calls.load(Ordering::SeqCst) >= 20
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 20, "each consumed once");
    running.shutdown().await.expect("shutdown");

    // A plaintext client gets nowhere with that listener: an error, in bounded time.
    let plain = Kafka::builder(&broker.brokers())
        .publish_timeout(Duration::from_secs(5))
        .build()
        .expect("a valid Kafka configuration");
    let err = send_once(plain, &endpoint).await;
    assert!(
        err.contains("PLAINTEXT"),
        "the error names the protocol: {err}"
    );
}

/// Builds a bus on `kafka` and sends one message: the error that stops it, within 40 s
/// (building checks that the brokers answer; a send waits at most the publish timeout).
async fn send_once(kafka: Kafka, endpoint: &str) -> String {
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(40), async {
        let bus = Bus::builder().transport(kafka).build().await?;
        bus.send(format!("queue:{endpoint}"), Sealed { n: 99 })
            .await
    })
    .await
    .expect("building and sending end in bounded time");
    let err = outcome
        .expect_err("the client cannot talk to the broker")
        .to_string();
    println!("refused after {:?}: {err}", started.elapsed());
    err
}

/// A broker certificate the client does not trust is an error to the sender within the
/// publish timeout, not a hang and not a silent plaintext fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_an_error_not_a_hang() {
    init_tracing();
    let broker = TlsBroker::start();
    let kafka = tls_transport(&broker, &broker.unrelated_ca());
    let err = send_once(kafka, &unique("untrusted")).await;
    assert!(err.contains("SSL"), "the error names the protocol: {err}");
}
