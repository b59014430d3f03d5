//! The [`Message`] trait: a serializable contract with a message type URN.

use std::any::TypeId;
use std::collections::HashMap;
use std::sync::RwLock;

use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::urn::Urn;

/// A message contract: something that can be published, sent and consumed.
///
/// Derive it with `#[derive(Message)]` (see the `busway` crate), which sets the URN from
/// `#[message(urn = "...")]` or from the module path and type name. Implement it by hand when
/// the URN must be computed:
///
/// ```
/// use busway_core::{Message, Urn};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Ping { n: u32 }
///
/// impl Message for Ping {
///     fn message_type() -> &'static Urn {
///         static URN: Urn = Urn::from_static("urn:message:Diagnostics:Ping");
///         &URN
///     }
/// }
/// assert_eq!(Ping::message_type().as_str(), "urn:message:Diagnostics:Ping");
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a busway message",
    label = "not a message contract",
    note = "add `#[derive(Serialize, Deserialize, Message)]` to `{Self}`"
)]
pub trait Message: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The message type URN, the routing identity on every transport.
    fn message_type() -> &'static Urn;

    /// The other contracts this message is, in the order MassTransit lists them after the
    /// concrete type in `messageType`: each declared contract, followed by the contracts it
    /// declares (`#[message(implements(OrderEvent))]`). Publishing lists them all, and the
    /// transports route the concrete type to each (RabbitMQ exchange-to-exchange bindings,
    /// Service Bus forwarding subscriptions), so consumers of a base contract receive it.
    fn implemented_types() -> &'static [Urn] {
        &[]
    }

    /// The message key (Kafka partition key, ordering lane), if the contract has one.
    fn message_key(&self) -> Option<String> {
        None
    }

    /// The correlation id the message carries itself (MassTransit's `CorrelatedBy<Guid>`).
    fn correlation_id(&self) -> Option<Uuid> {
        None
    }
}

/// A new message id: a time-ordered UUID (version 7), like MassTransit's sequential `NewId`.
pub fn new_id() -> Uuid {
    Uuid::now_v7()
}

/// Support for generated code. Not public API.
#[doc(hidden)]
pub mod private {
    use super::*;

    pub use crate::urn::{set_direct_contracts, set_entity_name};
    pub use serde::Serialize;
    pub use serde::de::DeserializeOwned;
    pub use std::sync::OnceLock;
    pub use uuid::Uuid;

    /// The URN of a generic message type, computed once per concrete type.
    pub fn urn_for_type<T: 'static>(make: impl FnOnce() -> Urn) -> &'static Urn {
        static CACHE: OnceLock<RwLock<HashMap<TypeId, &'static Urn>>> = OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        let id = TypeId::of::<T>();
        if let Some(urn) = cache.read().unwrap_or_else(|e| e.into_inner()).get(&id) {
            return urn;
        }
        let mut write = cache.write().unwrap_or_else(|e| e.into_inner());
        write
            .entry(id)
            .or_insert_with(|| Box::leak(Box::new(make())))
    }

    /// The implemented contracts of a generic message type, computed once per concrete type.
    pub fn types_for_type<T: 'static>(make: impl FnOnce() -> Vec<Urn>) -> &'static [Urn] {
        static CACHE: OnceLock<RwLock<HashMap<TypeId, &'static [Urn]>>> = OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        let id = TypeId::of::<T>();
        if let Some(types) = cache.read().unwrap_or_else(|e| e.into_inner()).get(&id) {
            return types;
        }
        let mut write = cache.write().unwrap_or_else(|e| e.into_inner());
        write
            .entry(id)
            .or_insert_with(|| Box::leak(make().into_boxed_slice()))
    }

    /// Adds contract `C` and the contracts it implements to `out`, each once.
    pub fn push_contract<C: crate::Message>(out: &mut Vec<Urn>) {
        for urn in std::iter::once(C::message_type()).chain(C::implemented_types()) {
            if !out.contains(urn) {
                out.push(urn.clone());
            }
        }
    }

    /// Converts a correlation id field to `Option<Uuid>`.
    pub trait ToCorrelationId {
        /// The id, if set.
        fn to_correlation_id(&self) -> Option<Uuid>;
    }

    impl ToCorrelationId for Uuid {
        fn to_correlation_id(&self) -> Option<Uuid> {
            Some(*self)
        }
    }

    impl ToCorrelationId for Option<Uuid> {
        fn to_correlation_id(&self) -> Option<Uuid> {
            *self
        }
    }
}
