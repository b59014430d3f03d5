//! Delayed redelivery (MassTransit's `UseDelayedRedelivery`): second-level retry through the
//! transport's delayed delivery.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use tower_layer::Layer;
use tower_service::Service;

use super::retry::Retry;
use crate::context::ReceiveContext;
use crate::error::ConsumeError;

/// When the inner service fails with an error the policy handles, sends the message back to
/// the endpoint after the policy's next interval with `MT-Redelivery-Count` incremented, and
/// settles the delivery. Once the policy's limit is reached the error goes on to the fault
/// handling (error queue, `Fault<T>`).
#[derive(Debug, Clone)]
pub struct RedeliveryLayer {
    policy: Arc<Retry>,
}

impl RedeliveryLayer {
    /// A layer redelivering by `policy` (its intervals are the redelivery delays).
    pub fn new(policy: Retry) -> Self {
        Self {
            policy: Arc::new(policy),
        }
    }
}

impl<S> Layer<S> for RedeliveryLayer {
    type Service = RedeliveryService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RedeliveryService {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// The service made by [`RedeliveryLayer`].
#[derive(Debug, Clone)]
pub struct RedeliveryService<S> {
    inner: S,
    policy: Arc<Retry>,
}

impl<S> Service<ReceiveContext> for RedeliveryService<S>
where
    S: Service<ReceiveContext, Response = (), Error = ConsumeError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = ConsumeError;
    type Future = BoxFuture<'static, Result<(), ConsumeError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConsumeError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, rc: ReceiveContext) -> Self::Future {
        let fut = self.inner.call(rc.clone());
        let policy = self.policy.clone();
        Box::pin(async move {
            let err = match fut.await {
                Ok(()) => return Ok(()),
                Err(err) => err,
            };
            if rc.cancellation().is_cancelled() || !policy.should_retry(&err) {
                return Err(err);
            }
            let next = rc.redelivery_count() + 1;
            let Some(delay) = policy.delay_for(next) else {
                return Err(err);
            };
            match rc.redeliver(delay).await {
                Ok(()) => {
                    tracing::info!(
                        endpoint = rc.endpoint_name(),
                        message_id = ?rc.message_id(),
                        redelivery = next,
                        ?delay,
                        error = %err,
                        "consume failed; message scheduled for redelivery"
                    );
                    Ok(())
                }
                Err(redeliver_err) => {
                    // The original delivery was returned to the queue by the transport.
                    tracing::warn!(
                        endpoint = rc.endpoint_name(),
                        message_id = ?rc.message_id(),
                        error = %redeliver_err,
                        "delayed redelivery failed; the message was returned to the queue"
                    );
                    Err(err)
                }
            }
        })
    }
}
