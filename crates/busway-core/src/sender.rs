//! The send-side context: what every publish, send, response and fault needs to become an
//! envelope and reach the transport. It sits below the send builder, the contexts, the
//! endpoints and the request client, and knows none of them.

use std::sync::Arc;

use tower::ServiceExt;

use crate::host::HostInfo;
use crate::outgoing::{OutgoingMessage, SendService};
use crate::serializer::Serializers;
use crate::transport::Transport;

/// The transport, serializers, send pipeline, host and own address of one bus.
pub(crate) struct SendContext {
    /// The transport messages leave on.
    pub(crate) transport: Arc<dyn Transport>,
    /// The transport's `messaging.system` name.
    pub(crate) system: &'static str,
    /// Headers the transport adds about a delivery, not carried on
    /// ([`crate::transport::TransportProfile::delivery_headers`]).
    pub(crate) delivery_headers: &'static [&'static str],
    /// The bus's serializers (its default writer, and every reader).
    pub(crate) serializers: Serializers,
    /// The send pipeline: tracing, user send layers, serialization and the transport.
    pub(crate) pipeline: SendService,
    /// The host written into envelopes.
    pub(crate) host: Arc<HostInfo>,
    /// The bus's own address (its response endpoint): the source of messages produced
    /// outside a consumer, and where responses come back.
    pub(crate) address: String,
}

impl SendContext {
    /// The send pipeline's future for one message (not boxed again: `SendBuilder` boxes it
    /// once).
    pub(crate) fn dispatch(
        &self,
        outgoing: OutgoingMessage,
    ) -> tower::util::Oneshot<SendService, OutgoingMessage> {
        self.pipeline.clone().oneshot(outgoing)
    }
}
