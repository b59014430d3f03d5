//! The [`Transport`] implementation on Azure Service Bus (REST data plane).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use azure_core::HttpClient;
use azure_messaging_servicebus::prelude::{QueueClient, TopicClient};
use azure_messaging_servicebus::service_bus::{
    PeekLockResponse, SendMessageOptions, SettableBrokerProperties,
};
use busway_core::topology::{EndpointTopology, EndpointView, TopologyView};
use busway_core::transport::{
    Capabilities, Delivery, DeliveryOptions, GiveBack, MoveError, MoveKind, Receiver, SettleOnDrop,
    Settlement, TemporaryEntities, Transport, TransportProfile, check_scheme, spawn_on_current,
};
use busway_core::{
    Address, AddressKind, Error, ErrorKind, Headers, Result, Topology, TransportMessage, Urn,
};
use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::connection::{ConnectionString, Rebased, Timed, is_loopback_url};
use crate::management::{Management, QueueSettings};
use crate::naming::{ENTITY_NAMES, subscription_name, topic_name};

/// The environment variable with a connection string for tests against a real namespace.
pub const CONNECTION_STRING_ENV: &str = "BUSWAY_ASB_CONNECTION_STRING";

/// The environment variable with a base URL to use instead of the namespace's (optional).
///
/// [`ServiceBus::from_env`] honours it only for a loopback address (a local stand-in or
/// proxy): requests carry tokens for the real namespace, which must not go to another host
/// because a variable says so. Call [`ServiceBusBuilder::base_url`] to send them elsewhere.
pub const BASE_URL_ENV: &str = "BUSWAY_ASB_BASE_URL";

/// The Azure Service Bus transport.
#[derive(Clone)]
pub struct ServiceBus {
    shared: Arc<Shared>,
}

struct Shared {
    http: Arc<dyn HttpClient>,
    connection: ConnectionString,
    management: Management,
    settings: QueueSettings,
    provision: bool,
    base_url: Option<String>,
    receive_wait: Duration,
    temporaries: TemporaryEntities,
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

/// Builds a [`ServiceBus`] transport.
pub struct ServiceBusBuilder {
    connection: Result<ConnectionString>,
    http: Option<Arc<dyn HttpClient>>,
    base_url: Option<String>,
    settings: QueueSettings,
    provision: bool,
    receive_wait: Duration,
    request_timeout: Option<Duration>,
}

impl fmt::Debug for ServiceBusBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceBusBuilder")
            .field("connection", &self.connection.as_ref().ok())
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl ServiceBusBuilder {
    /// Sends every request to `base_url` (`http://127.0.0.1:8080`) instead of
    /// `https://<namespace>.servicebus.windows.net` (a local stand-in, a proxy).
    pub fn base_url(mut self, base_url: impl Into<String>) -> Self {
        self.base_url = Some(base_url.into());
        self
    }

    /// The HTTP client requests go through (default: azure_core's reqwest client).
    pub fn http_client(mut self, client: Arc<dyn HttpClient>) -> Self {
        self.http = Some(client);
        self
    }

    /// Lock duration of queues and subscriptions busway creates (default 5 minutes).
    pub fn lock_duration(mut self, duration: Duration) -> Self {
        self.settings.lock_duration = duration;
        self
    }

    /// Delivery attempts before Service Bus dead-letters a message (default 5).
    pub fn max_delivery_count(mut self, count: u32) -> Self {
        self.settings.max_delivery_count = count.max(1);
        self
    }

    /// Whether busway creates queues, topics and subscriptions (default true). Turn it off
    /// for keys without Manage rights; the entities must then exist.
    pub fn provision(mut self, on: bool) -> Self {
        self.provision = on;
        self
    }

    /// How long one receive request waits for a message (default 1 s; whole seconds).
    pub fn receive_wait(mut self, wait: Duration) -> Self {
        self.receive_wait = wait;
        self
    }

    /// How long any one request to Service Bus (send, receive, complete, abandon, renew,
    /// management) may take before it fails (default 30 s or the receive wait plus 10 s,
    /// whichever is longer; never less than the receive wait plus 1 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        self
    }

    /// The transport.
    pub fn build(self) -> Result<ServiceBus> {
        let connection = self.connection?;
        // A receive waits up to `receive_wait` on the server: leave it room to answer.
        let timeout = match self.request_timeout {
            Some(t) => t.max(self.receive_wait + Duration::from_secs(1)),
            None => Duration::from_secs(30).max(self.receive_wait + Duration::from_secs(10)),
        };
        let inner: Arc<dyn HttpClient> = Arc::new(Timed {
            inner: self.http.unwrap_or_else(azure_core::new_http_client),
            timeout,
        });
        let http: Arc<dyn HttpClient> = match &self.base_url {
            Some(base) => Arc::new(Rebased {
                inner,
                service: connection.service_url(),
                base: base.clone(),
            }),
            None => inner,
        };
        Ok(ServiceBus {
            shared: Arc::new(Shared {
                management: Management::new(http.clone(), connection.clone()),
                http,
                connection,
                settings: self.settings,
                provision: self.provision,
                base_url: self.base_url,
                receive_wait: self.receive_wait,
                temporaries: TemporaryEntities::default(),
            }),
        })
    }
}

