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
use bytes::Bytes;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel};
use tokio::time::Instant;

use crate::config::{DEFAULT_URL, RabbitMqBuilder, RabbitMqConfig, URL_ENV};
use crate::confirms::{Identity, Outcome};
use crate::connector::{Attempt, Connector, Link, Publisher};
use crate::declare::{self, EndpointSpec};
use crate::naming::{ENTITY_NAMES, REPLY_TO, exchange_name};
use crate::receive::RabbitReceiver;
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

/// An exchange a send declares by itself (no queue).
#[derive(Debug, Clone)]
pub(crate) struct ExchangeSpec {
    name: String,
    durable: bool,
    auto_delete: bool,
}

/// Where a message is published and what must exist first.
#[derive(Debug, Clone)]
pub(crate) enum Route {
    /// An endpoint's exchange (declared with its queue and binding).
    Endpoint(EndpointSpec),
    /// An exchange alone.
    Exchange(ExchangeSpec),
    /// The message type exchanges of a publish.
    MessageTypes(Vec<String>),
    /// A direct reply-to token: the default exchange, routed by the token.
    ReplyTo(String),
}

impl Route {
    fn exchange(&self) -> &str {
        match self {
            Route::Endpoint(spec) => &spec.name,
            Route::Exchange(spec) => &spec.name,
            Route::MessageTypes(types) => types.first().map(String::as_str).unwrap_or(""),
            Route::ReplyTo(_) => "",
        }
    }

    /// The routing key of an undelayed publish (exchanges here are fanout: none, but a
    /// reply-to token routes through the default exchange).
    fn routing_key(&self) -> String {
        match self {
            Route::ReplyTo(token) => token.clone(),
            _ => String::new(),
        }
    }

