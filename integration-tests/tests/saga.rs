//! Saga state machines on the in-memory transport: definitions that cannot work, endpoint
//! naming, correlation, missing-instance policies, composite events, requests to a saga,
//! concurrency across buses and repository failures. The transport-neutral saga tests run in
//! every transport's conformance suite (`conformance::sagas`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use busway::prelude::*;
use busway::saga::testing::{expect_exists, expect_finalized, expect_state};
use busway::saga::{
    BusBuilderSagaExt, EndpointSagaExt, InMemorySagaRepository, Instance, MissingInstance, Query,
    SagaError, SagaRepository, StateMachine,
};
use busway::{ReceiveContext, TransportMessage, headers::names};
use busway_integration_tests::saga_worker::{TickState, competing_ticks};
use busway_integration_tests::support::{Counter, Recorder, init_tracing, take_from, wait_until};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(10);

macro_rules! contracts {
    ($($name:ident),* $(,)?) => {$(
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, busway::Message)]
        #[serde(rename_all = "camelCase")]
        struct $name {
            order_id: Uuid,
            n: u32,
        }
    )*};
}

contracts!(
    Placed,
    Paid,
    Shipped,
    Cancelled,
    Late,
    Counted,
    CountedAck,
    Lookup,
    NoCorrelation,
    Orphan,
    Status
);

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OrderState {
    order_number: String,
    n: u32,
    log: Vec<String>,
}

/// `CorrelatedBy<Guid>`: the contract's own correlation id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, busway::Message)]
#[serde(rename_all = "camelCase")]
struct OrderOpened {
    #[message(correlation_id)]
    correlation_id: Uuid,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, busway::Message)]
#[serde(rename_all = "camelCase")]
struct StatusReply {
    state: String,
    n: u32,
}

fn log<M: Send + Sync + 'static>(
    what: &'static str,
) -> impl Fn(&mut busway::saga::BehaviorContext<OrderState, M>) -> Result<(), ConsumeError>
+ Send
+ Sync
+ 'static {
    move |ctx| {
        ctx.saga.log.push(what.to_string());
        Ok(())
    }
}

async fn bus_with(builder: busway::BusBuilder) -> (Bus, busway::RunningBus, InMemory) {
    let transport = InMemory::new();
    let bus = builder
        .transport(transport.clone())
        .build()
        .await
        .expect("the bus builds");
    let running = bus.start().await.expect("start");
    (bus, running, transport)
}

#[tokio::test]
async fn definitions_that_cannot_work_fail_bus_build_with_each_problem() {
    let mut m = StateMachine::<OrderState>::new("BrokenStateMachine");
    let _orphan_state = m.state("Nowhere");
    let _uncorrelated = m.event::<NoCorrelation>("NoCorrelation", |e| e);
    let _unhandled = m.event::<Orphan>("Orphan", |e| e.correlate_by(|m| m.order_id));
    let placed = m.event::<Placed>("Placed", |e| e.correlate_by(|m| m.order_id));
    let _again = m.event::<Placed>("PlacedAgain", |e| e.correlate_by(|m| m.order_id));
    m.during(busway::saga::State::FINAL).when(placed, |b| b);
    let err = Bus::builder()
        .transport(InMemory::new())
        .state_machine(m, InMemorySagaRepository::new())
        .build()
        .await
        .expect_err("a broken machine does not build");
    let text = err.to_string();
    for problem in [
        "state machine `BrokenStateMachine`",
        "the event `NoCorrelation` has no correlation",
        "the event `Orphan` is handled in no state",
        "the state `Nowhere` is unreachable",
        "no event creates an instance",
        "are both bound to",
    ] {
        assert!(text.contains(problem), "`{problem}` missing from: {text}");
    }
}

