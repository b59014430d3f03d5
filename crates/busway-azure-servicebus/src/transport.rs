//! The [`Transport`] implementation on Azure Service Bus (REST data plane).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use azure_core::HttpClient;
use azure_messaging_servicebus::prelude::{QueueClient, TopicClient};
use busway_core::topology::{EndpointTopology, EndpointView, TopologyView};
use busway_core::transport::{
    Capabilities, DeliveryOptions, Receiver, TemporaryEntities, Transport, TransportProfile,
    check_scheme,
};
use busway_core::{
    Address, AddressKind, Error, ErrorKind, Result, Topology, TransportMessage, Urn,
};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::{BASE_URL_ENV, CONNECTION_STRING_ENV, ServiceBusBuilder};
use crate::connection::{ConnectionString, is_loopback_url};
use crate::management::{Management, QueueSettings};
use crate::naming::{ENTITY_NAMES, subscription_name, topic_name};
use crate::receive::{SbReceiver, poll};
use crate::wire::{send_options, utf8};

/// The Azure Service Bus transport.
#[derive(Clone)]
pub struct ServiceBus {
    pub(crate) shared: Arc<Shared>,
}

/// What every clone of a [`ServiceBus`] shares.
pub(crate) struct Shared {
    pub(crate) http: Arc<dyn HttpClient>,
    pub(crate) connection: ConnectionString,
    pub(crate) management: Management,
    pub(crate) settings: QueueSettings,
    pub(crate) provision: bool,
    pub(crate) base_url: Option<String>,
    pub(crate) receive_wait: Duration,
    pub(crate) temporaries: TemporaryEntities,
}

impl fmt::Debug for ServiceBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceBus")
            .field("namespace", &self.shared.connection.namespace)
            .field("key_name", &self.shared.connection.key_name)
            .field("base_url", &self.shared.base_url)
            .finish()
    }
}

impl ServiceBus {
    /// A builder for a connection string
    /// (`Endpoint=sb://<ns>.servicebus.windows.net/;SharedAccessKeyName=..;SharedAccessKey=..`).
    pub fn builder(connection_string: &str) -> ServiceBusBuilder {
        ServiceBusBuilder::new(connection_string)
    }

    /// A transport for a connection string with default options.
    pub fn new(connection_string: &str) -> Result<Self> {
        Self::builder(connection_string).build()
    }

    /// A transport from `BUSWAY_ASB_CONNECTION_STRING` (and `BUSWAY_ASB_BASE_URL` if set).
    pub fn from_env() -> Result<Self> {
        let connection = std::env::var(CONNECTION_STRING_ENV).map_err(|_| {
            Error::config(format!(
                "set {CONNECTION_STRING_ENV} to a Service Bus connection string \
                 (Endpoint=sb://<namespace>.servicebus.windows.net/;SharedAccessKeyName=..;SharedAccessKey=..)"
            ))
        })?;
        let mut builder = Self::builder(&connection);
        if let Ok(base) = std::env::var(BASE_URL_ENV) {
            let base = base.trim();
            if !base.is_empty() {
                if !is_loopback_url(base) {
                    return Err(Error::config(format!(
                        "{BASE_URL_ENV} is `{base}`, which is not a loopback address; from_env only \
                         redirects requests (and the namespace's tokens) to this machine. Use \
                         ServiceBus::builder(..).base_url(..) to send them elsewhere"
                    )));
                }
                builder = builder.base_url(base);
            }
        }
        builder.build()
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.shared.connection.namespace
    }

    pub(crate) fn management(&self) -> &Management {
        &self.shared.management
    }

    pub(crate) fn queue_client(&self, queue: &str) -> Result<QueueClient> {
        let c = &self.shared.connection;
        QueueClient::new(
            self.shared.http.clone(),
            c.namespace.clone(),
            queue.to_string(),
            c.key_name.clone(),
            c.key.clone(),
        )
        .map_err(|e| {
            Error::with_source(
                ErrorKind::Config,
                "could not create a Service Bus queue client",
                e,
            )
        })
    }

    pub(crate) async fn ensure_queue(&self, name: &str, temporary: bool) -> Result<()> {
        if !self.shared.provision {
            return Ok(());
        }
        let mut settings = self.shared.settings.clone();
        if temporary {
            settings.auto_delete_on_idle = Some(Duration::from_secs(300));
        }
        self.shared.management.queue(name, &settings).await
    }

