//! MassTransit's RabbitMQ topology: what gets declared, with which names and flags.
//!
//! - Endpoint `X`: fanout exchange `X` bound to queue `X` (durable; temporary endpoints are
//!   non-durable and auto-delete); each consumed message type's fanout exchange
//!   (`Contracts:OrderPlaced`) bound exchange-to-exchange to exchange `X`.
//! - `X_error` / `X_skipped`: exchange and queue of that name, bound, declared on first use,
//!   with the same queue type as `X`.
//! - Delayed delivery without plugins: a direct exchange `busway.delayed` bound to each
//!   target exchange with the target's name as routing key, and one wait queue per delay
//!   (`busway.wait.<ms>ms`, fed by an auto-delete fanout exchange of the same name) whose
//!   messages expire after the delay and are dead-lettered to `busway.delayed`. Wait queues
//!   expire a minute after their last use, and their exchanges go with them.
//! - Per-endpoint options ([`RabbitMqEndpointOptions`]: quorum queue, single active
//!   consumer, `x-expires`, further queue arguments), set through [`RabbitMqEndpointExt`].

use std::sync::Arc;
use std::time::Duration;

use busway_core::topology::{EndpointTopology, Topology};
use busway_core::{EndpointConfigurator, Error, Result};
use lapin::ExchangeKind;
use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::connector::{Connector, Link};
use crate::naming::{DELAYED_EXCHANGE, exchange_name, wait_queue_name};
use crate::wire::to_amqp;

/// How long an idle delay wait queue lives after its delay.
const WAIT_QUEUE_IDLE: Duration = Duration::from_secs(60);

/// RabbitMQ-specific options of a receive endpoint (set through
/// [`crate::RabbitMqEndpointExt`]).
#[derive(Debug, Clone, Default)]
pub struct RabbitMqEndpointOptions {
    /// Declare the endpoint queue as a quorum queue (`x-queue-type: quorum`).
    pub quorum: bool,
    /// Only one consumer receives at a time (`x-single-active-consumer`).
    pub single_active_consumer: bool,
    /// Delete the queue after this long unused (`x-expires`).
    pub queue_expires: Option<Duration>,
    /// Further queue arguments.
    pub arguments: Vec<(String, serde_json::Value)>,
}

/// RabbitMQ options on a receive endpoint.
pub trait RabbitMqEndpointExt: Sized {
    /// Declares the endpoint queue as a quorum queue (replicated, at-least-once
    /// dead-lettering). Its error and skipped queues are quorum queues too.
    fn quorum_queue(self) -> Self;
    /// Lets only one consumer at a time receive from the queue.
    fn single_active_consumer(self) -> Self;
    /// Deletes the queue after it has been unused this long.
    fn queue_expires(self, after: Duration) -> Self;
    /// Adds a queue argument (`x-max-length`, ...).
    fn queue_argument(self, name: impl Into<String>, value: impl Into<serde_json::Value>) -> Self;
}

fn with_options(
    e: EndpointConfigurator,
    f: impl FnOnce(&mut RabbitMqEndpointOptions),
) -> EndpointConfigurator {
    let mut options = e
        .extensions()
        .get::<RabbitMqEndpointOptions>()
        .cloned()
        .unwrap_or_default();
    f(&mut options);
    e.extension(options)
}

impl RabbitMqEndpointExt for EndpointConfigurator {
    fn quorum_queue(self) -> Self {
        with_options(self, |o| o.quorum = true)
    }

    fn single_active_consumer(self) -> Self {
        with_options(self, |o| o.single_active_consumer = true)
    }

    fn queue_expires(self, after: Duration) -> Self {
        with_options(self, |o| o.queue_expires = Some(after))
    }

    fn queue_argument(self, name: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        let (name, value) = (name.into(), value.into());
        with_options(self, |o| o.arguments.push((name, value)))
    }
}

/// How an endpoint's exchange and queue are declared.
#[derive(Debug, Clone)]
pub(crate) struct EndpointSpec {
    pub(crate) name: String,
    /// The queue bound to exchange `name`, when it has another name (MassTransit's
    /// `?bind=true&queue=other`).
    pub(crate) queue: Option<String>,
    pub(crate) durable: bool,
    pub(crate) auto_delete: bool,
    pub(crate) queue_arguments: FieldTable,
    pub(crate) message_types: Vec<String>,
}

impl EndpointSpec {
    pub(crate) fn plain(name: &str) -> Self {
        Self {
            name: name.to_string(),
            queue: None,
            durable: true,
            auto_delete: false,
            queue_arguments: FieldTable::default(),
            message_types: Vec::new(),
        }
    }

