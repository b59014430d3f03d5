//! The counter saga that the two-process test runs in two `saga-worker` processes: each
//! `SagaTick` adds one to its instance and publishes a `SagaTickAck`, on a PostgreSQL
//! repository behind the consumer outbox.

use busway::saga::{Activities, StateMachine};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One increment for one instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, busway::Message)]
#[serde(rename_all = "camelCase")]
pub struct SagaTick {
    /// The instance.
    pub counter_id: Uuid,
    /// The event's number (unique per instance).
    pub n: u32,
}

/// Published by the saga for each tick it applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, busway::Message)]
#[serde(rename_all = "camelCase")]
pub struct SagaTickAck {
    /// The instance.
    pub counter_id: Uuid,
    /// The tick's number.
    pub n: u32,
    /// The process that applied it.
    pub worker: u32,
}

/// The counter's state.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct TickState {
    /// Ticks applied.
    pub count: u64,
    /// The sum of the ticks' numbers.
    pub sum: u64,
}

/// The machine: `Counting` from the first tick on, every tick counted and acknowledged.
pub fn tick_machine(worker: u32) -> StateMachine<TickState> {
    let mut m = StateMachine::<TickState>::new("TickStateMachine");
    let counting = m.state("Counting");
    let tick = m.event::<SagaTick>("Tick", |e| e.correlate_by(|m| m.counter_id));
    let step = move |b: Activities<TickState, SagaTick>| {
        b.then(|ctx| {
            ctx.saga.count += 1;
            ctx.saga.sum += u64::from(ctx.message().n);
            Ok(())
        })
        .publish(move |ctx| SagaTickAck {
            counter_id: ctx.correlation_id(),
            n: ctx.message().n,
            worker,
        })
    };
    m.initially()
        .when(tick, move |b| step(b).transition_to(counting));
    m.during(counting).when(tick, step);
    m
}
