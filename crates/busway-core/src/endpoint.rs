//! Receive endpoints: their configuration, and the loop that takes deliveries from the
//! transport, runs them through the pipeline and settles them.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;
use tower_layer::Layer;
use tower_service::Service;

use crate::bus::BusInner;
use crate::consumer::{
    Consumer, ConsumerConfigurator, ConsumerOf, ConsumerRegistration, Dispatcher,
};
use crate::context::{ConsumeContext, EndpointInfo, ReceiveContext};
use crate::envelope::Envelope;
use crate::error::{ConsumeError, ConsumeErrorKind, Error};
use crate::fault::{ExceptionInfo, FAULT_URN, Fault, FaultDetails};
use crate::headers::names;
use crate::message::{Message, new_id};
use crate::pipeline::{
    ConsumeLayer, ConsumeService, ConsumeTracingLayer, RedeliveryLayer, Retry, RetryLayer,
    TimeoutLayer, apply_consume_layers,
};
use crate::send::{OutgoingMessage, SendTarget};
use crate::topology::{EndpointTopology, Extensions};
use crate::transport::{
    Delivery, DeliveryOptions, MoveKind, Receiver, Settlement, TransportMessage,
};
use crate::urn::Urn;

/// MassTransit's default prefetch: twice the CPU count, at least 16.
pub fn default_prefetch() -> u16 {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    u16::try_from((cpus * 2).max(16)).unwrap_or(u16::MAX)
}

/// Configures one receive endpoint: its consumers, prefetch, concurrency and pipeline.
///
/// Used by value in `BusBuilder::receive_endpoint("name", |e| e.consumer(..).prefetch(32))`.
#[derive(Debug)]
pub struct EndpointConfigurator {
    pub(crate) name: String,
    pub(crate) prefetch: Option<u16>,
    pub(crate) concurrency: Option<usize>,
    pub(crate) registrations: Vec<ConsumerRegistration>,
    pub(crate) retry: Option<Retry>,
    pub(crate) redelivery: Option<Retry>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) layers: Vec<ConsumeLayer>,
    pub(crate) attempt_layers: Vec<ConsumeLayer>,
    pub(crate) temporary: bool,
    pub(crate) bind_message_types: bool,
    pub(crate) publish_faults: Option<bool>,
    pub(crate) extensions: Extensions,
}

