//! The in-memory outbox (MassTransit's `UseInMemoryOutbox`): messages a consumer publishes or
//! sends are held until it succeeds, then delivered; when it fails they are discarded.

use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use tower_layer::Layer;
use tower_service::Service;

use crate::context::ReceiveContext;
use crate::error::{ConsumeError, ConsumeErrorKind};
use crate::outgoing::OutgoingCapture;

/// Holds outgoing messages until the inner service succeeds.
///
/// Retries see a clean slate: what a failed attempt published is never delivered. If
/// delivering the held messages fails, the attempt fails (and is retried), so messages may be
/// delivered more than once; this is not a transactional outbox.
#[derive(Debug, Clone, Copy, Default)]
pub struct InMemoryOutboxLayer;

impl<S> Layer<S> for InMemoryOutboxLayer {
    type Service = InMemoryOutbox<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InMemoryOutbox { inner }
    }
}

/// The service made by [`InMemoryOutboxLayer`].
#[derive(Debug, Clone)]
pub struct InMemoryOutbox<S> {
    inner: S,
}

impl<S> Service<ReceiveContext> for InMemoryOutbox<S>
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
        let capture = OutgoingCapture::new();
        let fut = self.inner.call(rc.clone());
        Box::pin(async move {
            let result = capture.scope(fut).await;
            let held = capture.take();
            result?;
            let bus = rc.bus();
            for outgoing in held {
                bus.dispatch(outgoing).await.map_err(|e| {
                    ConsumeError::with_kind(
                        ConsumeErrorKind::Consumer,
                        "busway::OutboxDeliveryError",
                        e,
                    )
                })?;
            }
            Ok(())
        })
    }
}
