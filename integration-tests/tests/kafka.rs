//! The conformance suite and Kafka-specific tests on a real Kafka-protocol broker (nisshi on
//! 127.0.0.1:9092, or `BUSWAY_KAFKA_BROKERS`). Every test uses topics with a prefix of its own.

use async_trait::async_trait;
use busway::kafka::Kafka;
use busway_integration_tests::TransportFixture;
use busway_integration_tests::kafka::isolated_transport;

struct KafkaFixture;

#[async_trait]
impl TransportFixture for KafkaFixture {
    type Transport = Kafka;

    fn name(&self) -> &'static str {
        "Kafka"
    }

    async fn transport(&self) -> Kafka {
        isolated_transport(3)
    }

    /// Every topic with the test's prefix: the endpoints' topics and dead-letter topics,
    /// and the message types' topics, which only this test used.
    async fn cleanup(&self, kafka: &Kafka, _queues: &[String]) {
        let prefix = kafka.config().topic_prefix().to_string();
        let topics: Vec<String> = kafka
            .topic_names()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|t| t.starts_with(&prefix))
            .collect();
        kafka.delete_topics(&topics).await.expect("delete topics");
    }
}

busway_integration_tests::conformance_suite!(KafkaFixture);

mod kafka_specific {
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use busway::headers::names;
    use busway::kafka::KafkaBusExt;
    use busway::prelude::*;
    use busway::{Address, Transport, TransportMessage};
    use busway_integration_tests::kafka::{brokers, endpoint_topics, isolated_transport};
    use busway_integration_tests::support::{
        Counter, Gauge, header, init_tracing, unique, wait_until,
    };
    use futures_util::StreamExt;
    use rust_decimal::Decimal;
    use serde::{Deserialize, Serialize};
    use uuid::Uuid;

    const WAIT: Duration = Duration::from_secs(60);

    #[derive(Debug, Clone, Serialize, Deserialize, Message)]
    #[serde(rename_all = "camelCase")]
    struct Keyed {
        #[message(key)]
        key: u32,
        seq: u32,
    }

    #[derive(Debug, Clone, Serialize, Deserialize, Message)]
    #[serde(rename_all = "camelCase")]
    #[message(urn = "urn:message:BuswayTests:Numbered")]
    struct Numbered {
        n: u32,
    }

    #[derive(Debug, Clone, Serialize, Deserialize, Message)]
    #[serde(rename_all = "camelCase")]
    #[message(urn = "urn:message:Contracts:OrderPlaced")]
    struct OrderPlaced {
        order_id: Uuid,
        total: Decimal,
    }

