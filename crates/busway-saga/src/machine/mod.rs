//! Defining a state machine: states, events bound to message types, and what each event
//! does in each state.

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use busway_core::{ConsumeContext, ConsumerRegistration, Fault, Message};

use crate::activities::Activities;
use crate::instance::SagaState;
use crate::runner::{self, Runtime};

mod during;
mod event;
mod request;

pub use during::During;
pub(crate) use event::{Correlation, RequestOutcome, TypedEvent};
pub use event::{EventCorrelation, MissingInstance};
pub(crate) use request::timeout_schedule;
pub use request::{Request, RequestTimeoutExpired};

/// The name of the state every instance starts in.
pub const INITIAL: &str = "Initial";
/// The name of the state a finalized instance is in.
pub const FINAL: &str = "Final";

/// A state of a machine (a handle from [`StateMachine::state`], or [`State::INITIAL`] and
/// [`State::FINAL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct State(usize);

impl State {
    /// `Initial`: where a new instance is, before its first event's activities run.
    pub const INITIAL: State = State(0);
    /// `Final`: where `finalize` leaves an instance.
    pub const FINAL: State = State(1);

    pub(crate) fn index(self) -> usize {
        self.0
    }
}

/// An event of a machine, bound to the message type `M` (or `()` for a composite event).
pub struct Event<M> {
    index: usize,
    _message: PhantomData<fn() -> M>,
}

impl<M> Event<M> {
    fn new(index: usize) -> Self {
        Event {
            index,
            _message: PhantomData,
        }
    }

    /// The event without its message type, to list it in a composite event.
    pub fn id(&self) -> EventId {
        EventId(self.index)
    }
}

impl<M> Clone for Event<M> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<M> Copy for Event<M> {}

impl<M> fmt::Debug for Event<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Event").field(&self.index).finish()
    }
}

/// An event of a machine without its message type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventId(usize);

/// A timeout (MassTransit's `Schedule`): a message the saga sends itself after a delay, and
/// the event its arrival raises ([`Schedule::received`]). The message's scheduling token is
/// kept on the instance; one that arrives with another token is stale and ignored.
pub struct Schedule<M> {
    name: String,
    delay: Duration,
    event: Event<M>,
}

impl<M> Schedule<M> {
    /// The schedule's name (the key of its token on the instance).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How long after scheduling the message arrives.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// The event raised when the scheduled message arrives with the current token.
    pub fn received(&self) -> Event<M> {
        self.event
    }
}

impl<M> fmt::Debug for Schedule<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Schedule")
            .field("name", &self.name)
            .field("delay", &self.delay)
            .finish()
    }
}

/// Makes the consumer registration of a message event (monomorphised per message type when
/// the event is declared).
type Register<S> = fn(Box<dyn Any + Send + Sync>, usize, Arc<Runtime<S>>) -> ConsumerRegistration;

pub(crate) enum SlotKind<S> {
    Message {
        message_type: String,
        register: Register<S>,
    },
    Composite {
        of: Vec<usize>,
    },
}

pub(crate) struct EventSlot<S> {
    pub(crate) name: String,
    pub(crate) kind: SlotKind<S>,
    /// `TypedEvent<S, M>` for the event's message type.
    pub(crate) typed: Box<dyn Any + Send + Sync>,
    pub(crate) handled: bool,
    pub(crate) initial: bool,
    pub(crate) correlated: bool,
}

