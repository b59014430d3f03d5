//! Publish and send: the [`SendBuilder`] returned by `bus.publish(..)`, `bus.send(..)` and the
//! consume context's methods, and the one function that makes the envelope of every message
//! busway produces.

use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::address::Address;
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::headers::Headers;
use crate::message::{Message, new_id};
use crate::outgoing::{OutgoingCapture, OutgoingMessage, SendTarget};
use crate::sender::SendContext;
use crate::serializer::Serializer;
use crate::trace::TraceContext;
use crate::transport::DeliveryOptions;
use crate::urn::Urn;

/// Everything a caller can set on one outgoing message (the builder's state).
#[derive(Default)]
pub(crate) struct SendOptions {
    /// Headers of the message's own; the consumed message's non-`MT-` headers are added
    /// first unless `own_headers_only`.
    pub(crate) headers: Headers,
    /// Leaves out the consumed message's headers (faults carry only their own).
    pub(crate) own_headers_only: bool,
    pub(crate) message_id: Option<Uuid>,
    pub(crate) correlation_id: Option<Uuid>,
    pub(crate) conversation_id: Option<Uuid>,
    pub(crate) request_id: Option<Uuid>,
    pub(crate) initiator_id: Option<Uuid>,
    pub(crate) response_address: Option<String>,
    pub(crate) fault_address: Option<String>,
    pub(crate) delay: Option<Duration>,
    pub(crate) time_to_live: Option<Duration>,
    pub(crate) partition_key: Option<String>,
    pub(crate) serializer: Option<Arc<dyn Serializer>>,
    /// A response's routing token from the request's transport ([`DeliveryOptions::reply_to`]).
    pub(crate) reply_to: Option<String>,
}

/// A publish or send being prepared; `.await` it to deliver.
///
/// Set ids, headers, a delay or a time to live before awaiting:
///
/// ```no_run
/// # use busway_core::*;
/// # #[derive(serde::Serialize, serde::Deserialize)] struct OrderPlaced;
/// # impl Message for OrderPlaced { fn message_type() -> &'static Urn { static U: Urn = Urn::from_static("urn:message:X:OrderPlaced"); &U } }
/// # async fn f(bus: Bus) -> Result<()> {
/// bus.publish(OrderPlaced)
///     .header("Tenant", "acme")
///     .correlation_id(uuid::Uuid::now_v7())
///     .await?;
/// bus.send("queue:billing", OrderPlaced)
///     .delay(std::time::Duration::from_secs(30)) // scheduled send
///     .await?;
/// # Ok(()) }
/// ```
#[must_use = "a publish or send does nothing until it is awaited"]
pub struct SendBuilder<'a, M> {
    send: &'a SendContext,
    parent: Option<Parent<'a>>,
    message: M,
    target: Result<SendTarget>,
    options: SendOptions,
    capturable: bool,
}

impl<M> fmt::Debug for SendBuilder<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendBuilder")
            .field("target", &self.target.as_ref().ok())
            .finish_non_exhaustive()
    }
}

impl<'a, M: Message> SendBuilder<'a, M> {
    pub(crate) fn publish(send: &'a SendContext, parent: Option<Parent<'a>>, message: M) -> Self {
        Self {
            send,
            parent,
            message,
            target: Ok(SendTarget::Publish),
            options: SendOptions::default(),
            capturable: true,
        }
    }

    pub(crate) fn send(
        send: &'a SendContext,
        parent: Option<Parent<'a>>,
        address: Result<Address>,
        message: M,
    ) -> Self {
        Self {
            send,
            parent,
            message,
            target: address.map(SendTarget::Send),
            options: SendOptions::default(),
            capturable: true,
        }
    }

    /// Never captured by an [`OutgoingCapture`] (requests must go out while their caller
    /// waits for the response).
    pub(crate) fn uncaptured(mut self) -> Self {
        self.capturable = false;
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.options.headers.insert(name, value);
        self
    }

    /// Adds every header of `headers`.
    pub fn headers(mut self, headers: &Headers) -> Self {
        self.options.headers.extend_from(headers);
        self
    }

    /// Sets the message id (default: a new time-ordered UUID).
    pub fn message_id(mut self, id: Uuid) -> Self {
        self.options.message_id = Some(id);
        self
    }