impl EndpointConfigurator {
    pub(crate) fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            prefetch: None,
            concurrency: None,
            registrations: Vec::new(),
            retry: None,
            redelivery: None,
            timeout: None,
            layers: Vec::new(),
            attempt_layers: Vec::new(),
            temporary: false,
            bind_message_types: true,
            publish_faults: None,
            extensions: Extensions::default(),
        }
    }

    /// The endpoint name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds a consumer of one message type; the type is inferred when `C` consumes only one.
    pub fn consumer<M, C>(mut self, consumer: C) -> Self
    where
        M: Message,
        C: Consumer<M>,
    {
        self.registrations
            .push(ConsumerRegistration::new::<M, C>(Arc::new(consumer)));
        self
    }

    /// Adds a consumer of several message types: `consumer_for::<(A, B)>(c)`.
    pub fn consumer_for<Ms>(mut self, consumer: impl ConsumerOf<Ms>) -> Self {
        self.registrations
            .extend(Arc::new(consumer).registrations());
        self
    }

    /// Adds a consumer with its own pipeline options (retry, timeout, concurrency, layers).
    pub fn consumer_with<M, C>(
        mut self,
        consumer: C,
        configure: impl FnOnce(ConsumerConfigurator) -> ConsumerConfigurator,
    ) -> Self
    where
        M: Message,
        C: Consumer<M>,
    {
        let config = configure(ConsumerConfigurator::default());
        self.registrations
            .push(ConsumerRegistration::new::<M, C>(Arc::new(consumer)).configure(&config));
        self
    }

    /// Adds a handler function: `e.handler(|ctx: ConsumeContext<Ping>| async move { .. })`.
    pub fn handler<M, F, Fut>(mut self, handler: F) -> Self
    where
        M: Message,
        F: Fn(ConsumeContext<M>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), ConsumeError>> + Send + 'static,
    {
        self.registrations
            .push(ConsumerRegistration::handler::<M, F, Fut>(handler));
        self
    }

    /// Adds a prepared registration.
    pub fn registration(mut self, registration: ConsumerRegistration) -> Self {
        self.registrations.push(registration);
        self
    }

    /// How many unacknowledged messages the broker may hand this endpoint
    /// (default `max(2 × CPUs, 16)`).
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = Some(prefetch.max(1));
        self
    }

    /// How many messages this endpoint processes at once (default: the prefetch).
    pub fn concurrency_limit(mut self, limit: usize) -> Self {
        self.concurrency = Some(limit.max(1));
        self
    }

    /// In-process retry for every consumer at the endpoint.
    pub fn retry(mut self, policy: Retry) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Delayed redelivery: after in-process retries fail, send the message back to the
    /// endpoint after each of the policy's intervals (needs transport delayed delivery).
    pub fn redelivery(mut self, policy: Retry) -> Self {
        self.redelivery = Some(policy);
        self
    }

    /// Limits each consume attempt.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Adds a `tower::Layer` around the endpoint's consume pipeline (first added is
    /// outermost; all of them run inside the bus-level layers).
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<ConsumeService> + Send + Sync + 'static,
        L::Service: Service<ReceiveContext, Response = (), Error = ConsumeError>
            + Clone
            + Send
            + Sync
            + 'static,
        <L::Service as Service<ReceiveContext>>::Future: Send + 'static,
    {
        self.layers.push(ConsumeLayer::new(layer));
        self
    }

    /// Adds a `tower::Layer` that runs once per consume attempt: inside retry and delayed
    /// redelivery, around the timeout and the consumers. Transactional layers belong here
    /// (the transactional outbox opens one database transaction per attempt, so a retry
    /// starts from a clean slate).
    pub fn attempt_layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<ConsumeService> + Send + Sync + 'static,
        L::Service: Service<ReceiveContext, Response = (), Error = ConsumeError>
            + Clone
            + Send
            + Sync
            + 'static,
        <L::Service as Service<ReceiveContext>>::Future: Send + 'static,
    {
        self.attempt_layers.push(ConsumeLayer::new(layer));
        self
    }

    /// Makes the endpoint temporary: its queue is deleted when the bus stops.
    pub fn temporary(mut self) -> Self {
        self.temporary = true;
        self
    }

    /// Whether the consumed message types are bound to the endpoint so publishes reach it
    /// (default true). With `false`, only sends to the endpoint's address arrive.
    pub fn bind_message_types(mut self, bind: bool) -> Self {
        self.bind_message_types = bind;
        self
    }

    /// Whether `Fault<T>` is published when a message faults (default true). Faults are
    /// always sent to the message's fault or response address when it has one.
    pub fn publish_faults(mut self, publish: bool) -> Self {
        self.publish_faults = Some(publish);
        self
    }

    /// Stores a transport-specific option (used by transport crates' extension traits).
    pub fn extension<T: std::any::Any + Send + Sync>(mut self, value: T) -> Self {
        self.extensions.insert(value);
        self
    }

    /// The transport-specific options.
    pub fn extensions(&self) -> &Extensions {
        &self.extensions
    }
}

/// Defaults every endpoint starts from (set on the bus builder).
#[derive(Debug, Clone)]
pub(crate) struct EndpointDefaults {
    pub(crate) prefetch: Option<u16>,
    pub(crate) concurrency: Option<usize>,
    pub(crate) retry: Option<Retry>,
    pub(crate) redelivery: Option<Retry>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) publish_faults: bool,
}

impl Default for EndpointDefaults {
    fn default() -> Self {
        Self {
            prefetch: None,
            concurrency: None,
            retry: None,
            redelivery: None,
            timeout: None,
            publish_faults: true,
        }
    }
}