/// A saga state machine over the instance state `S` (MassTransit's
/// `MassTransitStateMachine<TInstance>`): declare states and events, then say what each event
/// does in each state.
///
/// ```
/// use busway_saga::{State, StateMachine};
/// # use serde::{Deserialize, Serialize};
/// # use uuid::Uuid;
/// # #[derive(Debug, Clone, Serialize, Deserialize, busway_macros::Message)]
/// # #[serde(rename_all = "camelCase")]
/// # #[message(crate = "busway_core")]
/// # struct OrderPlaced { order_id: Uuid, total: u32 }
/// # #[derive(Debug, Clone, Serialize, Deserialize, busway_macros::Message)]
/// # #[serde(rename_all = "camelCase")]
/// # #[message(crate = "busway_core")]
/// # struct OrderShipped { order_id: Uuid }
/// #[derive(Debug, Default, Serialize, Deserialize)]
/// struct OrderState { total: u32 }
///
/// let mut m = StateMachine::<OrderState>::new("OrderStateMachine");
/// let submitted = m.state("Submitted");
/// let placed = m.event::<OrderPlaced>("OrderPlaced", |e| e.correlate_by(|m| m.order_id));
/// let shipped = m.event::<OrderShipped>("OrderShipped", |e| e.correlate_by(|m| m.order_id));
/// m.initially().when(placed, |b| {
///     b.then(|ctx| {
///         ctx.saga.total = ctx.message().total;
///         Ok(())
///     })
///     .transition_to(submitted)
/// });
/// m.during(submitted).when(shipped, |b| b.finalize());
/// m.delete_when_finalized();
/// ```
pub struct StateMachine<S> {
    name: String,
    states: Vec<String>,
    targets: HashSet<usize>,
    events: Vec<EventSlot<S>>,
    finally: Activities<S, ()>,
    delete_when_finalized: bool,
    problems: Vec<String>,
}

