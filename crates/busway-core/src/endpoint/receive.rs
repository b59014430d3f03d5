//! The receive loop: takes deliveries from the transport while permits last and hands them
//! to the endpoint's workers; and starting the endpoints of a bus.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::context::EndpointInfo;
use crate::endpoint::EndpointRuntime;
use crate::endpoint::plan::EndpointPlan;
use crate::endpoint::workers::Workers;
use crate::error::Result;
use crate::observer::Observers;
use crate::transport::{Backoff, Receiver};

/// Starts one endpoint: opens its receiver and spawns its receive loop.
pub(crate) async fn start_endpoint(
    bus: &Bus,
    observers: &Observers,
    plan: EndpointPlan,
    stop: &CancellationToken,
    hard: &CancellationToken,
) -> Result<JoinHandle<()>> {
    let receiver = bus.transport().receive(&plan.topology).await?;
    let runtime = Arc::new(EndpointRuntime {
        bus: bus.clone(),
        observers: observers.clone(),
        info: Arc::new(EndpointInfo {
            name: plan.topology.name.clone(),
            address: plan.topology.address.clone(),
        }),
        pipeline: plan.pipeline,
        publish_faults: plan.publish_faults,
        hand_backs: Default::default(),
        stopping: stop.clone(),
    });
    Ok(tokio::spawn(run_endpoint(
        runtime,
        receiver,
        plan.topology.concurrency,
        stop.clone(),
        hard.clone(),
    )))
}

/// Starts every endpoint of `plans`; if one cannot start, stops the ones already started.
pub(crate) async fn start_endpoints(
    bus: &Bus,
    observers: &Observers,
    plans: Vec<EndpointPlan>,
    stop: &CancellationToken,
    hard: &CancellationToken,
) -> Result<Vec<(String, JoinHandle<()>)>> {
    let mut endpoints = Vec::with_capacity(plans.len());
    for plan in plans {
        let name = plan.topology.name.clone();
        match start_endpoint(bus, observers, plan, stop, hard).await {
            Ok(handle) => endpoints.push((name, handle)),
            Err(err) => {
                stop.cancel();
                for (_, h) in endpoints {
                    let _: std::result::Result<(), _> = h.await;
                }
                return Err(err);
            }
        }
    }
    Ok(endpoints)
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
    let mut failures = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
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