    /// Topics of the contracts a published type implements, and on each type's topic a
    /// subscription forwarding to each of its direct contracts' topics, as MassTransit's
    /// publish topology keeps the hierarchy (`PublishEndpointBrokerTopologyBuilder`,
    /// `MaintainHierarchy`): the subscription is named after the destination topic's path
    /// segments reversed and joined by `-` (`IOrderEvent-Contracts`). Without a recorded
    /// hierarchy (a fault's types) the first type forwards to each of the others.
    async fn ensure_contract_forwarding(&self, message_types: &[Urn]) -> Result<()> {
        let mut edges: Vec<(&Urn, Urn)> = Vec::new();
        for urn in message_types {
            if let Some(direct) = busway_core::urn::direct_contracts(urn) {
                edges.extend(
                    direct
                        .iter()
                        .filter(|d| message_types.contains(d))
                        .map(|d| (urn, d.clone())),
                );
            }
        }
        if edges.is_empty() {
            edges = message_types[1..]
                .iter()
                .map(|d| (&message_types[0], d.clone()))
                .collect();
        }
        for (from, to) in edges {
            let (source, target) = (topic_name(from), topic_name(&to));
            self.ensure_topic(&source).await?;
            self.ensure_topic(&target).await?;
            let reversed: Vec<&str> = target.split('/').rev().collect();
            self.shared
                .management
                .subscription(
                    &source,
                    &subscription_name(&reversed.join("-")),
                    &target,
                    &self.shared.settings,
                )
                .await?;
        }
        Ok(())
    }

    async fn ensure_topic(&self, name: &str) -> Result<()> {
        if !self.shared.provision {
            return Ok(());
        }
        self.shared.management.topic(name).await
    }

    fn send_error(&self, entity: &str, e: azure_core::Error) -> Error {
        let status = match e.kind() {
            azure_core::error::ErrorKind::HttpResponse { status, .. } => Some(u16::from(*status)),
            _ => None,
        };
        let c = &self.shared.connection;
        match status {
            Some(401 | 403) => Error::with_source(
                ErrorKind::Config,
                format!(
                    "Service Bus namespace `{}` refused the shared access key `{}` when sending to `{entity}`; check the connection string and the key's Send rights",
                    c.namespace, c.key_name
                ),
                e,
            ),
            Some(404 | 410) => Error::with_source(
                ErrorKind::Transport,
                format!(
                    "Service Bus entity `{entity}` does not exist in namespace `{}`",
                    c.namespace
                ),
                e,
            ),
            Some(400 | 413) => Error::with_source(
                ErrorKind::Transport,
                format!("Service Bus refused the message for `{entity}`"),
                e,
            ),
            _ => Error::with_source(
                ErrorKind::Unavailable,
                format!("sending to Service Bus entity `{entity}` failed"),
                e,
            ),
        }
    }

    pub(crate) async fn send_to_queue(
        &self,
        queue: &str,
        message: &TransportMessage,
        delay: Option<Duration>,
    ) -> Result<()> {
        let body = utf8(message)?;
        let options = send_options(message, delay);
        self.queue_client(queue)?
            .send_message(body, Some(options))
            .await
            .map_err(|e| self.send_error(queue, e))
    }

    async fn send_to_topic(
        &self,
        topic: &str,
        message: &TransportMessage,
        delay: Option<Duration>,
    ) -> Result<()> {
        let body = utf8(message)?;
        let options = send_options(message, delay);
        let c = &self.shared.connection;
        let client = TopicClient::new(
            self.shared.http.clone(),
            c.namespace.clone(),
            topic.to_string(),
            c.key_name.clone(),
            c.key.clone(),
        )
        .map_err(|e| {
            Error::with_source(
                ErrorKind::Config,
                "could not create a Service Bus topic client",
                e,
            )
        })?;
        client
            .topic_sender()
            .send_message(body, Some(options))
            .await
            .map_err(|e| self.send_error(topic, e))
    }
}

#[async_trait]
impl Transport for ServiceBus {
    fn profile(&self) -> TransportProfile {
        TransportProfile::new("servicebus")
            .with_capabilities(Capabilities::new().with_delayed_delivery(true))
            .with_entity_names(ENTITY_NAMES)
    }

