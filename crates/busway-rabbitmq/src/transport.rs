//! The [`Transport`] implementation: the [`RabbitMq`] transport, its addresses, topology
//! deployment, and publish and send with the routing rules that pick their exchange.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use busway_core::topology::EndpointTopology;
use busway_core::transport::{
    Capabilities, DeliveryOptions, Receiver, Transport, TransportProfile, check_scheme,
};
use busway_core::{
    Address, AddressKind, Error, ErrorKind, Result, Topology, TransportMessage, Urn,
};
use lapin::Channel;
use lapin::types::ShortString;
use tokio::time::Instant;

use crate::config::{DEFAULT_URL, RabbitMqBuilder, RabbitMqConfig, URL_ENV};
use crate::connector::{Attempt, Connector};
use crate::declare::{self, EndpointSpec};
use crate::naming::{DELIVERY_HEADERS, ENTITY_NAMES, REPLY_TO, exchange_name};
use crate::receive::RabbitReceiver;
use crate::route::{ExchangeSpec, Route, publish};
use crate::wire;

/// The RabbitMQ transport. Clone it to share one connection between buses.
///
/// ```no_run
/// # async fn f() -> busway_core::Result<()> {
/// use busway_rabbitmq::RabbitMq;
/// let transport = RabbitMq::new("amqp://guest:guest@127.0.0.1:5672/%2f")?;
/// let bus = busway_core::Bus::builder().transport(transport).build().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RabbitMq {
    connector: Arc<Connector>,
    prefix: Arc<str>,
}

impl fmt::Debug for RabbitMq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMq")
            .field("url", &self.connector.config.url())
            .finish()
    }
}

impl RabbitMq {
    /// A transport for `url` (`amqp://user:pass@host:port/vhost`, `amqps://` for TLS;
    /// `?heartbeat=` and `?prefetch=` are read). Connects when the bus is built.
    pub fn new(url: &str) -> Result<Self> {
        Self::builder(url).build()
    }

    /// A transport for the URL in `BUSWAY_RABBITMQ_URL`, or the local broker with the guest
    /// user when it is not set.
    pub fn from_env() -> Result<Self> {
        Self::new(&Self::env_url())
    }

    /// The URL `from_env` uses.
    pub fn env_url() -> String {
        std::env::var(URL_ENV).unwrap_or_else(|_| DEFAULT_URL.to_string())
    }

    /// A builder for `url`.
    pub fn builder(url: &str) -> RabbitMqBuilder {
        RabbitMqBuilder::new(url)
    }