impl<S> fmt::Debug for StateMachine<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateMachine")
            .field("name", &self.name)
            .field("states", &self.states)
            .field(
                "events",
                &self.events.iter().map(|e| &e.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl<S: SagaState> StateMachine<S> {
    /// An empty machine named `name` (for logs, spans and errors).
    pub fn new(name: impl Into<String>) -> Self {
        StateMachine {
            name: name.into(),
            states: vec![INITIAL.to_string(), FINAL.to_string()],
            targets: HashSet::new(),
            events: Vec::new(),
            finally: Activities::new(),
            delete_when_finalized: false,
            problems: Vec::new(),
        }
    }

    /// The machine's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Declares a state; its name is what repositories store.
    pub fn state(&mut self, name: &str) -> State {
        if let Some(i) = self.states.iter().position(|s| s == name) {
            self.problems
                .push(format!("the state `{name}` is declared twice"));
            return State(i);
        }
        self.states.push(name.to_string());
        State(self.states.len() - 1)
    }

    /// The names of the states: `Initial`, `Final`, then the declared ones in order.
    pub fn state_names(&self) -> &[String] {
        &self.states
    }

    /// A state's number as MassTransit stores states in an `int` column
    /// (`StateAccessorIndex`): 1 for `Initial`, 2 for `Final`, then 3, 4, .. for the states
    /// in the order they were declared (0 means none).
    pub fn state_number(&self, name: &str) -> Option<i32> {
        let i = self.states.iter().position(|s| s == name)?;
        i32::try_from(i + 1).ok()
    }

    /// The state with MassTransit's number `number` ([`StateMachine::state_number`]).
    pub fn state_by_number(&self, number: i32) -> Option<&str> {
        let i = usize::try_from(number).ok()?.checked_sub(1)?;
        self.states.get(i).map(String::as_str)
    }

    /// Declares an event raised by messages of type `M`; `configure` says how a message finds
    /// its instance. Without configuration, a contract with its own correlation id
    /// (`#[message(correlation_id)]`, MassTransit's `CorrelatedBy<Guid>`) correlates by it.
    pub fn event<M: Message>(
        &mut self,
        name: &str,
        configure: impl FnOnce(EventCorrelation<M>) -> EventCorrelation<M>,
    ) -> Event<M> {
        let config = configure(EventCorrelation::default());
        let typed = TypedEvent::<S, M>::new(config);
        self.push_message_event::<M>(name, typed)
    }

    fn push_message_event<M: Message>(&mut self, name: &str, typed: TypedEvent<S, M>) -> Event<M> {
        if self.events.iter().any(|e| e.name == name) {
            self.problems
                .push(format!("the event `{name}` is declared twice"));
        }
        let message_type = M::message_type().as_str().to_string();
        if let Some(other) = self.events.iter().find(
            |e| matches!(&e.kind, SlotKind::Message { message_type: t, .. } if *t == message_type),
        ) {
            self.problems.push(format!(
                "the events `{}` and `{name}` are both bound to {message_type}: a message type \
                 raises one event",
                other.name
            ));
        }
        let correlated = !matches!(typed.correlation, Correlation::Unset);
        self.events.push(EventSlot {
            name: name.to_string(),
            kind: SlotKind::Message {
                message_type,
                register: runner::registration::<S, M>,
            },
            typed: Box::new(typed),
            handled: false,
            initial: false,
            correlated,
        });
        Event::new(self.events.len() - 1)
    }

    /// Declares a composite event (MassTransit's `CompositeEvent`): it is raised, once, when
    /// every event in `of` has been handled for an instance, in whatever order they came. Its
    /// activities run after those of the event that completed it.
    pub fn composite_event(&mut self, name: &str, of: &[EventId]) -> Event<()> {
        if of.len() < 2 || of.len() > 64 {
            self.problems.push(format!(
                "the composite event `{name}` must combine 2 to 64 events, not {}",
                of.len()
            ));
        }
        let of: Vec<usize> = of.iter().map(|e| e.0).collect();
        for &i in &of {
            match self.events.get_mut(i) {
                Some(slot) => slot.handled = true,
                None => self.problems.push(format!(
                    "the composite event `{name}` lists an event of another state machine"
                )),
            }
        }
        self.events.push(EventSlot {
            name: name.to_string(),
            kind: SlotKind::Composite { of },
            typed: Box::new(TypedEvent::<S, ()>::composite()),
            handled: false,
            initial: false,
            correlated: true,
        });
        Event::new(self.events.len() - 1)
    }

    /// Declares a schedule (MassTransit's `Schedule`): messages of type `M` the saga sends
    /// to its own endpoint `delay` after a `schedule` activity, raising
    /// [`Schedule::received`] when they arrive with the instance's current token.
    pub fn schedule<M: Message>(
        &mut self,
        name: &str,
        delay: Duration,
        configure: impl FnOnce(EventCorrelation<M>) -> EventCorrelation<M>,
    ) -> Schedule<M> {
        let config = configure(EventCorrelation::default());
        let mut typed = TypedEvent::<S, M>::new(config);
        typed.schedule = Some(name.to_string());
        let event = self.push_message_event::<M>(&format!("{name}.Received"), typed);
        Schedule {
            name: name.to_string(),
            delay,
            event,
        }
    }

    /// Declares a request (MassTransit's `Request`): a [`crate::Activities::request`]
    /// activity sends a `Req` to `address` (or publishes it when `None`) with this saga's
    /// endpoint as its response and fault address and the instance's correlation id as its
    /// request id; the response raises [`Request::completed`], a `Fault<Req>`
    /// [`Request::faulted`], and no answer within `timeout` [`Request::timed_out`] (a
    /// scheduled message; `Duration::ZERO` for none).
    pub fn request<Req: Message, Resp: Message>(
        &mut self,
        name: &str,
        address: Option<&str>,
        timeout: Duration,
    ) -> Request<Req, Resp> {
        let outcome = |cancels_timeout| RequestOutcome {
            name: name.to_string(),
            cancels_timeout,
        };
        let mut completed = TypedEvent::<S, Resp>::new(by_request_id());
        completed.request = Some(outcome(true));
        let mut faulted = TypedEvent::<S, Fault<Req>>::new(by_request_id());
        faulted.request = Some(outcome(true));
        let mut timed_out = TypedEvent::<S, RequestTimeoutExpired<Req>>::new(
            EventCorrelation::default()
                .correlate_by(|m: &RequestTimeoutExpired<Req>| m.correlation_id),
        );
        timed_out.request = Some(outcome(false));
        timed_out.schedule = Some(timeout_schedule(name));
        Request {
            name: name.to_string(),
            address: address.map(str::to_string),
            timeout,
            completed: self.push_message_event(&format!("{name}.Completed"), completed),
            faulted: self.push_message_event(&format!("{name}.Faulted"), faulted),
            timed_out: self.push_message_event(&format!("{name}.TimeoutExpired"), timed_out),
        }
    }

    /// What events do in `Initial`: the events that create instances.
    pub fn initially(&mut self) -> During<'_, S> {
        self.during_states(&[State::INITIAL])
    }

    /// What events do in `state`.
    pub fn during(&mut self, state: State) -> During<'_, S> {
        self.during_states(&[state])
    }

    /// What events do in each of `states`.
    pub fn during_states(&mut self, states: &[State]) -> During<'_, S> {
        During {
            machine: self,
            states: states.iter().map(|s| s.0).collect(),
            any: false,
        }
    }

    /// What events do in every state but `Initial` and `Final` (MassTransit's `DuringAny`),
    /// after what the current state says.
    pub fn during_any(&mut self) -> During<'_, S> {
        During {
            machine: self,
            states: Vec::new(),
            any: true,
        }
    }

    /// Activities that run whenever an instance becomes final, after the event's own
    /// (MassTransit's `Finally`).
    pub fn finally(&mut self, f: impl FnOnce(Activities<S, ()>) -> Activities<S, ()>) {
        let current = std::mem::replace(&mut self.finally, Activities::new());
        self.finally = f(current);
    }

    /// Removes an instance from the repository when it becomes final (MassTransit's
    /// `SetCompletedWhenFinalized`); otherwise it stays, in `Final`.
    pub fn delete_when_finalized(&mut self) {
        self.delete_when_finalized = true;
    }

    /// What is wrong with the definition, if anything: an event without correlation, an event
    /// handled in no state, a state no activity leads to, no event that creates an instance.
    pub fn problems(&self) -> Vec<String> {
        let mut out = self.problems.clone();
        for slot in &self.events {
            if !slot.correlated {
                out.push(format!(
                    "the event `{}` has no correlation: use `correlate_by(..)`, \
                     `correlate_by_correlation_id()` or `correlate_by_query(..)`, or mark the \
                     contract's id with `#[message(correlation_id)]`",
                    slot.name
                ));
            }
            if !slot.handled {
                out.push(format!(
                    "the event `{}` is handled in no state (add `when` or `ignore` for it)",
                    slot.name
                ));
            }
        }
        if !self.events.iter().any(|e| e.initial) {
            out.push("no event creates an instance: add `initially().when(event, ..)`".to_string());
        }
        for (i, name) in self.states.iter().enumerate().skip(2) {
            if !self.targets.contains(&i) {
                out.push(format!(
                    "the state `{name}` is unreachable: no activity transitions to it"
                ));
            }
        }
        out.into_iter()
            .map(|p| format!("state machine `{}`: {p}", self.name))
            .collect()
    }

    /// The consumer registrations that run this machine over `repository`, one per message
    /// event; the problems of the definition when it cannot work.
    pub(crate) fn into_registrations(
        self,
        repository: Arc<dyn runner::DynRepository<S>>,
    ) -> Result<Vec<ConsumerRegistration>, Vec<String>> {
        let problems = self.problems();
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut composites = Vec::new();
        let mut composites_of: HashMap<usize, Vec<(usize, u64)>> = HashMap::new();
        let mut messages = Vec::new();
        for (index, slot) in self.events.into_iter().enumerate() {
            match slot.kind {
                SlotKind::Composite { of } => {
                    let at = composites.len();
                    for (bit, &event) in of.iter().enumerate() {
                        composites_of
                            .entry(event)
                            .or_default()
                            .push((at, 1u64 << bit));
                    }
                    let typed = slot
                        .typed
                        .downcast::<TypedEvent<S, ()>>()
                        .map_err(|_| vec![format!("composite event `{}`", slot.name)])?;
                    composites.push(runner::Composite {
                        name: slot.name,
                        all: if of.len() == 64 {
                            u64::MAX
                        } else {
                            (1u64 << of.len()) - 1
                        },
                        event: *typed,
                    });
                }
                SlotKind::Message { register, .. } => {
                    messages.push((index, slot.name, slot.typed, register));
                }
            }
        }
        let runtime = Arc::new(Runtime {
            name: self.name,
            states: self.states,
            composites,
            composites_of,
            finally: self.finally,
            delete_when_finalized: self.delete_when_finalized,
            repository,
            locks: runner::KeyedLocks::default(),
        });
        Ok(messages
            .into_iter()
            .map(|(index, _name, typed, register)| register(typed, index, runtime.clone()))
            .collect())
    }

    fn typed_mut<M: 'static>(&mut self, event: Event<M>) -> Option<&mut TypedEvent<S, M>> {
        let slot = self.events.get_mut(event.index)?;
        slot.typed.downcast_mut::<TypedEvent<S, M>>()
    }
}

/// Correlates a request's outcome by its request id (the instance's correlation id).
fn by_request_id<M: Message>() -> EventCorrelation<M> {
    EventCorrelation {
        correlation: Correlation::ById(Arc::new(|ctx: &ConsumeContext<M>| ctx.request_id())),
        ..EventCorrelation::default()
    }
}
