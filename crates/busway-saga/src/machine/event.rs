//! How an event finds its instance, and what happens when there is none.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use busway_core::{ConsumeContext, ConsumeError, Message};
use futures_util::future::BoxFuture;
use uuid::Uuid;

use crate::activities::Activities;
use crate::repository::Query;

type IdOf<M> = Arc<dyn Fn(&ConsumeContext<M>) -> Option<Uuid> + Send + Sync>;
type QueryOf<M> = Arc<dyn Fn(&M) -> Query + Send + Sync>;
type NewIdOf<M> = Arc<dyn Fn(&M) -> Uuid + Send + Sync>;
type OnMissing<M> = Arc<
    dyn for<'a> Fn(&'a ConsumeContext<M>) -> BoxFuture<'a, Result<(), ConsumeError>> + Send + Sync,
>;

pub(crate) enum Correlation<M> {
    Unset,
    ById(IdOf<M>),
    ByQuery(QueryOf<M>),
}

/// What an event does when no instance matches it and it creates none in `Initial`.
pub enum MissingInstance<M> {
    /// Acknowledge it and do nothing (MassTransit's default); logged at `warn`.
    Discard,
    /// Fault it: it goes to the endpoint's `_error` queue with a `MissingInstance` reason.
    Fault,
    /// Run code instead (respond to a request with "not found", say).
    Execute(OnMissing<M>),
    /// Send it back to the endpoint after `delay`, up to `attempts` times (the instance may
    /// be created by an event still on its way), then fault it. MassTransit discards it
    /// when the limit is reached; busway keeps it in `_error` so that nothing is lost.
    Redeliver {
        /// How many redeliveries before it faults.
        attempts: u32,
        /// How long each waits.
        delay: Duration,
    },
}

impl<M> MissingInstance<M> {
    /// [`MissingInstance::Execute`] from a closure returning a boxed future.
    pub fn execute(
        f: impl for<'a> Fn(&'a ConsumeContext<M>) -> BoxFuture<'a, Result<(), ConsumeError>>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        MissingInstance::Execute(Arc::new(f))
    }
}

impl<M> fmt::Debug for MissingInstance<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MissingInstance::Discard => f.write_str("Discard"),
            MissingInstance::Fault => f.write_str("Fault"),
            MissingInstance::Execute(_) => f.write_str("Execute(..)"),
            MissingInstance::Redeliver { attempts, delay } => f
                .debug_struct("Redeliver")
                .field("attempts", attempts)
                .field("delay", delay)
                .finish(),
        }
    }
}

/// How an event's message finds its instance (MassTransit's `Event(() => X, e => e.CorrelateById(..))`).
pub struct EventCorrelation<M> {
    pub(crate) correlation: Correlation<M>,
    pub(crate) new_id: Option<NewIdOf<M>>,
    pub(crate) missing: MissingInstance<M>,
}

impl<M: Message> Default for EventCorrelation<M> {
    fn default() -> Self {
        let correlation = if M::has_correlation_id() {
            Correlation::ById(Arc::new(|ctx: &ConsumeContext<M>| {
                ctx.message().correlation_id()
            }))
        } else {
            Correlation::Unset
        };
        EventCorrelation {
            correlation,
            new_id: None,
            missing: MissingInstance::Discard,
        }
    }
}

impl<M> fmt::Debug for EventCorrelation<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let by = match self.correlation {
            Correlation::Unset => "unset",
            Correlation::ById(_) => "id",
            Correlation::ByQuery(_) => "query",
        };
        f.debug_struct("EventCorrelation")
            .field("by", &by)
            .field("missing", &self.missing)
            .finish()
    }
}

impl<M: Message> EventCorrelation<M> {
    /// The instance's correlation id is `f(message)` (MassTransit's `CorrelateById`).
    pub fn correlate_by(mut self, f: impl Fn(&M) -> Uuid + Send + Sync + 'static) -> Self {
        self.correlation = Correlation::ById(Arc::new(move |ctx: &ConsumeContext<M>| {
            Some(f(ctx.message()))
        }));
        self
    }

    /// The instance's correlation id is the envelope's `correlationId` (what a MassTransit
    /// `CorrelatedBy<Guid>` message carries).
    pub fn correlate_by_correlation_id(mut self) -> Self {
        self.correlation = Correlation::ById(Arc::new(|ctx: &ConsumeContext<M>| {
            ctx.correlation_id()
                .or_else(|| ctx.message().correlation_id())
        }));
        self
    }

    /// The instance is the one whose fields match `f(message)` (MassTransit's
    /// `CorrelateBy(expression)`), on repositories that can query. An instance this event
    /// creates gets the id [`EventCorrelation::select_id`] chooses, or a new one.
    pub fn correlate_by_query(mut self, f: impl Fn(&M) -> Query + Send + Sync + 'static) -> Self {
        self.correlation = Correlation::ByQuery(Arc::new(f));
        self
    }

    /// The correlation id of an instance this event creates when it correlates by query
    /// (MassTransit's `SelectId`).
    pub fn select_id(mut self, f: impl Fn(&M) -> Uuid + Send + Sync + 'static) -> Self {
        self.new_id = Some(Arc::new(f));
        self
    }

    /// What happens when no instance matches (default: [`MissingInstance::Discard`]).
    pub fn on_missing_instance(mut self, policy: MissingInstance<M>) -> Self {
        self.missing = policy;
        self
    }
}

/// Everything a machine knows about one event of message type `M`.
pub(crate) struct TypedEvent<S, M> {
    pub(crate) correlation: Correlation<M>,
    pub(crate) new_id: Option<NewIdOf<M>>,
    pub(crate) missing: MissingInstance<M>,
    pub(crate) by_state: HashMap<usize, Activities<S, M>>,
    pub(crate) any: Option<Activities<S, M>>,
    pub(crate) ignored: HashSet<usize>,
    /// The schedule whose message this is, for the stale-token check.
    pub(crate) schedule: Option<String>,
    /// The request whose outcome this is: accepted only while it is pending.
    pub(crate) request: Option<RequestOutcome>,
}

/// What a request outcome event does to its request.
pub(crate) struct RequestOutcome {
    pub(crate) name: String,
    /// A response or a fault (not the timeout): the timeout is cancelled.
    pub(crate) cancels_timeout: bool,
}

impl<S, M> TypedEvent<S, M> {
    pub(crate) fn new(config: EventCorrelation<M>) -> Self {
        TypedEvent {
            correlation: config.correlation,
            new_id: config.new_id,
            missing: config.missing,
            by_state: HashMap::new(),
            any: None,
            ignored: HashSet::new(),
            schedule: None,
            request: None,
        }
    }
}

impl<S> TypedEvent<S, ()> {
    pub(crate) fn composite() -> Self {
        TypedEvent {
            correlation: Correlation::Unset,
            new_id: None,
            missing: MissingInstance::Discard,
            by_state: HashMap::new(),
            any: None,
            ignored: HashSet::new(),
            schedule: None,
            request: None,
        }
    }
}