    /// The transport for `config` (what [`RabbitMqBuilder::build`] returns).
    pub(crate) fn with_config(config: RabbitMqConfig) -> Self {
        let prefix = config.address_prefix();
        let declare: crate::connector::DeclareFn =
            Arc::new(|c, l, t| Box::pin(declare::topology(c, l, t)));
        Self {
            connector: Connector::new(config, declare),
            prefix: Arc::from(prefix),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &RabbitMqConfig {
        &self.connector.config
    }

    /// Forgets what was declared, so the next use declares it again (after entities were
    /// deleted).
    pub(crate) fn forget_declarations(&self) {
        self.connector.forget_declarations();
    }

    /// Runs `f` on a fresh channel: on the transport's connection while it is open, else on
    /// a short-lived connection of its own. The whole call (connect, `f`, close) is bounded by
    /// the publish timeout: a broker that stops answering makes it fail, never hang.
    pub(crate) async fn with_admin_channel<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let limit = self.connector.config.publish_timeout;
        match tokio::time::timeout(limit, self.admin_call(f)).await {
            Ok(result) => result,
            Err(_) => Err(Error::timeout(format!(
                "a management call to RabbitMQ at {} did not finish within {limit:?}",
                self.connector.config.url()
            ))),
        }
    }

    async fn admin_call<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let config = &self.connector.config;
        if !self.connector.is_closed() {
            let link = self
                .connector
                .link_until(Instant::now() + config.connect_timeout)
                .await?;
            let channel = link.consumer_channel().await?;
            let result = f(channel.clone()).await;
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                channel.close(200, ShortString::from("done")),
            )
            .await;
            return result;
        }
        let connect = crate::frame_guard::connect(config.uri.clone(), Default::default());
        let connection = tokio::time::timeout(config.connect_timeout, connect)
            .await
            .map_err(|_| {
                Error::timeout(format!(
                    "connecting to RabbitMQ at {} took longer than {:?}",
                    config.url(),
                    config.connect_timeout
                ))
            })?
            .map_err(|e| {
                Error::transport(
                    format!("could not connect to RabbitMQ at {}", config.url()),
                    e,
                )
            })?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| Error::transport("could not open a channel", e))?;
        let result = f(channel).await;
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            connection.close(200, ShortString::from("done")),
        )
        .await;
        result
    }

    /// Where a send to `address` goes and what it declares, by MassTransit's rule
    /// (`RabbitMqEndpointAddress`, `RabbitMqSendSettings.GetBrokerTopology`): `queue:name`
    /// declares and binds exchange and queue `name`; `exchange:name` and a full
    /// `rabbitmq://host/vhost/name` declare only the exchange (`bind=false` is the default),
    /// unless `bind=true` asks for the queue too (named by `queue=`, else `name`).
    /// `temporary`, `durable` and `autodelete` set the flags of what is declared. So a
    /// `responseAddress` or `faultAddress` chosen by a message's sender never makes this
    /// endpoint create a queue, and a .NET bus endpoint (a temporary queue with `x-expires`)
    /// is published to as it stands rather than declared again with other arguments.
    fn route_for(&self, address: &Address) -> Result<Route> {
        let name = address.name().to_string();
        let bind_default = match address.kind() {
            AddressKind::Queue => true,
            AddressKind::Exchange => false,
            AddressKind::Topic => {
                return Err(Error::new(
                    ErrorKind::Address,
                    format!(
                        "RabbitMQ has no topics; send to `exchange:{name}` or `queue:{name}` instead of `{address}`"
                    ),
                ));
            }
            _ => {
                check_scheme(
                    "RabbitMQ",
                    address,
                    &["rabbitmq", "rabbitmqs", "amqp", "amqps"],
                )?;
                false
            }
        };
        let flag = |key: &str| {
            address
                .query(key)
                .and_then(|v| v.to_ascii_lowercase().parse::<bool>().ok())
        };
        let (mut durable, mut auto_delete) = (true, false);
        if let Some(temporary) = flag("temporary") {
            durable = !temporary;
            auto_delete = temporary;
        }
        if let Some(d) = flag("durable") {
            durable = d;
        }
        if let Some(a) = flag("autodelete") {
            auto_delete = a;
        }
        if !flag("bind").unwrap_or(bind_default) {
            return Ok(Route::Exchange(ExchangeSpec {
                name,
                durable,
                auto_delete,
            }));
        }
        let mut spec = EndpointSpec::plain(&name);
        spec.durable = durable;
        spec.auto_delete = auto_delete;
        spec.queue = address
            .query("queue")
            .filter(|q| !q.trim().is_empty() && *q != name)
            .map(str::to_string);
        Ok(Route::Endpoint(spec))
    }

    async fn deliver(
        &self,
        route: Route,
        message: &TransportMessage,
        delay: Option<Duration>,
    ) -> Result<()> {
        publish(
            &self.connector,
            route,
            message,
            delay.filter(|d| !d.is_zero()),
        )
        .await
    }
}

/// Whether `address` is RabbitMQ's direct reply-to pseudo-queue (MassTransit's
/// `IsReplyToAddress`: the path ends with `amq.rabbitmq.reply-to`).
fn is_reply_to(address: &Address) -> bool {
    address.name() == REPLY_TO
}

/// The most message types one publish declares and binds (MassTransit contracts list a
/// handful: the type, its interfaces, `Fault`).
const MAX_PUBLISH_TYPES: usize = 32;

#[async_trait]
impl Transport for RabbitMq {
    fn profile(&self) -> TransportProfile {
        TransportProfile::new("rabbitmq")
            .with_capabilities(Capabilities::new().with_delayed_delivery(true))
            .with_default_prefetch(self.connector.config.prefetch)
            .with_entity_names(ENTITY_NAMES)
            .with_delivery_headers(DELIVERY_HEADERS)
    }

