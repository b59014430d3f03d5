//! Saga state machines on each transport: a lifecycle with publishes, events of one instance
//! one at a time, timeouts, and the faults a saga raises (unhandled events, instances that
//! no longer read).

use busway::saga::{
    EndpointSagaExt, InMemorySagaRepository, Instance, MissingInstance, StateMachine,
};

use super::*;

/// A saga test contract about one order.
macro_rules! order_contract {
    ($($name:ident),* $(,)?) => {$(
        #[doc = concat!("Saga test contract `", stringify!($name), "`.")]
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, busway::Message)]
        #[serde(rename_all = "camelCase")]
        pub struct $name {
            /// The order (the saga's correlation id).
            pub order_id: Uuid,
            /// An amount.
            pub amount: u32,
        }
    )*};
}

order_contract!(
    SagaOrderPlaced,
    SagaPaymentReceived,
    SagaItemShipped,
    SagaOrderCompleted,
    SagaCounted,
    SagaTimedOrder,
    SagaTimedPayment,
    SagaPaymentTimeout,
    SagaUnexpected,
    SagaCorruptEvent,
);

/// The state of the lifecycle test's saga.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderSagaState {
    /// The order total from `SagaOrderPlaced`.
    pub total: u32,
    /// Paid so far.
    pub paid: u32,
    /// Events handled.
    pub events: u32,
}

/// The order saga: placed → Submitted, paid in full → Paid, shipped → finalized (and
/// deleted), publishing `SagaOrderCompleted` on the way out.
fn order_machine() -> StateMachine<OrderSagaState> {
    let mut m = StateMachine::<OrderSagaState>::new("OrderSagaStateMachine");
    let submitted = m.state("Submitted");
    let paid = m.state("Paid");
    let placed = m.event::<SagaOrderPlaced>("OrderPlaced", |e| e.correlate_by(|m| m.order_id));
    let payment =
        m.event::<SagaPaymentReceived>("PaymentReceived", |e| e.correlate_by(|m| m.order_id));
    let shipped = m.event::<SagaItemShipped>("ItemShipped", |e| {
        e.correlate_by(|m| m.order_id)
            .on_missing_instance(MissingInstance::Fault)
    });
    m.initially().when(placed, |b| {
        b.then(|ctx| {
            ctx.saga.total = ctx.message().amount;
            ctx.saga.events += 1;
            Ok(())
        })
        .transition_to(submitted)
    });
    m.during(submitted).when(payment, |b| {
        b.then(|ctx| {
            ctx.saga.paid += ctx.message().amount;
            ctx.saga.events += 1;
            Ok(())
        })
        .when_true(
            |ctx| ctx.saga.paid >= ctx.saga.total,
            |b| b.transition_to(paid),
        )
    });
    m.during(paid).when(shipped, |b| {
        b.then(|ctx| {
            ctx.saga.events += 1;
            Ok(())
        })
        .publish(|ctx| SagaOrderCompleted {
            order_id: ctx.correlation_id(),
            amount: ctx.saga.paid,
        })
        .finalize()
    });
    m.delete_when_finalized();
    m
}

/// A started bus with `machine` over `repo` at the endpoint `name`.
async fn saga_bus<F: TransportFixture, S: busway::saga::SagaState + Clone>(
    t: &F::Transport,
    name: &str,
    machine: StateMachine<S>,
    repo: &InMemorySagaRepository<S>,
) -> (Bus, busway::RunningBus) {
    let repo = repo.clone();
    let bus = build::<F>(
        t,
        Bus::builder().receive_endpoint(name, move |e| e.state_machine(machine, repo)),
    )
    .await;
    let running = bus.start().await.expect("start");
    (bus, running)
}

async fn wait_for_state<S: busway::saga::SagaState + Clone>(
    repo: &InMemorySagaRepository<S>,
    id: Uuid,
    state: &str,
) -> Instance<S> {
    let what = format!("saga instance {id} is in `{state}`");
    wait_until(WAIT, &what, || {
        repo.get(id)
            .expect("the instance reads")
            .is_some_and(|i| i.current_state == state)
    })
    .await;
    repo.get(id).expect("reads").expect("exists")
}

