//! Azure Service Bus transport for busway, on `azure_messaging_servicebus` 0.21 (the REST
//! data plane: send with broker properties, peek-lock, complete, unlock, renew lock) with
//! entity management over the documented REST management API.
//!
//! ```no_run
//! # async fn f() -> busway_core::Result<()> {
//! use busway_azure_servicebus::ServiceBus;
//! let transport = ServiceBus::new(
//!     "Endpoint=sb://contoso.servicebus.windows.net/;SharedAccessKeyName=app;SharedAccessKey=...",
//! )?;
//! let bus = busway_core::Bus::builder().transport(transport).build().await?;
//! # Ok(()) }
//! ```
//!
//! - **Topology** is MassTransit's: a topic per message type (`Namespace/TypeName`), a queue
//!   per endpoint, a subscription per consuming endpoint that forwards to its queue
//!   (subscription names shortened past 50 characters), `_error` and `_skipped` queues.
//!   Provisioning can be switched off for keys without Manage rights.
//! - **Receiving**: peek-lock; complete after the pipeline succeeds; unlock when a message
//!   should come back; lock renewal while a consumer runs; the broker's delivery count on
//!   every delivery.
//! - **Scheduling**: delayed redelivery and scheduled sends use `ScheduledEnqueueTimeUtc`.
//! - `base_url(..)` points the transport at any endpoint (a local stand-in, a proxy).
//!
//! See `docs/guide/azure-service-bus.md` in the repository, including what was tested where.

mod admin;
mod config;
mod connection;
mod management;
pub mod naming;
mod receive;
mod settle;
mod transport;
mod wire;

pub use config::{BASE_URL_ENV, CONNECTION_STRING_ENV, ServiceBusBuilder};
pub use connection::{ConnectionString, sas_token};
pub use naming::{subscription_name, topic_name};
pub use transport::ServiceBus;
