//! Tracing: a span per consume and per publish/send with OpenTelemetry messaging attributes,
//! and W3C `traceparent` propagation.

use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use tower_layer::Layer;
use tower_service::Service;
use tracing::{Instrument, field};

use crate::context::ReceiveContext;
use crate::error::{ConsumeError, Error};
use crate::outgoing::{OutgoingMessage, SendTarget};
use crate::trace::TraceContext;

/// Opens a `consume` span per delivery (`messaging.operation = "process"`) and makes the
/// delivery's trace context current for everything the consumer does.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConsumeTracingLayer;

impl<S> Layer<S> for ConsumeTracingLayer {
    type Service = ConsumeTracingService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConsumeTracingService { inner }
    }
}

/// The service made by [`ConsumeTracingLayer`].
#[derive(Debug, Clone)]
pub struct ConsumeTracingService<S> {
    inner: S,
}

impl<S> Service<ReceiveContext> for ConsumeTracingService<S>
where
    S: Service<ReceiveContext, Response = (), Error = ConsumeError>,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = ConsumeError;
    type Future = BoxFuture<'static, Result<(), ConsumeError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConsumeError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, rc: ReceiveContext) -> Self::Future {
        let trace = rc.trace_context();
        let env = rc.envelope();
        let message_type = rc.message_types().first().map(|u| u.as_str()).unwrap_or("");
        let span = tracing::info_span!(
            "consume",
            otel.name = %format_args!("{} process", rc.endpoint_name()),
            otel.kind = "consumer",
            otel.status_code = field::Empty,
            messaging.system = rc.messaging_system(),
            messaging.operation = "process",
            messaging.destination.name = rc.endpoint_name(),
            messaging.message.id = field::display(Opt(env.message_id)),
            messaging.message.conversation_id = field::display(Opt(env.conversation_id)),
            messaging.masstransit.message_types = message_type,
            messaging.masstransit.input_address = rc.input_address(),
            trace_id = %trace.trace_id_hex(),
            span_id = %trace.span_id_hex(),
            parent_span_id = field::display(Opt(rc.parent_trace_context().map(|p| p.span_id_hex()))),
            error = field::Empty,
        );
        let fut = self.inner.call(rc);
        let record_on = span.clone();
        Box::pin(
            trace.scope(
                async move {
                    let result = fut.await;
                    if let Err(err) = &result {
                        record_on.record("otel.status_code", "ERROR");
                        record_on.record("error", field::display(err));
                    }
                    result
                }
                .instrument(span),
            ),
        )
    }
}

/// An optional value for a span field: the value, or nothing.
struct Opt<T>(Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for Opt<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => Ok(()),
        }
    }
}

/// Opens a `publish` or `send` span per outgoing message and writes its `traceparent`
/// (continuing the consume in progress, or starting a trace).
#[derive(Debug, Clone, Copy)]
pub struct SendTracingLayer {
    system: &'static str,
}

impl SendTracingLayer {
    /// A layer recording `messaging.system = system`.
    pub fn new(system: &'static str) -> Self {
        Self { system }
    }
}

impl<S> Layer<S> for SendTracingLayer {
    type Service = SendTracingService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SendTracingService {
            inner,
            system: self.system,
        }
    }
}

/// The service made by [`SendTracingLayer`].
#[derive(Debug, Clone)]
pub struct SendTracingService<S> {
    inner: S,
    system: &'static str,
}

impl<S> Service<OutgoingMessage> for SendTracingService<S>
where
    S: Service<OutgoingMessage, Response = (), Error = Error>,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = Error;
    type Future = BoxFuture<'static, Result<(), Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut msg: OutgoingMessage) -> Self::Future {
        let (trace, parent) = TraceContext::stamp(&mut msg.envelope.headers, msg.trace_parent);
        let (operation, destination) = match &msg.target {
            SendTarget::Publish => (
                "publish",
                msg.envelope
                    .message_type
                    .first()
                    .map(|u| u.as_str())
                    .unwrap_or(""),
            ),
            SendTarget::Send(address) => ("send", address.as_str()),
        };
        let span = tracing::info_span!(
            "send",
            otel.name = %format_args!("{destination} {operation}"),
            otel.kind = "producer",
            otel.status_code = field::Empty,
            messaging.system = self.system,
            messaging.operation = operation,
            messaging.destination.name = %destination,
            messaging.message.id = field::display(Opt(msg.envelope.message_id)),
            messaging.message.conversation_id = field::display(Opt(msg.envelope.conversation_id)),
            trace_id = %trace.trace_id_hex(),
            span_id = %trace.span_id_hex(),
            parent_span_id = field::display(Opt(parent.map(|p| p.span_id_hex()))),
            error = field::Empty,
        );
        let fut = self.inner.call(msg);
        let record_on = span.clone();
        Box::pin(
            async move {
                let result = fut.await;
                if let Err(err) = &result {
                    record_on.record("otel.status_code", "ERROR");
                    record_on.record("error", field::display(err));
                }
                result
            }
            .instrument(span),
        )
    }
}
