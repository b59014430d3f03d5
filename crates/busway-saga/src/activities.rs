//! What a state machine does when an event arrives: a list of activities, run in order
//! with a [`BehaviorContext`].

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use busway_core::address::IntoAddress;
use busway_core::headers::names::SCHEDULING_TOKEN_ID;
use busway_core::{ConsumeContext, ConsumeError, Message};
use futures_util::future::BoxFuture;
use uuid::Uuid;

use crate::instance::InstanceMeta;
use crate::machine::{Request, RequestTimeoutExpired, Schedule, State, timeout_schedule};

/// What a behavior does once the instance is saved (or, with the consumer outbox, in the same
/// transaction): a message it sends, a schedule it cancels.
pub(crate) type Pending = Box<dyn FnOnce() -> BoxFuture<'static, Result<(), ConsumeError>> + Send>;

/// What the behaviors of one event have done so far, carried from one behavior to the next
/// (the event's own, its composites', `finally`'s) and then saved.
pub(crate) struct Progress<S> {
    pub(crate) saga: S,
    pub(crate) state: String,
    pub(crate) meta: InstanceMeta,
    pub(crate) finalized: bool,
    pub(crate) pending: Vec<Pending>,
}

impl<S> Progress<S> {
    /// Nothing done yet to an instance in `state`.
    pub(crate) fn start(saga: S, state: String, meta: InstanceMeta) -> Self {
        Progress {
            saga,
            state,
            meta,
            finalized: false,
            pending: Vec::new(),
        }
    }
}

/// Where and how a saga's request goes.
pub(crate) struct RequestSpec {
    name: String,
    address: Option<String>,
    timeout: Duration,
}

/// The instance and the event while a behavior runs: read the message, change the saga's
/// fields, and publish, send or respond (those go out after the instance is saved).
pub struct BehaviorContext<S, M> {
    /// The user's fields of the instance.
    pub saga: S,
    correlation_id: Uuid,
    state: String,
    meta: InstanceMeta,
    finalized: bool,
    consume: Arc<ConsumeContext<M>>,
    pending: Vec<Pending>,
}

impl<S, M> BehaviorContext<S, M> {
    /// A context that goes on from `progress` for the event in `consume`.
    pub(crate) fn resume(
        progress: Progress<S>,
        correlation_id: Uuid,
        consume: Arc<ConsumeContext<M>>,
    ) -> Self {
        let Progress {
            saga,
            state,
            meta,
            finalized,
            pending,
        } = progress;
        BehaviorContext {
            saga,
            correlation_id,
            state,
            meta,
            finalized,
            consume,
            pending,
        }
    }

    /// The event's message.
    pub fn message(&self) -> &M {
        self.consume.message()
    }

    /// The consume context of the event (headers, envelope, the bus).
    pub fn consume_context(&self) -> &ConsumeContext<M> {
        &self.consume
    }

    /// The instance's correlation id.
    pub fn correlation_id(&self) -> Uuid {
        self.correlation_id
    }

    /// The current state's name (as it stands after the transitions so far).
    pub fn state(&self) -> &str {
        &self.state
    }

    pub(crate) fn set_state(&mut self, name: &str, finalized: bool) {
        self.state.clear();
        self.state.push_str(name);
        self.finalized = finalized;
    }

    /// What the behavior did, for the next one or for the save.
    pub(crate) fn into_progress(self) -> Progress<S> {
        Progress {
            saga: self.saga,
            state: self.state,
            meta: self.meta,
            finalized: self.finalized,
            pending: self.pending,
        }
    }
}

impl<S: Send + 'static, M: Send + Sync + 'static> BehaviorContext<S, M> {
    /// Publishes `message` once the instance is saved, with the event's conversation.
    pub fn publish<T: Message>(&mut self, message: T) {
        let consume = self.consume.clone();
        self.pending.push(Box::new(move || {
            Box::pin(async move { consume.publish(message).await.map_err(ConsumeError::new) })
        }));
    }

    /// Sends `message` to `address` once the instance is saved.
    pub fn send<T: Message>(&mut self, address: impl IntoAddress + Send + 'static, message: T) {
        let consume = self.consume.clone();
        self.pending.push(Box::new(move || {
            Box::pin(async move {
                consume
                    .send(address, message)
                    .await
                    .map_err(ConsumeError::new)
            })
        }));
    }