#[tokio::test]
async fn a_machine_gets_an_endpoint_named_after_its_state_and_contracts_correlate_themselves() {
    init_tracing();
    let mut m = StateMachine::<OrderState>::new("OrderStateMachine");
    let open = m.state("Open");
    let opened = m.event::<OrderOpened>("Opened", |e| e);
    m.initially()
        .when(opened, |b| b.then(log("opened")).transition_to(open));
    m.during(open).ignore(opened);
    let repo = InMemorySagaRepository::<OrderState>::new();
    let (bus, running, _) = bus_with(Bus::builder().state_machine(m, repo.clone())).await;
    assert!(
        bus.topology_text().contains("order-state"),
        "the endpoint is `order-state`: {}",
        bus.topology_text()
    );
    let id = Uuid::now_v7();
    bus.send("queue:order-state", OrderOpened { correlation_id: id })
        .await
        .expect("send");
    let i = expect_state(&repo, id, "Open", WAIT).await.expect("opened");
    assert_eq!(i.data.log, ["opened"]);
    // Ignored in Open: no fault, no change.
    bus.publish(OrderOpened { correlation_id: id })
        .await
        .expect("publish");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(repo.get(id).expect("reads").expect("exists").version, 1);
    running.shutdown().await.expect("shutdown");
}

