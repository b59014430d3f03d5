//! The transport SPI: what a broker client implements so the bus can run on it.
//!
//! A transport connects, deploys the [`Topology`], publishes by message type, sends to
//! addresses, and hands each receive endpoint a stream of [`Delivery`]s that the bus settles
//! (ack, requeue, move to the error or skipped queue, redeliver later). All policy (retry,
//! faults, serialization, tracing) lives in the bus; a transport only moves bytes and keeps
//! its broker's delivery guarantees.
//!
//! # Stability
//!
//! This module is the contract third-party transports build on. Within a busway minor
//! version it only grows: new trait methods come with a default body, new fields only on
//! `#[non_exhaustive]` types. A change that would break an implementation (a method without
//! a default, a changed signature) is made only in a new minor version and is marked
//! **breaking (SPI)** in the changelog.
//!
//! # What the bus relies on
//!
//! - [`Receiver::next`] is cancel-safe: the bus races it against its stop signal, so a
//!   `next` future dropped before it completes must not have taken a message off the broker
//!   (or must hand it back): no delivery is lost to a dropped `next`.
//! - Each [`Delivery`] is settled exactly once: the bus calls one [`Settlement`] method, or
//!   drops the settlement, never both; a dropped settlement returns the message to the
//!   broker. [`MoveError::retry`] hands the same, still unsettled, delivery back for another
//!   try.
//! - After [`Receiver::stop`] the bus settles every delivery it holds before it calls
//!   [`Receiver::close`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::address::Address;
use crate::error::Result;
use crate::serializer::Serializer;
use crate::topology::{EndpointTopology, Topology, TopologyView};
use crate::urn::{EntityNameStyle, Urn};

mod admin;
mod backoff;
mod kit;
pub(crate) mod message;

pub use admin::QueueAdmin;
pub use backoff::Backoff;
pub use kit::{GiveBack, SettleOnDrop, TemporaryEntities, check_scheme, spawn_on_current};
pub use message::{DeliveryOptions, MoveKind, TransportMessage};

/// What a transport supports beyond publish, send and receive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Delayed delivery (`DeliveryOptions::delay`, `Settlement::redeliver`): needed for
    /// scheduled sends and delayed redelivery.
    pub delayed_delivery: bool,
}

impl Capabilities {
    /// Nothing beyond the basics.
    pub const fn new() -> Self {
        Self {
            delayed_delivery: false,
        }
    }

    /// Declares delayed delivery support.
    pub const fn with_delayed_delivery(mut self, yes: bool) -> Self {
        self.delayed_delivery = yes;
        self
    }
}

/// What a transport says about itself ([`Transport::profile`]): its name, what it supports
/// and the defaults it prefers.
///
/// ```
/// use busway_core::transport::{Capabilities, TransportProfile};
///
/// let profile = TransportProfile::new("rabbitmq")
///     .with_capabilities(Capabilities::new().with_delayed_delivery(true))
///     .with_default_prefetch(Some(32));
/// assert_eq!(profile.system, "rabbitmq");
/// assert!(profile.capabilities.delayed_delivery);
/// assert!(profile.default_serializer.is_none());
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TransportProfile {
    /// The transport's name for tracing (`messaging.system`): `rabbitmq`, `kafka`, `loopback`.
    pub system: &'static str,
    /// What the transport supports beyond publish, send and receive.
    pub capabilities: Capabilities,
    /// The prefetch for endpoints that set none, when the transport has its own default
    /// (a `?prefetch=` in a RabbitMQ URL). `None` keeps busway's default.
    pub default_prefetch: Option<u16>,
    /// The serializer this transport writes with when the application chose none (Kafka
    /// writes raw JSON with identity in headers, as MassTransit's rider does). `None` keeps
    /// MassTransit's JSON envelope.
    pub default_serializer: Option<Arc<dyn Serializer>>,
    /// How message types become entity names (exchanges, topics) on this transport, for the
    /// default [`Transport::publish_address`] and [`Transport::describe`].
    pub entity_names: EntityNameStyle,
    /// Headers the broker adds to a delivery about that delivery (RabbitMQ's dead-letter
    /// history): not carried into messages sent while consuming it. A name ending in `*` is
    /// a prefix; names compare without regard to case.
    pub delivery_headers: &'static [&'static str],
}

