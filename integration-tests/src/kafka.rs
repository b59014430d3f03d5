//! Helpers for tests against the local Kafka-protocol broker (nisshi on 127.0.0.1:9092).

use std::net::TcpStream;
use std::time::Duration;

use busway::kafka::Kafka;

/// The brokers for tests: `BUSWAY_KAFKA_BROKERS` or 127.0.0.1:9092.
pub fn brokers() -> String {
    Kafka::env_brokers()
}

/// Panics with how to start the broker when nothing listens.
pub fn require_broker() {
    crate::support::start_watchdog();
    let brokers = brokers();
    let first = brokers
        .split(',')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    let reachable = std::net::ToSocketAddrs::to_socket_addrs(&first)
        .ok()
        .and_then(|mut a| a.next())
        .map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
        .unwrap_or(false);
    assert!(
        reachable,
        "no Kafka-protocol broker is reachable at {first} (BUSWAY_KAFKA_BROKERS={brokers}). Start nisshi with \
         `scripts/services` (it installs it with `cargo +1.96.0 install nisshi --locked --version 0.8.1 \
         --no-default-features --features dynostore` if missing), or run `nisshi broker --listener-url \
         tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092 --storage-engine memory://nisshi/`."
    );
}

/// A transport whose derived topics carry a prefix of their own, so tests never see each
/// other's (or earlier runs') records.
pub fn isolated_transport(partitions: i32) -> Kafka {
    require_broker();
    let prefix = format!("{}.", crate::support::unique("t"));
    Kafka::builder(&brokers())
        .topic_prefix(&prefix)
        .partitions(partitions)
        .publish_timeout(Duration::from_secs(20))
        .consumer_property("session.timeout.ms", "6000")
        .consumer_property("heartbeat.interval.ms", "1000")
        .build()
        .expect("a valid Kafka configuration")
}

/// The dead-letter (`kind` = `error`) or skipped topics of an endpoint.
pub async fn endpoint_topics(kafka: &Kafka, endpoint: &str, kind: &str) -> Vec<String> {
    let prefix = kafka.config().topic_prefix().to_string();
    let suffix = format!(".{endpoint}.{kind}");
    kafka
        .topic_names()
        .await
        .expect("topic metadata")
        .into_iter()
        .filter(|t| t.starts_with(&prefix) && t.ends_with(&suffix))
        .collect()
}