    /// 10,000 messages over 100 keys on 6 partitions, concurrency 16: every key's messages in
    /// order, all consumed, and more than one message in flight at a time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn per_key_order_with_parallel_keys() {
        init_tracing();
        let kafka = isolated_transport(6);
        let seen: Arc<Mutex<HashMap<u32, Vec<u32>>>> = Arc::default();
        let gauge = Gauge::default();
        let (s, g) = (seen.clone(), gauge.clone());
        let bus = Bus::builder()
            .transport(kafka.clone())
            .receive_endpoint(unique("ordered"), move |e| {
                e.prefetch(16)
                    .concurrency_limit(16)
                    .handler(move |ctx: ConsumeContext<Keyed>| {
                        let (s, g) = (s.clone(), g.clone());
                        async move {
                            g.enter();
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            s.lock()
                                .expect("lock")
                                .entry(ctx.message().key)
                                .or_default()
                                .push(ctx.message().seq);
                            g.exit();
                            Ok(())
                        }
                    })
            })
            .build()
            .await
            .expect("build");
        let running = bus.start().await.expect("start");
        let started = Instant::now();
        futures_util::stream::iter(0..100u32)
            .for_each_concurrent(100, |key| {
                let bus = bus.clone();
                async move {
                    // One key's messages are produced in order; keys in parallel.
                    for seq in 0..100u32 {
                        bus.publish(Keyed { key, seq }).await.expect("publish");
                    }
                }
            })
            .await;
        let published = started.elapsed();
        wait_until(WAIT, "10,000 messages consumed", || {
            seen.lock()
                .expect("lock")
                .values()
                .map(Vec::len)
                .sum::<usize>()
                >= 10_000
        })
        .await;
        let seen = seen.lock().expect("lock").clone();
        assert_eq!(seen.len(), 100, "every key");
        for (key, seqs) in &seen {
            assert_eq!(seqs.len(), 100, "key {key}: every message once");
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "key {key} out of order: {seqs:?}"
            );
        }
        println!(
            "kafka ordering: 10000 messages, 100 keys, 6 partitions: published in {:.1} s, consumed in {:.1} s, max {} in flight",
            published.as_secs_f64(),
            started.elapsed().as_secs_f64(),
            gauge.max()
        );
        assert!(
            gauge.max() >= 4,
            "processing was not parallel: at most {} at once",
            gauge.max()
        );
        running.shutdown().await.expect("shutdown");
        let topics: Vec<String> = kafka
            .topic_names()
            .await
            .expect("topics")
            .into_iter()
            .filter(|t| t.starts_with(kafka.config().topic_prefix()))
            .collect();
        kafka.delete_topics(&topics).await.expect("cleanup");
    }

    /// A Kafka bus prints its topology as topics and consumer groups, not exchanges.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn topology_prints_topics_and_consumer_groups() {
        init_tracing();
        let kafka = isolated_transport(1);
        let name = unique("described");
        let bus = Bus::builder()
            .transport(kafka.clone())
            .receive_endpoint(name.clone(), |e| {
                e.handler(|_: ConsumeContext<OrderPlaced>| async { Ok(()) })
            })
            .build()
            .await
            .expect("build");
        let config = kafka.config();
        let topic = config.topic_for(OrderPlaced::message_type());
        let own = config.prefixed(&name);
        let text = bus.topology_text();
        assert!(
            text.contains(&format!("  reads consumer group {name}\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "  {} <- topic {topic}\n",
                OrderPlaced::message_type()
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!("  sends <- topic {own}\n")),
            "{text}"
        );
        assert!(
            text.contains(&config.dead_letter_topic(&topic, &name)),
            "{text}"
        );
        assert!(!text.contains("exchange"), "{text}");
        let mermaid = bus.topology_mermaid();
        assert!(mermaid.contains("consumer group"), "{mermaid}");
        assert!(!mermaid.contains("exchange"), "{mermaid}");
        let topics: Vec<String> = kafka
            .topic_names()
            .await
            .expect("topics")
            .into_iter()
            .filter(|t| t.starts_with(config.topic_prefix()))
            .collect();
        kafka.delete_topics(&topics).await.expect("cleanup");
    }

    fn probe() -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_kafka-probe"))
    }

    /// A consumer killed mid-stream (SIGKILL, no shutdown) and started again loses nothing;
    /// the new one resumes exactly at the committed offsets, and the commits trailed the
    /// handled messages by little more than the in-flight windows.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_killed_consumer_resumes_without_loss() {
        init_tracing();
        const TOTAL: u32 = 3000;
        const WINDOW: usize = 50;
        const PARTITIONS: usize = 3;
        let kafka = isolated_transport(PARTITIONS as i32);
        let endpoint = unique("killed");
        let bus = Bus::builder()
            .transport(kafka.clone())
            .build()
            .await
            .expect("build");
        futures_util::stream::iter(0..TOTAL)
            .for_each_concurrent(64, |n| {
                let bus = bus.clone();
                let to = format!("queue:{endpoint}");
                async move { bus.send(to, Numbered { n }).await.expect("send") }
            })
            .await;

        // Each probe's log (partition assignments, pauses, offset gaps) goes to a file that a
        // failure quotes.
        let logs = std::env::temp_dir().join(unique("kafka-probe-logs"));
        std::fs::create_dir_all(&logs).expect("log dir");
        let mut started = 0;
        let mut spawn = || {
            started += 1;
            let log = std::fs::File::create(logs.join(format!("probe-{started}.log")))
                .expect("probe log");
            Command::new(probe())
                .args([
                    brokers(),
                    kafka.config().topic_prefix().to_string(),
                    endpoint.clone(),
                    WINDOW.to_string(),
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::from(log))
                .spawn()
                .expect("the probe starts")
        };
        let mut counts: HashMap<u32, u32> = HashMap::new();
        let mut first = spawn();
        let mut lines = BufReader::new(first.stdout.take().expect("stdout")).lines();
        for line in lines.by_ref() {
            let n: u32 = line.expect("a line").trim().parse().expect("a number");
            *counts.entry(n).or_default() += 1;
            if counts.len() >= TOTAL as usize / 3 {
                break;
            }
        }
        first.kill().expect("SIGKILL");
        let _ = first.wait();
        // What the probe printed before it died (handled, so possibly committed) is still in
        // the reader's buffer and the pipe: count it, or it looks lost. The write end closed
        // with the process, so this ends.
        for line in lines {
            let Ok(line) = line else { break };
            if let Ok(n) = line.trim().parse::<u32>() {
                *counts.entry(n).or_default() += 1;
            }
        }
        let before_kill = counts.len();
        // What the broker holds as committed when the second consumer starts: it must resume
        // exactly there. Handled messages above that point (the in-flight window, plus those
        // whose commit was still on its way when the process died) run again.
        // A commit request the process wrote just before it died may still be in the broker's
        // hands: give it a moment before reading.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let uncommitted = kafka
            .lag(&endpoint, &kafka.endpoint_topic(&endpoint))
            .await
            .expect("read the committed offsets");
        let uncommitted = usize::try_from(uncommitted).expect("a lag");
        let mut consumed_after = 0usize;

        let mut second = spawn();
        let stdout = second.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        while counts.len() < TOTAL as usize || consumed_after < uncommitted {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                // Say which are missing and whether the broker still has them.
                let missing: Vec<u32> = (0..TOTAL).filter(|n| !counts.contains_key(n)).collect();
                let stored: Vec<u32> = kafka
                    .read(&kafka.endpoint_topic(&endpoint), &unique("diagnose"))
                    .await
                    .expect("read the topic")
                    .iter()
                    .filter_map(|m| serde_json::from_slice::<serde_json::Value>(&m.body).ok())
                    .filter_map(|v| v["n"].as_u64().and_then(|n| u32::try_from(n).ok()))
                    .filter(|n| missing.contains(n))
                    .collect();
                let mut notes = String::new();
                for i in 1..=2 {
                    let text = std::fs::read_to_string(logs.join(format!("probe-{i}.log")))
                        .unwrap_or_default();
                    let lines: Vec<&str> = text
                        .lines()
                        .filter(|l| !l.contains("partition resumed"))
                        .collect();
                    notes.push_str(&format!("\n--- probe {i} log (last 60 lines) ---\n"));
                    notes.push_str(&lines[lines.len().saturating_sub(60)..].join("\n"));
                }
                panic!(
                    "only {} of {TOTAL} consumed after the restart ({consumed_after} of the \
                     {uncommitted} not committed; killed after {before_kill}); \
                     missing {missing:?}, of which the topic holds {stored:?}{notes}",
                    counts.len()
                );
            }
            if let Ok(line) = rx.recv_timeout(remaining.min(Duration::from_secs(5))) {
                consumed_after += 1;
                *counts
                    .entry(line.trim().parse().expect("a number"))
                    .or_default() += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        while let Ok(line) = rx.try_recv() {
            consumed_after += 1;
            *counts
                .entry(line.trim().parse().expect("a number"))
                .or_default() += 1;
        }
        let _ = second.kill();
        let _ = second.wait();
        let duplicates: usize = counts.values().map(|c| (c - 1) as usize).sum();
        let committed = TOTAL as usize - uncommitted;
        println!(
            "kafka commit test: {TOTAL} messages, {before_kill} handled before the kill, \
             {committed} committed, {duplicates} consumed twice, {consumed_after} after the restart"
        );
        assert_eq!(counts.len(), TOTAL as usize, "no message lost");
        assert_eq!(
            consumed_after, uncommitted,
            "the restarted consumer runs exactly what was not committed"
        );
        assert_eq!(
            duplicates,
            before_kill - committed,
            "what ran twice is exactly what was handled and not committed"
        );
        // Commits kept up while the stream ran: the killed consumer's commits trail what it
        // handled by its in-flight windows plus about one commit round trip (one commit is in
        // flight at a time), not by everything it handled.
        assert!(
            duplicates <= WINDOW * PARTITIONS + before_kill / 4,
            "{duplicates} of {before_kill} handled messages were not committed at the kill \
             (windows {WINDOW} × {PARTITIONS})"
        );
        let topics: Vec<String> = kafka
            .topic_names()
            .await
            .expect("topics")
            .into_iter()
            .filter(|t| t.starts_with(kafka.config().topic_prefix()))
            .collect();
        kafka.delete_topics(&topics).await.expect("cleanup");
    }

    /// A failing consumer's record and an invalid JSON record land in `<topic>.<group>.error`
    /// with the fault headers; the partition keeps flowing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dead_letters_and_the_partition_keeps_flowing() {
        init_tracing();
        let kafka = isolated_transport(1);
        let endpoint = unique("dlt");
        let ok = Counter::default();
        let o = ok.clone();
        let bus = Bus::builder()
            .transport(kafka.clone())
            .receive_endpoint(endpoint.clone(), move |e| {
                e.retry(Retry::immediate(1))
                    .handler(move |ctx: ConsumeContext<Numbered>| {
                        let o = o.clone();
                        async move {
                            if ctx.message().n == 13 {
                                return Err(ConsumeError::msg("unlucky number"));
                            }
                            o.incr();
                            Ok(())
                        }
                    })
            })
            .build()
            .await
            .expect("build");
        let running = bus.start().await.expect("start");
        let to = format!("queue:{endpoint}");
        bus.send(to.as_str(), Numbered { n: 12 })
            .await
            .expect("send");
        bus.send(to.as_str(), Numbered { n: 13 })
            .await
            .expect("send");
        let raw = TransportMessage::new(bytes::Bytes::from_static(b"{ not json"))
            .with_content_type("application/json");
        kafka
            .send(&Address::queue(endpoint.clone()), raw, &Default::default())
            .await
            .expect("raw send");
        bus.send(to.as_str(), Numbered { n: 14 })
            .await
            .expect("send");
        wait_until(
            WAIT,
            "the messages around the bad ones are consumed",
            || ok.get() == 2,
        )
        .await;

        let dlt = kafka
            .config()
            .dead_letter_topic(&kafka.endpoint_topic(&endpoint), &endpoint);
        let deadline = Instant::now() + WAIT;
        let mut dead = Vec::new();
        while dead.len() < 2 && Instant::now() < deadline {
            dead.extend(kafka.read(&dlt, "dlt-reader").await.expect("read"));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(dead.len(), 2, "two records in {dlt}");
        assert_eq!(
            endpoint_topics(&kafka, &endpoint, "error").await,
            vec![dlt.clone()]
        );
        let failed = dead
            .iter()
            .find(|m| &m.body[..] == br#"{"n":13}"#)
            .expect("the failed record, unchanged");
        assert_eq!(header(failed, names::REASON), "fault");
        assert_eq!(header(failed, names::FAULT_MESSAGE), "unlucky number");
        assert_eq!(header(failed, names::FAULT_RETRY_COUNT), "1");
        assert_eq!(
            header(failed, "MT-Fault-Topic"),
            kafka.endpoint_topic(&endpoint)
        );
        assert!(!header(failed, names::HOST_MACHINE_NAME).is_empty());
        let invalid = dead
            .iter()
            .find(|m| &m.body[..] == b"{ not json")
            .expect("the invalid record");
        assert_eq!(
            header(invalid, names::FAULT_EXCEPTION_TYPE),
            "busway::DeserializeError"
        );
        running.shutdown().await.expect("shutdown");
        assert_eq!(
            kafka
                .lag(&endpoint, &kafka.endpoint_topic(&endpoint))
                .await
                .expect("lag"),
            0,
            "everything committed"
        );
        let topics: Vec<String> = kafka
            .topic_names()
            .await
            .expect("topics")
            .into_iter()
            .filter(|t| t.starts_with(kafka.config().topic_prefix()))
            .collect();
        kafka.delete_topics(&topics).await.expect("cleanup");
    }

    /// What MassTransit's Kafka rider produces (raw camelCase JSON, rider headers, content
    /// type `application/vnd.masstransit+json`, no message type header) reaches a rider-style
    /// topic endpoint; what busway produces carries the rider's headers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn interop_with_the_masstransit_rider() {
        init_tracing();
        let kafka = isolated_transport(1);
        let topic = format!("{}orders", kafka.config().topic_prefix());
        let group = unique("order-service");
        let got = Arc::new(Mutex::new(
            Vec::<(OrderPlaced, Option<Uuid>, Option<String>)>::new(),
        ));
        let g = got.clone();
        let bus = Bus::builder()
            .transport(kafka.clone())
            .topic_endpoint(&topic, &group, move |e| {
                e.handler(move |ctx: ConsumeContext<OrderPlaced>| {
                    let g = g.clone();
                    async move {
                        g.lock().expect("lock").push((
                            ctx.message().clone(),
                            ctx.conversation_id(),
                            ctx.source_address().map(str::to_string),
                        ));
                        Ok(())
                    }
                })
            })
            .build()
            .await
            .expect("build");
        let running = bus.start().await.expect("start");
        let mut headers = busway::Headers::new();
        for (k, v) in [
            ("MessageId", "181c0000-6393-3630-36a4-08daf4e7c6da"),
            ("ConversationId", "181c0000-6393-3630-7cc2-08daf4e7c6db"),
            ("SourceAddress", "rabbitmq://localhost/OrderService"),
            ("DestinationAddress", "rabbitmq://localhost/kafka/orders"),
        ] {
            headers.insert(k, v);
        }
        let rider = TransportMessage::new(bytes::Bytes::from_static(
            br#"{"orderId":"0c9b7f0e-4a48-4d5e-9a57-6c1f6bd2f1d4","total":"12.50"}"#,
        ))
        .with_content_type("application/vnd.masstransit+json")
        .with_headers(headers);
        kafka
            .send(
                &Address::parse(&format!("topic:{topic}")).expect("address"),
                rider,
                &Default::default(),
            )
            .await
            .expect("produce");
        wait_until(WAIT, "the rider's record is consumed", || {
            !got.lock().expect("lock").is_empty()
        })
        .await;
        let (order, conversation, source) = got.lock().expect("lock")[0].clone();
        assert_eq!(order.total.to_string(), "12.50");
        assert_eq!(
            conversation.map(|c| c.to_string()).as_deref(),
            Some("181c0000-6393-3630-7cc2-08daf4e7c6db")
        );
        assert_eq!(source.as_deref(), Some("rabbitmq://localhost/OrderService"));

        // busway's own records: raw JSON value and the rider's header names.
        let order_topic = kafka.config().topic_for(OrderPlaced::message_type());
        bus.publish(OrderPlaced {
            order_id: Uuid::now_v7(),
            total: Decimal::new(999, 2),
        })
        .correlation_id(Uuid::now_v7())
        .await
        .expect("publish");
        let mut produced = Vec::new();
        let deadline = Instant::now() + WAIT;
        while produced.is_empty() && Instant::now() < deadline {
            produced = kafka.read(&order_topic, "inspector").await.expect("read");
        }
        let m = &produced[0];
        let body: serde_json::Value = serde_json::from_slice(&m.body).expect("raw JSON");
        assert_eq!(body["total"], "9.99", "the value is the message itself");
        assert_eq!(m.content_type.as_deref(), Some("application/json"));
        for name in [
            "MessageId",
            "CorrelationId",
            "ConversationId",
            "SourceAddress",
            "DestinationAddress",
            "MT-MessageType",
        ] {
            assert!(m.headers.contains(name), "header {name} in {:?}", m.headers);
        }
        assert_eq!(
            header(m, "MT-MessageType"),
            "urn:message:Contracts:OrderPlaced"
        );
        running.shutdown().await.expect("shutdown");
        let topics: Vec<String> = kafka
            .topic_names()
            .await
            .expect("topics")
            .into_iter()
            .filter(|t| t.starts_with(kafka.config().topic_prefix()))
            .collect();
        kafka.delete_topics(&topics).await.expect("cleanup");
    }

    /// A second consumer joining mid-stream takes partitions over; every message is still
    /// consumed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rebalance_mid_stream_loses_nothing() {
        init_tracing();
        const TOTAL: u32 = 2000;
        let kafka = isolated_transport(4);
        let endpoint = unique("rebalanced");
        let seen: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
        let make = |seen: Arc<Mutex<HashMap<u32, u32>>>| {
            Bus::builder()
                .transport(kafka.clone())
                .receive_endpoint(endpoint.clone(), move |e| {
                    e.handler(move |ctx: ConsumeContext<Numbered>| {
                        let s = seen.clone();
                        async move {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            *s.lock().expect("lock").entry(ctx.message().n).or_default() += 1;
                            Ok(())
                        }
                    })
                })
        };
        let first = make(seen.clone()).build().await.expect("build");
        let r1 = first.start().await.expect("start");
        let to = format!("queue:{endpoint}");
        futures_util::stream::iter(0..TOTAL)
            .for_each_concurrent(64, |n| {
                let bus = first.clone();
                let to = to.clone();
                async move { bus.send(to, Numbered { n }).await.expect("send") }
            })
            .await;
        wait_until(WAIT, "some consumed", || {
            seen.lock().expect("lock").len() >= 200
        })
        .await;
        let second = make(seen.clone()).build().await.expect("build");
        let r2 = second.start().await.expect("second member joins");
        wait_until(Duration::from_secs(120), "all consumed", || {
            seen.lock().expect("lock").len() == TOTAL as usize
        })
        .await;
        let duplicates: u32 = seen.lock().expect("lock").values().map(|c| c - 1).sum();
        println!("kafka rebalance: {TOTAL} messages, {duplicates} consumed twice");
        r1.shutdown().await.expect("shutdown");
        r2.shutdown().await.expect("shutdown");
        let topics: Vec<String> = kafka
            .topic_names()
            .await
            .expect("topics")
            .into_iter()
            .filter(|t| t.starts_with(kafka.config().topic_prefix()))
            .collect();
        kafka.delete_topics(&topics).await.expect("cleanup");
    }
}
