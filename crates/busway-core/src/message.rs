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

    /// True when the contract carries its own correlation id ([`Message::correlation_id`]
    /// is implemented; `#[message(correlation_id)]` on a field), so that a saga can correlate
    /// the message without being told how.
    fn has_correlation_id() -> bool {
        false
    }
}

/// How a type appears as a generic argument of a message type URN, as MassTransit writes it:
/// `urn:message:Contracts:Batch[[Contracts:OrderPlaced]]` for `Batch<OrderPlaced>`,
/// `[[System:Int32]]` for an `int`. Every [`Message`] is one (its URN without the
/// `urn:message:` prefix); so are the primitives a .NET contract can be generic over.
///
/// ```
/// use busway_core::UrnArgument;
/// assert_eq!(<i32 as UrnArgument>::urn_argument(), "System:Int32");
/// assert_eq!(<String as UrnArgument>::urn_argument(), "System:String");
/// ```
pub trait UrnArgument {
    /// The argument's name inside `[[..]]`.
    fn urn_argument() -> String;
}

impl<T: Message> UrnArgument for T {
    fn urn_argument() -> String {
        let urn = T::message_type().as_str();
        urn.strip_prefix("urn:message:").unwrap_or(urn).to_string()
    }
}

macro_rules! system_arguments {
    ($($ty:ty => $name:literal),* $(,)?) => {$(
        impl UrnArgument for $ty {
            fn urn_argument() -> String {
                $name.to_string()
            }
        }
    )*};
}

system_arguments!(
    String => "System:String",
    bool => "System:Boolean",
    u8 => "System:Byte",
    i8 => "System:SByte",
    i16 => "System:Int16",
    u16 => "System:UInt16",
    i32 => "System:Int32",
    u32 => "System:UInt32",
    i64 => "System:Int64",
    u64 => "System:UInt64",
    f32 => "System:Single",
    f64 => "System:Double",
    Uuid => "System:Guid",
    chrono::DateTime<chrono::Utc> => "System:DateTime",
);

/// A new message id: a time-ordered UUID (version 7), like MassTransit's sequential `NewId`.
pub fn new_id() -> Uuid {
    Uuid::now_v7()
}

/// Support for generated code. Not public API.
#[doc(hidden)]
pub mod private {
    use super::*;

    pub use super::UrnArgument;
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

    /// `base` with MassTransit's generic argument list: `base[[A],[B]]`.
    pub fn generic_urn(base: Urn, arguments: &[String]) -> Urn {
        if arguments.is_empty() {
            return base;
        }
        let inner: Vec<String> = arguments.iter().map(|a| format!("[{a}]")).collect();
        Urn::new(format!("{}[{}]", base.as_str(), inner.join(",")))
    }

    /// Adds contract `C` and the contracts it implements to `out`, each once.
    pub fn push_contract<C: Message>(out: &mut Vec<Urn>) {
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
