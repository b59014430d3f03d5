//! The producer and admin client shared by a transport: producing with delivery reports and
//! creating (or verifying) topics.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use busway_core::{Error, ErrorKind, Result, TransportMessage};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use crate::config::KafkaConfig;
use crate::wire::to_kafka_headers;

/// The producer, the admin client and what is known about topics.
pub(crate) struct Client {
    pub(crate) config: KafkaConfig,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    known: Mutex<HashSet<String>>,
}

/// How long after the publish timeout a publish still waits for librdkafka's own report.
const REPORT_GRACE: Duration = Duration::from_secs(1);

fn config_error(err: KafkaError) -> Error {
    Error::with_source(
        ErrorKind::Config,
        "the Kafka client configuration is not valid",
        err,
    )
}

/// Refuses, with the fix, a security protocol this build of librdkafka cannot speak (it
/// would otherwise say only that OpenSSL was not available at build time).
fn check_security(config: &KafkaConfig) -> Result<()> {
    let wants_tls = matches!(config.security_protocol().as_str(), "SSL" | "SASL_SSL");
    if wants_tls && !cfg!(feature = "ssl") {
        return Err(Error::config(
            "security.protocol asks for TLS, but busway's Kafka transport was built without \
             it: enable the busway feature `kafka-tls` (busway-kafka's `ssl`), which builds \
             librdkafka with the system's OpenSSL",
        ));
    }
    Ok(())
}

/// A Kafka error as a busway error: timeouts and unreachable brokers are `Unavailable`.
pub(crate) fn kafka_error(what: String, err: KafkaError) -> Error {
    let unavailable = matches!(
        err.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageTimedOut
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::NotEnoughReplicas
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::NotLeaderForPartition
        )
    );
    let kind = if unavailable {
        ErrorKind::Unavailable
    } else {
        ErrorKind::Transport
    };
    Error::with_source(kind, what, err)
}