/// An order saga over its whole life: created by a publish, moved by partial and full
/// payments, finalized by shipping (and deleted), with its `SagaOrderCompleted` published
/// after the save and consumed elsewhere.
pub async fn saga_lifecycle<F: TransportFixture>(fixture: &F) {
    init_tracing();
    let t = fixture.transport().await;
    let saga = unique("order-saga");
    let listener = unique("order-completed");
    let repo = InMemorySagaRepository::<OrderSagaState>::new();
    let completed = Recorder::<SagaOrderCompleted>::default();
    let bus = build::<F>(
        &t,
        Bus::builder()
            .receive_endpoint(saga.clone(), {
                let repo = repo.clone();
                move |e| e.state_machine(order_machine(), repo)
            })
            .receive_endpoint(listener.clone(), {
                let completed = completed.clone();
                move |e| {
                    e.handler(
                        completed
                            .record(|c: &ConsumeContext<SagaOrderCompleted>| c.message().clone()),
                    )
                }
            }),
    )
    .await;
    let running = bus.start().await.expect("start");
    let order = Uuid::now_v7();
    bus.publish(SagaOrderPlaced {
        order_id: order,
        amount: 30,
    })
    .await
    .expect("publish");
    let i = wait_for_state(&repo, order, "Submitted").await;
    assert_eq!((i.data.total, i.data.paid, i.version), (30, 0, 1));
    bus.publish(SagaPaymentReceived {
        order_id: order,
        amount: 10,
    })
    .await
    .expect("publish");
    wait_until(WAIT, "the partial payment is recorded", || {
        repo.get(order)
            .ok()
            .flatten()
            .is_some_and(|i| i.data.paid == 10)
    })
    .await;
    assert_eq!(
        repo.get(order)
            .expect("reads")
            .expect("exists")
            .current_state,
        "Submitted",
        "a partial payment leaves the order submitted"
    );
    bus.publish(SagaPaymentReceived {
        order_id: order,
        amount: 20,
    })
    .await
    .expect("publish");
    let i = wait_for_state(&repo, order, "Paid").await;
    assert_eq!((i.data.paid, i.data.events, i.version), (30, 3, 3));
    assert!(completed.is_empty(), "nothing published before shipping");
    bus.publish(SagaItemShipped {
        order_id: order,
        amount: 0,
    })
    .await
    .expect("publish");
    let done = completed
        .wait_for(1, WAIT, "the saga publishes SagaOrderCompleted")
        .await;
    assert_eq!(
        done[0],
        SagaOrderCompleted {
            order_id: order,
            amount: 30
        }
    );
    wait_until(WAIT, "the finalized instance is deleted", || {
        repo.get(order).ok().flatten().is_none()
    })
    .await;
    // Shipping a deleted order is a fault (this event's missing-instance policy).
    bus.publish(SagaItemShipped {
        order_id: order,
        amount: 0,
    })
    .await
    .expect("publish");
    let errors = take_queue(fixture, &t, &format!("{saga}_error"), 1, WAIT).await;
    assert_eq!(
        header(&errors[0], names::FAULT_EXCEPTION_TYPE),
        "busway::saga::MissingInstance"
    );
    assert!(
        header(&errors[0], names::FAULT_MESSAGE).contains(&order.to_string()),
        "the fault names the instance"
    );
    assert_eq!(completed.len(), 1, "one completion, no duplicate");
    running.shutdown().await.expect("shutdown");
    cleanup(fixture, &t, &[&saga, &listener]).await;
}

/// A counter saga: each `SagaCounted` adds its amount to its instance.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct CounterState {
    /// The sum so far.
    pub total: u64,
    /// Events handled.
    pub count: u64,
}

fn counter_machine() -> StateMachine<CounterState> {
    let mut m = StateMachine::<CounterState>::new("CounterStateMachine");
    let counting = m.state("Counting");
    let counted = m.event::<SagaCounted>("Counted", |e| e.correlate_by(|m| m.order_id));
    m.initially().when(counted, |b| {
        b.then(|ctx| {
            ctx.saga.total += u64::from(ctx.message().amount);
            ctx.saga.count += 1;
            Ok(())
        })
        .transition_to(counting)
    });
    m.during(counting).when(counted, |b| {
        b.then(|ctx| {
            ctx.saga.total += u64::from(ctx.message().amount);
            ctx.saga.count += 1;
            Ok(())
        })
    });
    m
}

