//! Running a machine for one event: find the instance, run the behavior, save with a version
//! check, then send what the behavior produced.

use std::any::Any;
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use busway_core::headers::names::SCHEDULING_TOKEN_ID;
use busway_core::{
    ConsumeContext, ConsumeError, ConsumeErrorKind, ConsumerRegistration, Message, ReceiveContext,
};
use futures_util::future::BoxFuture;
use tokio::sync::OwnedMutexGuard;
use tracing::Instrument;
use uuid::Uuid;

use crate::activities::{Activities, BehaviorContext, Progress};
use crate::instance::{Instance, SagaState};
use crate::machine::{Correlation, FINAL, MissingInstance, TypedEvent, timeout_schedule};
use crate::repository::{Query, SagaError, SagaErrorKind, SagaRepository};

/// How many times an event is run again on a fresh load after a version conflict before it
/// faults (and goes to the endpoint's retry policy).
const CONFLICT_RETRIES: u32 = 16;

/// A repository behind a pointer: the machine's runtime is not generic over it.
pub(crate) trait DynRepository<S>: Send + Sync {
    fn load<'a>(
        &'a self,
        cx: &'a ReceiveContext,
        id: Uuid,
    ) -> BoxFuture<'a, Result<Option<Instance<S>>, SagaError>>;
    fn supports_queries(&self) -> bool;
    fn find<'a>(
        &'a self,
        cx: &'a ReceiveContext,
        query: &'a Query,
    ) -> BoxFuture<'a, Result<Option<Instance<S>>, SagaError>>;
    fn insert<'a>(
        &'a self,
        cx: &'a ReceiveContext,
        instance: &'a Instance<S>,
    ) -> BoxFuture<'a, Result<(), SagaError>>;
    fn update<'a>(
        &'a self,
        cx: &'a ReceiveContext,
        instance: &'a Instance<S>,
        expected: i64,
    ) -> BoxFuture<'a, Result<(), SagaError>>;
    fn delete<'a>(
        &'a self,
        cx: &'a ReceiveContext,
        id: Uuid,
        expected: i64,
    ) -> BoxFuture<'a, Result<(), SagaError>>;
}

impl<S: SagaState, R: SagaRepository<S>> DynRepository<S> for R {
    fn load<'a>(
        &'a self,
        cx: &'a ReceiveContext,
        id: Uuid,
    ) -> BoxFuture<'a, Result<Option<Instance<S>>, SagaError>> {
        Box::pin(SagaRepository::load(self, cx, id))
    }
    fn supports_queries(&self) -> bool {
        SagaRepository::supports_queries(self)
    }
    fn find<'a>(
        &'a self,
        cx: &'a ReceiveContext,
        query: &'a Query,
    ) -> BoxFuture<'a, Result<Option<Instance<S>>, SagaError>> {
        Box::pin(SagaRepository::find(self, cx, query))
    }
    fn insert<'a>(
        &'a self,
        cx: &'a ReceiveContext,
        instance: &'a Instance<S>,
    ) -> BoxFuture<'a, Result<(), SagaError>> {
        Box::pin(SagaRepository::insert(self, cx, instance))
    }
    fn update<'a>(
        &'a self,
        cx: &'a ReceiveContext,
        instance: &'a Instance<S>,
        expected: i64,
    ) -> BoxFuture<'a, Result<(), SagaError>> {
        Box::pin(SagaRepository::update(self, cx, instance, expected))
    }
    fn delete<'a>(
        &'a self,
        cx: &'a ReceiveContext,
        id: Uuid,
        expected: i64,
    ) -> BoxFuture<'a, Result<(), SagaError>> {
        Box::pin(SagaRepository::delete(self, cx, id, expected))
    }
}

/// One lock per key in use: the events of one instance are handled one at a time at an
/// endpoint, those of different instances side by side.
#[derive(Default)]
pub(crate) struct KeyedLocks {
    locks: Arc<Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>>,
}

pub(crate) struct KeyGuard {
    key: u64,
    locks: Arc<Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    pub(crate) async fn lock(&self, key: &impl Hash) -> KeyGuard {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        let key = hasher.finish();
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(key).or_default().clone()
        };
        KeyGuard {
            key,
            locks: self.locks.clone(),
            guard: Some(lock.lock_owned().await),
        }
    }
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        // Only the map holds it now: no one waits for this key.
        if locks
            .get(&self.key)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            locks.remove(&self.key);
        }
    }
}

