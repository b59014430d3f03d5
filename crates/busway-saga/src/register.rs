//! Putting a state machine on a bus: on an endpoint named after its state type, or on one
//! the user configures.

use std::sync::Arc;

use busway_core::{BusBuilder, EndpointConfigurator};

use crate::instance::SagaState;
use crate::machine::StateMachine;
use crate::repository::SagaRepository;

/// Adds a state machine to a bus on an endpoint of its own, named by the bus's endpoint
/// name formatter after the state type (MassTransit's `Saga<T>` name): `OrderState` →
/// `order-state`, with a `Saga` suffix dropped. Every event's message type is bound to it.
pub trait BusBuilderSagaExt: Sized {
    /// Runs `machine` over `repository` on its own endpoint; a machine that cannot work
    /// makes `Bus::build` fail with what is wrong.
    fn state_machine<S: SagaState, R: SagaRepository<S>>(
        self,
        machine: StateMachine<S>,
        repository: R,
    ) -> Self;
}

impl BusBuilderSagaExt for BusBuilder {
    fn state_machine<S: SagaState, R: SagaRepository<S>>(
        self,
        machine: StateMachine<S>,
        repository: R,
    ) -> Self {
        match machine.into_registrations(Arc::new(repository)) {
            Ok(registrations) => {
                self.consumer_registrations(endpoint_type_name::<S>(), registrations)
            }
            Err(problems) => self.config_error(problems.join("; ")),
        }
    }
}

/// Adds a state machine to an endpoint configured by hand.
pub trait EndpointSagaExt: Sized {
    /// Runs `machine` over `repository` at this endpoint; a machine that cannot work makes
    /// `Bus::build` fail with what is wrong.
    fn state_machine<S: SagaState, R: SagaRepository<S>>(
        self,
        machine: StateMachine<S>,
        repository: R,
    ) -> Self;
}

impl EndpointSagaExt for EndpointConfigurator {
    fn state_machine<S: SagaState, R: SagaRepository<S>>(
        self,
        machine: StateMachine<S>,
        repository: R,
    ) -> Self {
        match machine.into_registrations(Arc::new(repository)) {
            Ok(registrations) => registrations
                .into_iter()
                .fold(self, |e, registration| e.registration(registration)),
            Err(problems) => self.config_error(problems.join("; ")),
        }
    }
}

/// The type name the endpoint is named after: `S`'s, without a `Saga` suffix.
fn endpoint_type_name<S>() -> String {
    let full = std::any::type_name::<S>();
    let base = full.split('<').next().unwrap_or(full);
    let simple = base.rsplit("::").next().unwrap_or(base);
    match simple.strip_suffix("Saga") {
        Some(stripped) if !stripped.is_empty() => stripped.to_string(),
        _ => simple.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(dead_code)]
    struct OrderState;
    #[allow(dead_code)]
    struct BillingSaga;

    #[test]
    fn endpoint_names_follow_masstransit() {
        assert_eq!(endpoint_type_name::<OrderState>(), "OrderState");
        assert_eq!(endpoint_type_name::<BillingSaga>(), "Billing");
    }
}