/// Each missing-instance policy: discard, fault, run code, redeliver until the instance
/// exists (and fault once the redeliveries are spent).
#[tokio::test]
async fn missing_instance_policies() {
    init_tracing();
    let ran = Recorder::<Uuid>::default();
    let repo = InMemorySagaRepository::<OrderState>::new();
    let machine = {
        let ran = ran.clone();
        move || {
            let mut m = StateMachine::<OrderState>::new("PolicyStateMachine");
            let open = m.state("Open");
            let placed = m.event::<Placed>("Placed", |e| e.correlate_by(|m| m.order_id));
            let paid = m.event::<Paid>("Paid", |e| {
                e.correlate_by(|m| m.order_id)
                    .on_missing_instance(MissingInstance::Redeliver {
                        attempts: 3,
                        delay: Duration::from_millis(100),
                    })
            });
            let shipped = m.event::<Shipped>("Shipped", |e| {
                e.correlate_by(|m| m.order_id)
                    .on_missing_instance(MissingInstance::Fault)
            });
            let cancelled = m.event::<Cancelled>("Cancelled", |e| e.correlate_by(|m| m.order_id));
            let late = m.event::<Late>("Late", {
                let ran = ran.clone();
                move |e| {
                    e.correlate_by(|m| m.order_id)
                        .on_missing_instance(MissingInstance::execute(
                            move |ctx: &ConsumeContext<Late>| {
                                let ran = ran.clone();
                                Box::pin(async move {
                                    ran.push(ctx.message().order_id);
                                    Ok(())
                                })
                            },
                        ))
                }
            });
            m.initially().when(placed, |b| b.transition_to(open));
            m.during(open)
                .when(paid, |b| b.then(log("paid")))
                .when(shipped, |b| b.then(log("shipped")))
                .when(cancelled, |b| b.then(log("cancelled")))
                .when(late, |b| b.then(log("late")));
            m
        }
    };
    let (bus, running, transport) = bus_with(Bus::builder().receive_endpoint("policies", {
        let repo = repo.clone();
        move |e| e.state_machine(machine(), repo)
    }))
    .await;
    let to = "queue:policies";
    let early = Uuid::now_v7();
    let never = Uuid::now_v7();
    bus.send(
        to,
        Cancelled {
            order_id: never,
            n: 0,
        },
    )
    .await
    .expect("send");
    bus.send(
        to,
        Shipped {
            order_id: never,
            n: 0,
        },
    )
    .await
    .expect("send");
    bus.send(
        to,
        Late {
            order_id: never,
            n: 0,
        },
    )
    .await
    .expect("send");
    bus.send(
        to,
        Paid {
            order_id: never,
            n: 0,
        },
    )
    .await
    .expect("send");
    // Paid before Placed: redelivered until the instance exists.
    bus.send(
        to,
        Paid {
            order_id: early,
            n: 0,
        },
    )
    .await
    .expect("send");
    tokio::time::sleep(Duration::from_millis(150)).await;
    bus.send(
        to,
        Placed {
            order_id: early,
            n: 0,
        },
    )
    .await
    .expect("send");
    let i = expect_exists(&repo, early, WAIT).await.expect("placed");
    wait_until(
        WAIT,
        "the early payment applies once the order exists",
        || {
            repo.get(early)
                .ok()
                .flatten()
                .is_some_and(|i| i.data.log == ["paid"])
        },
    )
    .await;
    assert_eq!(i.current_state, "Open");
    assert_eq!(
        ran.wait_for(1, WAIT, "the Late handler runs").await,
        [never]
    );
    let errors = wait_for_error(&transport, "policies_error", 2).await;
    let mut faulted: Vec<String> = errors
        .iter()
        .map(|m| {
            let body: serde_json::Value = serde_json::from_slice(&m.body).expect("json");
            body["messageType"][0]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    faulted.sort();
    assert_eq!(
        faulted,
        [
            Paid::message_type().as_str(),
            Shipped::message_type().as_str()
        ]
    );
    for m in &errors {
        assert_eq!(
            m.headers.get_str(names::FAULT_EXCEPTION_TYPE).as_deref(),
            Some("busway::saga::MissingInstance")
        );
    }
    assert!(
        repo.get(never).expect("reads").is_none(),
        "discarded: nothing made"
    );
    assert_eq!(repo.len(), 1);
    running.shutdown().await.expect("shutdown");
}

/// A composite event fires once when both its events have arrived, in either order;
/// `finally` runs when the instance finalizes; `during_any` runs in every state.
#[tokio::test]
async fn composite_events_finally_and_during_any() {
    init_tracing();
    let repo = InMemorySagaRepository::<OrderState>::new();
    let finals = Counter::default();
    let machine = {
        let finals = finals.clone();
        move || {
            let mut m = StateMachine::<OrderState>::new("CompositeStateMachine");
            let open = m.state("Open");
            let ready = m.state("Ready");
            let placed = m.event::<Placed>("Placed", |e| e.correlate_by(|m| m.order_id));
            let paid = m.event::<Paid>("Paid", |e| e.correlate_by(|m| m.order_id));
            let shipped = m.event::<Shipped>("Shipped", |e| e.correlate_by(|m| m.order_id));
            let counted = m.event::<Counted>("Counted", |e| e.correlate_by(|m| m.order_id));
            let both = m.composite_event("PaidAndShipped", &[paid.id(), shipped.id()]);
            m.initially()
                .when(placed, |b| b.then(log("placed")).transition_to(open));
            m.during(open)
                .when(paid, |b| b.then(log("paid")))
                .when(shipped, |b| b.then(log("shipped")))
                .when(both, |b| b.then(log("both")).transition_to(ready));
            m.during(ready).when(counted, |b| {
                b.then(log("counted")).if_else(
                    |c| c.message().n > 1,
                    |b| b.finalize(),
                    |b| b.then(log("again")),
                )
            });
            m.during_any().when(counted, |b| b.then(log("any")));
            m.finally({
                let finals = finals.clone();
                move |b| {
                    b.then(move |ctx| {
                        finals.incr();
                        ctx.saga.log.push("finally".into());
                        Ok(())
                    })
                }
            });
            m
        }
    };
    let (bus, running, _) = bus_with(Bus::builder().receive_endpoint("composite", {
        let repo = repo.clone();
        move |e| e.state_machine(machine(), repo)
    }))
    .await;
    let to = "queue:composite";
    let a = Uuid::now_v7();
    let b = Uuid::now_v7();
    for id in [a, b] {
        bus.send(to, Placed { order_id: id, n: 0 })
            .await
            .expect("send");
        expect_state(&repo, id, "Open", WAIT).await.expect("open");
    }
    bus.send(to, Paid { order_id: a, n: 0 })
        .await
        .expect("send");
    bus.send(to, Shipped { order_id: b, n: 0 })
        .await
        .expect("send");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(repo.get(a).expect("r").expect("e").current_state, "Open");
    bus.send(to, Shipped { order_id: a, n: 0 })
        .await
        .expect("send");
    bus.send(to, Paid { order_id: b, n: 0 })
        .await
        .expect("send");
    let ia = expect_state(&repo, a, "Ready", WAIT)
        .await
        .expect("a ready");
    let ib = expect_state(&repo, b, "Ready", WAIT)
        .await
        .expect("b ready");
    assert_eq!(ia.data.log, ["placed", "paid", "shipped", "both"]);
    assert_eq!(ib.data.log, ["placed", "shipped", "paid", "both"]);
    bus.send(to, Counted { order_id: a, n: 1 })
        .await
        .expect("send");
    wait_until(WAIT, "a counted once", || {
        repo.get(a)
            .ok()
            .flatten()
            .is_some_and(|i| i.data.log.len() == 7)
    })
    .await;
    bus.send(to, Counted { order_id: a, n: 2 })
        .await
        .expect("send");
    expect_state(&repo, a, "Final", WAIT).await.expect("final");
    expect_finalized(&repo, a, WAIT).await.expect("finalized");
    let ia = repo.get(a).expect("r").expect("kept in Final");
    assert_eq!(
        &ia.data.log[4..],
        ["counted", "again", "any", "counted", "any", "finally"]
    );
    assert_eq!(finals.get(), 1);
    running.shutdown().await.expect("shutdown");
}

/// Correlation by query (an order number), a new instance's id chosen by `select_id`, and
/// a request answered from the instance with `respond`.
#[tokio::test]
async fn correlation_by_query_and_responses_from_a_saga() {
    init_tracing();
    let repo = InMemorySagaRepository::<OrderState>::new();
    let mut m = StateMachine::<OrderState>::new("LookupStateMachine");
    let open = m.state("Open");
    let lookup = m.event::<Lookup>("Lookup", |e| {
        e.correlate_by_query(|m| Query::eq("orderNumber", format!("PO-{}", m.n)))
            .select_id(|m| m.order_id)
    });
    let status = m.event::<Status>("Status", |e| {
        e.correlate_by_query(|m| Query::eq("orderNumber", format!("PO-{}", m.n)))
    });
    m.initially().when(lookup, |b| {
        b.then(|ctx| {
            ctx.saga.order_number = format!("PO-{}", ctx.message().n);
            Ok(())
        })
        .transition_to(open)
    });
    m.during(open)
        .when(lookup, |b| {
            b.then(|ctx| {
                ctx.saga.n += 1;
                Ok(())
            })
        })
        .when(status, |b| {
            b.respond(|ctx| StatusReply {
                state: ctx.state().to_string(),
                n: ctx.saga.n,
            })
        });
    let (bus, running, _) =
        bus_with(Bus::builder().receive_endpoint("lookup", |e| e.state_machine(m, repo.clone())))
            .await;
    let chosen = Uuid::now_v7();
    for _ in 0..3 {
        bus.send(
            "queue:lookup",
            Lookup {
                order_id: chosen,
                n: 7,
            },
        )
        .await
        .expect("send");
    }
    wait_until(WAIT, "three lookups on one instance", || {
        repo.get(chosen)
            .ok()
            .flatten()
            .is_some_and(|i| i.data.n == 2)
    })
    .await;
    assert_eq!(repo.len(), 1, "one instance, found by its order number");
    let reply = bus
        .request_client_to::<Status>("queue:lookup")
        .expect("client")
        .get_response::<StatusReply>(Status {
            order_id: Uuid::nil(),
            n: 7,
        })
        .await
        .expect("the saga responds");
    assert_eq!(
        reply.message(),
        &StatusReply {
            state: "Open".into(),
            n: 2
        }
    );
    running.shutdown().await.expect("shutdown");
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct CounterState {
    count: u64,
    sum: u64,
}

fn counter_machine() -> StateMachine<CounterState> {
    let mut m = StateMachine::<CounterState>::new("SharedCounterStateMachine");
    let counting = m.state("Counting");
    let counted = m.event::<Counted>("Counted", |e| e.correlate_by(|m| m.order_id));
    let step = |b: busway::saga::Activities<CounterState, Counted>| {
        b.then(|ctx| {
            ctx.saga.count += 1;
            ctx.saga.sum += u64::from(ctx.message().n);
            Ok(())
        })
        .publish(|ctx| CountedAck {
            order_id: ctx.correlation_id(),
            n: ctx.message().n,
        })
    };
    m.initially()
        .when(counted, move |b| step(b).transition_to(counting));
    m.during(counting).when(counted, step);
    m
}

/// Two buses (two processes' worth of endpoints, each with its own per-instance locks)
/// compete for one queue over one repository: version checks and re-runs keep every counter
/// exact, and each tick's ack reaches the downstream consumer exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_buses_on_one_repository_lose_no_update_and_send_no_duplicate() {
    init_tracing();
    let repo = InMemorySagaRepository::<TickState>::new();
    competing_ticks("shared-counter", [repo.clone(), repo], 20, 100).await;
}

/// A repository that refuses the first updates with conflicts (another process moved the
/// instance) and can be switched to fail like a database that went away.
#[derive(Clone)]
struct FlakyRepository {
    inner: InMemorySagaRepository<CounterState>,
    conflicts_left: Arc<AtomicU32>,
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl SagaRepository<CounterState> for FlakyRepository {
    async fn load(
        &self,
        cx: &ReceiveContext,
        id: Uuid,
    ) -> Result<Option<Instance<CounterState>>, SagaError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(SagaError::storage(
                "connection refused (test: database down)",
            ));
        }
        self.inner.load(cx, id).await
    }
    async fn insert(
        &self,
        cx: &ReceiveContext,
        instance: &Instance<CounterState>,
    ) -> Result<(), SagaError> {
        self.inner.insert(cx, instance).await
    }
    async fn update(
        &self,
        cx: &ReceiveContext,
        instance: &Instance<CounterState>,
        expected: i64,
    ) -> Result<(), SagaError> {
        let left = self.conflicts_left.load(Ordering::SeqCst);
        if left > 0 {
            self.conflicts_left.store(left - 1, Ordering::SeqCst);
            return Err(SagaError::conflict("test: another process saved first"));
        }
        self.inner.update(cx, instance, expected).await
    }
    async fn delete(&self, cx: &ReceiveContext, id: Uuid, expected: i64) -> Result<(), SagaError> {
        self.inner.delete(cx, id, expected).await
    }
}

/// Conflicts re-run the event and publish once; a storm of conflicts past the limit and a
/// database outage fault the event into `_error` (after the endpoint's retries), with
/// nothing published for it; the endpoint recovers when the database is back.
#[tokio::test]
async fn conflict_storms_and_outages_fault_without_sending() {
    init_tracing();
    let repo = FlakyRepository {
        inner: InMemorySagaRepository::new(),
        conflicts_left: Arc::new(AtomicU32::new(0)),
        down: Arc::default(),
    };
    let acks = Recorder::<u32>::default();
    let (bus, running, transport) = bus_with(
        Bus::builder()
            .receive_endpoint("flaky", {
                let repo = repo.clone();
                move |e| {
                    e.retry(Retry::immediate(2))
                        .state_machine(counter_machine(), repo)
                }
            })
            .receive_endpoint("flaky-acks", {
                let acks = acks.clone();
                move |e| e.handler(acks.record(|c: &ConsumeContext<CountedAck>| c.message().n))
            }),
    )
    .await;
    let id = Uuid::now_v7();
    let to = "queue:flaky";
    bus.send(to, Counted { order_id: id, n: 1 })
        .await
        .expect("send");
    acks.wait_for(1, WAIT, "the first ack").await;
    repo.conflicts_left.store(5, Ordering::SeqCst);
    bus.send(to, Counted { order_id: id, n: 2 })
        .await
        .expect("send");
    acks.wait_for(2, WAIT, "the ack after five conflicts").await;
    // 16 re-runs per attempt, 3 attempts: a storm of 100 conflicts exhausts them.
    repo.conflicts_left.store(100, Ordering::SeqCst);
    bus.send(to, Counted { order_id: id, n: 3 })
        .await
        .expect("send");
    let errors = wait_for_error(&transport, "flaky_error", 1).await;
    assert_eq!(
        errors[0]
            .headers
            .get_str(names::FAULT_EXCEPTION_TYPE)
            .as_deref(),
        Some("busway::saga::ConcurrencyConflict")
    );
    assert_eq!(
        errors[0]
            .headers
            .get_str(names::FAULT_RETRY_COUNT)
            .as_deref(),
        Some("2")
    );
    repo.conflicts_left.store(0, Ordering::SeqCst);
    repo.down.store(true, Ordering::SeqCst);
    bus.send(to, Counted { order_id: id, n: 4 })
        .await
        .expect("send");
    let errors = wait_for_error(&transport, "flaky_error", 1).await;
    assert_eq!(
        errors[0]
            .headers
            .get_str(names::FAULT_EXCEPTION_TYPE)
            .as_deref(),
        Some("busway::saga::RepositoryError")
    );
    assert!(
        errors[0]
            .headers
            .get_str(names::FAULT_MESSAGE)
            .is_some_and(|m| m.contains("database down"))
    );
    repo.down.store(false, Ordering::SeqCst);
    bus.send(to, Counted { order_id: id, n: 5 })
        .await
        .expect("send");
    acks.wait_for(3, WAIT, "the ack after the outage").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        acks.entries(),
        [1, 2, 5],
        "nothing sent for the faulted events"
    );
    let i = repo.inner.get(id).expect("reads").expect("exists");
    assert_eq!((i.data.count, i.data.sum, i.version), (3, 8, 3));
    running.shutdown().await.expect("shutdown");
}