pub(crate) struct Composite<S> {
    pub(crate) name: String,
    pub(crate) all: u64,
    pub(crate) event: TypedEvent<S, ()>,
}

/// A machine ready to run: what the definition left, the repository and the locks.
pub(crate) struct Runtime<S> {
    pub(crate) name: String,
    pub(crate) states: Vec<String>,
    pub(crate) composites: Vec<Composite<S>>,
    /// For each event index, the composites it is part of and its bit in each.
    pub(crate) composites_of: HashMap<usize, Vec<(usize, u64)>>,
    pub(crate) finally: Activities<S, ()>,
    pub(crate) delete_when_finalized: bool,
    pub(crate) repository: Arc<dyn DynRepository<S>>,
    pub(crate) locks: KeyedLocks,
}

/// The registration that runs the machine for the event at `index` (of message type `M`).
pub(crate) fn registration<S: SagaState, M: Message>(
    typed: Box<dyn Any + Send + Sync>,
    index: usize,
    runtime: Arc<Runtime<S>>,
) -> ConsumerRegistration {
    let event: Arc<TypedEvent<S, M>> = match typed.downcast::<TypedEvent<S, M>>() {
        Ok(typed) => Arc::new(*typed),
        // The slot was made for `M` by `StateMachine::event`; nothing else builds one.
        Err(_) => unreachable!("a saga event slot holds the event of its own message type"),
    };
    ConsumerRegistration::handler::<M, _, _>(move |ctx: ConsumeContext<M>| {
        let runtime = runtime.clone();
        let event = event.clone();
        async move { runtime.handle(index, &event, ctx).await }
    })
}

enum Key {
    Id(Uuid),
    Query(Query),
}

fn saga_error(name: &'static str, e: SagaError) -> ConsumeError {
    ConsumeError::with_kind(ConsumeErrorKind::Consumer, name, e)
}

/// A fault of the machine itself (not of the repository): `name` is its exception type.
fn text_error(name: &'static str, message: String) -> ConsumeError {
    ConsumeError::with_kind(ConsumeErrorKind::Consumer, name, message)
}

impl<S: SagaState> Runtime<S> {
    async fn handle<M: Message>(
        &self,
        index: usize,
        event: &TypedEvent<S, M>,
        ctx: ConsumeContext<M>,
    ) -> Result<(), ConsumeError> {
        let key = match &event.correlation {
            Correlation::ById(f) => match f(&ctx) {
                Some(id) => Key::Id(id),
                // A response or fault of the same type sent to someone else's request.
                None if event.request.is_some() => {
                    tracing::debug!(
                        "a {} without a request id is not an outcome of `{}`'s requests",
                        M::message_type(),
                        self.name
                    );
                    return Ok(());
                }
                None => {
                    return Err(text_error(
                        "busway::saga::NoCorrelationId",
                        format!(
                            "the {} message carries no correlation id for state machine `{}`",
                            M::message_type(),
                            self.name
                        ),
                    ));
                }
            },
            Correlation::ByQuery(f) => Key::Query(f(ctx.message())),
            Correlation::Unset => {
                return Err(text_error(
                    "busway::saga::NoCorrelation",
                    format!("the {} event has no correlation", M::message_type()),
                ));
            }
        };
        let _guard = match &key {
            Key::Id(id) => self.locks.lock(id).await,
            Key::Query(q) => self.locks.lock(&q.partition_key()).await,
        };
        let ctx = Arc::new(ctx);
        let span = tracing::info_span!(
            "saga",
            saga.machine = %self.name,
            saga.event = %M::message_type(),
            saga.correlation_id = tracing::field::Empty,
            saga.state_before = tracing::field::Empty,
            saga.state_after = tracing::field::Empty,
        );
        let mut conflicts = 0;
        loop {
            match self
                .attempt(index, event, &ctx, &key)
                .instrument(span.clone())
                .await
            {
                Err(Failure::Conflict(e)) if conflicts < CONFLICT_RETRIES => {
                    conflicts += 1;
                    tracing::debug!(parent: &span, conflicts, "saga version conflict: {e}");
                    let jitter = fastrand::u64(0..(1u64 << conflicts.min(6)));
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                }
                Err(Failure::Conflict(e)) => {
                    return Err(saga_error("busway::saga::ConcurrencyConflict", e));
                }
                Err(Failure::Consume(e)) => return Err(e),
                Ok(()) => return Ok(()),
            }
        }
    }

