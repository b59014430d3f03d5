//! The conformance tests. Each is an `async fn` taking a fixture; [`crate::conformance_suite!`]
//! turns them into `#[tokio::test]`s for one transport.
//!
//! Every test uses its own message types and uniquely named endpoints, so the tests can run in
//! parallel on one broker without seeing each other's messages.

use std::sync::Arc;
use std::time::Duration;

use busway::headers::names;
use busway::{
    Address, Bus, BusBuilder, ConsumeContext, ConsumeError, Envelope, Fault, Message, Retry,
    Transport, TransportMessage,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::TransportFixture;
use crate::support::{
    Counter, Gauge, Recorder, depth, header, init_tracing, take_queue, unique, wait_until,
};

mod delivery;
mod faults;
mod lifecycle;
mod propagation;
mod requests;
mod retries;
mod sagas;
mod scheduling;
mod unreadable;

pub use delivery::*;
pub use faults::*;
pub use lifecycle::*;
pub use propagation::*;
pub use requests::*;
pub use retries::*;
pub use sagas::*;
pub use scheduling::*;
pub use unreadable::*;

const WAIT: Duration = Duration::from_secs(20);

macro_rules! contract {
    ($($name:ident),* $(,)?) => {$(
        #[doc = concat!("Test contract `", stringify!($name), "`.")]
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, busway::Message)]
        #[serde(rename_all = "camelCase")]
        pub struct $name {
            /// A number.
            pub n: u64,
        }
    )*};
}

contract!(
    FanOut,
    Competing,
    Prefetched,
    Retried,
    RetriedThenOk,
    Redelivered,
    RedeliveredExhausted,
    Faulty,
    Handled,
    NotHandled,
    Panicky,
    FaultSource,
    Slow,
    TimedOut,
    Draining,
    Stuck,
    ChainA,
    ChainB,
    ChainC,
    Traced,
    TracedNext,
    Question,
    Answer,
    FailingQuestion,
    Unanswered,
    Scheduled,
);

async fn build<F: TransportFixture>(t: &F::Transport, builder: BusBuilder) -> Bus {
    builder
        .transport(t.clone())
        .build()
        .await
        .expect("the bus builds and deploys its topology")
}

/// Deletes each endpoint's queue and its `_error` and `_skipped` queues.
async fn cleanup<F: TransportFixture>(fixture: &F, t: &F::Transport, endpoints: &[&String]) {
    let mut queues = Vec::new();
    for e in endpoints {
        queues.push((*e).clone());
        queues.push(format!("{e}_error"));
        queues.push(format!("{e}_skipped"));
    }
    fixture.cleanup(t, &queues).await;
}

/// A handler that counts the messages it consumes.
fn counting<M: Message>(
    counter: &Counter,
) -> impl Fn(ConsumeContext<M>) -> std::future::Ready<Result<(), ConsumeError>> + Send + Sync + 'static
{
    let counter = counter.clone();
    move |_| {
        counter.incr();
        std::future::ready(Ok(()))
    }
}

fn raw(body: &'static [u8], content_type: Option<&str>) -> TransportMessage {
    let mut message = TransportMessage::new(bytes::Bytes::from_static(body))
        .with_message_id(Uuid::now_v7().to_string());
    message.content_type = content_type.map(str::to_string);
    message
}

/// Sends `body` as it is (no envelope written by busway) to `address`.
async fn send_raw(
    t: &impl Transport,
    address: &Address,
    body: &'static [u8],
    content_type: Option<&str>,
) {
    t.send(address, raw(body, content_type), &Default::default())
        .await
        .expect("raw send");
}

/// A MassTransit envelope cut short: not valid JSON.
const BROKEN_ENVELOPE: &[u8] = b"{\"messageId\": oops";

/// Expands the conformance suite into `#[tokio::test]`s for one fixture;
/// `conformance_suite!(ignore = "reason", fixture)` marks every test `#[ignore]` with the reason.
#[macro_export]
macro_rules! conformance_suite {
    ($fixture:expr) => {
        $crate::conformance_suite!(@all []; $fixture);
    };
    (ignore = $reason:literal, $fixture:expr) => {
        $crate::conformance_suite!(@all [ignore = $reason]; $fixture);
    };
    (@all $attrs:tt; $fixture:expr) => {
        $crate::conformance_suite!(@tests $attrs; $fixture;
            fan_out_to_every_endpoint,
            competing_consumers_each_message_once,
            prefetch_bound_is_respected,
            retry_counts_are_exact,
            delayed_redelivery,
            error_queue_has_fault_headers,
            unhandled_type_goes_to_skipped,
            unreadable_messages_go_to_error,
            wrong_shape_is_not_retried,
            panicking_consumer_faults_and_endpoint_survives,
            consumer_timeout_faults,
            fault_event_is_published,
            shutdown_drains_in_flight,
            shutdown_deadline_requeues,
            ids_propagate_through_publish_chains,
            traceparent_propagates,
            request_response,
            unreadable_responses_go_to_error,
            scheduled_send_waits,
            saga_lifecycle,
            saga_events_of_one_instance_never_lose_an_update,
            saga_timeouts,
            saga_faults_go_to_error,
        );
    };
    (@tests $attrs:tt; $fixture:expr; $($name:ident),* $(,)?) => {$(
        $crate::conformance_suite!(@one $attrs; $fixture; $name);
    )*};
    (@one [$($attr:meta)*]; $fixture:expr; $name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])*
        async fn $name() {
            $crate::conformance::$name(&$fixture).await;
        }
    };
}