/// Many events for a few instances at an endpoint that consumes 16 at a time: each
/// instance's events run one at a time, so every counter is exact.
pub async fn saga_events_of_one_instance_never_lose_an_update<F: TransportFixture>(fixture: &F) {
    init_tracing();
    let t = fixture.transport().await;
    let saga = unique("counter-saga");
    let repo = InMemorySagaRepository::<CounterState>::new();
    let bus = build::<F>(
        &t,
        Bus::builder().receive_endpoint(saga.clone(), {
            let repo = repo.clone();
            move |e| {
                e.prefetch(32)
                    .concurrency_limit(16)
                    .state_machine(counter_machine(), repo)
            }
        }),
    )
    .await;
    let running = bus.start().await.expect("start");
    let ids: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
    const PER_INSTANCE: u32 = 40;
    for n in 1..=PER_INSTANCE {
        for id in &ids {
            bus.send(
                format!("queue:{saga}"),
                SagaCounted {
                    order_id: *id,
                    amount: n,
                },
            )
            .await
            .expect("send");
        }
    }
    let expected_total: u64 = (1..=u64::from(PER_INSTANCE)).sum();
    wait_until(WAIT * 2, "every counter has all its events", || {
        ids.iter().all(|id| {
            repo.get(*id)
                .ok()
                .flatten()
                .is_some_and(|i| i.data.count == u64::from(PER_INSTANCE))
        })
    })
    .await;
    for id in &ids {
        let i = repo.get(*id).expect("reads").expect("exists");
        assert_eq!(i.data.total, expected_total, "no lost update on {id}");
        assert_eq!(i.version, i64::from(PER_INSTANCE), "one save per event");
    }
    assert_eq!(depth(fixture, &t, &format!("{saga}_error")).await, 0);
    running.shutdown().await.expect("shutdown");
    cleanup(fixture, &t, &[&saga]).await;
}

/// The timed order saga's state.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimedOrderState {
    /// Timeouts handled.
    pub timeouts: u32,
}

/// A saga timeout: an order not paid in time moves to `TimedOut`; a paid order's timeout is
/// unscheduled and never raises the event; scheduling again makes the first message stale.
pub async fn saga_timeouts<F: TransportFixture>(fixture: &F) {
    init_tracing();
    let t = fixture.transport().await;
    let saga = unique("timed-saga");
    let repo = InMemorySagaRepository::<TimedOrderState>::new();
    let machine = || {
        let mut m = StateMachine::<TimedOrderState>::new("TimedOrderStateMachine");
        let waiting = m.state("AwaitingPayment");
        let paid = m.state("Paid");
        let timed_out = m.state("TimedOut");
        let placed = m.event::<SagaTimedOrder>("Placed", |e| e.correlate_by(|m| m.order_id));
        let payment = m.event::<SagaTimedPayment>("Paid", |e| e.correlate_by(|m| m.order_id));
        let timeout =
            m.schedule::<SagaPaymentTimeout>("PaymentTimeout", Duration::from_millis(700), |e| {
                e.correlate_by(|m| m.order_id)
            });
        m.initially().when(placed, |b| {
            b.schedule(&timeout, |ctx| SagaPaymentTimeout {
                order_id: ctx.correlation_id(),
                amount: 0,
            })
            .transition_to(waiting)
        });
        m.during(waiting)
            .when(placed, |b| {
                // Placed again: a new timeout; the first one's message is stale now.
                b.schedule(&timeout, |ctx| SagaPaymentTimeout {
                    order_id: ctx.correlation_id(),
                    amount: 1,
                })
            })
            .when(payment, |b| b.unschedule(&timeout).transition_to(paid))
            .when(timeout.received(), |b| {
                b.then(|ctx| {
                    ctx.saga.timeouts += 1;
                    Ok(())
                })
                .transition_to(timed_out)
            });
        m.during_states(&[paid, timed_out])
            .ignore(timeout.received())
            .ignore(placed)
            .ignore(payment);
        m
    };
    let (bus, running) = saga_bus::<F, _>(&t, &saga, machine(), &repo).await;
    let unpaid = Uuid::now_v7();
    let paid = Uuid::now_v7();
    let twice = Uuid::now_v7();
    let to = format!("queue:{saga}");
    if !t.profile().capabilities.delayed_delivery {
        bus.send(
            to.clone(),
            SagaTimedOrder {
                order_id: unpaid,
                amount: 0,
            },
        )
        .await
        .expect("send");
        // The schedule cannot be sent: the event faults and nothing is saved.
        let errors = take_queue(fixture, &t, &format!("{saga}_error"), 1, WAIT).await;
        assert!(
            header(&errors[0], names::FAULT_MESSAGE).contains("delay"),
            "the fault says why: {}",
            header(&errors[0], names::FAULT_MESSAGE)
        );
        assert!(repo.get(unpaid).expect("reads").is_none(), "nothing saved");
        running.shutdown().await.expect("shutdown");
        cleanup(fixture, &t, &[&saga]).await;
        return;
    }
    for id in [unpaid, paid, twice] {
        bus.send(
            to.clone(),
            SagaTimedOrder {
                order_id: id,
                amount: 0,
            },
        )
        .await
        .expect("send");
    }
    wait_for_state(&repo, paid, "AwaitingPayment").await;
    wait_for_state(&repo, twice, "AwaitingPayment").await;
    bus.send(
        to.clone(),
        SagaTimedPayment {
            order_id: paid,
            amount: 5,
        },
    )
    .await
    .expect("send");
    bus.send(
        to.clone(),
        SagaTimedOrder {
            order_id: twice,
            amount: 0,
        },
    )
    .await
    .expect("send");
    let i = wait_for_state(&repo, unpaid, "TimedOut").await;
    assert_eq!(i.data.timeouts, 1);
    assert!(
        i.meta.schedules.is_empty(),
        "the token is gone once it fired"
    );
    let i = wait_for_state(&repo, twice, "TimedOut").await;
    assert_eq!(
        i.data.timeouts, 1,
        "the first, stale timeout raised nothing"
    );
    let i = wait_for_state(&repo, paid, "Paid").await;
    assert!(
        i.meta.schedules.is_empty(),
        "payment unscheduled the timeout"
    );
    // Long enough for every scheduled message to have arrived (and been ignored).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        repo.get(paid)
            .expect("reads")
            .expect("exists")
            .current_state,
        "Paid"
    );
    assert_eq!(
        repo.get(twice)
            .expect("reads")
            .expect("exists")
            .data
            .timeouts,
        1,
        "exactly one timeout for the order placed twice"
    );
    assert_eq!(depth(fixture, &t, &format!("{saga}_error")).await, 0);
    running.shutdown().await.expect("shutdown");
    cleanup(fixture, &t, &[&saga]).await;
}

