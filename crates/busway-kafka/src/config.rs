//! Configuration: brokers, librdkafka properties, topics, commits and the in-flight window,
//! and the [`KafkaBuilder`] that sets them.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use busway_core::{Error, Message, Result, Urn};

use crate::client::Client;
use crate::transport::Kafka;

use crate::naming::{message_topic, sanitize};

/// The environment variable [`crate::Kafka::from_env`] reads.
pub const BROKERS_ENV: &str = "BUSWAY_KAFKA_BROKERS";

/// The brokers used when [`BROKERS_ENV`] is not set.
pub const DEFAULT_BROKERS: &str = "127.0.0.1:9092";

/// Kafka client options. Build them with [`crate::Kafka::builder`].
///
/// Its `Debug` output hides the values of secret properties (passwords, secrets, private
/// keys, JAAS and OAuth configuration).
#[derive(Clone)]
pub struct KafkaConfig {
    pub(crate) brokers: String,
    pub(crate) properties: BTreeMap<String, String>,
    pub(crate) producer_properties: BTreeMap<String, String>,
    pub(crate) consumer_properties: BTreeMap<String, String>,
    pub(crate) partitions: i32,
    pub(crate) replication: i32,
    pub(crate) create_topics: bool,
    pub(crate) topics: BTreeMap<String, String>,
    pub(crate) publish_timeout: Duration,
    pub(crate) max_in_flight: usize,
    pub(crate) commit_interval: Duration,
    pub(crate) commit_every: i64,
    pub(crate) dead_letter: String,
    pub(crate) skipped: String,
    pub(crate) prefix: String,
    pub(crate) dead_letter_failure: DeadLetterFailure,
}

/// What a consumer does with a record whose dead-letter (or skipped) copy cannot be written
/// (the topic is refused, the brokers are down). Either way the write is first tried again
/// with back-off (100 ms doubling to 30 s); the record is never dropped silently.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadLetterFailure {
    /// Hold the record and keep trying until the copy is written (the default). Records
    /// with the same key wait behind it, and its partition commits no further: nothing is
    /// lost, and the stall shows in the logs at every tenth failure.
    #[default]
    Park,
    /// After this many failed writes, log the record as lost (at error level, with its
    /// topic, partition, offset and key) and move past it, so its key and partition go on.
    SkipAfter(u32),
    /// After this many failed writes, stop the endpoint: it consumes nothing more (the bus's
    /// other endpoints go on), commits nothing past the record, and logs why at error
    /// level. The record runs again when the endpoint is started again (a new bus or
    /// process), once whatever refused the dead-letter copy is fixed.
    StopAfter(u32),
}

/// True for librdkafka properties whose values must not be printed.
pub(crate) fn is_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name.contains("password")
        || name.contains("secret")
        || name.contains("jaas")
        || name == "sasl.oauthbearer.config"
        || name == "ssl.key.pem"
        || name == "ssl_key"
}

/// A property map for `Debug`, secret values replaced by `***`.
struct Redacted<'a>(&'a BTreeMap<String, String>);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                let shown = if is_secret(k) { "***" } else { v.as_str() };
                (k, shown)
            }))
            .finish()
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("properties", &Redacted(&self.properties))
            .field("producer_properties", &Redacted(&self.producer_properties))
            .field("consumer_properties", &Redacted(&self.consumer_properties))
            .field("partitions", &self.partitions)
            .field("replication", &self.replication)
            .field("create_topics", &self.create_topics)
            .field("topics", &self.topics)
            .field("publish_timeout", &self.publish_timeout)
            .field("max_in_flight", &self.max_in_flight)
            .field("commit_interval", &self.commit_interval)
            .field("commit_every", &self.commit_every)
            .field("dead_letter", &self.dead_letter)
            .field("skipped", &self.skipped)
            .field("prefix", &self.prefix)
            .field("dead_letter_failure", &self.dead_letter_failure)
            .finish()
    }
}

