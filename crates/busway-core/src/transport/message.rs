//! The bytes a transport carries and the options of one delivery or move.

use std::time::Duration;

use bytes::Bytes;

use crate::headers::Headers;

/// A message as the transport sees it: bytes plus transport-level properties.
///
/// Build one with [`TransportMessage::new`] and the `with_*` methods, or set the public
/// fields of a new one (the type is `#[non_exhaustive]` so fields can be added).
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct TransportMessage {
    /// The serialized body.
    pub body: Bytes,
    /// The content type of the body (`application/vnd.masstransit+json`, `application/json`).
    pub content_type: Option<String>,
    /// The transport-level message id (the envelope's message id, "D" form).
    pub message_id: Option<String>,
    /// The transport-level correlation id.
    pub correlation_id: Option<String>,
    /// Transport headers (AMQP headers table, Kafka headers, Service Bus properties).
    pub headers: Headers,
    /// How long the broker should keep the message before discarding it.
    pub time_to_live: Option<Duration>,
    /// A partition or ordering key, for transports that have one.
    pub partition_key: Option<String>,
    /// Where the sender wants replies, in the broker's own terms, when it said so outside
    /// the envelope: RabbitMQ's `reply-to` property (a direct reply-to token such as
    /// `amq.rabbitmq.reply-to.g1h2AA...`). Set by transports on received messages.
    pub reply_to: Option<String>,
}

impl TransportMessage {
    /// A message with `body` and no properties.
    pub fn new(body: impl Into<Bytes>) -> Self {
        Self {
            body: body.into(),
            ..Self::default()
        }
    }

    /// Sets the content type.
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Sets the transport-level message id.
    pub fn with_message_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }

    /// Sets the transport-level correlation id.
    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Sets the transport headers.
    pub fn with_headers(mut self, headers: Headers) -> Self {
        self.headers = headers;
        self
    }

    /// Sets how long the broker keeps the message.
    pub fn with_time_to_live(mut self, ttl: Duration) -> Self {
        self.time_to_live = Some(ttl);
        self
    }

    /// Sets the partition or ordering key.
    pub fn with_partition_key(mut self, key: impl Into<String>) -> Self {
        self.partition_key = Some(key.into());
        self
    }
}

/// Per-call delivery options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeliveryOptions {
    /// Deliver no earlier than this long from now (transport delayed delivery).
    pub delay: Option<Duration>,
    /// For a response: the request's [`TransportMessage::reply_to`], which a transport needs
    /// to route to an address that names no entity of its own (RabbitMQ's direct reply-to
    /// pseudo-queue `amq.rabbitmq.reply-to`).
    pub reply_to: Option<String>,
}

impl DeliveryOptions {
    /// Options with a delivery delay.
    pub fn delayed(delay: Duration) -> Self {
        Self {
            delay: Some(delay),
            ..Self::default()
        }
    }
}

/// Where a settled message is moved instead of being acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MoveKind {
    /// `<endpoint>_error`: the message faulted.
    Error,
    /// `<endpoint>_skipped`: no consumer at the endpoint handles the message.
    Skipped,
}

impl MoveKind {
    /// The queue suffix for this kind (`_error`, `_skipped`).
    pub fn suffix(self) -> &'static str {
        match self {
            MoveKind::Error => "_error",
            MoveKind::Skipped => "_skipped",
        }
    }

    /// The queue name for an endpoint.
    pub fn queue_name(self, endpoint: &str) -> String {
        format!("{endpoint}{}", self.suffix())
    }
}