/// An endpoint ready to run: its topology and its pipeline.
pub(crate) struct EndpointPlan {
    pub(crate) topology: EndpointTopology,
    pub(crate) pipeline: ConsumeService,
    pub(crate) publish_faults: bool,
}

impl EndpointConfigurator {
    pub(crate) fn into_plan(
        self,
        address: String,
        defaults: &EndpointDefaults,
        bus_layers: &[ConsumeLayer],
    ) -> EndpointPlan {
        let (prefetch, concurrency) = match (
            self.prefetch.or(defaults.prefetch),
            self.concurrency.or(defaults.concurrency),
        ) {
            (Some(p), Some(c)) => (p, c),
            (Some(p), None) => (p, usize::from(p)),
            (None, Some(c)) => (u16::try_from((c * 12 / 10).max(c)).unwrap_or(u16::MAX), c),
            (None, None) => {
                let p = default_prefetch();
                (p, usize::from(p))
            }
        };
        let mut consumers = Vec::new();
        let mut message_types: Vec<Urn> = Vec::new();
        for r in &self.registrations {
            if !consumers.contains(&r.consumer_type) {
                consumers.push(r.consumer_type.clone());
            }
            if !message_types.contains(&r.message_type) {
                message_types.push(r.message_type.clone());
            }
        }
        let mut svc: ConsumeService = BoxCloneSyncService::new(Dispatcher::new(self.registrations));
        if let Some(t) = self.timeout.or(defaults.timeout) {
            svc = BoxCloneSyncService::new(TimeoutLayer::new(t).layer(svc));
        }
        svc = apply_consume_layers(&self.attempt_layers, svc);
        if let Some(r) = self.retry.or_else(|| defaults.retry.clone()) {
            svc = BoxCloneSyncService::new(RetryLayer::new(r).layer(svc));
        }
        if let Some(r) = self.redelivery.or_else(|| defaults.redelivery.clone()) {
            svc = BoxCloneSyncService::new(RedeliveryLayer::new(r).layer(svc));
        }
        svc = apply_consume_layers(&self.layers, svc);
        svc = apply_consume_layers(bus_layers, svc);
        svc = BoxCloneSyncService::new(ConsumeTracingLayer.layer(svc));
        EndpointPlan {
            topology: EndpointTopology {
                name: self.name,
                address,
                message_types,
                prefetch,
                concurrency,
                temporary: self.temporary,
                bind_message_types: self.bind_message_types,
                consumers,
                extensions: self.extensions,
            },
            pipeline: svc,
            publish_faults: self.publish_faults.unwrap_or(defaults.publish_faults),
        }
    }

    pub(crate) fn has_redelivery(&self, defaults: &EndpointDefaults) -> bool {
        self.redelivery.is_some() || defaults.redelivery.is_some()
    }
}

/// Shared state of a running endpoint.
pub(crate) struct EndpointRuntime {
    pub(crate) bus: Arc<BusInner>,
    pub(crate) info: Arc<EndpointInfo>,
    pub(crate) pipeline: ConsumeService,
    pub(crate) publish_faults: bool,
    /// Deliveries handed back (consumer said "cancelled") since the last one handled; sets
    /// how long the next hand-back waits.
    pub(crate) hand_backs: std::sync::atomic::AtomicU32,
    /// Fires when the endpoint stops taking deliveries (graceful shutdown): deliveries that
    /// are only waiting (a held move, a hand-back delay) go back to the broker then instead
    /// of holding the shutdown until its deadline.
    pub(crate) stopping: CancellationToken,
}

/// How long a failed move to `_error` / `_skipped` waits before its `attempt`-th retry:
/// 100 ms doubling to 30 s. The delivery is held meanwhile (not redelivered), so the
/// consumers do not run again and the fault is not published again.
pub(crate) fn move_backoff(attempt: u32) -> Duration {
    backoff(attempt, Duration::from_millis(100), Duration::from_secs(30))
}

