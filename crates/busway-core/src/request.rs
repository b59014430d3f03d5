//! Request/response: a client that sends a request and awaits the response (or a fault)
//! through the bus's own response endpoint.

use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;
use std::task::{Context, Poll};
use std::time::Duration;

use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tower_service::Service;
use uuid::Uuid;

use crate::address::{Address, IntoAddress};
use crate::bus::{Bus, Requests};
use crate::context::ReceiveContext;
use crate::envelope::Envelope;
use crate::error::{ConsumeError, Error, ErrorKind, RequestFault, Result};
use crate::fault::ExceptionInfo;
use crate::headers::{Headers, names};
use crate::message::{Message, new_id};
use crate::send::SendBuilder;
use crate::serializer::{ReceivedMessage, decode_json};

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

/// The internal consumer of the bus's response endpoint: completes the request a response
/// (or fault) answers. A late response, whose request timed out or was cancelled, is
/// acknowledged and dropped; an unreadable one never gets here (the endpoint moves it to
/// `_error` like any other).
#[derive(Clone, Copy, Default)]
pub(crate) struct ResponseSink;

impl Service<ReceiveContext> for ResponseSink {
    type Response = ();
    type Error = ConsumeError;
    type Future = std::future::Ready<std::result::Result<(), ConsumeError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::result::Result<(), ConsumeError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, rc: ReceiveContext) -> Self::Future {
        let envelope = rc.envelope();
        let waiting = envelope
            .request_id
            .and_then(|id| rc.bus_ref().shared().requests.remove(&id));
        match waiting {
            Some(tx) => {
                let _ = tx.send(ReceivedMessage {
                    envelope: envelope.clone(),
                    message: rc.message_json().clone(),
                    any_message_type: rc.any_message_type(),
                });
            }
            None => tracing::debug!(
                request_id = ?envelope.request_id,
                message_id = ?envelope.message_id,
                "a response arrived for a request that is no longer waiting (timed out or cancelled); discarding it"
            ),
        }
        std::future::ready(Ok(()))
    }
}

impl Bus {
    /// A request client that publishes requests of type `Req`.
    pub fn request_client<Req: Message>(&self) -> RequestClient<Req> {
        RequestClient::new(self.clone(), None, self.shared().request_timeout)
    }

    /// A request client that sends requests of type `Req` to `address`.
    pub fn request_client_to<Req: Message>(
        &self,
        address: impl IntoAddress,
    ) -> Result<RequestClient<Req>> {
        Ok(RequestClient::new(
            self.clone(),
            Some(address.into_address()?),
            self.shared().request_timeout,
        ))
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
        let bus = &self.client.bus;
        bus.ensure_response_endpoint().await?;
        let request_id = new_id();
        let requests = &bus.shared().requests;
        let rx = requests.register(request_id);
        let _guard = PendingGuard {
            requests,
            id: request_id,
        };
        let send = bus.send_context();
        let builder = match &self.client.destination {
            Some(address) => SendBuilder::send(send, None, Ok(address.clone()), self.request),
            None => SendBuilder::publish(send, None, self.request),
        };
        builder
            .uncaptured()
            .request_id(request_id)
            .response_address(bus.address().to_string())
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
        if types
            .iter()
            .any(|t| Resp::message_type().matches(t.as_str()))
            || received.any_message_type
        {
            let message = decode_json::<Resp>(received.message.as_bytes()).map_err(|e| {
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
            let shape: FaultShape =
                decode_json(received.message.as_bytes()).unwrap_or(FaultShape {
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
