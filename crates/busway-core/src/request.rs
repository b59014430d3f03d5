//! Request/response: a client that sends a request and awaits the response (or a fault)
//! through the bus's own response endpoint.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::address::Address;
use crate::bus::{Bus, BusInner};
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, RequestFault, Result};
use crate::fault::ExceptionInfo;
use crate::headers::{Headers, names};
use crate::message::{Message, new_id};
use crate::send::SendBuilder;
use crate::serializer::{ReceivedMessage, decode_message};
use crate::transport::Receiver;

/// Requests waiting for a response, by request id.
#[derive(Default)]
pub(crate) struct Requests {
    pending: Mutex<HashMap<Uuid, oneshot::Sender<ReceivedMessage>>>,
}

impl Requests {
    fn register(&self, id: Uuid) -> oneshot::Receiver<ReceivedMessage> {
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        rx
    }

    fn remove(&self, id: &Uuid) -> Option<oneshot::Sender<ReceivedMessage>> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id)
    }

    /// Number of requests waiting.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.pending.lock().map(|p| p.len()).unwrap_or(0)
    }
}

/// Removes the pending entry when the request future ends or is dropped (cancelled).
struct PendingGuard<'a> {
    requests: &'a Requests,
    id: Uuid,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.requests.remove(&self.id);
    }
}

/// Reads responses on the bus's response endpoint and completes waiting requests.
pub(crate) async fn run_response_endpoint(
    bus: Arc<BusInner>,
    mut receiver: Box<dyn Receiver>,
    stop: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            d = receiver.next() => d,
        };
        let delivery = match next {
            None => break,
            Some(Err(err)) => {
                tracing::warn!(error = %err, "response endpoint receive failed");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                }
            }
            Some(Ok(d)) => d,
        };
        match bus.serializers.deserialize(&delivery.message) {
            Ok(received) => {
                let waiting = received
                    .envelope
                    .request_id
                    .and_then(|id| bus.requests.remove(&id));
                match waiting {
                    Some(tx) => {
                        let _ = tx.send(received);
                    }
                    None => tracing::debug!(
                        request_id = ?received.envelope.request_id,
                        message_id = ?received.envelope.message_id,
                        "a response arrived for a request that is no longer waiting (timed out or cancelled); discarding it"
                    ),
                }
            }
            Err(err) => {
                // Like any endpoint: an unreadable message goes to `<endpoint>_error` with the
                // reason, not away.
                unreadable_response(&bus, delivery, &err).await;
                continue;
            }
        }
        if let Err(err) = delivery.settlement.ack().await {
            tracing::debug!(error = %err, "response ack failed");
        }
    }
    if let Err(err) = receiver.stop().await {
        tracing::debug!(error = %err, "stopping the response receiver failed");
    }
    if let Err(err) = receiver.close().await {
        tracing::debug!(error = %err, "closing the response receiver failed");
    }
}

/// Moves a message the response endpoint could not read to its error queue, with the
/// fault headers an ordinary endpoint writes. If the move fails the message goes back to the
/// broker (requeued, or redelivered when the settlement is gone), never dropped.
async fn unreadable_response(bus: &BusInner, delivery: crate::transport::Delivery, err: &Error) {
    let topology = &bus.response_topology;
    let details = crate::fault::FaultDetails::unreadable(err, &topology.address);
    tracing::error!(endpoint = %topology.name, error = %err, "the response endpoint could not read a message; moving it to the error queue");
    let mut message = delivery.message;
    let kind = crate::transport::MoveKind::Error;
    crate::endpoint::prepare_move(
        bus,
        &topology.name,
        kind,
        &mut message,
        &details.message,
        |h| details.write_headers(h),
    );
    if let Err(failed) = delivery.settlement.move_to(kind, message).await {
        tracing::error!(endpoint = %topology.name, error = %failed.error, "could not move an unreadable response to the error queue; returning it to the broker");
        if let Some(held) = failed.settlement
            && let Err(e) = held.requeue().await
        {
            tracing::warn!(endpoint = %topology.name, error = %e, "requeueing the unreadable response failed; the broker redelivers it");
        }
    }
}

/// Sends requests of type `Req` and awaits typed responses.
///
/// The request carries a new request id, the bus's response address and the accepted
/// response types (`MT-Request-AcceptType`); its time to live is the timeout. A `Fault<Req>`
/// in reply ends the request with an error for which `is_request_fault()` is true.
pub struct RequestClient<Req> {
    bus: Bus,
    destination: Option<Address>,
    timeout: Duration,
    _request: PhantomData<fn(Req)>,
}

impl<Req> Clone for RequestClient<Req> {
    fn clone(&self) -> Self {
        Self {
            bus: self.bus.clone(),
            destination: self.destination.clone(),
            timeout: self.timeout,
            _request: PhantomData,
        }
    }
}