    fn endpoint_address(&self, name: &str) -> String {
        format!(
            "sb://{}.servicebus.windows.net/{name}",
            self.shared.connection.namespace
        )
    }

    fn temporary_endpoint_address(&self, name: &str) -> String {
        format!("{}?autodelete=300", self.endpoint_address(name))
    }

    fn publish_address(&self, message_type: &Urn) -> String {
        format!(
            "{}?type=topic",
            self.endpoint_address(&topic_name(message_type))
        )
    }

    fn describe(&self, topology: &Topology) -> TopologyView {
        let endpoints = topology
            .endpoints
            .iter()
            .map(|e| {
                let mut view = EndpointView::queues(e);
                if e.bind_message_types {
                    for t in &e.message_types {
                        view = view.with_source(
                            t.as_str(),
                            format!(
                                "topic {} / subscription {}",
                                topic_name(t),
                                subscription_name(&e.name)
                            ),
                        );
                    }
                }
                view
            })
            .collect();
        TopologyView::new(endpoints)
    }

    async fn deploy(&self, topology: &Topology) -> Result<()> {
        for e in &topology.endpoints {
            self.ensure_queue(&e.name, e.temporary).await?;
            if e.bind_message_types {
                for t in &e.message_types {
                    let topic = topic_name(t);
                    self.ensure_topic(&topic).await?;
                    if self.shared.provision {
                        self.shared
                            .management
                            .subscription(
                                &topic,
                                &subscription_name(&e.name),
                                &e.name,
                                &self.shared.settings,
                            )
                            .await?;
                    }
                }
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
        let first = message_types
            .first()
            .ok_or_else(|| Error::config("cannot publish a message without a message type"))?;
        let topic = topic_name(first);
        self.ensure_topic(&topic).await?;
        if message_types.len() > 1 && self.shared.provision {
            self.ensure_contract_forwarding(message_types).await?;
        }
        self.send_to_topic(&topic, &message, options.delay).await
    }

    async fn send(
        &self,
        address: &Address,
        message: TransportMessage,
        options: &DeliveryOptions,
    ) -> Result<()> {
        match address.kind() {
            AddressKind::Topic | AddressKind::Exchange => {
                self.ensure_topic(address.name()).await?;
                self.send_to_topic(address.name(), &message, options.delay)
                    .await
            }
            AddressKind::Uri => {
                check_scheme("Service Bus", address, &["sb"])?;
                let mut path = address.path().to_vec();
                path.push(address.name().to_string());
                let entity = path.join("/");
                if address.query("type") == Some("topic") {
                    self.ensure_topic(&entity).await?;
                    self.send_to_topic(&entity, &message, options.delay).await
                } else {
                    self.ensure_queue(&entity, address.query("autodelete").is_some())
                        .await?;
                    self.send_to_queue(&entity, &message, options.delay).await
                }
            }
            _ => {
                self.ensure_queue(address.name(), false).await?;
                self.send_to_queue(address.name(), &message, options.delay)
                    .await
            }
        }
    }

    async fn receive(&self, endpoint: &EndpointTopology) -> Result<Box<dyn Receiver>> {
        self.ensure_queue(&endpoint.name, endpoint.temporary)
            .await?;
        if endpoint.temporary {
            self.shared.temporaries.add(&endpoint.name);
        }
        let prefetch = usize::from(endpoint.prefetch.max(1));
        let pollers = prefetch.clamp(1, 8);
        let permits = Arc::new(Semaphore::new(prefetch));
        let (tx, rx) = mpsc::channel(prefetch);
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        for _ in 0..pollers {
            tasks.push(tokio::spawn(poll(
                self.clone(),
                endpoint.name.clone(),
                permits.clone(),
                tx.clone(),
                stop.clone(),
            )));
        }
        Ok(Box::new(SbReceiver { rx, stop, tasks }))
    }

    async fn close(&self) -> Result<()> {
        for q in self.shared.temporaries.take_all() {
            if let Err(e) = self.shared.management.delete(&q).await {
                tracing::debug!(queue = %q, error = %e, "could not delete a temporary queue");
            }
        }
        Ok(())
    }
}
