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

/// Two buses on one in-memory broker, each with its own repository handle (its own pool or
/// connection: two processes' worth), compete for the queue `queue`: `instances` ×
/// `per_instance` ticks in random order. Asserts every counter exact, one save per tick and
/// each tick's ack exactly once downstream.
pub async fn competing_ticks<R>(queue: &str, repos: [R; 2], instances: usize, per_instance: u32)
where
    R: busway::saga::SagaRepository<TickState>
        + busway::saga::testing::InspectSagas<TickState>
        + Clone,
{
    use std::time::Duration;

    use busway::saga::EndpointSagaExt;
    use busway::{Bus, ConsumeContext, InMemory};

    use crate::support::Recorder;

    let broker = InMemory::new();
    let acks = Recorder::<(Uuid, u32)>::default();
    let check = repos[0].clone();
    let mut running = Vec::new();
    for (worker, repo) in (1..).zip(repos) {
        let bus = Bus::builder()
            .transport(broker.clone())
            .receive_endpoint(queue, move |e| {
                e.prefetch(32)
                    .concurrency_limit(16)
                    .state_machine(tick_machine(worker), repo)
            })
            .build()
            .await
            .expect("build");
        running.push(bus.start().await.expect("start"));
    }
    let downstream = Bus::builder()
        .transport(broker.clone())
        .receive_endpoint(format!("{queue}-acks"), {
            let acks = acks.clone();
            move |e| {
                e.handler(acks.record(|c: &ConsumeContext<SagaTickAck>| {
                    (c.message().counter_id, c.message().n)
                }))
            }
        })
        .build()
        .await
        .expect("build");
    running.push(downstream.start().await.expect("start"));
    let ids: Vec<Uuid> = (0..instances).map(|_| Uuid::now_v7()).collect();
    let mut ticks: Vec<(Uuid, u32)> = ids
        .iter()
        .flat_map(|id| (1..=per_instance).map(move |n| (*id, n)))
        .collect();
    fastrand::shuffle(&mut ticks);
    for (counter_id, n) in ticks {
        downstream
            .send(format!("queue:{queue}"), SagaTick { counter_id, n })
            .await
            .expect("send");
    }
    let total = instances * per_instance as usize;
    acks.wait_for(total, Duration::from_secs(120), "every tick's ack")
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut seen = acks.entries();
    assert_eq!(seen.len(), total, "no duplicate downstream");
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), total, "each tick acknowledged once");
    let sum: u64 = (1..=u64::from(per_instance)).sum();
    for id in &ids {
        let i =
            busway::saga::testing::expect_state(&check, *id, "Counting", Duration::from_secs(10))
                .await
                .expect("the counter exists");
        assert_eq!(
            (i.data.count, i.data.sum),
            (u64::from(per_instance), sum),
            "{id}"
        );
        assert_eq!(
            i.version,
            i64::from(per_instance),
            "{id}: one save per tick"
        );
    }
    for r in running {
        r.shutdown().await.expect("shutdown");
    }
}
