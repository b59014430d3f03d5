//! Assertions for tests of state machines: wait, with a bound, until an instance is in a
//! state or finalized, and fail with what the instance looks like when it is not.
//!
//! ```ignore
//! use busway::saga::testing::{expect_state, expect_finalized};
//! let order = expect_state(&repo, order_id, "Submitted", Duration::from_secs(5)).await?;
//! assert_eq!(order.data.total, 30);
//! expect_finalized(&repo, order_id, Duration::from_secs(5)).await?;
//! ```

use std::fmt;
use std::future::Future;
use std::time::Duration;

use uuid::Uuid;

use crate::instance::{Instance, SagaState};
use crate::machine::FINAL;
use crate::repository::SagaError;

/// A repository a test can read instances from outside a delivery.
pub trait InspectSagas<S: SagaState>: Send + Sync {
    /// The instance with this correlation id, if there is one.
    fn instance(
        &self,
        correlation_id: Uuid,
    ) -> impl Future<Output = Result<Option<Instance<S>>, SagaError>> + Send;
}

/// Why an expectation about an instance failed: what was expected and what was there when
/// the time ran out.
#[derive(Debug)]
pub struct ExpectationFailed {
    message: String,
}

impl fmt::Display for ExpectationFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ExpectationFailed {}

const POLL: Duration = Duration::from_millis(10);

async fn poll<S: SagaState, R: InspectSagas<S>>(
    repo: &R,
    id: Uuid,
    within: Duration,
    expected: &str,
    done: impl Fn(Option<&Instance<S>>) -> bool,
) -> Result<Option<Instance<S>>, ExpectationFailed> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let last = repo.instance(id).await;
        if let Ok(found) = &last
            && done(found.as_ref())
        {
            return Ok(last.ok().flatten());
        }
        if tokio::time::Instant::now() >= deadline {
            let seen = match last {
                Ok(Some(i)) => format!("it is in `{}` at version {}", i.current_state, i.version),
                Ok(None) => "there is no such instance".to_string(),
                Err(e) => format!("the repository failed: {e}"),
            };
            return Err(ExpectationFailed {
                message: format!(
                    "expected saga instance {id} {expected} within {within:?}, but {seen}"
                ),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until the instance `id` exists in `state`; returns it.
pub async fn expect_state<S: SagaState, R: InspectSagas<S>>(
    repo: &R,
    id: Uuid,
    state: &str,
    within: Duration,
) -> Result<Instance<S>, ExpectationFailed> {
    let expected = format!("to be in `{state}`");
    let found = poll(repo, id, within, &expected, |i| {
        i.is_some_and(|i| i.current_state == state)
    })
    .await?;
    found.ok_or_else(|| ExpectationFailed {
        message: format!("saga instance {id} vanished"),
    })
}

/// Waits until the instance `id` exists (in any state); returns it.
pub async fn expect_exists<S: SagaState, R: InspectSagas<S>>(
    repo: &R,
    id: Uuid,
    within: Duration,
) -> Result<Instance<S>, ExpectationFailed> {
    let found = poll(repo, id, within, "to exist", |i| i.is_some()).await?;
    found.ok_or_else(|| ExpectationFailed {
        message: format!("saga instance {id} vanished"),
    })
}

/// Waits until the instance `id` is finalized: in `Final`, or removed from the repository
/// (a machine with `delete_when_finalized`). An instance that never existed counts as
/// removed, so call it once the instance was seen ([`expect_exists`]).
pub async fn expect_finalized<S: SagaState, R: InspectSagas<S>>(
    repo: &R,
    id: Uuid,
    within: Duration,
) -> Result<(), ExpectationFailed> {
    poll(repo, id, within, "to be finalized", |i| {
        i.is_none_or(|i| i.current_state == FINAL)
    })
    .await
    .map(|_| ())
}