    /// Responds to the event (a request) once the instance is saved.
    pub fn respond<T: Message>(&mut self, message: T) {
        let consume = self.consume.clone();
        self.pending.push(Box::new(move || {
            Box::pin(async move { consume.respond(message).await.map_err(ConsumeError::new) })
        }));
    }

    /// Schedules `message` to arrive at this saga's endpoint after the schedule's delay, with
    /// a new token kept on the instance; a message already scheduled by it becomes stale.
    ///
    /// Fails at once, before anything is saved, on a transport without delayed delivery.
    pub(crate) fn schedule_message<T: Message>(
        &mut self,
        name: &str,
        delay: Duration,
        message: T,
    ) -> Result<(), ConsumeError> {
        let bus = self.consume.bus();
        let transport = bus.transport();
        if !transport.profile().capabilities.delayed_delivery {
            return Err(ConsumeError::msg(format!(
                "the saga schedules `{name}`, but the `{}` transport has no delayed delivery to deliver it later",
                transport.profile().system
            )));
        }
        let token = busway_core::message::new_id();
        self.meta.schedules.insert(name.to_string(), token);
        let consume = self.consume.clone();
        self.pending.push(Box::new(move || {
            Box::pin(async move {
                let address = consume.input_address().to_string();
                consume
                    .send(address, message)
                    .delay(delay)
                    .header(SCHEDULING_TOKEN_ID, token.to_string())
                    .await
                    .map_err(ConsumeError::new)
            })
        }));
        Ok(())
    }

    /// Sends the request once the instance is saved (see [`Activities::request`]), and
    /// schedules its timeout.
    pub(crate) fn send_request<Req: Message>(
        &mut self,
        request: &RequestSpec,
        message: Req,
    ) -> Result<(), ConsumeError> {
        let request_message_id = busway_core::message::new_id();
        self.meta
            .requests
            .insert(request.name.clone(), request_message_id);
        let consume = self.consume.clone();
        let correlation_id = self.correlation_id;
        let address = request.address.clone();
        self.pending.push(Box::new(move || {
            Box::pin(async move {
                let here = consume.input_address().to_string();
                let builder = match address {
                    Some(address) => consume.send(address, message),
                    None => consume.publish(message),
                };
                builder
                    .message_id(request_message_id)
                    .request_id(correlation_id)
                    .response_address(here.clone())
                    .fault_address(here)
                    .await
                    .map_err(ConsumeError::new)
            })
        }));
        let timeout = timeout_schedule(&request.name);
        self.unschedule(&timeout);
        if !request.timeout.is_zero() {
            let expired = RequestTimeoutExpired::<Req>::new(
                correlation_id,
                request_message_id,
                request.timeout,
            );
            self.schedule_message(&timeout, request.timeout, expired)?;
        }
        Ok(())
    }

    /// Forgets the schedule's token, so its message is ignored when it arrives, and, once
    /// the instance is saved, tells this bus not to deliver it.
    pub(crate) fn unschedule(&mut self, name: &str) {
        self.pending
            .extend(unschedule(&self.consume, &mut self.meta, name));
    }
}

/// Forgets the schedule `name`'s token on the instance; returns the cancellation of its
/// message at `consume`'s endpoint, to run after the save (a conflict that re-runs the event
/// on a newer instance must not have cancelled a timeout that instance still waits for).
pub(crate) fn unschedule<M>(
    consume: &ConsumeContext<M>,
    meta: &mut InstanceMeta,
    name: &str,
) -> Option<Pending> {
    let token = meta.schedules.remove(name)?;
    let bus = consume.bus();
    let scheduled = busway_core::scheduling::ScheduledMessage {
        token_id: token,
        scheduled_time: chrono::Utc::now(),
        destination: consume.input_address().to_string(),
    };
    Some(Box::new(move || {
        Box::pin(async move {
            bus.cancel_scheduled_send(&scheduled);
            Ok(())
        })
    }))
}

impl<S: fmt::Debug, M> fmt::Debug for BehaviorContext<S, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BehaviorContext")
            .field("saga", &self.saga)
            .field("correlation_id", &self.correlation_id)
            .field("state", &self.state)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

