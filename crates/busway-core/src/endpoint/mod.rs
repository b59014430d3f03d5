//! Receive endpoints: their configuration ([`config`]), the plan the bus builds from it
//! (`plan`), the loop that takes deliveries from the transport (`receive`), the tasks that
//! run them through the pipeline (`workers`), and what happens to each delivery at the end
//! (`settle`).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::context::EndpointInfo;
use crate::observer::Observers;
use crate::pipeline::ConsumeService;

pub mod config;
pub(crate) mod plan;
pub(crate) mod receive;
pub(crate) mod settle;
pub(crate) mod workers;

/// Shared state of a running endpoint.
pub(crate) struct EndpointRuntime {
    pub(crate) bus: Bus,
    pub(crate) observers: Observers,
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