impl ServiceBus {
    /// A builder for a connection string
    /// (`Endpoint=sb://<ns>.servicebus.windows.net/;SharedAccessKeyName=..;SharedAccessKey=..`).
    pub fn builder(connection_string: &str) -> ServiceBusBuilder {
        ServiceBusBuilder {
            connection: ConnectionString::parse(connection_string),
            http: None,
            base_url: None,
            settings: QueueSettings {
                lock_duration: Duration::from_secs(300),
                max_delivery_count: 5,
                auto_delete_on_idle: None,
            },
            provision: true,
            receive_wait: Duration::from_secs(1),
            request_timeout: None,
        }
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

    async fn ensure_queue(&self, name: &str, temporary: bool) -> Result<()> {
        if !self.shared.provision {
            return Ok(());
        }
        let mut settings = self.shared.settings.clone();
        if temporary {
            settings.auto_delete_on_idle = Some(Duration::from_secs(300));
        }
        self.shared.management.queue(name, &settings).await
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

    async fn send_to_queue(
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

fn utf8(message: &TransportMessage) -> Result<&str> {
    std::str::from_utf8(&message.body).map_err(|e| {
        Error::with_source(
            ErrorKind::Serialize,
            "the Service Bus REST API carries text bodies; this body is not UTF-8",
            e,
        )
    })
}

/// The "N" form of a GUID (32 hex digits), as MassTransit writes Service Bus ids.
fn n_form(id: &str) -> String {
    match uuid::Uuid::parse_str(id.trim()) {
        Ok(u) => u.simple().to_string(),
        Err(_) => id.to_string(),
    }
}

/// A JSON header value as the REST API wants custom properties: JSON text, ASCII only.
fn property_value(value: &serde_json::Value) -> String {
    let json = serde_json::to_string(value).unwrap_or_default();
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut buf = [0u16; 2];
            for unit in c.encode_utf16(&mut buf) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

fn send_options(message: &TransportMessage, delay: Option<Duration>) -> SendMessageOptions {
    let scheduled = delay.filter(|d| !d.is_zero()).map(|d| {
        // The REST API takes whole seconds (RFC 2822); round up so a delay is never shortened.
        let at = time::OffsetDateTime::now_utc() + d;
        let rounded = at.replace_nanosecond(0).unwrap_or(at);
        if rounded < at {
            rounded + time::Duration::SECOND
        } else {
            rounded
        }
    });
    let reply_to = message
        .headers
        .get_str(busway_core::headers::names::RESPONSE_ADDRESS)
        .map(|s| s.into_owned());
    let mut custom = std::collections::HashMap::new();
    for (k, v) in message.headers.iter() {
        if v.is_null() {
            continue;
        }
        custom.insert(k.to_string(), property_value(v));
    }
    SendMessageOptions {
        content_type: message.content_type.clone(),
        broker_properties: Some(SettableBrokerProperties {
            message_id: message.message_id.as_deref().map(n_form),
            correlation_id: message.correlation_id.as_deref().map(n_form),
            time_to_live: message.time_to_live,
            scheduled_enqueue_time_utc: scheduled,
            reply_to,
            ..SettableBrokerProperties::default()
        }),
        custom_properties: Some(custom),
    }
}

/// The broker properties busway reads from a received message.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ReceivedProperties {
    delivery_count: u32,
    #[serde(default)]
    lock_token: String,
    #[serde(default)]
    locked_until_utc: Option<String>,
    #[serde(default)]
    message_id: Option<String>,
    #[serde(default)]
    correlation_id: Option<String>,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    reply_to: Option<String>,
    #[serde(default)]
    time_to_live: Option<f64>,
}

const STANDARD_HEADERS: [&str; 12] = [
    "brokerproperties",
    "content-type",
    "content-length",
    "location",
    "date",
    "server",
    "transfer-encoding",
    "strict-transport-security",
    "connection",
    "keep-alive",
    "x-ms-request-id",
    "vary",
];

pub(crate) struct Received {
    pub(crate) message: TransportMessage,
    delivery_count: u32,
    lock_left: Option<Duration>,
}

impl Received {
    pub(crate) fn read(response: &PeekLockResponse) -> Result<Option<Received>> {
        let status = u16::from(*response.status());
        match status {
            204 => return Ok(None),
            200 | 201 => {}
            401 | 403 => {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("Service Bus refused the key ({status})"),
                ));
            }
            404 | 410 => {
                return Err(Error::new(
                    ErrorKind::Transport,
                    "the entity does not exist (it was deleted, or was never created with provisioning off)",
                ));
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!("Service Bus answered {status} to a receive"),
                ));
            }
        }
        let headers: azure_core::headers::Headers = match response.custom_properties() {
            Ok(h) => h,
            Err(never) => match never {},
        };
        let mut props: Option<ReceivedProperties> = None;
        let mut content_type = None;
        let mut out = Vec::new();
        for (name, value) in headers.iter() {
            let name = name.as_str();
            let value = value.as_str();
            match name {
                "brokerproperties" => props = serde_json::from_str(value).ok(),
                "content-type" => content_type = Some(value.to_string()),
                _ if STANDARD_HEADERS.contains(&name) => {}
                _ => {
                    let parsed = serde_json::from_str::<serde_json::Value>(value)
                        .unwrap_or_else(|_| serde_json::Value::String(value.to_string()));
                    out.push((name.to_string(), parsed));
                }
            }
        }
        let Some(props) = props else {
            return Ok(None);
        };
        // Collected in one pass (linear, unlike an insert per property).
        let mut out: Headers = out.into_iter().collect();
        if let Some(label) = &props.label {
            out.insert_if_absent("Label", label.as_str());
        }
        if let Some(reply_to) = &props.reply_to {
            out.insert_if_absent("ReplyTo", reply_to.as_str());
        }
        let lock_left = props
            .locked_until_utc
            .as_deref()
            .and_then(|t| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc2822).ok()
            })
            .map(|until| until - time::OffsetDateTime::now_utc())
            .and_then(|d| Duration::try_from(d).ok());
        let _ = &props.lock_token;
        Ok(Some(Received {
            message: {
                let mut message = TransportMessage::new(Bytes::from(response.body()));
                message.content_type = content_type;
                message.message_id = props.message_id.clone();
                message.correlation_id = props.correlation_id.clone();
                message.headers = out;
                message.time_to_live = props
                    .time_to_live
                    .filter(|t| t.is_finite() && *t > 0.0 && *t < 1e9)
                    .map(Duration::from_secs_f64);
                message
            },
            delivery_count: props.delivery_count,
            lock_left,
        }))
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