impl KafkaConfig {
    pub(crate) fn new(brokers: &str) -> Self {
        Self {
            brokers: brokers.trim().to_string(),
            properties: BTreeMap::new(),
            producer_properties: BTreeMap::new(),
            consumer_properties: BTreeMap::new(),
            partitions: 3,
            replication: 1,
            create_topics: true,
            topics: BTreeMap::new(),
            publish_timeout: Duration::from_secs(30),
            max_in_flight: 1000,
            commit_interval: Duration::from_secs(1),
            commit_every: 100,
            dead_letter: "{topic}.{group}.error".to_string(),
            skipped: "{topic}.{group}.skipped".to_string(),
            prefix: String::new(),
            dead_letter_failure: DeadLetterFailure::Park,
        }
    }

    /// `name` with the topic prefix, made a valid topic name.
    pub fn prefixed(&self, name: &str) -> String {
        sanitize(&format!("{}{name}", self.prefix))
    }

    /// The bootstrap servers.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// The `security.protocol` property, upper case (`PLAINTEXT` when not set).
    pub(crate) fn security_protocol(&self) -> String {
        self.properties
            .get("security.protocol")
            .map_or_else(|| "PLAINTEXT".to_string(), |p| p.to_ascii_uppercase())
    }

    /// The prefix of derived topic names (empty by default).
    pub fn topic_prefix(&self) -> &str {
        &self.prefix
    }

    /// The topic a message type is published to: the configured one, else its MassTransit
    /// name with `:` as `.` (`urn:message:Contracts:OrderPlaced` → `Contracts.OrderPlaced`).
    pub fn topic_for(&self, message_type: &Urn) -> String {
        if let Some(t) = self.topics.get(message_type.as_str()) {
            return t.clone();
        }
        self.prefixed(&message_topic(message_type))
    }

    /// The dead-letter topic of `topic` for consumer group `group`.
    pub fn dead_letter_topic(&self, topic: &str, group: &str) -> String {
        sanitize(
            &self
                .dead_letter
                .replace("{topic}", topic)
                .replace("{group}", group),
        )
    }

    /// The skipped topic of `topic` for consumer group `group`.
    pub fn skipped_topic(&self, topic: &str, group: &str) -> String {
        sanitize(
            &self
                .skipped
                .replace("{topic}", topic)
                .replace("{group}", group),
        )
    }
}

/// Builds a [`Kafka`] transport.
#[derive(Debug, Clone)]
pub struct KafkaBuilder {
    config: KafkaConfig,
}

impl KafkaBuilder {
    pub(crate) fn new(brokers: &str) -> Self {
        Self {
            config: KafkaConfig::new(brokers),
        }
    }