async fn wait_for_error(transport: &InMemory, queue: &str, count: usize) -> Vec<TransportMessage> {
    take_from("in-memory", transport, queue, count, WAIT).await
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, busway::Message)]
#[serde(rename_all = "camelCase")]
struct CheckStock {
    sku: String,
    mode: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, busway::Message)]
#[serde(rename_all = "camelCase")]
struct StockChecked {
    sku: String,
    available: u32,
}

/// A saga's request, with each outcome as an event: a response (completed), a `Fault`
/// from the responder (faulted), no answer in time (timed out), and a response that comes
/// after the timeout, which is ignored.
#[tokio::test]
async fn requests_from_a_saga_complete_fault_or_time_out() {
    init_tracing();
    let repo = InMemorySagaRepository::<OrderState>::new();
    let mut m = StateMachine::<OrderState>::new("StockStateMachine");
    let waiting = m.state("Waiting");
    let reserved = m.state("Reserved");
    let rejected = m.state("Rejected");
    let timed_out = m.state("TimedOut");
    let placed = m.event::<Placed>("Placed", |e| e.correlate_by(|m| m.order_id));
    let check = m.request::<CheckStock, StockChecked>(
        "CheckStock",
        Some("queue:stock"),
        Duration::from_millis(400),
    );
    m.initially().when(placed, |b| {
        b.request(&check, |ctx| CheckStock {
            sku: format!("SKU-{}", ctx.correlation_id()),
            mode: ctx.message().n,
        })
        .transition_to(waiting)
    });
    m.during(waiting)
        .when(check.completed(), |b| {
            b.then(|ctx| {
                ctx.saga.n = ctx.message().available;
                Ok(())
            })
            .transition_to(reserved)
        })
        .when(check.faulted(), |b| {
            b.then(|ctx| {
                let reason = ctx
                    .message()
                    .exceptions
                    .first()
                    .map(|e| e.message.clone())
                    .unwrap_or_default();
                ctx.saga.log.push(reason);
                Ok(())
            })
            .transition_to(rejected)
        })
        .when(check.timed_out(), |b| b.transition_to(timed_out));
    m.during_states(&[reserved, rejected, timed_out])
        .ignore(check.completed())
        .ignore(check.faulted())
        .ignore(check.timed_out());
    let (bus, running, _) = bus_with(
        Bus::builder()
            .receive_endpoint("stock-saga", |e| e.state_machine(m, repo.clone()))
            .receive_endpoint("stock", |e| {
                e.handler(|ctx: ConsumeContext<CheckStock>| async move {
                    match ctx.message().mode {
                        0 => {
                            ctx.respond(StockChecked {
                                sku: ctx.message().sku.clone(),
                                available: 12,
                            })
                            .await?;
                            Ok(())
                        }
                        1 => Err(ConsumeError::msg("the warehouse is closed")),
                        2 => Ok(()),
                        _ => {
                            tokio::time::sleep(Duration::from_millis(900)).await;
                            ctx.respond(StockChecked {
                                sku: ctx.message().sku.clone(),
                                available: 1,
                            })
                            .await?;
                            Ok(())
                        }
                    }
                })
                .concurrency_limit(8)
            }),
    )
    .await;
    let ids: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
    for (mode, id) in ids.iter().enumerate() {
        bus.send(
            "queue:stock-saga",
            Placed {
                order_id: *id,
                n: mode as u32,
            },
        )
        .await
        .expect("send");
    }
    let ok = expect_state(&repo, ids[0], "Reserved", WAIT)
        .await
        .expect("completed");
    assert_eq!(ok.data.n, 12);
    assert!(ok.meta.requests.is_empty() && ok.meta.schedules.is_empty());
    let failed = expect_state(&repo, ids[1], "Rejected", WAIT)
        .await
        .expect("faulted");
    assert_eq!(failed.data.log, ["the warehouse is closed"]);
    expect_state(&repo, ids[2], "TimedOut", WAIT)
        .await
        .expect("timed out");
    let late = expect_state(&repo, ids[3], "TimedOut", WAIT)
        .await
        .expect("late");
    // The late response arrives about 500 ms after the timeout; it changes nothing.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let after = repo.get(ids[3]).expect("reads").expect("exists");
    assert_eq!(
        (after.current_state.as_str(), after.version),
        ("TimedOut", late.version)
    );
    // The completed request's timeout was cancelled: still Reserved, one more save at most.
    let ok_after = repo.get(ids[0]).expect("reads").expect("exists");
    assert_eq!(
        (ok_after.current_state.as_str(), ok_after.version),
        ("Reserved", 2)
    );
    running.shutdown().await.expect("shutdown");
}

