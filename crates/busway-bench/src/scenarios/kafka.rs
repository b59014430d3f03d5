//! `kafka`: busway on Kafka vs raw rdkafka with the same settings: an idempotent producer
//! with `acks=all` and `linger.ms=5`, the same window of produces in flight, 3 partitions, a
//! consumer group per run, auto-commit off with a commit every 100 messages, and the same
//! value (the message as JSON) and rider headers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use busway::BoxError;
use busway::kafka::Kafka;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tokio::sync::oneshot;

use super::{BenchTransport, BuswaySide};
use crate::message::{BenchMessage, Tally, WAIT, send_all, send_open_loop};
use crate::{Scenario, Settings, Side};

const PARTITIONS: i32 = 3;

#[async_trait]
impl BenchTransport for Kafka {
    async fn remove(&self, _name: &str) {
        let prefix = self.config().topic_prefix().to_string();
        let topics: Vec<String> = self
            .topic_names()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|t| t.starts_with(&prefix))
            .collect();
        let _ = self.delete_topics(&topics).await;
    }
}

/// The Kafka scenario.
#[derive(Debug)]
pub struct KafkaScenario {
    brokers: String,
}

impl KafkaScenario {
    /// On `BUSWAY_KAFKA_BROKERS` (default `127.0.0.1:9092`).
    pub fn from_env() -> Self {
        Self {
            brokers: Kafka::env_brokers(),
        }
    }
}

/// Records per producer batch on both sides: `BUSWAY_BENCH_KAFKA_BATCH`, default 10,000
/// (librdkafka's default). The one-record-per-batch setting that tansu 0.6 needed (it answered
/// a fetch that starts inside a record batch with the batches after it) is gone: nisshi
/// 0.8.1, the broker `scripts/services` installs, answers such fetches correctly.
pub fn producer_batch() -> String {
    std::env::var("BUSWAY_BENCH_KAFKA_BATCH").unwrap_or_else(|_| "10000".to_string())
}

/// Consumer properties both sides use (busway's defaults, set on the raw side too).
const SHARED_CONSUMER_PROPERTIES: [(&str, &str); 4] = [
    ("auto.offset.reset", "earliest"),
    ("session.timeout.ms", "10000"),
    ("heartbeat.interval.ms", "2000"),
    ("fetch.wait.max.ms", "50"),
];

/// Producer properties both sides use.
fn shared_producer_properties() -> Vec<(&'static str, String)> {
    vec![
        ("enable.idempotence", "true".to_string()),
        ("acks", "all".to_string()),
        ("linger.ms", "5".to_string()),
        ("batch.num.messages", producer_batch()),
    ]
}

#[async_trait]
impl Scenario for KafkaScenario {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn description(&self) -> String {
        format!(
            "busway on Kafka vs raw rdkafka: idempotent acks=all producer, same window, {} record(s) per producer batch, 3 partitions, commit every 100",
            producer_batch()
        )
    }

    async fn available(&self) -> Result<(), String> {
        let first = self.brokers.split(',').next().unwrap_or_default();
        if super::rabbitmq::reachable(&format!("kafka://{first}"), 9092) {
            Ok(())
        } else {
            Err(format!(
                "no Kafka broker is reachable at {} (scripts/services starts one)",
                self.brokers
            ))
        }
    }

    async fn busway(&self, settings: &Settings) -> Result<Box<dyn Side>, BoxError> {
        let brokers = self.brokers.clone();
        Ok(BuswaySide::boxed(
            Arc::new(move |name: &str| {
                let mut b = Kafka::builder(&brokers)
                    .topic_prefix(&format!("{name}."))
                    .partitions(PARTITIONS)
                    .commit_every(100);
                for (k, v) in SHARED_CONSUMER_PROPERTIES {
                    b = b.consumer_property(k, v);
                }
                for (k, v) in shared_producer_properties() {
                    b = b.producer_property(k, v);
                }
                Ok(b.build()?)
            }),
            settings,
        ))
    }

    async fn raw(&self, settings: &Settings) -> Result<Box<dyn Side>, BoxError> {
        let mut producer = ClientConfig::new();
        producer.set("bootstrap.servers", &self.brokers);
        producer.set("message.timeout.ms", "30000");
        for (k, v) in shared_producer_properties() {
            producer.set(k, v);
        }
        let mut admin = ClientConfig::new();
        admin.set("bootstrap.servers", &self.brokers);
        Ok(Box::new(RdkafkaSide {
            brokers: self.brokers.clone(),
            producer: producer.create()?,
            admin: admin.create()?,
            settings: settings.clone(),
            backlog: None,
            topics: Vec::new(),
        }))
    }

    fn sides(&self) -> (&'static str, &'static str) {
        ("busway", "rdkafka")
    }
}

struct RdkafkaSide {
    brokers: String,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    settings: Settings,
    backlog: Option<String>,
    topics: Vec<String>,
}