/// An activity written as a type, for work that needs its own dependencies (a payment
/// client, a repository) or is shared between machines.
///
/// ```ignore
/// struct ReserveStock { inventory: Inventory }
///
/// impl Activity<OrderState, OrderPlaced> for ReserveStock {
///     async fn execute(&self, ctx: &mut BehaviorContext<OrderState, OrderPlaced>) -> Result<(), ConsumeError> {
///         ctx.saga.reservation = self.inventory.reserve(&ctx.message().items).await?;
///         Ok(())
///     }
/// }
/// ```
pub trait Activity<S, M>: Send + Sync + 'static {
    /// Runs the activity.
    fn execute(
        &self,
        ctx: &mut BehaviorContext<S, M>,
    ) -> impl Future<Output = Result<(), ConsumeError>> + Send;
}

type SyncFn<S, M> =
    Arc<dyn Fn(&mut BehaviorContext<S, M>) -> Result<(), ConsumeError> + Send + Sync>;
type AsyncFn<S, M> = Arc<
    dyn for<'a> Fn(&'a mut BehaviorContext<S, M>) -> BoxFuture<'a, Result<(), ConsumeError>>
        + Send
        + Sync,
>;
type Condition<S, M> = Arc<dyn Fn(&BehaviorContext<S, M>) -> bool + Send + Sync>;

pub(crate) enum Step<S, M> {
    Then(SyncFn<S, M>),
    Async(AsyncFn<S, M>),
    TransitionTo(State),
    Finalize,
    If(Condition<S, M>, Activities<S, M>, Activities<S, M>),
}

/// The activities of one behavior (`when(event, |b| b.then(..).transition_to(..))`), run in
/// order; an error stops them and faults the event (nothing is saved or sent).
pub struct Activities<S, M> {
    pub(crate) steps: Vec<Step<S, M>>,
}

impl<S, M> fmt::Debug for Activities<S, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Activities")
            .field("steps", &self.steps.len())
            .finish()
    }
}

impl<S: Send + 'static, M: Send + Sync + 'static> Activities<S, M> {
    pub(crate) fn new() -> Self {
        Activities { steps: Vec::new() }
    }

    /// Runs `f` with the instance and the message (MassTransit's `Then`).
    pub fn then(
        mut self,
        f: impl Fn(&mut BehaviorContext<S, M>) -> Result<(), ConsumeError> + Send + Sync + 'static,
    ) -> Self {
        self.steps.push(Step::Then(Arc::new(f)));
        self
    }