impl Client {
    /// The base librdkafka configuration: brokers and the user's properties.
    pub(crate) fn base_config(config: &KafkaConfig) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &config.brokers);
        for (k, v) in &config.properties {
            c.set(k, v);
        }
        c
    }

    pub(crate) fn new(config: KafkaConfig) -> Result<Self> {
        check_security(&config)?;
        let mut producer_config = Self::base_config(&config);
        for (k, v) in [
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("linger.ms", "1"),
        ] {
            if !config.properties.contains_key(k) && !config.producer_properties.contains_key(k) {
                producer_config.set(k, v);
            }
        }
        for (k, v) in &config.producer_properties {
            producer_config.set(k, v);
        }
        let timeout_ms = config.publish_timeout.as_millis().max(1).to_string();
        producer_config.set("message.timeout.ms", &timeout_ms);
        let producer: FutureProducer = producer_config.create().map_err(config_error)?;
        let admin: AdminClient<DefaultClientContext> =
            Self::base_config(&config).create().map_err(config_error)?;
        Ok(Self {
            config,
            producer,
            admin,
            known: Mutex::new(HashSet::new()),
        })
    }

    /// Checks that the brokers answer (fetches metadata), with a clear error if not.
    pub(crate) async fn check_connection(&self, timeout: Duration) -> Result<()> {
        let producer = self.producer.clone();
        let brokers = self.config.brokers.clone();
        let protocol = self.config.security_protocol();
        tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, timeout))
            .await
            .map_err(|e| Error::transport("the metadata request did not finish", e))?
            .map(|_| ())
            .map_err(|e| {
                Error::with_source(
                    ErrorKind::Unavailable,
                    format!(
                        "could not reach Kafka at {brokers} over {protocol}: is it running, and does its \
                         listener speak {protocol}? (a TLS or SASL failure is in librdkafka's log; \
                         the tests use a local Kafka-protocol broker: `scripts/services` starts one)"
                    ),
                    e,
                )
            })
    }

    /// Makes sure `topic` exists: creates it (with the configured partitions and replication)
    /// or, when creating is off or not allowed, checks that it is there.
    pub(crate) async fn ensure_topic(&self, topic: &str) -> Result<()> {
        if self
            .known
            .lock()
            .map(|k| k.contains(topic))
            .unwrap_or(false)
        {
            return Ok(());
        }
        let mut created = false;
        let mut last_error = None;
        if self.config.create_topics {
            let new = NewTopic::new(
                topic,
                self.config.partitions,
                TopicReplication::Fixed(self.config.replication),
            );
            let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
            match self.admin.create_topics([&new], &options).await {
                Ok(results) => match results.into_iter().next() {
                    Some(Ok(_)) | None => created = true,
                    Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => created = true,
                    Some(Err((_, code))) => last_error = Some(format!("{code}")),
                },
                Err(e) => last_error = Some(e.to_string()),
            }
        }
        if !created {
            let producer = self.producer.clone();
            let name = topic.to_string();
            let exists = tokio::task::spawn_blocking(move || {
                producer
                    .client()
                    .fetch_metadata(Some(&name), Duration::from_secs(10))
                    .map(|m| {
                        m.topics().iter().any(|t| {
                            t.name() == name && t.error().is_none() && !t.partitions().is_empty()
                        })
                    })
            })
            .await
            .map_err(|e| Error::transport("the metadata request did not finish", e))?
            .unwrap_or(false);
            if !exists {
                return Err(Error::new(
                    ErrorKind::Transport,
                    format!(
                        "the Kafka topic `{topic}` does not exist and could not be created{}",
                        last_error.map(|e| format!(" ({e})")).unwrap_or_default()
                    ),
                ));
            }
        }
        if let Ok(mut k) = self.known.lock() {
            k.insert(topic.to_string());
        }
        Ok(())
    }

    /// Deletes topics (temporary endpoints' topics at shutdown).
    pub(crate) async fn delete_topics(&self, topics: &[String]) {
        if topics.is_empty() {
            return;
        }
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        if let Err(e) = self.admin.delete_topics(&names, &options).await {
            tracing::debug!(error = %e, "could not delete temporary topics");
        }
        if let Ok(mut k) = self.known.lock() {
            for t in topics {
                k.remove(t);
            }
        }
    }

    /// Produces `message` to `topic` and waits for the delivery report.
    pub(crate) async fn produce(&self, topic: &str, message: &TransportMessage) -> Result<()> {
        self.ensure_topic(topic).await?;
        let headers = to_kafka_headers(message);
        let mut record = FutureRecord::<[u8], [u8]>::to(topic)
            .payload(&message.body[..])
            .headers(headers);
        if let Some(key) = &message.partition_key {
            record = record.key(key.as_bytes());
        }
        let timeout = self.config.publish_timeout;
        let send = self.producer.send(record, Timeout::After(timeout));
        // librdkafka gives up on a queued message after `message.timeout.ms` (set to the same
        // timeout), but a request already written to a broker that then went away can outlive
        // it by many seconds; the publish itself gives up a moment after the timeout.
        match tokio::time::timeout(timeout + REPORT_GRACE, send).await {
            Ok(result) => result.map(|_| ()).map_err(|(e, _)| {
                kafka_error(format!("producing to Kafka topic `{topic}` failed"), e)
            }),
            Err(_) => Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "no delivery report from Kafka for topic `{topic}` within {timeout:?}; the message may still be delivered"
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `SSL` / `SASL_SSL` need librdkafka built with OpenSSL (feature `ssl`, busway's
    /// `kafka-tls`); without it the error names the feature to enable.
    #[test]
    fn tls_is_refused_with_the_fix_unless_built_in() {
        for protocol in ["SSL", "sasl_ssl"] {
            let mut config = KafkaConfig::new("127.0.0.1:9092");
            config
                .properties
                .insert("security.protocol".into(), protocol.into());
            let checked = check_security(&config);
            if cfg!(feature = "ssl") {
                assert!(checked.is_ok(), "{protocol}: {checked:?}");
            } else {
                let err = checked.expect_err("refused").to_string();
                assert!(err.contains("kafka-tls"), "{protocol}: {err}");
            }
        }
        let mut plain = KafkaConfig::new("127.0.0.1:9092");
        plain
            .properties
            .insert("security.protocol".into(), "SASL_PLAINTEXT".into());
        assert!(check_security(&plain).is_ok());
    }
}