    async fn attempt<M: Message>(
        &self,
        index: usize,
        event: &TypedEvent<S, M>,
        ctx: &Arc<ConsumeContext<M>>,
        key: &Key,
    ) -> Result<(), Failure> {
        let cx = ctx.receive_context();
        let repo = &self.repository;
        let loaded = match key {
            Key::Id(id) => repo.load(cx, *id).await,
            Key::Query(q) if repo.supports_queries() => repo.find(cx, q).await,
            Key::Query(_) => Err(SagaError::storage(
                "this saga repository cannot correlate by query (by id only)",
            )),
        }
        .map_err(Failure::from_repository)?;
        let (instance, new) = match loaded {
            Some(instance) => (instance, false),
            None if event.by_state.contains_key(&0) => {
                let id = match key {
                    Key::Id(id) => *id,
                    Key::Query(_) => match &event.new_id {
                        Some(f) => f(ctx.message()),
                        None => busway_core::message::new_id(),
                    },
                };
                (Instance::new(id), true)
            }
            None => {
                return self
                    .missing(event, ctx, key)
                    .await
                    .map_err(Failure::Consume);
            }
        };
        let span = tracing::Span::current();
        span.record(
            "saga.correlation_id",
            tracing::field::display(instance.correlation_id),
        );
        span.record("saga.state_before", instance.current_state.as_str());
        let Some(state) = self
            .states
            .iter()
            .position(|s| *s == instance.current_state)
        else {
            return Err(Failure::Consume(text_error(
                "busway::saga::UnknownState",
                format!(
                    "the saga instance {} is in `{}`, which is not a state of `{}`",
                    instance.correlation_id, instance.current_state, self.name
                ),
            )));
        };
        let Instance {
            correlation_id,
            current_state,
            version,
            mut meta,
            data,
        } = instance;
        if let Some(schedule) = &event.schedule {
            let token = ctx
                .headers()
                .get_str(SCHEDULING_TOKEN_ID)
                .and_then(|t| t.parse::<Uuid>().ok());
            if let Some(token) = token {
                if meta.schedules.get(schedule) != Some(&token) {
                    tracing::debug!(%token, schedule, "stale scheduled message ignored");
                    return Ok(());
                }
                meta.schedules.remove(schedule);
            }
        }
        let mut progress = Progress::start(data, current_state, meta);
        if let Some(request) = &event.request {
            if progress.meta.requests.remove(&request.name).is_none() {
                tracing::debug!(
                    request = %request.name,
                    "an outcome of a request that is no longer pending is ignored"
                );
                return Ok(());
            }
            if request.cancels_timeout {
                let timeout = timeout_schedule(&request.name);
                progress.pending.extend(crate::activities::unschedule(
                    ctx,
                    &mut progress.meta,
                    &timeout,
                ));
            }
        }
        if event.ignored.contains(&state) {
            return Ok(());
        }
        let own = event.by_state.get(&state);
        let any = if state > 1 { event.any.as_ref() } else { None };
        if own.is_none() && any.is_none() {
            return Err(Failure::Consume(text_error(
                "busway::saga::UnhandledEvent",
                format!(
                    "the {} event is not handled during the {} state for the `{}` state machine",
                    M::message_type(),
                    progress.state,
                    self.name
                ),
            )));
        }
        let progress = self
            .behave(
                own.into_iter().chain(any),
                progress,
                correlation_id,
                ctx.clone(),
            )
            .await
            .map_err(Failure::Consume)?;
        let Progress {
            saga,
            state,
            meta,
            finalized,
            pending,
        } = self
            .after_event(index, ctx, correlation_id, progress)
            .await
            .map_err(Failure::Consume)?;
        span.record("saga.state_after", state.as_str());
        let mut instance = Instance {
            correlation_id,
            current_state: state,
            version,
            meta,
            data: saga,
        };
        let saved = if finalized && self.delete_when_finalized {
            if new {
                Ok(())
            } else {
                repo.delete(cx, correlation_id, version).await
            }
        } else if new {
            instance.version = 1;
            repo.insert(cx, &instance).await
        } else {
            instance.version = version + 1;
            repo.update(cx, &instance, version).await
        };
        saved.map_err(Failure::from_repository)?;
        for send in pending {
            send().await.map_err(Failure::Consume)?;
        }
        Ok(())
    }

