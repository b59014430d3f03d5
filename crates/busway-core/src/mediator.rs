//! In-process domain events: a dispatcher (mediator) that hands events to handlers in the
//! same process, with no transport and no serialization.
//!
//! An aggregate records events in a [`DomainEvents`] list while it changes; after the
//! aggregate is saved, the application dispatches them:
//!
//! ```
//! use busway_core::mediator::{DomainEventHandler, DomainEvents, Mediator};
//! use busway_core::BoxError;
//!
//! #[derive(Debug)]
//! struct OrderPlaced { order_id: u64 }
//!
//! struct UpdateSalesReport;
//!
//! impl DomainEventHandler<OrderPlaced> for UpdateSalesReport {
//!     async fn handle(&self, event: &OrderPlaced) -> Result<(), BoxError> {
//!         println!("order {} counted", event.order_id);
//!         Ok(())
//!     }
//! }
//!
//! # tokio_test_block_on(async {
//! let mediator = Mediator::builder().handler(UpdateSalesReport).build();
//! let mut events = DomainEvents::default();
//! events.record(OrderPlaced { order_id: 7 });
//! // ... save the aggregate, then:
//! let report = mediator.dispatch_all(events.take()).await.unwrap();
//! assert_eq!(report.handled, 1);
//! # });
//! # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
//! # }
//! ```

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::marker::PhantomData;
use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::error::BoxError;

/// Handles in-process domain events of type `E`.
pub trait DomainEventHandler<E: Send + Sync + 'static>: Send + Sync + 'static {
    /// Handles one event. Write it as `async fn handle(&self, event: &E) -> Result<(),
    /// BoxError>`; the future must be `Send`.
    fn handle(&self, event: &E) -> impl Future<Output = Result<(), BoxError>> + Send;
}

/// A recorded event of any type.
pub type DomainEvent = Box<dyn Any + Send + Sync>;

/// The events an aggregate recorded and has not dispatched yet.
#[derive(Default)]
pub struct DomainEvents {
    events: Vec<DomainEvent>,
}

impl DomainEvents {
    /// Records an event.
    pub fn record<E: Send + Sync + 'static>(&mut self, event: E) {
        self.events.push(Box::new(event));
    }

    /// Takes the recorded events, leaving the list empty.
    pub fn take(&mut self) -> Vec<DomainEvent> {
        std::mem::take(&mut self.events)
    }

    /// Number of recorded events.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// True if nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

impl fmt::Debug for DomainEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DomainEvents")
            .field("len", &self.events.len())
            .finish()
    }
}

trait ErasedHandler: Send + Sync {
    fn handle<'a>(
        &'a self,
        event: &'a (dyn Any + Send + Sync),
    ) -> BoxFuture<'a, Result<(), BoxError>>;
    fn name(&self) -> &'static str;
}

struct Typed<E, H> {
    handler: H,
    _event: PhantomData<fn(E)>,
}

impl<E, H> ErasedHandler for Typed<E, H>
where
    E: Send + Sync + 'static,
    H: DomainEventHandler<E>,
{
    fn handle<'a>(
        &'a self,
        event: &'a (dyn Any + Send + Sync),
    ) -> BoxFuture<'a, Result<(), BoxError>> {
        match event.downcast_ref::<E>() {
            Some(e) => Box::pin(self.handler.handle(e)),
            None => Box::pin(async { Err("event type mismatch".into()) }),
        }
    }

    fn name(&self) -> &'static str {
        std::any::type_name::<H>()
    }
}

/// `TypeId` is already a hash; use it as is.
#[derive(Default)]
struct TypeIdHasher(u64);

impl Hasher for TypeIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut buf = [0u8; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(buf);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = self.0.rotate_left(5) ^ n;
    }
}

type HandlerMap = HashMap<TypeId, Vec<Arc<dyn ErasedHandler>>, BuildHasherDefault<TypeIdHasher>>;

/// Dispatches domain events to in-process handlers. Cheap to clone.
#[derive(Clone, Default)]
pub struct Mediator {
    handlers: Arc<HandlerMap>,
}

/// Builds a [`Mediator`].
#[derive(Default)]
pub struct MediatorBuilder {
    handlers: HandlerMap,
}

impl MediatorBuilder {
    /// Adds a handler; the event type is inferred when `H` handles one type.
    pub fn handler<E, H>(mut self, handler: H) -> Self
    where
        E: Send + Sync + 'static,
        H: DomainEventHandler<E>,
    {
        self.handlers
            .entry(TypeId::of::<E>())
            .or_default()
            .push(Arc::new(Typed::<E, H> {
                handler,
                _event: PhantomData,
            }));
        self
    }

