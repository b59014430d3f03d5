//! The last stage of the send pipeline: serialize the message, hand it to the transport, and
//! tell the observers.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use tower_service::Service;

use crate::error::{Error, Result};
use crate::observer::Observers;
use crate::outgoing::{OutgoingMessage, SendTarget};
use crate::serializer::Serializers;
use crate::transport::Transport;

/// The last service of the send pipeline: serialize, then publish or send on the transport.
#[derive(Clone)]
pub(crate) struct TransportSender {
    shared: Arc<SenderShared>,
}

struct SenderShared {
    transport: Arc<dyn Transport>,
    serializers: Serializers,
    observers: Observers,
}

impl TransportSender {
    pub(crate) fn new(
        transport: Arc<dyn Transport>,
        serializers: Serializers,
        observers: Observers,
    ) -> Self {
        Self {
            shared: Arc::new(SenderShared {
                transport,
                serializers,
                observers,
            }),
        }
    }
}

impl Service<OutgoingMessage> for TransportSender {
    type Response = ();
    type Error = Error;
    type Future = BoxFuture<'static, Result<()>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, outgoing: OutgoingMessage) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move {
            let serializer = outgoing
                .serializer
                .as_ref()
                .unwrap_or_else(|| shared.serializers.default_serializer());
            let mut message = serializer.serialize(&outgoing.envelope, &outgoing.message)?;
            message.time_to_live = outgoing.time_to_live;
            message.partition_key = outgoing.partition_key.clone();
            let result = match &outgoing.target {
                SendTarget::Publish => {
                    shared
                        .transport
                        .publish(&outgoing.envelope.message_type, message, &outgoing.delivery)
                        .await
                }
                SendTarget::Send(address) => {
                    shared
                        .transport
                        .send(address, message, &outgoing.delivery)
                        .await
                }
            };
            shared.observers.on_send(&outgoing, result.as_ref().err());
            result
        })
    }
}