impl<Req> fmt::Debug for RequestClient<Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestClient")
            .field("request", &std::any::type_name::<Req>())
            .field("destination", &self.destination)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl<Req: Message> RequestClient<Req> {
    pub(crate) fn new(bus: Bus, destination: Option<Address>, timeout: Duration) -> Self {
        Self {
            bus,
            destination,
            timeout,
            _request: PhantomData,
        }
    }

    /// The same client with another timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends `request` and awaits a response of type `Resp`.
    pub async fn get_response<Resp: Message>(&self, request: Req) -> Result<Response<Resp>> {
        self.request(request).get_response().await
    }

    /// A request with per-call options (headers, timeout, cancellation).
    pub fn request(&self, request: Req) -> Request<'_, Req> {
        Request {
            client: self,
            request,
            timeout: self.timeout,
            headers: Headers::new(),
            cancel: None,
        }
    }
}

/// One request being prepared; finish with [`Request::get_response`].
#[must_use = "a request does nothing until get_response is awaited"]
pub struct Request<'a, Req> {
    client: &'a RequestClient<Req>,
    request: Req,
    timeout: Duration,
    headers: Headers,
    cancel: Option<CancellationToken>,
}

impl<Req> fmt::Debug for Request<'_, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct FaultShape {
    #[serde(default, alias = "Exceptions")]
    exceptions: Vec<ExceptionInfo>,
}

impl<Req: Message> Request<'_, Req> {
    /// Overrides the client's timeout for this request.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Adds a header to the request.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Ends the request with a cancelled error when `token` is cancelled.
    pub fn cancellation(mut self, token: CancellationToken) -> Self {
        self.cancel = Some(token);
        self
    }

    /// Sends the request and awaits a response of type `Resp`.
    pub async fn get_response<Resp: Message>(self) -> Result<Response<Resp>> {
        let bus = self.client.bus.inner().clone();
        bus.ensure_response_endpoint().await?;
        let request_id = new_id();
        let rx = bus.requests.register(request_id);
        let _guard = PendingGuard {
            requests: &bus.requests,
            id: request_id,
        };
        let builder = match &self.client.destination {
            Some(address) => SendBuilder::send(&bus, None, Ok(address.clone()), self.request),
            None => SendBuilder::publish(&bus, None, self.request),
        };
        builder
            .uncaptured()
            .request_id(request_id)
            .response_address(bus.address.clone())
            .header(
                names::REQUEST_ACCEPT_TYPE,
                vec![Resp::message_type().as_str().to_string()],
            )
            .headers(&self.headers)
            .time_to_live(self.timeout)
            .await?;

        let cancel = self.cancel.unwrap_or_default();
        let received = tokio::select! {
            r = rx => r.map_err(|_| Error::closed("the bus stopped while the request was waiting"))?,
            _ = tokio::time::sleep(self.timeout) => {
                return Err(Error::timeout(format!(
                    "no response to {} within {:?} (request id {request_id})",
                    Req::message_type(),
                    self.timeout
                )));
            }
            _ = cancel.cancelled() => {
                return Err(Error::new(ErrorKind::Cancelled, "the request was cancelled"));
            }
        };
        let types = &received.envelope.message_type;
        if types.iter().any(|t| t == Resp::message_type()) || received.any_message_type {
            let message = decode_message::<Resp>(&received.message).map_err(|e| {
                Error::with_source(
                    ErrorKind::Deserialize,
                    format!("the response is not a valid {}", Resp::message_type()),
                    e,
                )
            })?;
            return Ok(Response {
                message,
                envelope: received.envelope,
            });
        }
        if types.iter().any(|t| t.faulted_type().is_some()) {
            let shape: FaultShape = decode_message(&received.message).unwrap_or(FaultShape {
                exceptions: Vec::new(),
            });
            return Err(Error::request_fault(RequestFault::new(shape.exceptions)));
        }
        let listed: Vec<&str> = types.iter().map(|t| t.as_str()).collect();
        Err(Error::new(
            ErrorKind::Deserialize,
            format!(
                "the response has type(s) [{}], expected {}",
                listed.join(", "),
                Resp::message_type()
            ),
        ))
    }
}

/// A response: the message and its envelope. Derefs to the message.
#[derive(Debug, Clone)]
pub struct Response<M> {
    message: M,
    envelope: Envelope,
}

impl<M> Response<M> {
    /// The response message.
    pub fn message(&self) -> &M {
        &self.message
    }

    /// Takes the message.
    pub fn into_message(self) -> M {
        self.message
    }

    /// The response's envelope.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }
}

impl<M> Deref for Response<M> {
    type Target = M;
    fn deref(&self) -> &M {
        &self.message
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_removes_pending_requests() {
        let requests = Requests::default();
        let id = new_id();
        let _rx = requests.register(id);
        assert_eq!(requests.len(), 1);
        drop(PendingGuard {
            requests: &requests,
            id,
        });
        assert_eq!(requests.len(), 0);
    }
}