impl TransportProfile {
    /// A transport named `system` with no capabilities beyond the basics and no defaults of
    /// its own.
    pub fn new(system: &'static str) -> Self {
        Self {
            system,
            capabilities: Capabilities::new(),
            default_prefetch: None,
            default_serializer: None,
            entity_names: EntityNameStyle::COLONS,
            delivery_headers: &[],
        }
    }

    /// Headers the broker adds about a delivery, which busway does not carry on.
    pub fn with_delivery_headers(mut self, headers: &'static [&'static str]) -> Self {
        self.delivery_headers = headers;
        self
    }

    /// How message types become entity names (default [`EntityNameStyle::COLONS`]).
    pub fn with_entity_names(mut self, style: EntityNameStyle) -> Self {
        self.entity_names = style;
        self
    }

    /// Declares what the transport supports.
    pub fn with_capabilities(mut self, capabilities: Capabilities) -> Self {
        self.capabilities = capabilities;
        self
    }

    /// The prefetch for endpoints that set none (`None`: busway's default).
    pub fn with_default_prefetch(mut self, prefetch: Option<u16>) -> Self {
        self.default_prefetch = prefetch;
        self
    }

    /// The serializer to write with when the application chose none.
    pub fn with_default_serializer(mut self, serializer: Arc<dyn Serializer>) -> Self {
        self.default_serializer = Some(serializer);
        self
    }
}

/// A broker client the bus runs on.
///
/// Implementations must be cheap to share (`Arc` inside) and safe to call from many tasks.
#[async_trait]
pub trait Transport: Send + Sync + fmt::Debug + 'static {
    /// What the transport says about itself: its `messaging.system` name, what it supports,
    /// and the defaults it prefers. Read once, when the bus is built.
    fn profile(&self) -> TransportProfile;

    /// The full address of a named endpoint on this transport
    /// (`loopback://localhost/orders`, `rabbitmq://host/vhost/orders`).
    fn endpoint_address(&self, name: &str) -> String;

    /// The address of a temporary endpoint (the bus's response endpoint). Transports that
    /// must declare temporary entities differently say so in the address (RabbitMQ adds
    /// `?temporary=true`, as MassTransit does).
    fn temporary_endpoint_address(&self, name: &str) -> String {
        self.endpoint_address(name)
    }

    /// The topology in this transport's own terms, for printing
    /// ([`crate::Bus::topology_text`], [`crate::Bus::topology_mermaid`]). The default is
    /// MassTransit's exchanges and queues, named in the profile's
    /// [`entity_names`](TransportProfile::entity_names) style; a transport with another model
    /// (Kafka's topics and consumer groups) says so.
    fn describe(&self, topology: &Topology) -> TopologyView {
        TopologyView::exchanges_and_queues(topology, &self.profile().entity_names)
    }

    /// The address written as `destinationAddress` when publishing a message type
    /// (the message type's exchange or topic). The default names it in the profile's
    /// [`entity_names`](TransportProfile::entity_names) style; it is called on every publish,
    /// so a transport whose profile is not trivial to make overrides it.
    fn publish_address(&self, message_type: &Urn) -> String {
        self.endpoint_address(&message_type.entity_name_shared(&self.profile().entity_names))
    }

    /// Connects (if needed) and declares everything the topology names. Called once by
    /// `BusBuilder::build`, and again by transports themselves after a reconnect.
    async fn deploy(&self, topology: &Topology) -> Result<()>;

    /// Publishes to every endpoint subscribed to any of `message_types` (most specific first).
    /// Returns once the broker has accepted the message.
    async fn publish(
        &self,
        message_types: &[Urn],
        message: TransportMessage,
        options: &DeliveryOptions,
    ) -> Result<()>;

    /// Sends to one address. Returns once the broker has accepted the message.
    async fn send(
        &self,
        address: &Address,
        message: TransportMessage,
        options: &DeliveryOptions,
    ) -> Result<()>;

    /// Starts consuming an endpoint declared by [`Transport::deploy`] (or, for temporary
    /// endpoints, declares it now).
    async fn receive(&self, endpoint: &EndpointTopology) -> Result<Box<dyn Receiver>>;

    /// Closes connections. Called last during bus shutdown.
    async fn close(&self) -> Result<()>;
}