/// How long a delivery the consumer handed back ("cancelled" while the bus is not stopping)
/// waits before it returns to the broker: 50 ms doubling to 5 s over consecutive hand-backs
/// at the endpoint. Requeuing at once would redeliver it at once, a hot loop.
pub(crate) fn hand_back_delay(consecutive: u32) -> Duration {
    backoff(
        consecutive,
        Duration::from_millis(50),
        Duration::from_secs(5),
    )
}

fn backoff(attempt: u32, first: Duration, max: Duration) -> Duration {
    crate::transport::Backoff::delay_for(attempt, first, max)
}

/// Takes deliveries until `stop`, processing up to `concurrency` at once; then stops the
/// receiver and waits for in-flight deliveries (which `hard` cancels and requeues).
pub(crate) async fn run_endpoint(
    runtime: Arc<EndpointRuntime>,
    mut receiver: Box<dyn Receiver>,
    concurrency: usize,
    stop: CancellationToken,
    hard: CancellationToken,
) {
    // Each delivery holds one permit until it is settled; waiting for every permit back is
    // waiting for every delivery (a panicking delivery drops its permit while unwinding).
    let concurrency = concurrency.max(1);
    let permits = Arc::new(Semaphore::new(concurrency));
    let workers = Workers::new(runtime.clone(), hard.clone(), concurrency);
    // Receive failures: 50 ms doubling to 2 s.
    let mut failures =
        crate::transport::Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    loop {
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let next = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            d = receiver.next() => d,
        };
        match next {
            None => break,
            Some(Err(err)) => {
                tracing::warn!(endpoint = %runtime.info.name, error = %err, failures = failures.failures() + 1, "receive failed");
                drop(permit);
                if !failures.wait(&stop).await {
                    break;
                }
            }
            Some(Ok(delivery)) => {
                failures.reset();
                workers.hand_over(delivery, permit);
            }
        }
    }
    workers.close();
    if let Err(err) = receiver.stop().await {
        tracing::warn!(endpoint = %runtime.info.name, error = %err, "stopping the receiver failed");
    }
    let all = u32::try_from(concurrency).unwrap_or(u32::MAX);
    if permits.acquire_many(all).await.is_err() {
        tracing::error!(endpoint = %runtime.info.name, "the delivery permits were closed; not waiting for in-flight deliveries");
    }
    if let Err(err) = receiver.close().await {
        tracing::debug!(endpoint = %runtime.info.name, error = %err, "closing the receiver failed");
    }
    tracing::debug!(endpoint = %runtime.info.name, "endpoint stopped");
}

/// The tasks that process an endpoint's deliveries: started as they are needed, up to the
/// endpoint's concurrency, and kept for the endpoint's life. A delivery is handed to an idle
/// worker, or to a new one when none is idle; a task per delivery would cost an allocation
/// (and, with glibc, a contended arena lock) each time.
struct Workers {
    shared: Arc<WorkQueue>,
    runtime: Arc<EndpointRuntime>,
    hard: CancellationToken,
    started: std::cell::Cell<usize>,
    max: usize,
}

struct WorkQueue {
    queue: std::sync::Mutex<WorkState>,
    ready: tokio::sync::Notify,
}

struct WorkState {
    items: std::collections::VecDeque<(Delivery, OwnedSemaphorePermit)>,
    /// Workers waiting for an item and not yet promised one.
    idle: usize,
    closed: bool,
}

impl Workers {
    fn new(runtime: Arc<EndpointRuntime>, hard: CancellationToken, max: usize) -> Self {
        Self {
            shared: Arc::new(WorkQueue {
                queue: std::sync::Mutex::new(WorkState {
                    items: std::collections::VecDeque::new(),
                    idle: 0,
                    closed: false,
                }),
                ready: tokio::sync::Notify::new(),
            }),
            runtime,
            hard,
            started: std::cell::Cell::new(0),
            max,
        }
    }