    /// Sets the correlation id.
    pub fn correlation_id(mut self, id: Uuid) -> Self {
        self.options.correlation_id = Some(id);
        self
    }

    /// Sets the conversation id (default: the consumed message's, else a new one).
    pub fn conversation_id(mut self, id: Uuid) -> Self {
        self.options.conversation_id = Some(id);
        self
    }

    /// Sets the request id.
    pub fn request_id(mut self, id: Uuid) -> Self {
        self.options.request_id = Some(id);
        self
    }

    /// The request's transport reply token, for a response (see [`DeliveryOptions::reply_to`]).
    pub(crate) fn reply_to(mut self, token: Option<String>) -> Self {
        self.options.reply_to = token;
        self
    }

    /// Sets the initiator id.
    pub fn initiator_id(mut self, id: Uuid) -> Self {
        self.options.initiator_id = Some(id);
        self
    }

    /// Sets where responses should go.
    pub fn response_address(mut self, address: impl Into<String>) -> Self {
        self.options.response_address = Some(address.into());
        self
    }

    /// Sets where faults should go.
    pub fn fault_address(mut self, address: impl Into<String>) -> Self {
        self.options.fault_address = Some(address.into());
        self
    }

    /// Delivers the message no earlier than `delay` from now (scheduled send, using the
    /// transport's delayed delivery).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.options.delay = Some(delay);
        self
    }

    /// Delivers the message no earlier than `at`.
    pub fn deliver_at(self, at: DateTime<Utc>) -> Self {
        let delay = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        self.delay(delay)
    }

    /// Sets how long the broker keeps the message (also written as `expirationTime`).
    pub fn time_to_live(mut self, ttl: Duration) -> Self {
        self.options.time_to_live = Some(ttl);
        self
    }

    /// Sets the partition or ordering key (default: the message's own key).
    pub fn partition_key(mut self, key: impl Into<String>) -> Self {
        self.options.partition_key = Some(key.into());
        self
    }

    /// Writes this message with `serializer` instead of the bus default.
    pub fn serializer(mut self, serializer: Arc<dyn Serializer>) -> Self {
        self.options.serializer = Some(serializer);
        self
    }

    /// Builds the message without delivering it: the envelope filled in (ids, addresses,
    /// headers, host) and its producer `traceparent` written. Deliver it later with
    /// [`crate::Bus::dispatch`] (the transactional outbox stores it in between).
    pub fn into_outgoing(self) -> Result<OutgoingMessage> {
        let mut outgoing = self.build()?;
        let (_, _) = TraceContext::stamp(&mut outgoing.envelope.headers, outgoing.trace_parent);
        Ok(outgoing)
    }

    fn build(self) -> Result<OutgoingMessage> {
        let SendBuilder {
            send,
            parent,
            message,
            target,
            options,
            capturable: _,
        } = self;
        let target = target?;
        let body = serde_json::value::to_raw_value(&message).map_err(|e| {
            Error::with_source(
                ErrorKind::Serialize,
                format!("could not serialize {}", M::message_type()),
                e,
            )
        })?;
        let own = MessageDefaults {
            correlation_id: message.correlation_id(),
            partition_key: message.message_key(),
        };
        Ok(build_outgoing(
            send,
            parent,
            target,
            options,
            std::iter::once(M::message_type())
                .chain(M::implemented_types())
                .cloned()
                .collect(),
            body,
            own,
        ))
    }
}

/// What the message itself says about its ids (from its [`Message`] impl).
#[derive(Default)]
pub(crate) struct MessageDefaults {
    /// The message's own correlation id.
    pub(crate) correlation_id: Option<Uuid>,
    /// The message's own partition key.
    pub(crate) partition_key: Option<String>,
}

/// The consumed message a new one continues: its envelope, the endpoint it arrived at and
/// the consume's trace context.
#[derive(Clone, Copy)]
pub(crate) struct Parent<'a> {
    /// The consumed message's envelope.
    pub(crate) envelope: &'a Envelope,
    /// The address of the endpoint that consumed it.
    pub(crate) input_address: &'a str,
    /// The consume's trace context.
    pub(crate) trace: TraceContext,
}