    /// Sets any librdkafka property (security, SASL, TLS, tuning): `.property("security.protocol", "SASL_SSL")`.
    pub fn property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.properties.insert(name.into(), value.into());
        self
    }

    /// Sets a librdkafka property for the producer only (`linger.ms`, `batch.num.messages`).
    pub fn producer_property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.config
            .producer_properties
            .insert(name.into(), value.into());
        self
    }

    /// Sets a librdkafka property for consumers only (`session.timeout.ms`, `fetch.max.bytes`).
    pub fn consumer_property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.config
            .consumer_properties
            .insert(name.into(), value.into());
        self
    }

    /// Partitions of topics busway creates (default 3).
    pub fn partitions(mut self, partitions: i32) -> Self {
        self.config.partitions = partitions.max(1);
        self
    }

    /// Replication factor of topics busway creates (default 1).
    pub fn replication(mut self, replication: i32) -> Self {
        self.config.replication = replication.max(1);
        self
    }

    /// Whether missing topics are created (default true). When false, topics are only
    /// checked and a missing one is an error.
    pub fn create_topics(mut self, create: bool) -> Self {
        self.config.create_topics = create;
        self
    }

    /// Publishes message type `M` to `topic` instead of its default topic.
    pub fn topic<M: Message>(self, topic: &str) -> Self {
        self.topic_for(M::message_type(), topic)
    }

    /// Publishes message type `urn` to `topic`.
    pub fn topic_for(mut self, urn: &Urn, topic: &str) -> Self {
        self.config
            .topics
            .insert(urn.as_str().to_string(), sanitize(topic));
        self
    }

    /// How long a publish waits, for room in the producer's queue and for the broker's
    /// delivery report together (default 30 s). It is also librdkafka's
    /// `message.timeout.ms`; a publish that runs out of it fails as unavailable, and may
    /// still have been delivered.
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.config.publish_timeout = timeout;
        self
    }

    /// Unfinished records a partition may hold before consuming waits for one to finish
    /// (default 1000).
    pub fn max_in_flight(mut self, records: usize) -> Self {
        self.config.max_in_flight = records.max(1);
        self
    }

    /// Commit at least this often while messages finish (default 1 s).
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.config.commit_interval = interval;
        self
    }

    /// Commit a partition when its position moved by this many messages (default 100).
    pub fn commit_every(mut self, messages: i64) -> Self {
        self.config.commit_every = messages.max(1);
        self
    }

    /// Puts `prefix` before every topic name busway derives (message types, endpoints, dead
    /// letters): one Kafka cluster, several isolated environments. Topics named explicitly are
    /// not prefixed.
    pub fn topic_prefix(mut self, prefix: &str) -> Self {
        self.config.prefix = sanitize(prefix);
        self
    }

    /// The dead-letter topic pattern (default `{topic}.{group}.error`).
    pub fn dead_letter_topic(mut self, pattern: impl Into<String>) -> Self {
        self.config.dead_letter = pattern.into();
        self
    }

    /// What to do with a record whose dead-letter or skipped copy cannot be written
    /// (default [`DeadLetterFailure::Park`]).
    pub fn dead_letter_failure(mut self, policy: DeadLetterFailure) -> Self {
        self.config.dead_letter_failure = policy;
        self
    }

    /// The skipped topic pattern (default `{topic}.{group}.skipped`).
    pub fn skipped_topic(mut self, pattern: impl Into<String>) -> Self {
        self.config.skipped = pattern.into();
        self
    }

    /// The transport.
    pub fn build(self) -> Result<Kafka> {
        if self.config.brokers.is_empty() {
            return Err(Error::config("no Kafka brokers were given"));
        }
        Ok(Kafka::with_client(Client::new(self.config)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_secret_properties() {
        let builder = crate::Kafka::builder("127.0.0.1:9092")
            .property("security.protocol", "SASL_SSL")
            .property("sasl.username", "svc")
            .property("sasl.password", "hunter2")
            .property("ssl.key.password", "k3y-pass")
            .property("sasl.oauthbearer.client.secret", "oauth-s3cret")
            .producer_property("sasl.jaas.config", "jaas-s3cret")
            .consumer_property("ssl.key.pem", "-----BEGIN PRIVATE KEY-----");
        let debug = format!("{builder:?}");
        for secret in [
            "hunter2",
            "k3y-pass",
            "oauth-s3cret",
            "jaas-s3cret",
            "PRIVATE KEY",
        ] {
            assert!(!debug.contains(secret), "{debug}");
        }
        assert!(
            debug.contains("SASL_SSL") && debug.contains("svc"),
            "{debug}"
        );
        assert!(!is_secret("sasl.username"));
    }

    #[test]
    fn topic_names() {
        let c = KafkaConfig::new(" 127.0.0.1:9092 ");
        assert_eq!(c.brokers(), "127.0.0.1:9092");
        assert_eq!(
            c.topic_for(&Urn::new("urn:message:Contracts:OrderPlaced")),
            "Contracts.OrderPlaced"
        );
        assert_eq!(
            c.topic_for(&Urn::new("urn:message:Contracts:OrderPlaced").fault()),
            "MassTransit.Fault--Contracts.OrderPlaced--"
        );
        assert_eq!(
            c.dead_letter_topic("orders", "billing"),
            "orders.billing.error"
        );
    }
}