/// The faults state machine: `SagaUnexpected` is only handled in `Initial`.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct StrictState {
    /// A field a stored row may no longer fit.
    pub amount: u32,
}

/// An event the current state does not handle, and an instance row that no longer reads as
/// the state type, each go to `_error` with a reason; the endpoint keeps consuming.
pub async fn saga_faults_go_to_error<F: TransportFixture>(fixture: &F) {
    init_tracing();
    let t = fixture.transport().await;
    let saga = unique("strict-saga");
    let repo = InMemorySagaRepository::<StrictState>::new();
    let machine = || {
        let mut m = StateMachine::<StrictState>::new("StrictStateMachine");
        let open = m.state("Open");
        let unexpected =
            m.event::<SagaUnexpected>("Unexpected", |e| e.correlate_by(|m| m.order_id));
        let corrupt = m.event::<SagaCorruptEvent>("Corrupt", |e| e.correlate_by(|m| m.order_id));
        m.initially().when(unexpected, |b| b.transition_to(open));
        m.during_any().when(corrupt, |b| {
            b.then(|ctx| {
                ctx.saga.amount += ctx.message().amount;
                Ok(())
            })
        });
        m.initially().when(corrupt, |b| b.transition_to(open));
        m
    };
    let (bus, running) = saga_bus::<F, _>(&t, &saga, machine(), &repo).await;
    let to = format!("queue:{saga}");
    let id = Uuid::now_v7();
    bus.send(
        to.clone(),
        SagaUnexpected {
            order_id: id,
            amount: 1,
        },
    )
    .await
    .expect("send");
    wait_for_state(&repo, id, "Open").await;
    // Open does not handle it.
    bus.send(
        to.clone(),
        SagaUnexpected {
            order_id: id,
            amount: 2,
        },
    )
    .await
    .expect("send");
    let broken = Uuid::now_v7();
    repo.put_raw(broken, "Open", 1, r#"{"amount":"forty-two"}"#);
    bus.send(
        to.clone(),
        SagaCorruptEvent {
            order_id: broken,
            amount: 1,
        },
    )
    .await
    .expect("send");
    let errors = take_queue(fixture, &t, &format!("{saga}_error"), 2, WAIT).await;
    let mut kinds: Vec<String> = errors
        .iter()
        .map(|m| header(m, names::FAULT_EXCEPTION_TYPE))
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "busway::saga::CorruptInstance",
            "busway::saga::UnhandledEvent"
        ]
    );
    let unhandled = errors
        .iter()
        .find(|m| header(m, names::FAULT_EXCEPTION_TYPE).ends_with("UnhandledEvent"))
        .expect("the unhandled event faulted");
    assert!(
        header(unhandled, names::FAULT_MESSAGE).contains("Open"),
        "names the state"
    );
    // The endpoint is alive: a healthy instance still moves.
    bus.send(
        to.clone(),
        SagaCorruptEvent {
            order_id: id,
            amount: 5,
        },
    )
    .await
    .expect("send");
    wait_until(WAIT, "the healthy instance takes its event", || {
        repo.get(id)
            .ok()
            .flatten()
            .is_some_and(|i| i.data.amount == 5)
    })
    .await;
    assert_eq!(repo.get(id).expect("reads").expect("exists").version, 2);
    running.shutdown().await.expect("shutdown");
    cleanup(fixture, &t, &[&saga]).await;
}
