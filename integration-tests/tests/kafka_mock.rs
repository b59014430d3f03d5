//! Kafka behaviour a single-node Kafka-protocol broker cannot show, on librdkafka's own mock cluster
//! (`rdkafka::mocking::MockCluster`, in-process): heavy back-pressure with multi-record
//! batches, a stuck record that pauses its partition, and a broker that goes down and comes
//! back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use busway::kafka::{Kafka, KafkaEndpointExt};
use busway::prelude::*;
use busway_integration_tests::support::{init_tracing, wait_until};
use futures_util::StreamExt;
use rdkafka::mocking::MockCluster;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
struct Keyed {
    #[message(key)]
    key: u32,
    seq: u32,
}

type Seen = Arc<Mutex<HashMap<u32, Vec<u32>>>>;

/// Messages consumed so far, over all keys.
fn consumed(seen: &Seen) -> usize {
    seen.lock().expect("lock").values().map(Vec::len).sum()
}

/// Every key got `per_key` messages, in increasing sequence order.
fn assert_every_key_whole_and_in_order(seen: &Seen, per_key: usize) {
    for (key, seqs) in seen.lock().expect("lock").iter() {
        assert_eq!(seqs.len(), per_key, "key {key}");
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "key {key} out of order"
        );
    }
}

type Cluster = MockCluster<'static, rdkafka::producer::DefaultProducerContext>;

/// A one-broker mock cluster with the message type's topic and the endpoint's topic
/// (4 partitions each), and a transport on it whose publishes wait up to `timeout`.
fn cluster_for(endpoint: &str, timeout: Duration) -> (Cluster, Kafka) {
    let cluster = MockCluster::new(1).expect("mock cluster");
    let kafka = Kafka::builder(&cluster.bootstrap_servers())
        .partitions(4)
        .create_topics(false)
        .publish_timeout(timeout)
        .build()
        .expect("config");
    cluster
        .create_topic(&kafka.config().topic_for(Keyed::message_type()), 4, 1)
        .expect("topic");
    cluster.create_topic(endpoint, 4, 1).expect("topic");
    (cluster, kafka)
}

/// A window of 20 records per partition forces constant back-pressure while 5,000
/// keyed messages flow: nothing is lost and every key stays in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_pressure_keeps_every_message_and_the_order() {
    init_tracing();
    let (_cluster, kafka) = cluster_for("pressed", Duration::from_secs(10));
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let bus = Bus::builder()
        .transport(kafka.clone())
        .receive_endpoint("pressed", move |e| {
            e.prefetch(8)
                .max_in_flight(20)
                .handler(move |ctx: ConsumeContext<Keyed>| {
                    let s = s.clone();
                    async move {
                        tokio::time::sleep(Duration::from_micros(200)).await;
                        s.lock()
                            .expect("lock")
                            .entry(ctx.message().key)
                            .or_default()
                            .push(ctx.message().seq);
                        Ok(())
                    }
                })
        })
        .build()
        .await
        .expect("build");
    let running = bus.start().await.expect("start");
    futures_util::stream::iter(0..50u32)
        .for_each_concurrent(50, |key| {
            let bus = bus.clone();
            async move {
                for seq in 0..100u32 {
                    bus.publish(Keyed { key, seq }).await.expect("publish");
                }
            }
        })
        .await;
    wait_until(Duration::from_secs(60), "5,000 consumed", || {
        consumed(&seen) >= 5000
    })
    .await;
    assert_every_key_whole_and_in_order(&seen, 100);
    running.shutdown().await.expect("shutdown");
}

/// One record that never finishes fills its partition's in-flight window. The pump stops
/// polling while a window is full, but only for a few seconds: then it pauses that partition
/// and the other partitions go on. Once the record finishes, its partition catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_record_pauses_only_its_own_partition() {
    init_tracing();
    let (_cluster, kafka) = cluster_for("stuck", Duration::from_secs(10));
    let seen: Seen = Arc::default();
    let release = Arc::new(tokio::sync::Notify::new());
    let (s, r) = (seen.clone(), release.clone());
    let bus = Bus::builder()
        .transport(kafka.clone())
        .receive_endpoint("stuck", move |e| {
            e.prefetch(16)
                .max_in_flight(20)
                .handler(move |ctx: ConsumeContext<Keyed>| {
                    let (s, r) = (s.clone(), r.clone());
                    async move {
                        let m = ctx.message();
                        if m.key == 0 && m.seq == 0 {
                            r.notified().await;
                        }
                        s.lock()
                            .expect("lock")
                            .entry(m.key)
                            .or_default()
                            .push(m.seq);
                        Ok(())
                    }
                })
        })
        .build()
        .await
        .expect("build");
    let running = bus.start().await.expect("start");
    for seq in 0..50u32 {
        for key in 0..40u32 {
            bus.publish(Keyed { key, seq }).await.expect("publish");
        }
    }
    // Keys spread over 4 partitions; the three without key 0 hold about 1,500 of the 2,000.
    wait_until(
        Duration::from_secs(40),
        "the partitions without the stuck record to be consumed",
        || consumed(&seen) >= 1000,
    )
    .await;
    assert!(
        !seen.lock().expect("lock").contains_key(&0),
        "key 0 waits behind its first record"
    );
    release.notify_one();
    wait_until(Duration::from_secs(40), "all 2,000 consumed", || {
        consumed(&seen) >= 2000
    })
    .await;
    assert_every_key_whole_and_in_order(&seen, 50);
    running.shutdown().await.expect("shutdown");
}

