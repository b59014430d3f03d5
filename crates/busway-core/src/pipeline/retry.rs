//! In-process retry (MassTransit's `UseMessageRetry`).

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tower::ServiceExt;
use tower_layer::Layer;
use tower_service::Service;

use crate::context::ReceiveContext;
use crate::error::{ConsumeError, ConsumeErrorKind};

#[derive(Debug, Clone)]
enum Schedule {
    None,
    Immediate {
        limit: u32,
    },
    Intervals(Arc<[Duration]>),
    Incremental {
        limit: u32,
        initial: Duration,
        increment: Duration,
    },
    Exponential {
        limit: u32,
        min: Duration,
        max: Duration,
        factor: f64,
        jitter: bool,
    },
}

type Predicate = Arc<dyn Fn(&ConsumeError) -> bool + Send + Sync>;

/// Which errors a retry or redelivery policy acts on.
///
/// By default every error is retried except [`ConsumeErrorKind::Deserialize`] (the same body
/// will not parse next time), [`ConsumeErrorKind::NoConsumer`] and
/// [`ConsumeErrorKind::Cancelled`].
#[derive(Clone)]
pub struct ErrorFilter {
    ignored: Vec<ConsumeErrorKind>,
    handled: Option<Vec<ConsumeErrorKind>>,
    predicates: Vec<(bool, Predicate)>,
}

impl Default for ErrorFilter {
    fn default() -> Self {
        Self {
            ignored: vec![
                ConsumeErrorKind::Deserialize,
                ConsumeErrorKind::NoConsumer,
                ConsumeErrorKind::Cancelled,
            ],
            handled: None,
            predicates: Vec::new(),
        }
    }
}

impl ErrorFilter {
    /// True if the policy should act on `err`.
    pub fn matches(&self, err: &ConsumeError) -> bool {
        if self.ignored.contains(&err.kind()) {
            return false;
        }
        if let Some(handled) = &self.handled
            && !handled.contains(&err.kind())
        {
            return false;
        }
        self.predicates
            .iter()
            .all(|(want, predicate)| predicate(err) == *want)
    }
}

impl fmt::Debug for ErrorFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ErrorFilter")
            .field("ignored", &self.ignored)
            .field("handled", &self.handled)
            .field("predicates", &self.predicates.len())
            .finish()
    }
}

/// A retry policy: how many times, how long to wait between attempts, and for which errors.
///
/// Used in-process with `.retry(..)` and for delayed redelivery with `.redelivery(..)`.
///
/// ```
/// use std::time::Duration;
/// use busway_core::{ConsumeErrorKind, Retry};
///
/// let r = Retry::exponential(5)
///     .min_interval(Duration::from_millis(100))
///     .max_interval(Duration::from_secs(5))
///     .ignore(ConsumeErrorKind::Timeout);
/// assert_eq!(r.limit(), 5);
/// assert!(r.delay_for(6).is_none());
/// assert_eq!(Retry::intervals([Duration::from_secs(1), Duration::from_secs(5)]).delay_for(2), Some(Duration::from_secs(5)));
/// ```
#[derive(Clone, Debug)]
pub struct Retry {
    schedule: Schedule,
    filter: ErrorFilter,
}

impl Retry {
    /// No retries.
    pub fn none() -> Self {
        Self::with(Schedule::None)
    }

    /// Up to `limit` retries with no wait.
    pub fn immediate(limit: u32) -> Self {
        Self::with(Schedule::Immediate { limit })
    }

    /// Up to `limit` retries, waiting `interval` before each.
    pub fn interval(limit: u32, interval: Duration) -> Self {
        Self::intervals(std::iter::repeat_n(interval, limit as usize))
    }

    /// One retry per interval, waiting that long before it.
    pub fn intervals(intervals: impl IntoIterator<Item = Duration>) -> Self {
        Self::with(Schedule::Intervals(intervals.into_iter().collect()))
    }

    /// Up to `limit` retries, waiting `initial`, then `initial + increment`, and so on.
    pub fn incremental(limit: u32, initial: Duration, increment: Duration) -> Self {
        Self::with(Schedule::Incremental {
            limit,
            initial,
            increment,
        })
    }

    /// Up to `limit` retries with exponential back-off (from 100 ms, doubling, at most 30 s)
    /// and jitter. Tune with [`Retry::min_interval`], [`Retry::max_interval`],
    /// [`Retry::factor`] and [`Retry::jitter`].
    pub fn exponential(limit: u32) -> Self {
        Self::with(Schedule::Exponential {
            limit,
            min: Duration::from_millis(100),
            max: Duration::from_secs(30),
            factor: 2.0,
            jitter: true,
        })
    }

    fn with(schedule: Schedule) -> Self {
        Self {
            schedule,
            filter: ErrorFilter::default(),
        }
    }

    /// Exponential: the first wait.
    pub fn min_interval(mut self, min_interval: Duration) -> Self {
        if let Schedule::Exponential { min, .. } = &mut self.schedule {
            *min = min_interval;
        }
        self
    }

    /// Exponential: the longest wait.
    pub fn max_interval(mut self, max_interval: Duration) -> Self {
        if let Schedule::Exponential { max, .. } = &mut self.schedule {
            *max = max_interval;
        }
        self
    }