    /// Queues a delivery for an idle worker; starts a worker when none is idle.
    fn hand_over(&self, delivery: Delivery, permit: OwnedSemaphorePermit) {
        let claimed = {
            let mut state = self.shared.lock();
            state.items.push_back((delivery, permit));
            if state.idle > 0 {
                state.idle -= 1;
                true
            } else {
                false
            }
        };
        if claimed {
            self.shared.ready.notify_one();
        } else if self.started.get() < self.max {
            self.started.set(self.started.get() + 1);
            tokio::spawn(worker(
                self.shared.clone(),
                self.runtime.clone(),
                self.hard.clone(),
            ));
        } else {
            // Every worker is busy: the one that finishes first takes it.
            self.shared.ready.notify_one();
        }
    }

    /// Lets the workers end once the queue is empty.
    fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_waiters();
    }
}

impl WorkQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, WorkState> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

async fn worker(queue: Arc<WorkQueue>, rt: Arc<EndpointRuntime>, hard: CancellationToken) {
    loop {
        let item = loop {
            let notified = queue.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = queue.lock();
                if let Some(item) = state.items.pop_front() {
                    break Some(item);
                }
                if state.closed {
                    break None;
                }
            }
            notified.await;
        };
        let Some((delivery, permit)) = item else {
            return;
        };
        let outcome = AssertUnwindSafe(handle_delivery(rt.clone(), delivery, hard.child_token()))
            .catch_unwind()
            .await;
        drop(permit);
        if outcome.is_err() {
            tracing::error!(endpoint = %rt.info.name, "a delivery panicked outside the consume pipeline");
        }
        queue.lock().idle += 1;
        // Let other tasks on this thread run between deliveries.
        tokio::task::consume_budget().await;
    }
}

async fn handle_delivery(rt: Arc<EndpointRuntime>, delivery: Delivery, cancel: CancellationToken) {
    let Delivery {
        message,
        redelivered,
        delivery_count,
        lost,
        settlement,
    } = delivery;
    // A transport that can lose a delivery (a Service Bus lock) says so through `lost`: the
    // consumer's cancellation fires. The watcher ends with the delivery.
    let _watch = lost.map(|lost| {
        let done = CancellationToken::new();
        let (cancel, until) = (cancel.clone(), done.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = lost.cancelled() => cancel.cancel(),
                _ = until.cancelled() => {}
            }
        });
        done.drop_guard()
    });
    let received = match rt.bus.serializers.deserialize(&message) {
        Ok(received) => received,
        Err(err) => {
            let details = FaultDetails::unreadable(&err, &rt.info.address);
            tracing::error!(endpoint = %rt.info.name, error = %err, "could not read a message; moving it to the error queue");
            // Rare paths are boxed so they do not enlarge every delivery's task.
            Box::pin(move_message(
                &rt,
                settlement,
                MoveKind::Error,
                message,
                &details.message,
                |h| details.write_headers(h),
                &cancel,
            ))
            .await;
            return;
        }
    };
    let rc = ReceiveContext::new(
        rt.bus.clone(),
        rt.info.clone(),
        message,
        received,
        redelivered,
        delivery_count,
        settlement,
        cancel.clone(),
    );
    let fut = AssertUnwindSafe(rt.pipeline.clone().oneshot(rc.clone())).catch_unwind();
    let outcome = tokio::select! {
        r = fut => Some(r),
        _ = cancel.cancelled() => None,
    };
    let Some(settlement) = rc.take_settlement() else {
        // A layer settled the delivery itself (delayed redelivery).
        return;
    };
    let result = match outcome {
        None => {
            tracing::info!(endpoint = %rt.info.name, message_id = ?rc.message_id(), "the delivery was cancelled (shutdown deadline, or its lock was lost); returning the message to the queue");
            settle(&rt, settlement.requeue().await, "requeue");
            return;
        }
        Some(Err(panic)) => Err(ConsumeError::kind_msg(
            ConsumeErrorKind::Panic,
            "panic",
            format!("the consume pipeline panicked: {}", panic_text(panic)),
        )),
        Some(Ok(result)) => result,
    };
    match result {
        Ok(()) => {
            if rt.hand_backs.load(std::sync::atomic::Ordering::Relaxed) != 0 {
                rt.hand_backs.store(0, std::sync::atomic::Ordering::Relaxed);
            }
            settle(&rt, settlement.ack().await, "ack");
        }
        Err(err) if err.kind() == ConsumeErrorKind::NoConsumer => {
            tracing::warn!(endpoint = %rt.info.name, message_id = ?rc.message_id(), error = %err, "moving the message to the skipped queue");
            let message = rc.transport_message().clone();
            Box::pin(move_message(
                &rt,
                settlement,
                MoveKind::Skipped,
                message,
                &err.to_string(),
                |h| {
                    h.insert(names::REASON, "dead-letter");
                },
                &cancel,
            ))
            .await;
        }
        Err(err) if err.kind() == ConsumeErrorKind::Cancelled => {
            if !cancel.is_cancelled() && !rt.stopping.is_cancelled() {
                // Handed back by the consumer while the bus runs: wait before the broker
                // has it again, longer the more hand-backs in a row.
                let n = rt
                    .hand_backs
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    .saturating_add(1);
                let delay = hand_back_delay(n);
                tracing::debug!(endpoint = %rt.info.name, message_id = ?rc.message_id(), ?delay, "the consumer handed the message back; requeuing it after a delay");
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = rt.stopping.cancelled() => {}
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            settle(&rt, settlement.requeue().await, "requeue");
        }
        Err(err) => Box::pin(fault(&rt, &rc, settlement, err, &cancel)).await,
    }
}

