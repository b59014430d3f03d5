//! Observers: hooks called as messages are sent, consumed, faulted and moved. The test
//! harness is built on them; metrics exporters can be too.

use std::fmt;
use std::sync::Arc;

use crate::context::ReceiveContext;
use crate::error::{ConsumeError, Error};
use crate::outgoing::OutgoingMessage;
use crate::transport::{MoveKind, TransportMessage};
use crate::urn::Urn;

/// Called by the bus as messages flow. Every method has an empty default; implement what you
/// need. Methods run inline on the message's task, so keep them short.
pub trait BusObserver: Send + Sync + 'static {
    /// A publish or send finished (`error` is `None` when the transport accepted it).
    fn on_send(&self, message: &OutgoingMessage, error: Option<&Error>) {
        let _ = (message, error);
    }

    /// A consumer finished one attempt on a message (`error` is `None` on success).
    fn on_consume(
        &self,
        context: &ReceiveContext,
        consumer_type: &str,
        message_type: &Urn,
        error: Option<&ConsumeError>,
    ) {
        let _ = (context, consumer_type, message_type, error);
    }

    /// A message was moved to an endpoint's error or skipped queue.
    fn on_move(&self, endpoint: &str, kind: MoveKind, message: &TransportMessage, reason: &str) {
        let _ = (endpoint, kind, message, reason);
    }
}

/// The observers registered on a bus.
#[derive(Clone, Default)]
pub(crate) struct Observers(Arc<Vec<Arc<dyn BusObserver>>>);

impl Observers {
    pub(crate) fn new(list: Vec<Arc<dyn BusObserver>>) -> Self {
        Self(Arc::new(list))
    }

    pub(crate) fn on_send(&self, message: &OutgoingMessage, error: Option<&Error>) {
        for o in self.0.iter() {
            o.on_send(message, error);
        }
    }

    pub(crate) fn on_consume(
        &self,
        context: &ReceiveContext,
        consumer_type: &str,
        message_type: &Urn,
        error: Option<&ConsumeError>,
    ) {
        for o in self.0.iter() {
            o.on_consume(context, consumer_type, message_type, error);
        }
    }

    pub(crate) fn on_move(
        &self,
        endpoint: &str,
        kind: MoveKind,
        message: &TransportMessage,
        reason: &str,
    ) {
        for o in self.0.iter() {
            o.on_move(endpoint, kind, message, reason);
        }
    }
}

impl fmt::Debug for Observers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observers")
            .field("len", &self.0.len())
            .finish()
    }
}