/// The fields of each closed `saga` span.
#[derive(Clone, Default)]
struct SagaSpans(Arc<std::sync::Mutex<Vec<std::collections::BTreeMap<String, String>>>>);

#[derive(Default)]
struct Fields(std::collections::BTreeMap<String, String>);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_string(),
            format!("{value:?}").trim_matches('"').to_string(),
        );
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl<S> tracing_subscriber::Layer<S> for SagaSpans
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if attrs.metadata().name() != "saga" {
            return;
        }
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if let Some(span) = ctx.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<Fields>()
        {
            values.record(fields);
        }
    }

    fn on_close(&self, id: tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        if let Some(span) = ctx.span(&id)
            && let Some(fields) = span.extensions_mut().remove::<Fields>()
        {
            self.0.lock().expect("lock").push(fields.0);
        }
    }
}

/// Each event runs in a `saga` span that carries the machine, the event, the instance and
/// the states before and after.
#[tokio::test]
async fn saga_spans_carry_the_instance_and_its_states() {
    use tracing_subscriber::layer::SubscriberExt;
    let spans = SagaSpans::default();
    let subscriber = tracing_subscriber::registry().with(spans.clone());
    let _guard = tracing::subscriber::set_default(subscriber);
    let repo = InMemorySagaRepository::<OrderState>::new();
    let mut m = StateMachine::<OrderState>::new("SpanStateMachine");
    let open = m.state("Open");
    let placed = m.event::<Placed>("Placed", |e| e.correlate_by(|m| m.order_id));
    let shipped = m.event::<Shipped>("Shipped", |e| e.correlate_by(|m| m.order_id));
    m.initially().when(placed, |b| b.transition_to(open));
    m.during(open).when(shipped, |b| b.finalize());
    let (bus, running, _) =
        bus_with(Bus::builder().receive_endpoint("spans", |e| e.state_machine(m, repo.clone())))
            .await;
    let id = Uuid::now_v7();
    bus.send("queue:spans", Placed { order_id: id, n: 0 })
        .await
        .expect("send");
    expect_state(&repo, id, "Open", WAIT).await.expect("open");
    bus.send("queue:spans", Shipped { order_id: id, n: 0 })
        .await
        .expect("send");
    expect_state(&repo, id, "Final", WAIT).await.expect("final");
    running.shutdown().await.expect("shutdown");
    let seen = spans.0.lock().expect("lock").clone();
    let pick = |event: &str| {
        seen.iter()
            .find(|f| f.get("saga.event").is_some_and(|e| e.ends_with(event)))
            .unwrap_or_else(|| panic!("no saga span for {event}: {seen:?}"))
            .clone()
    };
    let first = pick(":Placed");
    assert_eq!(first["saga.machine"], "SpanStateMachine");
    assert_eq!(first["saga.correlation_id"], id.to_string());
    assert_eq!(first["saga.state_before"], "Initial");
    assert_eq!(first["saga.state_after"], "Open");
    let second = pick(":Shipped");
    assert_eq!(second["saga.state_before"], "Open");
    assert_eq!(second["saga.state_after"], "Final");
}