    pub(crate) fn temporary(name: &str) -> Self {
        Self {
            durable: false,
            auto_delete: true,
            ..Self::plain(name)
        }
    }

    pub(crate) fn from_topology(e: &EndpointTopology) -> Self {
        let options = e
            .extensions
            .get::<RabbitMqEndpointOptions>()
            .cloned()
            .unwrap_or_default();
        let mut args = FieldTable::default();
        if options.quorum && !e.temporary {
            args.insert(
                ShortString::from("x-queue-type"),
                AMQPValue::LongString(LongString::from("quorum")),
            );
        }
        if options.single_active_consumer {
            args.insert(
                ShortString::from("x-single-active-consumer"),
                AMQPValue::Boolean(true),
            );
        }
        if let Some(expires) = options.queue_expires {
            let ms = i64::try_from(expires.as_millis()).unwrap_or(i64::MAX);
            args.insert(ShortString::from("x-expires"), AMQPValue::LongLongInt(ms));
        }
        for (k, v) in &options.arguments {
            if let Some(v) = to_amqp(v) {
                args.insert(ShortString::from(k.as_str()), v);
            }
        }
        let mut spec = if e.temporary {
            Self::temporary(&e.name)
        } else {
            Self::plain(&e.name)
        };
        spec.queue_arguments = args;
        if e.bind_message_types {
            spec.message_types = e.message_types.iter().map(exchange_name).collect();
        }
        spec
    }

    /// The queue's name (the exchange's, unless the address named another).
    pub(crate) fn queue_name(&self) -> &str {
        self.queue.as_deref().unwrap_or(&self.name)
    }

    /// The spec of this endpoint's error or skipped queue: durable, same queue type.
    pub(crate) fn companion(&self, suffix: &str) -> Self {
        let mut args = FieldTable::default();
        if let Some(kind) = self.queue_arguments.inner().get("x-queue-type") {
            args.insert(ShortString::from("x-queue-type"), kind.clone());
        }
        Self {
            name: format!("{}{suffix}", self.name),
            queue: None,
            durable: true,
            auto_delete: false,
            queue_arguments: args,
            message_types: Vec::new(),
        }
    }
}

fn declare_error(what: String, err: lapin::Error) -> Error {
    Error::transport(what, err)
}

/// Declares a fanout exchange once per link generation.
pub(crate) async fn exchange(
    connector: &Arc<Connector>,
    link: &Link,
    name: &str,
    kind: ExchangeKind,
    durable: bool,
    auto_delete: bool,
) -> Result<()> {
    let key = format!("x:{name}");
    if connector.is_declared(link.generation, &key) {
        return Ok(());
    }
    let channel = link.topology_channel().await?;
    channel
        .exchange_declare(
            ShortString::from(name),
            kind,
            ExchangeDeclareOptions {
                durable,
                auto_delete,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| declare_error(format!("declaring exchange `{name}` failed"), e))?;
    connector.mark_declared(link.generation, key);
    Ok(())
}

/// Declares a queue; `cache` false re-declares every time (resets `x-expires`).
pub(crate) async fn queue(
    connector: &Arc<Connector>,
    link: &Link,
    name: &str,
    durable: bool,
    auto_delete: bool,
    arguments: &FieldTable,
    cache: bool,
) -> Result<()> {
    let key = format!("q:{name}");
    if cache && connector.is_declared(link.generation, &key) {
        return Ok(());
    }
    let channel = link.topology_channel().await?;
    channel
        .queue_declare(
            ShortString::from(name),
            QueueDeclareOptions {
                durable,
                auto_delete,
                ..QueueDeclareOptions::default()
            },
            arguments.clone(),
        )
        .await
        .map_err(|e| declare_error(format!("declaring queue `{name}` failed"), e))?;
    if cache {
        connector.mark_declared(link.generation, key);
    }
    Ok(())
}

/// Binds queue `queue` to exchange `exchange`.
pub(crate) async fn bind_queue(
    connector: &Arc<Connector>,
    link: &Link,
    queue: &str,
    exchange: &str,
    cache: bool,
) -> Result<()> {
    let key = format!("bq:{exchange}->{queue}");
    if cache && connector.is_declared(link.generation, &key) {
        return Ok(());
    }
    let channel = link.topology_channel().await?;
    channel
        .queue_bind(
            ShortString::from(queue),
            ShortString::from(exchange),
            ShortString::from(""),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            declare_error(
                format!("binding queue `{queue}` to exchange `{exchange}` failed"),
                e,
            )
        })?;
    if cache {
        connector.mark_declared(link.generation, key);
    }
    Ok(())
}