    fn endpoint_address(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn temporary_endpoint_address(&self, name: &str) -> String {
        format!("{}{name}?temporary=true", self.prefix)
    }

    fn publish_address(&self, message_type: &Urn) -> String {
        self.endpoint_address(&exchange_name(message_type))
    }

    async fn deploy(&self, topology: &Topology) -> Result<()> {
        self.connector.set_topology(topology);
        let deadline = Instant::now() + self.connector.config.connect_timeout;
        let link = self.connector.link_until(deadline).await.map_err(|e| {
            Error::with_source(
                ErrorKind::Transport,
                format!(
                    "could not connect to RabbitMQ at {}; is it running? (start it with `rabbitmq-server -detached` or `docker compose up -d rabbitmq`)",
                    self.connector.config.url()
                ),
                e,
            )
        })?;
        let declare = declare::topology(self.connector.clone(), link.clone(), topology.clone());
        match tokio::time::timeout(self.connector.config.connect_timeout, declare).await {
            Ok(result) => result,
            Err(_) => {
                link.mark_broken();
                Err(Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "declaring the topology on RabbitMQ at {} timed out",
                        self.connector.config.url()
                    ),
                ))
            }
        }
    }

    async fn publish(
        &self,
        message_types: &[Urn],
        message: TransportMessage,
        options: &DeliveryOptions,
    ) -> Result<()> {
        if message_types.is_empty() {
            return Err(Error::config(
                "cannot publish a message without a message type",
            ));
        }
        // The first type names the exchange published to; the others are only bound to it.
        // One that cannot be an exchange name (a hostile `messageType` copied into a fault)
        // is left out, so the fault still reaches the consumers of the readable types.
        //
        // At most MAX_PUBLISH_TYPES are declared and bound: a message (or the fault of one)
        // listing thousands of types would otherwise make the endpoint declare thousands of
        // durable exchanges, one publish at a time.
        if message_types.len() > MAX_PUBLISH_TYPES {
            tracing::warn!(
                types = message_types.len(),
                bound = MAX_PUBLISH_TYPES,
                "a publish lists more message types than are bound; the rest are left out"
            );
        }
        let mut names = message_types
            .iter()
            .take(MAX_PUBLISH_TYPES)
            .map(exchange_name);
        let mut types: Vec<String> = names.next().into_iter().collect();
        types.extend(names.filter(|name| {
            let fits = name.len() <= wire::MAX_SHORT;
            if !fits {
                tracing::warn!(
                    name_bytes = name.len(),
                    "not binding a message type whose exchange name is longer than 255 bytes"
                );
            }
            fits
        }));
        let route = Route::MessageTypes(types);
        self.deliver(route, &message, options.delay).await
    }

    async fn send(
        &self,
        address: &Address,
        message: TransportMessage,
        options: &DeliveryOptions,
    ) -> Result<()> {
        if is_reply_to(address) {
            let token = options.reply_to.clone().ok_or_else(|| {
                Error::new(
                    ErrorKind::Address,
                    format!(
                        "`{address}` is RabbitMQ's direct reply-to, which needs the request's \
                         reply-to token; only a response to a request that carried one can go there"
                    ),
                )
            })?;
            // The token routes through the default exchange; a delay would need a wait queue,
            // which the pseudo-queue cannot be reached from, so the response goes now.
            return self.deliver(Route::ReplyTo(token), &message, None).await;
        }
        let route = self.route_for(address)?;
        self.deliver(route, &message, options.delay).await
    }

    async fn receive(&self, endpoint: &EndpointTopology) -> Result<Box<dyn Receiver>> {
        self.connector.ensure_started();
        let spec = EndpointSpec::from_topology(endpoint);
        if endpoint.temporary {
            // A temporary endpoint (the bus's response endpoint) is not part of the deployed
            // topology: declare it before its address is handed out, since a send to a
            // `?temporary=true` address declares only the exchange (MassTransit's rule) and
            // a response published before the binding exists would find no queue.
            let connector = self.connector.clone();
            let declared = spec.clone();
            self.connector
                .with_link("declaring a temporary endpoint", move |link| {
                    let connector = connector.clone();
                    let spec = declared.clone();
                    async move {
                        declare::endpoint(&connector, &link, &spec)
                            .await
                            .map_err(Attempt::Retry)
                    }
                })
                .await?;
        }
        Ok(Box::new(RabbitReceiver::new(
            self.connector.clone(),
            spec,
            endpoint.prefetch.max(1),
        )))
    }

    async fn close(&self) -> Result<()> {
        self.connector.close().await;
        Ok(())
    }
}