/// Makes the envelope of every message busway produces (publishes, sends, responses and
/// faults): ids and conversation carried from `parent`, addresses, times, headers, host.
pub(crate) fn build_outgoing(
    send: &SendContext,
    parent: Option<Parent<'_>>,
    target: SendTarget,
    options: SendOptions,
    message_type: Vec<Urn>,
    body: Box<RawValue>,
    own: MessageDefaults,
) -> OutgoingMessage {
    let parent_env = parent.map(|p| p.envelope);

    let mut headers = Headers::new();
    if let Some(env) = parent_env
        && !options.own_headers_only
    {
        for (k, v) in env.headers.iter() {
            let lower = k.to_ascii_lowercase();
            if lower.starts_with("mt-")
                || lower == "traceparent"
                || lower == "tracestate"
                || is_delivery_header(send.delivery_headers, &lower)
            {
                continue;
            }
            headers.insert(k, v.clone());
        }
    }
    headers.extend_from(&options.headers);

    let message_id = options.message_id.unwrap_or_else(new_id);
    let correlation_id = options
        .correlation_id
        .or(own.correlation_id)
        .or_else(|| parent_env.and_then(|e| e.correlation_id));
    let conversation_id = options
        .conversation_id
        .or_else(|| parent_env.and_then(|e| e.conversation_id))
        .or_else(|| Some(new_id()));
    let initiator_id = options
        .initiator_id
        .or_else(|| parent_env.and_then(|e| e.correlation_id.or(e.request_id).or(e.message_id)));
    let source_address = Some(match parent {
        Some(p) => p.input_address.to_string(),
        None => send.address.clone(),
    });
    let destination_address = match &target {
        SendTarget::Publish => message_type
            .first()
            .map(|urn| send.transport.publish_address(urn)),
        SendTarget::Send(address) => Some(match address.scheme() {
            Some(_) => address.as_str().to_string(),
            None => send.transport.endpoint_address(address.name()),
        }),
    };
    let now = Utc::now();
    let expiration_time = options
        .time_to_live
        .and_then(|ttl| chrono::Duration::from_std(ttl).ok())
        .map(|ttl| now + ttl);
    let partition_key = options.partition_key.or(own.partition_key);
    let trace_parent = parent.map(|p| p.trace);

    let envelope = Envelope {
        message_id: Some(message_id),
        request_id: options.request_id,
        correlation_id,
        conversation_id,
        initiator_id,
        source_address,
        destination_address,
        response_address: options.response_address,
        fault_address: options.fault_address,
        message_type,
        expiration_time,
        sent_time: Some(now),
        headers,
        host: Some(send.host.clone()),
    };
    OutgoingMessage {
        envelope,
        message: body,
        target,
        delivery: DeliveryOptions {
            delay: options.delay,
            reply_to: options.reply_to,
        },
        time_to_live: options.time_to_live,
        partition_key,
        serializer: options.serializer,
        trace_parent,
    }
}

impl<'a, M: Message> IntoFuture for SendBuilder<'a, M> {
    type Output = Result<()>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        let send = self.send;
        let capture = if self.capturable {
            OutgoingCapture::current()
        } else {
            None
        };
        match capture {
            Some(capture) => {
                let outgoing = self.into_outgoing();
                Box::pin(async move {
                    capture.push(outgoing?);
                    Ok(())
                })
            }
            // The send pipeline's own future, boxed once: wrapping it in another async block
            // would hold the message twice and make every publish a large allocation.
            None => match self.build() {
                Ok(outgoing) => Box::pin(send.dispatch(outgoing)),
                Err(e) => Box::pin(std::future::ready(Err(e))),
            },
        }
    }
}

/// Whether `lower` (a lower-cased header name) is one the transport adds about a delivery
/// (`TransportProfile::delivery_headers`). MassTransit carries every non-`MT-` header
/// (`SendContextExtensions.TransferConsumeContextHeaders`); with its raw JSON serializer a
/// RabbitMQ `x-death` then reaches the next message and makes it look dead-lettered.
fn is_delivery_header(names: &[&str], lower: &str) -> bool {
    names.iter().any(|name| match name.strip_suffix('*') {
        Some(prefix) => lower
            .as_bytes()
            .get(..prefix.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(prefix.as_bytes())),
        None => lower.eq_ignore_ascii_case(name),
    })
}