/// A stream of deliveries from one endpoint.
#[async_trait]
pub trait Receiver: Send + 'static {
    /// The next delivery. `None` once the receiver is stopped and drained. An `Err` is
    /// logged by the bus, which keeps calling `next` (transports recover underneath).
    ///
    /// Must be cancel-safe: dropping the future before it completes loses no message.
    async fn next(&mut self) -> Option<Result<Delivery>>;

    /// Stops taking new deliveries from the broker. Deliveries already handed out stay valid
    /// and must still be settled; buffered ones not yet handed out go back to the broker.
    async fn stop(&mut self) -> Result<()>;

    /// Releases the receiver's resources. Called once every delivery it handed out has been
    /// settled (after [`Receiver::stop`]).
    async fn close(&mut self) -> Result<()> {
        Ok(())
    }
}

/// One message handed to the bus by a [`Receiver`], to be settled exactly once.
///
/// Build one with [`Delivery::new`], then set the other public fields (the type is
/// `#[non_exhaustive]`).
#[non_exhaustive]
pub struct Delivery {
    /// The message.
    pub message: TransportMessage,
    /// True when the broker says this message was delivered before.
    pub redelivered: bool,
    /// The broker's delivery count, when it keeps one (1 for a first delivery).
    pub delivery_count: Option<u32>,
    /// Cancelled by the transport when it can no longer settle the delivery (a Service Bus
    /// lock that could not be renewed): the consumer's cancellation token fires, so it can
    /// stop work whose result could not be acknowledged anyway. `None` when that cannot
    /// happen.
    pub lost: Option<tokio_util::sync::CancellationToken>,
    /// How to settle the delivery.
    pub settlement: Box<dyn Settlement>,
}

impl Delivery {
    /// A first delivery of `message`, settled through `settlement`, that the transport cannot
    /// lose (set `redelivered`, `delivery_count` and `lost` where the broker says more).
    pub fn new(message: TransportMessage, settlement: Box<dyn Settlement>) -> Self {
        Self {
            message,
            redelivered: false,
            delivery_count: None,
            lost: None,
            settlement,
        }
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("redelivered", &self.redelivered)
            .field("delivery_count", &self.delivery_count)
            .finish_non_exhaustive()
    }
}

/// Why [`Settlement::move_to`] did not move a message, with the delivery handed back when
/// the transport can try again with it.
///
/// A move fails when the error queue refuses the message (full, deleted, a broker policy) or
/// the broker is unreachable. Handing the delivery back lets the bus wait and try the move
/// again, without running the consumers (and publishing the fault) once more.
pub struct MoveError {
    /// What went wrong.
    pub error: crate::error::Error,
    /// The still unsettled delivery, for another try. `None` when the transport already gave
    /// the message back to the broker, which delivers it again.
    pub settlement: Option<Box<dyn Settlement>>,
}

impl MoveError {
    /// A failed move whose delivery is still held and can be moved again.
    pub fn retry(error: crate::error::Error, settlement: Box<dyn Settlement>) -> Self {
        Self {
            error,
            settlement: Some(settlement),
        }
    }
}

impl From<crate::error::Error> for MoveError {
    fn from(error: crate::error::Error) -> Self {
        Self {
            error,
            settlement: None,
        }
    }
}

impl fmt::Debug for MoveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MoveError")
            .field("error", &self.error)
            .field("held", &self.settlement.is_some())
            .finish()
    }
}

impl fmt::Display for MoveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

/// Settles one delivery, exactly once. Each method consumes it; dropping it unsettled must
/// return the message to the broker (requeue), so nothing is lost when a task dies.
#[async_trait]
pub trait Settlement: Send + Sync + 'static {
    /// The message was handled: remove it from the broker.
    async fn ack(self: Box<Self>) -> Result<()>;

    /// Return the message to its queue for another delivery.
    async fn requeue(self: Box<Self>) -> Result<()>;

    /// Move `message` (the original, with added headers) to the endpoint's error or skipped
    /// queue, then remove the original. The move must be confirmed before the ack.
    ///
    /// When the move itself fails, return the delivery in [`MoveError::retry`] if it is still
    /// held: the bus backs off and tries again rather than redelivering the message at once.
    async fn move_to(
        self: Box<Self>,
        kind: MoveKind,
        message: TransportMessage,
    ) -> std::result::Result<(), MoveError>;

    /// Deliver `message` to this endpoint again after `delay`, then remove the original.
    async fn redeliver(self: Box<Self>, message: TransportMessage, delay: Duration) -> Result<()>;
}
