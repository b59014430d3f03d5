//! A time limit per consume attempt (MassTransit's `UseTimeout`).

use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tower_layer::Layer;
use tower_service::Service;

use crate::context::ReceiveContext;
use crate::error::ConsumeError;

/// Fails an attempt with [`crate::ConsumeErrorKind::Timeout`] when the inner service does
/// not finish within the duration. The unfinished attempt is dropped (its future is cancelled
/// at its next await point).
#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    timeout: Duration,
}

impl TimeoutLayer {
    /// A layer with the given limit.
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = TimeoutService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TimeoutService {
            inner,
            timeout: self.timeout,
        }
    }
}

/// The service made by [`TimeoutLayer`].
#[derive(Debug, Clone)]
pub struct TimeoutService<S> {
    inner: S,
    timeout: Duration,
}

impl<S> Service<ReceiveContext> for TimeoutService<S>
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
        let fut = self.inner.call(rc);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, fut).await {
                Ok(result) => result,
                Err(_) => Err(ConsumeError::timeout(timeout)),
            }
        })
    }
}