async fn poll(
    bus: ServiceBus,
    queue: String,
    permits: Arc<Semaphore>,
    tx: mpsc::Sender<Result<Delivery>>,
    stop: CancellationToken,
) {
    let client = match bus.queue_client(&queue) {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Err(e)).await;
            return;
        }
    };
    let wait = bus.shared.receive_wait;
    // Receive failures: 100 ms doubling to 5 s.
    let mut failures =
        busway_core::transport::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let response = tokio::select! {
            _ = stop.cancelled() => return,
            r = client.peek_lock_message2(Some(wait)) => r,
        };
        let outcome = match response {
            Ok(response) => Received::read(&response).map(|r| r.map(|r| (r, response))),
            Err(e) => Err(Error::with_source(
                ErrorKind::Unavailable,
                format!("Service Bus did not answer a receive on `{queue}`"),
                e,
            )),
        };
        let received = match outcome {
            Ok(received) => received,
            Err(e) => {
                drop(permit);
                let failed = failures.failures() + 1;
                if failed == 1 || failed.is_multiple_of(20) {
                    tracing::warn!(queue = %queue, error = %e, failures = failed, "Service Bus receive failed");
                }
                if e.is_config() && failed == 1 {
                    // The endpoint reports it (a key without Listen rights, a revoked key).
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        r = tx.send(Err(e)) => if r.is_err() { return },
                    }
                }
                if !failures.wait(&stop).await {
                    return;
                }
                continue;
            }
        };
        let Some((received, lock)) = received else {
            drop(permit);
            continue;
        };
        failures.reset();
        let renew = CancellationToken::new();
        let lost = CancellationToken::new();
        let lock = Arc::new(lock);
        tokio::spawn(renew_lock(
            lock.clone(),
            received.lock_left,
            renew.clone(),
            lost.clone(),
            queue.clone(),
        ));
        let mut delivery = Delivery::new(
            received.message,
            Box::new(SbSettlement {
                bus: bus.clone(),
                queue: queue.clone(),
                lock: SettleOnDrop::new(Locked(lock)),
                renew,
                _permit: permit,
            }),
        );
        delivery.redelivered = received.delivery_count > 1;
        delivery.delivery_count = Some(received.delivery_count);
        delivery.lost = Some(lost);
        // Cannot block for long: a delivery holds one of `prefetch` permits and the channel
        // holds `prefetch`. A send refused after `stop` drops the delivery, which unlocks it.
        if tx.send(Ok(delivery)).await.is_err() {
            return;
        }
    }
}

