//! The [`Transport`] implementation on Kafka.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use busway_core::topology::{EndpointTopology, EndpointView, TopologyView};
use busway_core::transport::{
    DeliveryOptions, Receiver, TemporaryEntities, Transport, TransportProfile, check_scheme,
};
use busway_core::{
    Address, AddressKind, BusBuilder, EndpointConfigurator, Error, ErrorKind, RawJson, Result,
    Topology, TransportMessage, Urn,
};

use crate::client::Client;
use crate::config::{BROKERS_ENV, DEFAULT_BROKERS, KafkaBuilder, KafkaConfig};
use crate::naming::{ENTITY_NAMES, sanitize};
use crate::receive;

/// The Kafka transport. Clone it to share one producer between buses.
///
/// ```no_run
/// # async fn f() -> busway_core::Result<()> {
/// use busway_kafka::Kafka;
/// let bus = busway_core::Bus::builder()
///     .transport(Kafka::builder("127.0.0.1:9092").partitions(6).build()?)
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Kafka {
    client: Arc<Client>,
    temporaries: Arc<TemporaryEntities>,
}

impl fmt::Debug for Kafka {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kafka")
            .field("brokers", &self.client.config.brokers())
            .finish()
    }
}

/// Kafka options of a receive endpoint (through [`KafkaEndpointExt`]).
#[derive(Debug, Clone, Default)]
pub struct KafkaEndpointOptions {
    /// Extra topics to consume (MassTransit rider's topic endpoints).
    pub topics: Vec<String>,
    /// The consumer group (default: the endpoint name).
    pub group: Option<String>,
    /// Unfinished records per partition before consuming waits (default: the transport's).
    pub max_in_flight: Option<usize>,
    /// Don't consume the endpoint's own topic (named after it; sends to `queue:<name>` go
    /// there).
    pub skip_own_topic: bool,
}

/// Kafka options on a receive endpoint.
pub trait KafkaEndpointExt: Sized {
    /// Also consumes `topic`.
    fn kafka_topic(self, topic: &str) -> Self;
    /// Uses consumer group `group` instead of the endpoint name.
    fn consumer_group(self, group: &str) -> Self;
    /// Unfinished records per partition before consuming waits for one to finish.
    fn max_in_flight(self, records: usize) -> Self;
}

fn with_options(
    e: EndpointConfigurator,
    f: impl FnOnce(&mut KafkaEndpointOptions),
) -> EndpointConfigurator {
    let mut options = e
        .extensions()
        .get::<KafkaEndpointOptions>()
        .cloned()
        .unwrap_or_default();
    f(&mut options);
    e.extension(options)
}

impl KafkaEndpointExt for EndpointConfigurator {
    fn kafka_topic(self, topic: &str) -> Self {
        let topic = sanitize(topic);
        with_options(self, |o| o.topics.push(topic))
    }

    fn consumer_group(self, group: &str) -> Self {
        let group = group.to_string();
        with_options(self, |o| o.group = Some(group))
    }

    fn max_in_flight(self, records: usize) -> Self {
        with_options(self, |o| o.max_in_flight = Some(records.max(1)))
    }
}

/// MassTransit rider-style topic endpoints on the bus builder.
pub trait KafkaBusExt: Sized {
    /// Consumes `topic` as consumer group `group` (the endpoint is named after the group;
    /// message types are not bound, only the topic is read). A record without an
    /// `MT-MessageType` header is taken as the endpoint's one consumed type.
    fn topic_endpoint(
        self,
        topic: &str,
        group: &str,
        configure: impl FnOnce(EndpointConfigurator) -> EndpointConfigurator,
    ) -> Self;
}

impl KafkaBusExt for BusBuilder {
    fn topic_endpoint(
        self,
        topic: &str,
        group: &str,
        configure: impl FnOnce(EndpointConfigurator) -> EndpointConfigurator,
    ) -> Self {
        let topic = topic.to_string();
        let group_name = group.to_string();
        self.receive_endpoint(group, move |e| {
            let e = with_options(e, |o| {
                o.topics.push(sanitize(&topic));
                o.group = Some(group_name);
                o.skip_own_topic = true;
            });
            configure(e).bind_message_types(false)
        })
    }
}

impl Kafka {
    /// A transport for `brokers` (`host:port,host:port`) with default options.
    pub fn new(brokers: &str) -> Result<Self> {
        Self::builder(brokers).build()
    }

    /// A transport for the brokers in `BUSWAY_KAFKA_BROKERS` (default `127.0.0.1:9092`).
    pub fn from_env() -> Result<Self> {
        Self::new(&Self::env_brokers())
    }

    /// The brokers `from_env` uses.
    pub fn env_brokers() -> String {
        std::env::var(BROKERS_ENV).unwrap_or_else(|_| DEFAULT_BROKERS.to_string())
    }

    /// A builder for `brokers`.
    pub fn builder(brokers: &str) -> KafkaBuilder {
        KafkaBuilder::new(brokers)
    }