fn settle(rt: &EndpointRuntime, result: crate::error::Result<()>, what: &str) {
    if let Err(err) = result {
        tracing::warn!(endpoint = %rt.info.name, error = %err, "{what} failed; the broker will redeliver the message");
    }
}

fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-text panic payload".to_string())
}

/// Readies a copy for `_error` / `_skipped`: the reason headers, the host headers, no time
/// to live, and the observers told.
pub(crate) fn prepare_move(
    bus: &BusInner,
    endpoint: &str,
    kind: MoveKind,
    message: &mut TransportMessage,
    reason: &str,
    add_headers: impl FnOnce(&mut crate::headers::Headers),
) {
    add_headers(&mut message.headers);
    bus.host.write_headers(&mut message.headers);
    message.time_to_live = None;
    bus.observers.on_move(endpoint, kind, message, reason);
}

/// Moves a message to the endpoint's error or skipped queue. A failed move is tried again
/// with [`move_backoff`] while the delivery is held, until it succeeds or the endpoint stops
/// (or `cancel`, the shutdown deadline, fires), which returns the message to the broker.
async fn move_message(
    rt: &EndpointRuntime,
    mut settlement: Box<dyn Settlement>,
    kind: MoveKind,
    mut message: TransportMessage,
    reason: &str,
    add_headers: impl FnOnce(&mut crate::headers::Headers),
    cancel: &CancellationToken,
) {
    prepare_move(
        &rt.bus,
        &rt.info.name,
        kind,
        &mut message,
        reason,
        add_headers,
    );
    let mut failures = 0u32;
    loop {
        let err = match settlement.move_to(kind, message.clone()).await {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(endpoint = %rt.info.name, queue = %kind.queue_name(&rt.info.name), failures, "moved the message after failed tries");
                }
                return;
            }
            Err(err) => err,
        };
        failures = failures.saturating_add(1);
        let Some(held) = err.settlement else {
            tracing::error!(
                endpoint = %rt.info.name,
                queue = %kind.queue_name(&rt.info.name),
                error = %err.error,
                "could not move the message; it stays on the queue and will be redelivered"
            );
            return;
        };
        let backoff = move_backoff(failures);
        if failures == 1 || failures.is_multiple_of(10) {
            tracing::error!(
                endpoint = %rt.info.name,
                queue = %kind.queue_name(&rt.info.name),
                failures,
                ?backoff,
                error = %err.error,
                "could not move the message; holding it and trying again"
            );
        }
        tokio::select! {
            _ = async { tokio::select! { _ = cancel.cancelled() => {}, _ = rt.stopping.cancelled() => {} } } => {
                tracing::warn!(endpoint = %rt.info.name, failures, "the endpoint is stopping while a move keeps failing; returning the message to the queue");
                settle(rt, held.requeue().await, "requeue");
                return;
            }
            _ = tokio::time::sleep(backoff) => {}
        }
        settlement = held;
    }
}