impl RdkafkaSide {
    async fn topic(&mut self, phase: &str) -> Result<String, BoxError> {
        let name = format!(
            "raw-{phase}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let results = self
            .admin
            .create_topics(
                &[NewTopic::new(&name, PARTITIONS, TopicReplication::Fixed(1))],
                &AdminOptions::new()
                    .operation_timeout(Some(Timeout::After(Duration::from_secs(10)))),
            )
            .await?;
        for r in results {
            r.map_err(|(t, e)| format!("creating topic {t}: {e}"))?;
        }
        self.topics.push(name.clone());
        Ok(name)
    }

    /// Starts a consumer of `topic`; the receiver fires once it has its partitions (busway's
    /// `start` waits for that too, so both sides pay the group join before producing).
    fn consumer(
        &self,
        topic: String,
        tally: Arc<Tally>,
    ) -> (
        tokio::task::JoinHandle<Result<(), String>>,
        oneshot::Receiver<()>,
    ) {
        let brokers = self.brokers.clone();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            consume(&brokers, &topic, tally, tx)
                .await
                .map_err(|e| e.to_string())
        });
        (task, rx)
    }
}

async fn produce(producer: &FutureProducer, topic: &str, m: BenchMessage) -> Result<(), BoxError> {
    let body = serde_json::to_vec(&m)?;
    let id = uuid::Uuid::new_v4().to_string();
    let headers = OwnedHeaders::new_with_capacity(4)
        .insert(Header {
            key: "Content-Type",
            value: Some("application/json"),
        })
        .insert(Header {
            key: "MessageId",
            value: Some(id.as_str()),
        })
        .insert(Header {
            key: "ConversationId",
            value: Some(id.as_str()),
        })
        .insert(Header {
            key: "MT-MessageType",
            value: Some("urn:message:Busway.Bench:BenchMessage"),
        });
    producer
        .send(
            FutureRecord::<[u8], [u8]>::to(topic)
                .payload(&body[..])
                .headers(headers),
            Timeout::After(Duration::from_secs(30)),
        )
        .await
        .map(|_| ())
        .map_err(|(e, _)| e.into())
}

async fn consume(
    brokers: &str,
    topic: &str,
    tally: Arc<Tally>,
    ready: oneshot::Sender<()>,
) -> Result<(), BoxError> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("raw-{}", uuid::Uuid::new_v4().simple()))
        .set("enable.auto.commit", "false");
    for (k, v) in SHARED_CONSUMER_PROPERTIES {
        config.set(k, v);
    }
    let consumer: StreamConsumer = config.create()?;
    consumer.subscribe(&[topic])?;
    let mut ready = Some(ready);
    let mut since_commit = 0;
    while !tally.is_complete() {
        let record = if ready.is_none() {
            consumer.recv().await?
        } else {
            match tokio::time::timeout(Duration::from_millis(50), consumer.recv()).await {
                Ok(r) => r?,
                Err(_) => {
                    if ready.is_some()
                        && consumer.assignment().is_ok_and(|a| a.count() > 0)
                        && let Some(r) = ready.take()
                    {
                        let _ = r.send(());
                    }
                    continue;
                }
            }
        };
        if let Some(r) = ready.take() {
            let _ = r.send(());
        }
        let body = record.payload().unwrap_or_default();
        let message: BenchMessage = serde_json::from_slice(body)?;
        tally.record(&message);
        since_commit += 1;
        if since_commit >= 100 {
            consumer.commit_message(&record, CommitMode::Async)?;
            since_commit = 0;
        }
    }
    consumer.commit_consumer_state(CommitMode::Sync)?;
    Ok(())
}

#[async_trait]
impl Side for RdkafkaSide {
    async fn publish(&mut self, n: usize) -> Result<(), BoxError> {
        let topic = self.topic("backlog").await?;
        let producer = self.producer.clone();
        send_all(n, self.settings.window, self.settings.payload, |m| {
            let (producer, topic) = (&producer, &topic);
            async move { produce(producer, topic, m).await }
        })
        .await?;
        self.backlog = Some(topic);
        Ok(())
    }

    async fn consume(&mut self, n: usize) -> Result<Duration, BoxError> {
        let topic = self.backlog.take().ok_or("consume before publish")?;
        let tally = Tally::new(n, false);
        self.consumer(topic, tally.clone()).0.await??;
        tally.wait(WAIT).await?;
        Ok(tally.span())
    }

    async fn end_to_end(&mut self, n: usize) -> Result<Duration, BoxError> {
        let topic = self.topic("e2e").await?;
        let tally = Tally::new(n, false);
        let (consumer, ready) = self.consumer(topic.clone(), tally.clone());
        ready.await?;
        let producer = self.producer.clone();
        let started = Instant::now();
        send_all(n, self.settings.window, self.settings.payload, |m| {
            let (producer, topic) = (&producer, &topic);
            async move { produce(producer, topic, m).await }
        })
        .await?;
        tally.wait(WAIT).await?;
        let took = started.elapsed();
        consumer.await??;
        Ok(took)
    }

    async fn latency(&mut self, n: usize, rate: f64) -> Result<Vec<u64>, BoxError> {
        let topic = self.topic("latency").await?;
        let tally = Tally::new(n, true);
        let (consumer, ready) = self.consumer(topic.clone(), tally.clone());
        ready.await?;
        send_open_loop(n, rate, self.settings.payload, |m| {
            let (producer, topic) = (self.producer.clone(), topic.clone());
            async move { produce(&producer, &topic, m).await }
        })
        .await?;
        tally.wait(WAIT).await?;
        consumer.await??;
        Ok(tally.latencies())
    }

    async fn cleanup(&mut self) {
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        let _ = self
            .admin
            .delete_topics(&topics, &AdminOptions::new())
            .await;
        self.topics.clear();
    }
}