    /// Runs asynchronous code: `f` returns a boxed future that may borrow the context
    /// (MassTransit's `ThenAsync`):
    /// `.then_async(|ctx| Box::pin(async move { ctx.saga.quote = prices.quote(ctx.message()).await?; Ok(()) }))`.
    pub fn then_async(
        mut self,
        f: impl for<'a> Fn(&'a mut BehaviorContext<S, M>) -> BoxFuture<'a, Result<(), ConsumeError>>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        self.steps.push(Step::Async(Arc::new(f)));
        self
    }

    /// Runs an [`Activity`] (MassTransit's `Activity(x => x.OfType<T>())`).
    pub fn activity<A: Activity<S, M>>(self, activity: A) -> Self {
        let activity = Arc::new(activity);
        self.then_async(move |ctx| {
            let activity = activity.clone();
            Box::pin(async move { activity.execute(ctx).await })
        })
    }

    /// Publishes the message `f` makes, after the instance is saved.
    pub fn publish<T: Message>(
        self,
        f: impl Fn(&BehaviorContext<S, M>) -> T + Send + Sync + 'static,
    ) -> Self {
        self.then(move |ctx| {
            let message = f(ctx);
            ctx.publish(message);
            Ok(())
        })
    }

    /// Sends the message `f` makes to `address`, after the instance is saved.
    pub fn send<T: Message>(
        self,
        address: &str,
        f: impl Fn(&BehaviorContext<S, M>) -> T + Send + Sync + 'static,
    ) -> Self {
        let address = address.to_string();
        self.then(move |ctx| {
            let message = f(ctx);
            ctx.send(address.clone(), message);
            Ok(())
        })
    }

    /// Responds to the event with the message `f` makes, after the instance is saved.
    pub fn respond<T: Message>(
        self,
        f: impl Fn(&BehaviorContext<S, M>) -> T + Send + Sync + 'static,
    ) -> Self {
        self.then(move |ctx| {
            let message = f(ctx);
            ctx.respond(message);
            Ok(())
        })
    }

    /// Moves the instance to `state`.
    pub fn transition_to(mut self, state: State) -> Self {
        self.steps.push(Step::TransitionTo(state));
        self
    }

    /// Moves the instance to `Final` (MassTransit's `Finalize`): the machine's `finally`
    /// activities run, and with `delete_when_finalized` the instance is removed.
    pub fn finalize(mut self) -> Self {
        self.steps.push(Step::Finalize);
        self
    }

    /// Runs the activities `then` builds only when `condition` holds (MassTransit's `If`).
    pub fn when_true(
        self,
        condition: impl Fn(&BehaviorContext<S, M>) -> bool + Send + Sync + 'static,
        then: impl FnOnce(Activities<S, M>) -> Activities<S, M>,
    ) -> Self {
        self.if_else(condition, then, |b| b)
    }

    /// Runs `then`'s activities when `condition` holds and `otherwise`'s when it does not
    /// (MassTransit's `IfElse`).
    pub fn if_else(
        mut self,
        condition: impl Fn(&BehaviorContext<S, M>) -> bool + Send + Sync + 'static,
        then: impl FnOnce(Activities<S, M>) -> Activities<S, M>,
        otherwise: impl FnOnce(Activities<S, M>) -> Activities<S, M>,
    ) -> Self {
        let yes = then(Activities::new());
        let no = otherwise(Activities::new());
        self.steps.push(Step::If(Arc::new(condition), yes, no));
        self
    }

    /// Schedules the message `f` makes to arrive after the schedule's delay; the token is
    /// kept on the instance, so an earlier message of the same schedule becomes stale
    /// (MassTransit's `Schedule`).
    pub fn schedule<T: Message>(
        self,
        schedule: &Schedule<T>,
        f: impl Fn(&BehaviorContext<S, M>) -> T + Send + Sync + 'static,
    ) -> Self {
        let name = schedule.name().to_string();
        let delay = schedule.delay();
        self.then(move |ctx| {
            let message = f(ctx);
            ctx.unschedule(&name);
            ctx.schedule_message(&name, delay, message)
        })
    }

    /// Sends the request `f` makes once the instance is saved, and waits for its outcome:
    /// [`Request::completed`], [`Request::faulted`] or [`Request::timed_out`] (MassTransit's
    /// `Request(..)` activity). A request of the same kind still pending is forgotten: its
    /// outcome is ignored when it arrives.
    pub fn request<Req: Message, Resp: Message>(
        self,
        request: &Request<Req, Resp>,
        f: impl Fn(&BehaviorContext<S, M>) -> Req + Send + Sync + 'static,
    ) -> Self {
        let spec = RequestSpec {
            name: request.name.clone(),
            address: request.address.clone(),
            timeout: request.timeout,
        };
        self.then(move |ctx| {
            let message = f(ctx);
            ctx.send_request(&spec, message)
        })
    }

    /// Cancels the schedule: its message, if one is on its way, is ignored when it arrives
    /// (MassTransit's `Unschedule`).
    pub fn unschedule<T: Message>(self, schedule: &Schedule<T>) -> Self {
        let name = schedule.name().to_string();
        self.then(move |ctx| {
            ctx.unschedule(&name);
            Ok(())
        })
    }

    /// These activities followed by `more`'s.
    pub(crate) fn append(mut self, more: Activities<S, M>) -> Self {
        self.steps.extend(more.steps);
        self
    }

    /// The states these activities can move an instance to.
    pub(crate) fn targets(&self, out: &mut Vec<State>) {
        for step in &self.steps {
            match step {
                Step::TransitionTo(s) => out.push(*s),
                Step::Finalize => out.push(State::FINAL),
                Step::If(_, yes, no) => {
                    yes.targets(out);
                    no.targets(out);
                }
                Step::Then(_) | Step::Async(_) => {}
            }
        }
    }

    /// Runs the activities in order; `states` names the machine's states by index.
    pub(crate) fn run<'a>(
        &'a self,
        states: &'a [String],
        ctx: &'a mut BehaviorContext<S, M>,
    ) -> BoxFuture<'a, Result<(), ConsumeError>> {
        Box::pin(async move {
            for step in &self.steps {
                match step {
                    Step::Then(f) => f(ctx)?,
                    Step::Async(f) => f(ctx).await?,
                    Step::TransitionTo(state) => {
                        ctx.set_state(&states[state.index()], *state == State::FINAL);
                    }
                    Step::Finalize => ctx.set_state(crate::machine::FINAL, true),
                    Step::If(condition, yes, no) => {
                        if condition(ctx) {
                            yes.run(states, ctx).await?;
                        } else {
                            no.run(states, ctx).await?;
                        }
                    }
                }
            }
            Ok(())
        })
    }
}