    pub(crate) fn with_client(client: Client) -> Self {
        Self {
            client: Arc::new(client),
            temporaries: Arc::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &KafkaConfig {
        &self.client.config
    }

    pub(crate) fn client(&self) -> &Arc<Client> {
        &self.client
    }

    /// The topic an endpoint named `name` consumes for point-to-point sends.
    pub fn endpoint_topic(&self, name: &str) -> String {
        self.client.config.prefixed(name)
    }

    fn endpoint_topics(
        &self,
        e: &EndpointTopology,
    ) -> (Vec<String>, String, usize, Option<String>) {
        let options = e
            .extensions
            .get::<KafkaEndpointOptions>()
            .cloned()
            .unwrap_or_default();
        let mut topics = Vec::new();
        if !options.skip_own_topic {
            topics.push(self.client.config.prefixed(&e.name));
        }
        if e.bind_message_types {
            topics.extend(
                e.message_types
                    .iter()
                    .map(|t| self.client.config.topic_for(t)),
            );
        }
        topics.extend(options.topics.iter().cloned());
        topics.dedup();
        let group = options.group.unwrap_or_else(|| e.name.clone());
        let window = options
            .max_in_flight
            .unwrap_or(self.client.config.max_in_flight);
        let default_type = match e.message_types.as_slice() {
            [only] => Some(only.as_str().to_string()),
            _ => None,
        };
        (topics, group, window, default_type)
    }

    fn no_delay(options: &DeliveryOptions) -> Result<()> {
        match options.delay {
            Some(d) if !d.is_zero() => Err(Error::new(
                ErrorKind::Unsupported,
                "Kafka has no delayed delivery: scheduled sends are not supported on the Kafka transport",
            )),
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl Transport for Kafka {
    fn profile(&self) -> TransportProfile {
        TransportProfile::new("kafka")
            .with_default_serializer(Arc::new(RawJson::rider()))
            .with_entity_names(ENTITY_NAMES)
    }

    fn endpoint_address(&self, name: &str) -> String {
        let host = self
            .client
            .config
            .brokers()
            .split(',')
            .next()
            .unwrap_or("localhost")
            .trim();
        format!("kafka://{host}/{}", self.client.config.prefixed(name))
    }

    fn describe(&self, topology: &Topology) -> TopologyView {
        let config = &self.client.config;
        let endpoints = topology
            .endpoints
            .iter()
            .map(|e| {
                let (topics, group, _, _) = self.endpoint_topics(e);
                let (dead, skipped): (Vec<String>, Vec<String>) = topics
                    .iter()
                    .map(|t| {
                        (
                            config.dead_letter_topic(t, &group),
                            config.skipped_topic(t, &group),
                        )
                    })
                    .unzip();
                let mut view = EndpointView::new(
                    e,
                    format!("consumer group {group}"),
                    format!("topics {}", dead.join(", ")),
                    format!("topics {}", skipped.join(", ")),
                );
                for topic in &topics {
                    let label = e
                        .message_types
                        .iter()
                        .find(|m| config.topic_for(m) == *topic)
                        .map(|m| m.as_str().to_string())
                        .unwrap_or_else(|| "sends".to_string());
                    view = view.with_source(label, format!("topic {topic}"));
                }
                view
            })
            .collect();
        TopologyView::new(endpoints)
    }

    fn publish_address(&self, message_type: &Urn) -> String {
        let host = self
            .client
            .config
            .brokers()
            .split(',')
            .next()
            .unwrap_or("localhost")
            .trim();
        format!(
            "kafka://{host}/{}",
            self.client.config.topic_for(message_type)
        )
    }

    async fn deploy(&self, topology: &Topology) -> Result<()> {
        self.client
            .check_connection(Duration::from_secs(10))
            .await?;
        for e in &topology.endpoints {
            let (topics, _, _, _) = self.endpoint_topics(e);
            for t in topics {
                self.client.ensure_topic(&t).await?;
            }
        }
        Ok(())
    }

    async fn publish(
        &self,
        message_types: &[Urn],
        message: TransportMessage,
        options: &DeliveryOptions,
    ) -> Result<()> {
        Self::no_delay(options)?;
        let first = message_types
            .first()
            .ok_or_else(|| Error::config("cannot publish a message without a message type"))?;
        self.client
            .produce(&self.client.config.topic_for(first), &message)
            .await
    }

    async fn send(
        &self,
        address: &Address,
        message: TransportMessage,
        options: &DeliveryOptions,
    ) -> Result<()> {
        Self::no_delay(options)?;
        check_scheme("Kafka", address, &["kafka"])?;
        let topic = match address.kind() {
            // A topic names itself; a full address already carries the prefixed name.
            AddressKind::Topic | AddressKind::Uri => sanitize(address.name()),
            _ => self.client.config.prefixed(address.name()),
        };
        self.client.produce(&topic, &message).await
    }

    async fn receive(&self, endpoint: &EndpointTopology) -> Result<Box<dyn Receiver>> {
        let (topics, group, window, default_type) = self.endpoint_topics(endpoint);
        if endpoint.temporary {
            for topic in &topics {
                self.temporaries.add(topic);
            }
        }
        let prefetch = usize::from(endpoint.prefetch);
        let receiver = receive::start(
            self.client.clone(),
            &group,
            &topics,
            window,
            prefetch,
            default_type,
        )
        .await?;
        Ok(Box::new(receiver))
    }

    async fn close(&self) -> Result<()> {
        self.client
            .delete_topics(&self.temporaries.take_all())
            .await;
        Ok(())
    }
}
