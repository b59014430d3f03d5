//! Requests from a saga (MassTransit's `Request`): the request goes out when the instance is
//! saved, and its response, its fault or its timeout comes back as an event.

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use busway_core::Fault;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Event;

/// Sent by a saga to itself when a request's time is up without a response (MassTransit's
/// `RequestTimeoutExpired<TRequest>`, with the same fields).
#[derive(Serialize, Deserialize, busway_macros::Message)]
#[serde(rename_all = "camelCase")]
#[message(crate = "busway_core")]
pub struct RequestTimeoutExpired<T> {
    /// The saga instance that sent the request.
    pub correlation_id: Uuid,
    /// When the timeout was scheduled.
    pub timestamp: DateTime<Utc>,
    /// When the request expired.
    pub expiration_time: DateTime<Utc>,
    /// The request's message id.
    pub request_id: Uuid,
    #[serde(skip)]
    _request: PhantomData<fn() -> T>,
}

impl<T> RequestTimeoutExpired<T> {
    pub(crate) fn new(correlation_id: Uuid, request_id: Uuid, timeout: Duration) -> Self {
        let now = Utc::now();
        RequestTimeoutExpired {
            correlation_id,
            timestamp: now,
            expiration_time: now + chrono::Duration::from_std(timeout).unwrap_or_default(),
            request_id,
            _request: PhantomData,
        }
    }
}

impl<T> Clone for RequestTimeoutExpired<T> {
    fn clone(&self) -> Self {
        RequestTimeoutExpired {
            correlation_id: self.correlation_id,
            timestamp: self.timestamp,
            expiration_time: self.expiration_time,
            request_id: self.request_id,
            _request: PhantomData,
        }
    }
}

impl<T> fmt::Debug for RequestTimeoutExpired<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestTimeoutExpired")
            .field("correlation_id", &self.correlation_id)
            .field("request_id", &self.request_id)
            .field("expiration_time", &self.expiration_time)
            .finish()
    }
}

/// A request a saga sends ([`crate::StateMachine::request`]), with the three events its
/// outcome raises. One request of a kind is pending per instance at a time; its outcome
/// events are accepted only while it is pending, so a late response after a timeout is
/// ignored.
pub struct Request<Req, Resp> {
    pub(crate) name: String,
    pub(crate) address: Option<String>,
    pub(crate) timeout: Duration,
    pub(crate) completed: Event<Resp>,
    pub(crate) faulted: Event<Fault<Req>>,
    pub(crate) timed_out: Event<RequestTimeoutExpired<Req>>,
}

impl<Req, Resp> Request<Req, Resp> {
    /// The request's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the request is sent (`None`: published).
    pub fn address(&self) -> Option<&str> {
        self.address.as_deref()
    }

    /// How long the saga waits for a response (zero: no timeout).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Raised by the response.
    pub fn completed(&self) -> Event<Resp> {
        self.completed
    }

    /// Raised by the `Fault<Req>` the responder sends back.
    pub fn faulted(&self) -> Event<Fault<Req>> {
        self.faulted
    }

    /// Raised when the timeout passes without a response.
    pub fn timed_out(&self) -> Event<RequestTimeoutExpired<Req>> {
        self.timed_out
    }
}

impl<Req, Resp> fmt::Debug for Request<Req, Resp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("name", &self.name)
            .field("address", &self.address)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The key of a request's timeout among an instance's schedules.
pub(crate) fn timeout_schedule(name: &str) -> String {
    format!("{name}.Timeout")
}
