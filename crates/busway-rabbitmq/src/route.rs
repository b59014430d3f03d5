//! Where a message goes on RabbitMQ and getting it there: a [`Route`] (an endpoint's
//! exchange with its queue, an exchange alone, the message types' exchanges of a publish, or
//! a direct reply-to token), what it must declare first, and [`publish`]: declare, publish
//! with publisher confirms, and retry across channel and connection failures until the
//! publish timeout.

use std::sync::Arc;
use std::time::Duration;

use busway_core::{Error, ErrorKind, Result, TransportMessage};
use bytes::Bytes;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;

use crate::confirms::{Identity, Outcome};
use crate::connector::{Attempt, Connector, Link, Publisher};
use crate::declare::{self, EndpointSpec};
use crate::wire;

/// An exchange a send declares by itself (no queue).
#[derive(Debug, Clone)]
pub(crate) struct ExchangeSpec {
    pub(crate) name: String,
    pub(crate) durable: bool,
    pub(crate) auto_delete: bool,
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
        let (first, rest): (&String, &[String]) = match self {
            Route::Endpoint(spec) => (&spec.name, &spec.message_types),
            Route::Exchange(spec) => (&spec.name, &[]),
            Route::MessageTypes(types) => match types.split_first() {
                Some((first, rest)) => (first, rest),
                None => return Ok(()),
            },
            Route::ReplyTo(token) => (token, &[]),
        };
        let queue = match self {
            Route::Endpoint(spec) => spec.queue.as_ref(),
            _ => None,
        };
        for name in std::iter::once(first).chain(queue).chain(rest) {
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
    // Only a mandatory publish can come back; the others need nothing to be told apart by.
    let identity = mandatory.then(|| Identity {
        exchange: exchange.to_string(),
        routing_key: routing_key.to_string(),
        message_id: props.message_id().as_ref().map(|m| m.as_str().to_string()),
        body: body.clone(),
    });
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