/// While the broker is down a publish fails as unavailable within its timeout (2 s here, and
/// a second's grace for librdkafka's report), even when librdkafka itself holds the request
/// longer; when the broker is back, publishing and consuming resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_is_an_unavailable_error_and_is_survived() {
    init_tracing();
    let (cluster, kafka) = cluster_for("outage", Duration::from_secs(2));
    let seen: Arc<Mutex<Vec<u32>>> = Arc::default();
    let s = seen.clone();
    let bus = Bus::builder()
        .transport(kafka.clone())
        .receive_endpoint("outage", move |e| {
            e.handler(move |ctx: ConsumeContext<Keyed>| {
                let s = s.clone();
                async move {
                    s.lock().expect("lock").push(ctx.message().seq);
                    Ok(())
                }
            })
        })
        .build()
        .await
        .expect("build");
    let running = bus.start().await.expect("start");
    bus.publish(Keyed { key: 1, seq: 1 })
        .await
        .expect("publish while up");
    wait_until(Duration::from_secs(30), "the first message", || {
        seen.lock().expect("lock").contains(&1)
    })
    .await;

    cluster.broker_down(1).expect("broker down");
    let begun = Instant::now();
    let err = bus
        .publish(Keyed { key: 1, seq: 2 })
        .await
        .expect_err("no broker");
    assert!(err.is_unavailable(), "{err}");
    assert!(
        begun.elapsed() < Duration::from_secs(5),
        "failed within its timeout: {:?}",
        begun.elapsed()
    );

    cluster.broker_up(1).expect("broker up");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match bus.publish(Keyed { key: 1, seq: 3 }).await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => tracing::debug!(error = %e, "not yet"),
            Err(e) => panic!("publishing did not recover: {e}"),
        }
    }
    wait_until(Duration::from_secs(30), "consumption resumes", || {
        seen.lock().expect("lock").contains(&3)
    })
    .await;
    running.shutdown().await.expect("shutdown");
}

/// A one-partition mock cluster whose dead-letter topic for `endpoint` refuses writes, and a
/// transport on it with `policy`: (cluster, transport, the message topic, the dead-letter
/// topic).
fn refusing_dead_letters(
    endpoint: &str,
    policy: busway::kafka::DeadLetterFailure,
) -> (
    MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    Kafka,
    String,
    String,
) {
    let cluster = MockCluster::new(1).expect("mock cluster");
    let kafka = Kafka::builder(&cluster.bootstrap_servers())
        .partitions(1)
        .create_topics(false)
        .publish_timeout(Duration::from_secs(1))
        .dead_letter_failure(policy)
        .build()
        .expect("config");
    let topic = kafka.config().topic_for(Keyed::message_type());
    let dead_letters = kafka.config().dead_letter_topic(&topic, endpoint);
    cluster.create_topic(&topic, 1, 1).expect("topic");
    cluster
        .create_topic(&dead_letters, 1, 1)
        .expect("dead-letter topic");
    cluster
        .topic_error(
            &dead_letters,
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
        )
        .expect("topic error");
    (cluster, kafka, topic, dead_letters)
}

/// Issue 12.6: a record whose dead-letter copy cannot be written (the mock refuses its
/// topic) does not spin: with the default policy it is parked (consumed once, later records
/// of its key wait, the write retried with back-off); with `SkipAfter(3)` it is logged as lost
/// after 3 failed writes and its key goes on. Before: 76,251 retries in 20 s and the next
/// record of the key never ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_dead_letter_topic_parks_or_skips_as_configured() {
    use busway::kafka::DeadLetterFailure;
    init_tracing();
    for policy in [DeadLetterFailure::Park, DeadLetterFailure::SkipAfter(3)] {
        let endpoint = busway_integration_tests::support::unique("dlq-fails");
        let (_cluster, kafka, _, _) = refusing_dead_letters(&endpoint, policy);
        let calls: Seen = Arc::default();
        let c = calls.clone();
        let bus = Bus::builder()
            .transport(kafka.clone())
            .receive_endpoint(endpoint.clone(), move |e| {
                e.handler(move |ctx: ConsumeContext<Keyed>| {
                    let seq = ctx.message().seq;
                    c.lock().expect("lock").entry(seq).or_default().push(seq);
                    std::future::ready(if seq == 0 {
                        Err(ConsumeError::msg("the first record always fails"))
                    } else {
                        Ok(())
                    })
                })
            })
            .build()
            .await
            .expect("build");
        let running = bus.start().await.expect("start");
        for seq in 0..2 {
            bus.publish(Keyed { key: 1, seq }).await.expect("publish");
        }
        let started = Instant::now();
        match policy {
            DeadLetterFailure::SkipAfter(_) => {
                wait_until(
                    Duration::from_secs(30),
                    "the next record of the key ran",
                    || calls.lock().expect("lock").contains_key(&1),
                )
                .await;
            }
            _ => tokio::time::sleep(Duration::from_secs(4)).await,
        }
        let calls = calls.lock().expect("lock").clone();
        assert_eq!(
            calls.get(&0).map(Vec::len),
            Some(1),
            "{policy:?}: the failing record ran once"
        );
        match policy {
            DeadLetterFailure::Park => {
                assert!(!calls.contains_key(&1), "parked: the key waits behind it");
            }
            _ => {
                assert_eq!(calls.get(&1).map(Vec::len), Some(1));
                println!(
                    "{policy:?}: skipped after {:.1} s",
                    started.elapsed().as_secs_f64()
                );
            }
        }
        running.shutdown().await.expect("shutdown");
    }
}