    /// Exponential: the growth factor (default 2).
    pub fn factor(mut self, growth: f64) -> Self {
        if let Schedule::Exponential { factor, .. } = &mut self.schedule {
            *factor = growth.max(1.0);
        }
        self
    }

    /// Exponential: randomise each wait between half and all of its value (default on).
    pub fn jitter(mut self, on: bool) -> Self {
        if let Schedule::Exponential { jitter, .. } = &mut self.schedule {
            *jitter = on;
        }
        self
    }

    /// Do not retry errors of this kind.
    pub fn ignore(mut self, kind: ConsumeErrorKind) -> Self {
        self.filter.ignored.push(kind);
        self
    }

    /// Retry only errors of the given kinds (called several times, the kinds add up). A kind
    /// ignored by default can be handled again this way.
    pub fn handle(mut self, kind: ConsumeErrorKind) -> Self {
        self.filter.ignored.retain(|k| *k != kind);
        self.filter.handled.get_or_insert_with(Vec::new).push(kind);
        self
    }

    /// Do not retry when the consumer's error is an `E`.
    pub fn ignore_error<E: std::error::Error + 'static>(self) -> Self {
        self.filter_with(false, |e| e.downcast_ref::<E>().is_some())
    }

    /// Retry only when the consumer's error is an `E`.
    pub fn handle_error<E: std::error::Error + 'static>(self) -> Self {
        self.filter_with(true, |e| e.downcast_ref::<E>().is_some())
    }

    /// Retry only errors for which `predicate` is true.
    pub fn filter(self, predicate: impl Fn(&ConsumeError) -> bool + Send + Sync + 'static) -> Self {
        self.filter_with(true, predicate)
    }

    fn filter_with(
        mut self,
        want: bool,
        predicate: impl Fn(&ConsumeError) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.filter.predicates.push((want, Arc::new(predicate)));
        self
    }

    /// The error filter.
    pub fn error_filter(&self) -> &ErrorFilter {
        &self.filter
    }

    /// True if the policy acts on `err`.
    pub fn should_retry(&self, err: &ConsumeError) -> bool {
        self.filter.matches(err)
    }

    /// The most retries this policy allows.
    pub fn limit(&self) -> u32 {
        match &self.schedule {
            Schedule::None => 0,
            Schedule::Immediate { limit }
            | Schedule::Incremental { limit, .. }
            | Schedule::Exponential { limit, .. } => *limit,
            Schedule::Intervals(i) => u32::try_from(i.len()).unwrap_or(u32::MAX),
        }
    }

    /// The wait before retry number `retry` (1-based), or `None` past the limit.
    pub fn delay_for(&self, retry: u32) -> Option<Duration> {
        if retry == 0 || retry > self.limit() {
            return None;
        }
        let n = retry - 1;
        Some(match &self.schedule {
            Schedule::None => return None,
            Schedule::Immediate { .. } => Duration::ZERO,
            Schedule::Intervals(i) => i[n as usize],
            Schedule::Incremental {
                initial, increment, ..
            } => initial.saturating_add(increment.saturating_mul(n)),
            Schedule::Exponential {
                min,
                max,
                factor,
                jitter,
                ..
            } => {
                let exp = factor.powi(i32::try_from(n).unwrap_or(i32::MAX));
                let base = min.as_secs_f64() * exp;
                let capped = base.min(max.as_secs_f64());
                let secs = if *jitter {
                    capped * (0.5 + fastrand::f64() * 0.5)
                } else {
                    capped
                };
                Duration::from_secs_f64(secs.max(0.0))
            }
        })
    }
}

/// Retries the inner service in-process according to a [`Retry`] policy.
#[derive(Debug, Clone)]
pub struct RetryLayer {
    policy: Arc<Retry>,
}

impl RetryLayer {
    /// A layer for `policy`.
    pub fn new(policy: Retry) -> Self {
        Self {
            policy: Arc::new(policy),
        }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = RetryService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryService {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// The service made by [`RetryLayer`].
#[derive(Debug, Clone)]
pub struct RetryService<S> {
    inner: S,
    policy: Arc<Retry>,
}

impl<S> Service<ReceiveContext> for RetryService<S>
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
        // Take the service that was driven to readiness, leave a clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let policy = self.policy.clone();
        Box::pin(async move {
            let mut result = inner.call(rc.clone()).await;
            let mut retry = 0u32;
            loop {
                let err = match result {
                    Ok(()) => return Ok(()),
                    Err(err) => err,
                };
                retry += 1;
                if rc.cancellation().is_cancelled() || !policy.should_retry(&err) {
                    return Err(err);
                }
                let Some(delay) = policy.delay_for(retry) else {
                    return Err(err);
                };
                tracing::debug!(
                    endpoint = rc.endpoint_name(),
                    retry,
                    ?delay,
                    error = %err,
                    "consume failed; retrying"
                );
                if !delay.is_zero() {
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = rc.cancellation().cancelled() => return Err(err),
                    }
                }
                rc.set_retry_attempt(retry);
                result = match inner.ready().await {
                    Ok(svc) => svc.call(rc.clone()).await,
                    Err(e) => Err(e),
                };
            }
        })
    }
}