    /// Builds the mediator.
    pub fn build(self) -> Mediator {
        Mediator {
            handlers: Arc::new(self.handlers),
        }
    }
}

impl fmt::Debug for MediatorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MediatorBuilder")
            .field("event_types", &self.handlers.len())
            .finish()
    }
}

/// What a dispatch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DispatchReport {
    /// Handler calls that succeeded.
    pub handled: usize,
}

/// One or more handlers failed. Every handler was still called.
#[derive(Debug)]
pub struct DispatchError {
    /// Handlers that succeeded.
    pub handled: usize,
    /// Each failing handler's type name and error.
    pub failures: Vec<(&'static str, BoxError)>,
}

impl fmt::Display for DispatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} domain event handler(s) failed", self.failures.len())?;
        for (name, err) in &self.failures {
            write!(f, "; {name}: {err}")?;
        }
        Ok(())
    }
}

impl std::error::Error for DispatchError {}

impl Mediator {
    /// A builder.
    pub fn builder() -> MediatorBuilder {
        MediatorBuilder::default()
    }

    /// Dispatches one event to every handler of its type, in registration order. Every
    /// handler runs even if an earlier one fails; failures are reported together.
    pub async fn dispatch<E: Send + Sync + 'static>(
        &self,
        event: &E,
    ) -> Result<DispatchReport, DispatchError> {
        let mut report = DispatchReport::default();
        let mut failures = Vec::new();
        self.dispatch_dyn(TypeId::of::<E>(), event, &mut report, &mut failures)
            .await;
        finish(report, failures)
    }

    /// Dispatches recorded events in order.
    pub async fn dispatch_all(
        &self,
        events: impl IntoIterator<Item = DomainEvent>,
    ) -> Result<DispatchReport, DispatchError> {
        let mut report = DispatchReport::default();
        let mut failures = Vec::new();
        for event in events {
            let any: &(dyn Any + Send + Sync) = &*event;
            self.dispatch_dyn(any.type_id(), any, &mut report, &mut failures)
                .await;
        }
        finish(report, failures)
    }

    async fn dispatch_dyn(
        &self,
        type_id: TypeId,
        event: &(dyn Any + Send + Sync),
        report: &mut DispatchReport,
        failures: &mut Vec<(&'static str, BoxError)>,
    ) {
        let Some(handlers) = self.handlers.get(&type_id) else {
            return;
        };
        for h in handlers {
            match h.handle(event).await {
                Ok(()) => report.handled += 1,
                Err(e) => failures.push((h.name(), e)),
            }
        }
    }

    /// Number of handlers registered for `E`.
    pub fn handler_count<E: 'static>(&self) -> usize {
        self.handlers
            .get(&TypeId::of::<E>())
            .map(Vec::len)
            .unwrap_or(0)
    }
}

fn finish(
    report: DispatchReport,
    failures: Vec<(&'static str, BoxError)>,
) -> Result<DispatchReport, DispatchError> {
    if failures.is_empty() {
        Ok(report)
    } else {
        Err(DispatchError {
            handled: report.handled,
            failures,
        })
    }
}

impl fmt::Debug for Mediator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mediator")
            .field("event_types", &self.handlers.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Placed(u32);
    struct Cancelled;

    struct Count(Arc<AtomicUsize>);

    impl DomainEventHandler<Placed> for Count {
        async fn handle(&self, e: &Placed) -> Result<(), BoxError> {
            self.0.fetch_add(e.0 as usize, Ordering::SeqCst);
            Ok(())
        }
    }

    struct Fails;

    impl DomainEventHandler<Placed> for Fails {
        async fn handle(&self, _: &Placed) -> Result<(), BoxError> {
            Err("nope".into())
        }
    }

    #[tokio::test]
    async fn dispatches_by_type_and_reports_failures() {
        let n = Arc::new(AtomicUsize::new(0));
        let m = Mediator::builder()
            .handler(Fails)
            .handler(Count(n.clone()))
            .build();
        let mut events = DomainEvents::default();
        events.record(Placed(2));
        events.record(Cancelled);
        events.record(Placed(3));
        let err = m.dispatch_all(events.take()).await.unwrap_err();
        assert_eq!(n.load(Ordering::SeqCst), 5, "the later handler still ran");
        assert_eq!(err.handled, 2);
        assert_eq!(err.failures.len(), 2);
        assert!(err.to_string().contains("Fails: nope"));
        assert!(events.is_empty());
        assert_eq!(m.handler_count::<Placed>(), 2);
        assert_eq!(m.handler_count::<Cancelled>(), 0);
    }
}