/// Renews the lock at half its remaining time until the delivery is settled. When the lock
/// runs out without a successful renewal, it is lost: `lost` fires (the consumer's
/// cancellation), since Service Bus delivers the message again and this delivery can no
/// longer be completed.
async fn renew_lock(
    lock: Arc<PeekLockResponse>,
    first: Option<Duration>,
    settled: CancellationToken,
    lost: CancellationToken,
    queue: String,
) {
    let period = first
        .unwrap_or(Duration::from_secs(30))
        .max(Duration::from_millis(400));
    let mut held_until = tokio::time::Instant::now() + period;
    let mut wait = period / 2;
    loop {
        tokio::select! {
            _ = settled.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let asked = tokio::time::Instant::now();
        let renewed = tokio::select! {
            _ = settled.cancelled() => return,
            r = lock.renew_message_lock() => r,
        };
        match renewed {
            Ok(()) => {
                held_until = asked + period;
                wait = period / 2;
            }
            Err(e) if tokio::time::Instant::now() >= held_until => {
                tracing::warn!(queue = %queue, error = %e, "the message lock was lost (not renewed in time); cancelling the consumer, Service Bus delivers the message again");
                lost.cancel();
                return;
            }
            Err(e) => {
                tracing::warn!(queue = %queue, error = %e, "renewing a message lock failed; trying again before it runs out");
                let left = held_until.saturating_duration_since(tokio::time::Instant::now());
                wait = (period / 4)
                    .max(Duration::from_millis(200))
                    .min(left.max(Duration::from_millis(50)));
            }
        }
    }
}

struct SbReceiver {
    rx: mpsc::Receiver<Result<Delivery>>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

#[async_trait]
impl Receiver for SbReceiver {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        self.rx.recv().await
    }

    async fn stop(&mut self) -> Result<()> {
        self.stop.cancel();
        // Closed first, so no poller can wait on a full channel; deliveries locked but not
        // handed out go back (their settlements unlock on drop).
        self.rx.close();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        while let Ok(d) = self.rx.try_recv() {
            drop(d);
        }
        Ok(())
    }
}

struct SbSettlement {
    bus: ServiceBus,
    queue: String,
    lock: SettleOnDrop<Locked>,
    renew: CancellationToken,
    _permit: OwnedSemaphorePermit,
}

/// A message still locked to this receiver: unlocked (so Service Bus delivers it again at
/// once) when its settlement is dropped.
struct Locked(Arc<PeekLockResponse>);

impl GiveBack for Locked {
    fn give_back(self) {
        spawn_on_current(async move {
            let _ = self.0.unlock_message().await;
        });
    }
}

impl SbSettlement {
    async fn complete(&mut self) -> Result<()> {
        self.renew.cancel();
        let Some(Locked(lock)) = self.lock.take() else {
            return Ok(());
        };
        lock.delete_message().await.map(|_| ()).map_err(|e| {
            Error::with_source(
                ErrorKind::Transport,
                "completing the message failed (its lock was lost); Service Bus delivers it again",
                e,
            )
        })
    }
}

#[async_trait]
impl Settlement for SbSettlement {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.complete().await
    }

    async fn requeue(mut self: Box<Self>) -> Result<()> {
        self.renew.cancel();
        if let Some(Locked(lock)) = self.lock.take() {
            lock.unlock_message().await.map_err(|e| {
                Error::with_source(
                    ErrorKind::Transport,
                    "unlocking the message failed; it returns when its lock expires",
                    e,
                )
            })?;
        }
        Ok(())
    }

    async fn move_to(
        mut self: Box<Self>,
        kind: MoveKind,
        message: TransportMessage,
    ) -> std::result::Result<(), MoveError> {
        let target = kind.queue_name(&self.queue);
        let sent = match self.bus.ensure_queue(&target, false).await {
            Ok(()) => self.bus.send_to_queue(&target, &message, None).await,
            Err(err) => Err(err),
        };
        if let Err(err) = sent {
            // Still locked (and renewed): the bus backs off and moves it again.
            return Err(MoveError::retry(err, self));
        }
        Ok(self.complete().await?)
    }

    async fn redeliver(
        mut self: Box<Self>,
        message: TransportMessage,
        delay: Duration,
    ) -> Result<()> {
        let queue = self.queue.clone();
        self.bus
            .send_to_queue(&queue, &message, Some(delay))
            .await?;
        self.complete().await
    }
}

impl Drop for SbSettlement {
    fn drop(&mut self) {
        // Stop renewing first; `lock` then unlocks a message nobody settled.
        self.renew.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_forms_like_masstransit() {
        assert_eq!(
            n_form("181c0000-6393-3630-36a4-08daf4e7c6da"),
            "181c00006393363036a408daf4e7c6da"
        );
        assert_eq!(property_value(&serde_json::json!("é\n")), "\"\\u00e9\\n\"");
    }
}
