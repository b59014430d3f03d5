//! A back-off for transport loops (reconnects, receive failures, retried moves).

use std::time::Duration;

/// Exponential back-off for retry loops (reconnecting, re-consuming, re-committing, moving a
/// message again): `first`, doubling after each failure, capped at `max`; [`Backoff::reset`]
/// after a success. Part of the kit for transport authors, so every loop backs off the same
/// way.
///
/// ```
/// use std::time::Duration;
/// use busway_core::transport::Backoff;
///
/// let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
/// let pauses: Vec<_> = (0..5).map(|_| backoff.next_delay()).collect();
/// assert_eq!(pauses, [100, 200, 400, 800, 1000].map(Duration::from_millis));
/// assert_eq!(backoff.failures(), 5);
/// backoff.reset();
/// assert_eq!(backoff.next_delay(), Duration::from_millis(100));
/// ```
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// Starts at `first` and doubles up to `max` (`first` if `max` is smaller).
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max: max.max(first),
            failures: 0,
        }
    }

    /// The pause after the `failure`-th consecutive failure (1-based) of a back-off from
    /// `first` to `max`, without keeping state.
    pub fn delay_for(failure: u32, first: Duration, max: Duration) -> Duration {
        let doublings = failure.saturating_sub(1).min(20);
        first.saturating_mul(1u32 << doublings).min(max.max(first))
    }

    /// Counts one more failure and returns the pause before the next try.
    pub fn next_delay(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        Self::delay_for(self.failures, self.first, self.max)
    }

    /// Consecutive failures since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// After a success: the next failure waits `first` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Counts a failure and sleeps its pause; returns `false` (at once) if `stop` fires first.
    pub async fn wait(&mut self, stop: &tokio_util::sync::CancellationToken) -> bool {
        let delay = self.next_delay();
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}