/// Binds exchange `destination` to exchange `source` (exchange-to-exchange).
pub(crate) async fn bind_exchange(
    connector: &Arc<Connector>,
    link: &Link,
    destination: &str,
    source: &str,
    routing_key: &str,
) -> Result<()> {
    let key = format!("bx:{source}->{destination}:{routing_key}");
    if connector.is_declared(link.generation, &key) {
        return Ok(());
    }
    let channel = link.topology_channel().await?;
    channel
        .exchange_bind(
            ShortString::from(destination),
            ShortString::from(source),
            ShortString::from(routing_key),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            declare_error(
                format!("binding exchange `{source}` to exchange `{destination}` failed"),
                e,
            )
        })?;
    connector.mark_declared(link.generation, key);
    Ok(())
}

/// Declares an endpoint: exchange and queue of its name, bound, and its message types'
/// exchanges bound to its exchange.
pub(crate) async fn endpoint(
    connector: &Arc<Connector>,
    link: &Link,
    spec: &EndpointSpec,
) -> Result<()> {
    exchange(
        connector,
        link,
        &spec.name,
        ExchangeKind::Fanout,
        spec.durable,
        spec.auto_delete,
    )
    .await?;
    queue(
        connector,
        link,
        spec.queue_name(),
        spec.durable,
        spec.auto_delete,
        &spec.queue_arguments,
        true,
    )
    .await?;
    bind_queue(connector, link, spec.queue_name(), &spec.name, true).await?;
    for t in &spec.message_types {
        exchange(connector, link, t, ExchangeKind::Fanout, true, false).await?;
        bind_exchange(connector, link, &spec.name, t, "").await?;
    }
    Ok(())
}

/// Declares the message type exchanges for a publish: the first type's exchange, bound to
/// the exchanges of the other types it lists (MassTransit's polymorphic publish topology).
pub(crate) async fn message_types(
    connector: &Arc<Connector>,
    link: &Link,
    types: &[String],
) -> Result<()> {
    let Some((first, rest)) = types.split_first() else {
        return Ok(());
    };
    exchange(connector, link, first, ExchangeKind::Fanout, true, false).await?;
    for other in rest {
        exchange(connector, link, other, ExchangeKind::Fanout, true, false).await?;
        bind_exchange(connector, link, other, first, "").await?;
    }
    Ok(())
}

/// Prepares delayed delivery to `target` (an exchange) after `delay`; returns the exchange
/// to publish into.
pub(crate) async fn delayed(
    connector: &Arc<Connector>,
    link: &Link,
    target: &str,
    delay: Duration,
) -> Result<String> {
    exchange(
        connector,
        link,
        DELAYED_EXCHANGE,
        ExchangeKind::Direct,
        true,
        false,
    )
    .await?;
    bind_exchange(connector, link, target, DELAYED_EXCHANGE, target).await?;
    let name = wait_queue_name(delay);
    let ms = i64::try_from(delay.as_millis().max(1)).unwrap_or(i64::MAX);
    let idle = i64::try_from(WAIT_QUEUE_IDLE.as_millis()).unwrap_or(60_000);
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-message-ttl"),
        AMQPValue::LongLongInt(ms),
    );
    args.insert(
        ShortString::from("x-dead-letter-exchange"),
        AMQPValue::LongString(LongString::from(DELAYED_EXCHANGE)),
    );
    args.insert(
        ShortString::from("x-expires"),
        AMQPValue::LongLongInt(ms.saturating_add(idle)),
    );
    // Auto-delete: removed with the binding when the idle queue expires, so jittered
    // delays leave nothing behind (they left one durable exchange per delay before).
    exchange(connector, link, &name, ExchangeKind::Fanout, true, true).await?;
    // Not cached: every use re-declares the queue, which resets its idle expiry and brings
    // it (and its binding) back after it expired.
    queue(connector, link, &name, true, false, &args, false).await?;
    bind_queue(connector, link, &name, &name, false).await?;
    Ok(name)
}

/// Declares a whole topology (at deploy, and after every reconnect).
pub(crate) async fn topology(
    connector: Arc<Connector>,
    link: Arc<Link>,
    topology: Topology,
) -> Result<()> {
    for e in &topology.endpoints {
        endpoint(&connector, &link, &EndpointSpec::from_topology(e)).await?;
    }
    Ok(())
}
