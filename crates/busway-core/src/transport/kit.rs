//! Small pieces every transport needs, so each one does them the same way: refusing
//! addresses of another transport, handing a delivery back when its settlement is dropped,
//! and remembering temporary entities to delete at close. [`super::Backoff`] is the fourth.

use std::future::Future;
use std::sync::Mutex;

use crate::address::Address;
use crate::error::{Error, ErrorKind, Result};

/// Refuses an address whose scheme is not one of `accepted`, with an error that names the
/// transport. Short forms (`queue:orders`, `exchange:orders`, a bare name) have no scheme
/// and pass: every transport reads them.
///
/// ```
/// use busway_core::Address;
/// use busway_core::transport::check_scheme;
///
/// let rabbit = Address::parse("rabbitmq://localhost/orders").unwrap();
/// assert!(check_scheme("RabbitMQ", &rabbit, &["rabbitmq", "rabbitmqs"]).is_ok());
/// let err = check_scheme("Kafka", &rabbit, &["kafka"]).unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "invalid address: the Kafka transport cannot send to `rabbitmq://localhost/orders` (scheme `rabbitmq`)"
/// );
/// assert!(check_scheme("Kafka", &Address::parse("queue:orders").unwrap(), &["kafka"]).is_ok());
/// ```
pub fn check_scheme(transport: &str, address: &Address, accepted: &[&str]) -> Result<()> {
    match address.scheme() {
        Some(scheme) if !accepted.contains(&scheme) => Err(Error::new(
            ErrorKind::Address,
            format!("the {transport} transport cannot send to `{address}` (scheme `{scheme}`)"),
        )),
        _ => Ok(()),
    }
}

/// What a transport holds for a delivery that is not yet settled (an acker, a lock, the
/// stored message) and how it hands the delivery back to the broker when nobody settles it.
///
/// `give_back` runs inside `Drop`, so it must not block: a transport that needs I/O to hand
/// a message back spawns it with [`spawn_on_current`].
pub trait GiveBack: Send + 'static {
    /// Returns the delivery to the broker (requeue, unlock, mark unfinished).
    fn give_back(self);
}

/// A delivery's unsettled state that goes back to the broker if the settlement is dropped
/// before one of its methods took it: the "a dropped settlement returns the message"
/// promise of [`super::Settlement`], kept in one place.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use busway_core::transport::{GiveBack, SettleOnDrop};
///
/// struct Held(Arc<Mutex<Vec<&'static str>>>);
/// impl GiveBack for Held {
///     fn give_back(self) {
///         self.0.lock().unwrap().push("requeued");
///     }
/// }
///
/// let log = Arc::new(Mutex::new(Vec::new()));
/// let mut settled = SettleOnDrop::new(Held(log.clone()));
/// assert!(settled.take().is_some()); // acked: nothing to give back
/// drop(settled);
/// drop(SettleOnDrop::new(Held(log.clone()))); // dropped unsettled
/// assert_eq!(*log.lock().unwrap(), ["requeued"]);
/// ```
#[derive(Debug)]
pub struct SettleOnDrop<T: GiveBack>(Option<T>);

impl<T: GiveBack> SettleOnDrop<T> {
    /// Holds `pending` until it is taken or dropped.
    pub fn new(pending: T) -> Self {
        Self(Some(pending))
    }

    /// Takes the unsettled state to settle it; `None` if it was taken already.
    pub fn take(&mut self) -> Option<T> {
        self.0.take()
    }

    /// The unsettled state, if it has not been taken.
    pub fn get(&self) -> Option<&T> {
        self.0.as_ref()
    }

    /// Whether the delivery is still unsettled.
    pub fn is_pending(&self) -> bool {
        self.0.is_some()
    }
}

impl<T: GiveBack> Drop for SettleOnDrop<T> {
    fn drop(&mut self) {
        if let Some(pending) = self.0.take() {
            pending.give_back();
        }
    }
}

/// Spawns `task` on the Tokio runtime this thread is in, if any (from `Drop`, where there
/// may be none: at process exit the broker hands unsettled messages back by itself).
pub fn spawn_on_current(task: impl Future<Output = ()> + Send + 'static) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(task);
    }
}

/// The temporary entities a transport declared (a bus's response queue where the broker has
/// no auto-delete), to delete when the transport closes.
///
/// ```
/// use busway_core::transport::TemporaryEntities;
///
/// let temporaries = TemporaryEntities::default();
/// temporaries.add("host_bus_1");
/// temporaries.add("host_bus_1");
/// assert_eq!(temporaries.take_all(), ["host_bus_1"]);
/// assert!(temporaries.take_all().is_empty());
/// ```
#[derive(Debug, Default)]
pub struct TemporaryEntities(Mutex<Vec<String>>);

impl TemporaryEntities {
    /// Remembers `name` (once).
    pub fn add(&self, name: &str) {
        let mut names = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
    }

    /// Every name remembered so far, forgetting them.
    pub fn take_all(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}