/// Issue 12.6, the third policy: with `StopAfter(3)` an unwritable dead-letter copy stops
/// the endpoint after 3 failed writes. The record's key waits behind it meanwhile (other
/// keys may run during the back-off); once stopped the endpoint runs nothing more, nothing
/// past the record is committed, and a new bus on the same endpoint, once the dead-letter
/// topic takes writes again, runs the record again, dead-letters it and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_dead_letter_topic_stops_the_endpoint_when_asked() {
    use busway::kafka::DeadLetterFailure;
    use rdkafka::types::RDKafkaRespErr;
    init_tracing();
    let endpoint = busway_integration_tests::support::unique("dlq-stops");
    let (cluster, kafka, topic, dead_letters) =
        refusing_dead_letters(&endpoint, DeadLetterFailure::StopAfter(3));
    let calls: Seen = Arc::default();
    let start = |kafka: Kafka, calls: Seen| {
        let endpoint = endpoint.clone();
        async move {
            let bus = Bus::builder()
                .transport(kafka)
                .receive_endpoint(endpoint, move |e| {
                    e.handler(move |ctx: ConsumeContext<Keyed>| {
                        let seq = ctx.message().seq;
                        calls
                            .lock()
                            .expect("lock")
                            .entry(seq)
                            .or_default()
                            .push(seq);
                        std::future::ready(if seq == 0 {
                            Err(ConsumeError::msg("the first record always fails"))
                        } else {
                            Ok(())
                        })
                    })
                })
                .build()
                .await
                .expect("build");
            let running = bus.start().await.expect("start");
            (bus, running)
        }
    };
    let (bus, running) = start(kafka.clone(), calls.clone()).await;
    bus.publish(Keyed { key: 1, seq: 0 })
        .await
        .expect("publish");
    bus.publish(Keyed { key: 1, seq: 1 })
        .await
        .expect("publish");
    bus.publish(Keyed { key: 2, seq: 2 })
        .await
        .expect("publish");
    wait_until(Duration::from_secs(30), "the failing record ran", || {
        calls.lock().expect("lock").contains_key(&0)
    })
    .await;
    // Three failed writes take well under 2 s (100 ms doubling to 400 ms).
    tokio::time::sleep(Duration::from_secs(3)).await;
    bus.publish(Keyed { key: 3, seq: 3 })
        .await
        .expect("publish");
    tokio::time::sleep(Duration::from_secs(3)).await;
    {
        let calls = calls.lock().expect("lock");
        assert_eq!(calls.get(&0).map(Vec::len), Some(1), "{calls:?}");
        assert!(
            !calls.contains_key(&1),
            "the record's key waited behind it: {calls:?}"
        );
        assert!(
            !calls.contains_key(&3),
            "the stopped endpoint ran nothing sent after it stopped: {calls:?}"
        );
    }
    running.shutdown().await.expect("shutdown");
    assert_eq!(
        kafka.lag(&endpoint, &topic).await.expect("lag"),
        4,
        "nothing was committed past the record"
    );

    // Fixed: the dead-letter topic takes writes again, and the endpoint starts again.
    cluster
        .topic_error(&dead_letters, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR)
        .expect("clear the topic error");
    let (_bus, running) = start(kafka.clone(), calls.clone()).await;
    wait_until(Duration::from_secs(30), "the other records ran", || {
        let calls = calls.lock().expect("lock");
        calls.contains_key(&1) && calls.contains_key(&2) && calls.contains_key(&3)
    })
    .await;
    running.shutdown().await.expect("shutdown");
    let calls = calls.lock().expect("lock").clone();
    assert_eq!(
        calls.get(&0).map(Vec::len),
        Some(2),
        "the record ran again: {calls:?}"
    );
    assert_eq!(calls.get(&1).map(Vec::len), Some(1), "{calls:?}");
    assert_eq!(calls.get(&3).map(Vec::len), Some(1), "{calls:?}");
    let dead = kafka
        .read(&dead_letters, "dlq-reader")
        .await
        .expect("read the dead letters");
    assert_eq!(dead.len(), 1, "the record was dead-lettered once");
    assert_eq!(kafka.lag(&endpoint, &topic).await.expect("lag"), 0);
}
