//! Saga state machines for busway, after MassTransit's: a machine correlates the events of
//! one long-running process (an order: `OrderPlaced`, `PaymentReceived`, `ItemShipped`),
//! keeps its state in a repository, and reacts with publishes, sends, responses and
//! timeouts.
//!
//! - **Define** a [`StateMachine`] over your state type: [`StateMachine::state`],
//!   [`StateMachine::event`] (with its correlation), then [`StateMachine::initially`],
//!   [`StateMachine::during`], [`StateMachine::during_any`] and [`StateMachine::finally`] with
//!   [`Activities`]: `then`, `publish`, `send`, `respond`, `transition_to`, `finalize`,
//!   `if_else`, `schedule`. Composite events ([`StateMachine::composite_event`]) and
//!   timeouts ([`StateMachine::schedule`]) are there too.
//! - **Register** it with [`BusBuilderSagaExt::state_machine`] (an endpoint of its own) or
//!   [`EndpointSagaExt::state_machine`]; a definition that cannot work is a `Bus::build`
//!   error that names the problem.
//! - **Store** instances in a [`SagaRepository`]: [`InMemorySagaRepository`] here; the
//!   database ones behind features.
//!
//! Safety over MassTransit's defaults: every write checks the instance's version, and a
//! conflict runs the event again on a fresh load (up to 16 times) before it faults; the events
//! of one instance are handled one at a time at an endpoint; messages go out only after the
//! instance is saved (and, with busway-outbox's consumer outbox, in the same transaction).
//!
//! See `docs/guide/sagas.md`.

mod activities;
mod instance;
mod machine;
mod register;
mod repository;
mod runner;
pub mod testing;

pub use activities::{Activities, Activity, BehaviorContext};
pub use instance::{Instance, InstanceMeta, SagaState};
pub use machine::{
    During, Event, EventCorrelation, EventId, FINAL, INITIAL, MissingInstance, Request,
    RequestTimeoutExpired, Schedule, State, StateMachine,
};
pub use register::{BusBuilderSagaExt, EndpointSagaExt};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use repository::RedisSagaRepository;
pub use repository::{
    InMemorySagaRepository, Query, SagaError, SagaErrorKind, SagaRepository, decode_instance,
    encode_instance,
};
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use repository::{PostgresSagaRepository, postgres_schema};
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use repository::{SqliteSagaRepository, sqlite_schema};