async fn fault(
    rt: &EndpointRuntime,
    rc: &ReceiveContext,
    settlement: Box<dyn Settlement>,
    err: ConsumeError,
    cancel: &CancellationToken,
) {
    let source = rc.fault_source();
    let details = FaultDetails {
        exception_type: err.type_name().to_string(),
        message: err.to_string(),
        stack_trace: err.chain_text(),
        input_address: rt.info.address.clone(),
        consumer_type: source.as_ref().map(|(c, _)| c.clone()),
        message_type: source.as_ref().map(|(_, m)| m.as_str().to_string()),
        retry_count: rc.retry_attempt(),
        redelivery_count: rc.redelivery_count(),
        timestamp: Utc::now(),
    };
    tracing::error!(
        endpoint = %rt.info.name,
        message_id = ?rc.message_id(),
        retries = details.retry_count,
        redeliveries = details.redelivery_count,
        error = %err,
        "consume faulted; moving the message to the error queue"
    );
    if let Err(publish_err) = send_fault(rt, rc, &err, &details).await {
        tracing::warn!(endpoint = %rt.info.name, error = %publish_err, "could not publish the fault event");
    }
    let message = rc.transport_message().clone();
    move_message(
        rt,
        settlement,
        MoveKind::Error,
        message,
        &details.message,
        |h| details.write_headers(h),
        cancel,
    )
    .await;
}

async fn send_fault(
    rt: &EndpointRuntime,
    rc: &ReceiveContext,
    err: &ConsumeError,
    details: &FaultDetails,
) -> crate::error::Result<()> {
    let env = rc.envelope();
    let target = match env
        .fault_address
        .as_deref()
        .or(env.response_address.as_deref())
    {
        Some(address) => SendTarget::Send(crate::address::Address::parse(address)?),
        None if rt.publish_faults => SendTarget::Publish,
        None => return Ok(()),
    };
    let now = Utc::now();
    let fault = Fault {
        fault_id: new_id(),
        faulted_message_id: env.message_id,
        timestamp: now,
        exceptions: vec![ExceptionInfo::from_consume_error(err)],
        host: Some((*rt.bus.host).clone()),
        fault_message_types: env.message_type.clone(),
        message: rc.message_json(),
    };
    let body = serde_json::value::to_raw_value(&fault).map_err(|e| {
        Error::with_source(
            crate::error::ErrorKind::Serialize,
            "could not write the fault",
            e,
        )
    })?;
    let mut message_type: Vec<Urn> = env.message_type.iter().map(Urn::fault).collect();
    message_type.push(FAULT_URN);
    let mut headers = crate::headers::Headers::new();
    if details.retry_count > 0 {
        headers.insert(names::FAULT_RETRY_COUNT, details.retry_count);
    }
    if details.redelivery_count > 0 {
        headers.insert(names::FAULT_REDELIVERY_COUNT, details.redelivery_count);
    }
    let destination_address = match &target {
        SendTarget::Publish => message_type
            .first()
            .map(|u| rt.bus.transport.publish_address(u)),
        SendTarget::Send(a) => Some(a.as_str().to_string()),
    };
    let envelope = Envelope {
        message_id: Some(new_id()),
        request_id: env.request_id,
        correlation_id: env.correlation_id,
        conversation_id: env.conversation_id,
        initiator_id: env.message_id,
        source_address: Some(rt.info.address.clone()),
        destination_address,
        response_address: None,
        fault_address: None,
        message_type,
        expiration_time: None,
        sent_time: Some(now),
        headers,
        host: Some(rt.bus.host.clone()),
    };
    rt.bus
        .dispatch(OutgoingMessage {
            envelope,
            message: body,
            target,
            delivery: DeliveryOptions::default(),
            time_to_live: None,
            partition_key: None,
            serializer: None,
            trace_parent: Some(rc.trace_context()),
        })
        .await
}