    /// Runs `behaviors` in order on a context that goes on from `progress`.
    async fn behave<'a, M: Send + Sync + 'static>(
        &'a self,
        behaviors: impl Iterator<Item = &'a Activities<S, M>>,
        progress: Progress<S>,
        correlation_id: Uuid,
        consume: Arc<ConsumeContext<M>>,
    ) -> Result<Progress<S>, ConsumeError> {
        let mut bctx = BehaviorContext::resume(progress, correlation_id, consume);
        for activities in behaviors {
            activities.run(&self.states, &mut bctx).await?;
        }
        Ok(bctx.into_progress())
    }

    /// Composite events the event completed, then `finally` if the instance became final.
    async fn after_event<M: Message>(
        &self,
        index: usize,
        ctx: &Arc<ConsumeContext<M>>,
        correlation_id: Uuid,
        mut progress: Progress<S>,
    ) -> Result<Progress<S>, ConsumeError> {
        let unit = || Arc::new(ctx.with_message(()));
        for &(at, bit) in self.composites_of.get(&index).into_iter().flatten() {
            let composite = &self.composites[at];
            let seen = progress
                .meta
                .composite
                .entry(composite.name.clone())
                .or_insert(0);
            if *seen == composite.all {
                continue;
            }
            *seen |= bit;
            if *seen != composite.all {
                continue;
            }
            let Some(state) = self.states.iter().position(|s| *s == progress.state) else {
                continue;
            };
            if composite.event.ignored.contains(&state) {
                continue;
            }
            let own = composite.event.by_state.get(&state);
            let any = if state > 1 {
                composite.event.any.as_ref()
            } else {
                None
            };
            progress = self
                .behave(own.into_iter().chain(any), progress, correlation_id, unit())
                .await?;
        }
        if progress.finalized && !self.finally.steps.is_empty() {
            progress = self
                .behave(
                    std::iter::once(&self.finally),
                    progress,
                    correlation_id,
                    unit(),
                )
                .await?;
            // `finally` cannot leave `Final`: the instance is done.
            progress.state = FINAL.to_string();
            progress.finalized = true;
        }
        Ok(progress)
    }

    async fn missing<M: Message>(
        &self,
        event: &TypedEvent<S, M>,
        ctx: &Arc<ConsumeContext<M>>,
        key: &Key,
    ) -> Result<(), ConsumeError> {
        let what = match key {
            Key::Id(id) => format!("no `{}` instance {id}", self.name),
            Key::Query(q) => format!("no `{}` instance matches {}", self.name, q.partition_key()),
        };
        let fault = || {
            text_error(
                "busway::saga::MissingInstance",
                format!("{what} for the {} event", M::message_type()),
            )
        };
        match &event.missing {
            MissingInstance::Discard => {
                tracing::warn!("{what}: the {} event is discarded", M::message_type());
                Ok(())
            }
            MissingInstance::Fault => Err(fault()),
            MissingInstance::Execute(f) => f(ctx).await,
            MissingInstance::Redeliver { attempts, delay } => {
                if ctx.redelivery_count() >= *attempts {
                    return Err(fault());
                }
                ctx.receive_context()
                    .redeliver(*delay)
                    .await
                    .map_err(ConsumeError::new)
            }
        }
    }
}

enum Failure {
    Conflict(SagaError),
    Consume(ConsumeError),
}

impl Failure {
    fn from_repository(e: SagaError) -> Self {
        match e.kind() {
            SagaErrorKind::Conflict => Failure::Conflict(e),
            SagaErrorKind::Corrupt => {
                Failure::Consume(saga_error("busway::saga::CorruptInstance", e))
            }
            _ => Failure::Consume(saga_error("busway::saga::RepositoryError", e)),
        }
    }
}