    /// Every exchange and queue name the route declares or publishes to fits an AMQP short
    /// string (255 bytes). A longer one (a hostile message type or fault address) is an
    /// address error here rather than a panic inside the client.
    fn check_names(&self) -> Result<()> {
        let names: Box<dyn Iterator<Item = &String>> = match self {
            Route::Endpoint(spec) => Box::new(
                std::iter::once(&spec.name)
                    .chain(&spec.queue)
                    .chain(&spec.message_types),
            ),
            Route::Exchange(spec) => Box::new(std::iter::once(&spec.name)),
            Route::MessageTypes(types) => Box::new(types.iter()),
            Route::ReplyTo(token) => Box::new(std::iter::once(token)),
        };
        for name in names {
            if name.len() > wire::MAX_SHORT {
                let preview: String = name.chars().take(60).collect();
                return Err(Error::new(
                    ErrorKind::Address,
                    format!(
                        "`{preview}...` ({} bytes) cannot be a RabbitMQ exchange or queue name: AMQP allows at most {} bytes",
                        name.len(),
                        wire::MAX_SHORT
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Sends must reach a queue; publishes may have no subscribers, and a reply-to
    /// requester may have gone (the broker then drops the response, as it does for
    /// MassTransit's).
    fn mandatory(&self) -> bool {
        !matches!(self, Route::MessageTypes(_) | Route::ReplyTo(_))
    }

    async fn ensure(&self, connector: &Arc<Connector>, link: &Link) -> Result<()> {
        match self {
            Route::Endpoint(spec) => declare::endpoint(connector, link, spec).await,
            Route::Exchange(spec) => {
                declare::exchange(
                    connector,
                    link,
                    &spec.name,
                    lapin::ExchangeKind::Fanout,
                    spec.durable,
                    spec.auto_delete,
                )
                .await
            }
            Route::MessageTypes(types) => declare::message_types(connector, link, types).await,
            Route::ReplyTo(_) => Ok(()),
        }
    }
}

/// Publishes with confirms, declaring what the route needs first; retried across channel
/// and connection failures until the publish timeout.
pub(crate) async fn publish(
    connector: &Arc<Connector>,
    route: Route,
    message: &TransportMessage,
    delay: Option<Duration>,
) -> Result<()> {
    route.check_names()?;
    let make_props = || {
        let props = wire::properties(message, true);
        if delay.is_some() {
            // A per-message expiration shorter than the delay would dead-letter the message
            // out of the wait queue early.
            strip_expiration(props)
        } else {
            props
        }
    };
    // The first attempt takes these; a retry builds them again (cheaper than cloning the
    // header table for every publish).
    let mut first_props = Some(make_props());
    let body = message.body.clone();
    let route = Arc::new(route);
    connector
        .with_link("publishing to RabbitMQ", |link| {
            let props = first_props.take().unwrap_or_else(make_props);
            let body = body.clone();
            let route = route.clone();
            let connector = connector.clone();
            async move {
                route
                    .ensure(&connector, &link)
                    .await
                    .map_err(Attempt::Retry)?;
                let target = route.exchange().to_string();
                let (exchange, routing_key) = match delay {
                    Some(d) => {
                        let wait = declare::delayed(&connector, &link, &target, d)
                            .await
                            .map_err(Attempt::Retry)?;
                        (wait, target.clone())
                    }
                    None => (target.clone(), route.routing_key()),
                };
                let mandatory = route.mandatory() || delay.is_some();
                // An endpoint's queue was declared and bound before the publish; a return
                // then means someone deleted it since. Declaring again (on the retry) and
                // publishing again brings it back, as MassTransit does.
                let redeclare_on_return = matches!(*route, Route::Endpoint(_));
                let publisher = link.publisher().await.map_err(Attempt::Retry)?;
                confirm_publish(
                    &link,
                    &publisher,
                    &exchange,
                    &routing_key,
                    mandatory,
                    &body,
                    props,
                    &target,
                    redeclare_on_return,
                )
                .await
            }
        })
        .await
}

fn strip_expiration(props: BasicProperties) -> BasicProperties {
    let mut out = BasicProperties::default();
    if let Some(v) = props.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = props.headers() {
        out = out.with_headers(v.clone());
    }
    if let Some(v) = props.delivery_mode() {
        out = out.with_delivery_mode(*v);
    }
    if let Some(v) = props.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = props.message_id() {
        out = out.with_message_id(v.clone());
    }
    out
}

#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
async fn confirm_publish(
    link: &Link,
    publisher: &Publisher,
    exchange: &str,
    routing_key: &str,
    mandatory: bool,
    body: &Bytes,
    props: BasicProperties,
    target: &str,
    redeclare_on_return: bool,
) -> std::result::Result<(), Attempt> {
    let identity = Identity {
        exchange: exchange.to_string(),
        routing_key: routing_key.to_string(),
        message_id: props.message_id().as_ref().map(|m| m.as_str().to_string()),
        body: body.clone(),
    };
    let publish = publisher.channel.basic_publish(
        ShortString::from(exchange),
        ShortString::from(routing_key),
        BasicPublishOptions {
            mandatory,
            immediate: false,
        },
        body,
        props,
    );
    let outcome = link
        .publish_confirmed(publisher, publish, identity)
        .await
        .map_err(|e| Attempt::from_lapin("basic.publish failed", e))?;
    match outcome {
        Outcome::Accepted => Ok(()),
        Outcome::Returned(code, text) => {
            let err = Error::new(
                ErrorKind::Transport,
                format!(
                    "RabbitMQ returned the message sent to `{target}`: {code} {text} (no queue is bound to it)"
                ),
            );
            if redeclare_on_return {
                Err(Attempt::Retry(err))
            } else {
                Err(Attempt::Fatal(err))
            }
        }
        Outcome::Refused => Err(Attempt::Fatal(Error::new(
            ErrorKind::Transport,
            format!("RabbitMQ refused (nacked) the message sent to `{target}`"),
        ))),
        Outcome::Failed(e) => Err(Attempt::from_lapin(
            "waiting for the publisher confirm failed",
            e,
        )),
        Outcome::Lost => Err(Attempt::Retry(Error::new(
            ErrorKind::Unavailable,
            "the publishing channel closed before RabbitMQ confirmed the message",
        ))),
    }
}

#[async_trait]
impl Transport for RabbitMq {
    fn profile(&self) -> TransportProfile {
        TransportProfile::new("rabbitmq")
            .with_capabilities(Capabilities::new().with_delayed_delivery(true))
            .with_default_prefetch(self.connector.config.prefetch)
            .with_entity_names(ENTITY_NAMES)
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
