//! Consumers: the [`Consumer`] trait, handler functions, and how they become services in an
//! endpoint's pipeline.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;
use tower_layer::Layer;
use tower_service::Service;

use crate::context::{ConsumeContext, ReceiveContext};
use crate::error::{ConsumeError, ConsumeErrorKind, Error, ErrorKind};
use crate::message::Message;
use crate::observer::Observers;
use crate::pipeline::{
    ConcurrencyLimitLayer, ConsumeLayer, ConsumeService, Retry, RetryLayer, TimeoutLayer,
    apply_consume_layers,
};
use crate::serializer::decode_json;
use crate::urn::Urn;

/// Consumes messages of type `M`.
///
/// ```
/// use busway_core::{ConsumeContext, ConsumeError, Consumer, Message, Urn};
/// # #[derive(serde::Serialize, serde::Deserialize)] struct OrderPlaced { order_id: u64 }
/// # impl Message for OrderPlaced { fn message_type() -> &'static Urn { static U: Urn = Urn::from_static("urn:message:Contracts:OrderPlaced"); &U } }
///
/// struct SendConfirmationEmail;
///
/// impl Consumer<OrderPlaced> for SendConfirmationEmail {
///     async fn consume(&self, ctx: &ConsumeContext<OrderPlaced>) -> Result<(), ConsumeError> {
///         println!("order {} placed", ctx.message().order_id);
///         Ok(())
///     }
/// }
/// ```
///
/// A consumer type may implement `Consumer<M>` for several message types; register it with
/// `consumer_for::<(A, B)>(..)`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` does not consume `{M}`",
    label = "this is not a `Consumer<{M}>`",
    note = "implement `Consumer<{M}>` for `{Self}`: `async fn consume(&self, ctx: &ConsumeContext<{M}>) -> Result<(), ConsumeError>`"
)]
pub trait Consumer<M: Message>: Send + Sync + 'static {
    /// Handles one message. Returning an error (or panicking) fails the attempt; retry,
    /// redelivery and fault handling take it from there.
    ///
    /// Write it as `async fn consume(&self, ctx: &ConsumeContext<M>) -> Result<(),
    /// ConsumeError>`; the future must be `Send` (it runs on the endpoint's worker tasks).
    fn consume(
        &self,
        ctx: &ConsumeContext<M>,
    ) -> impl Future<Output = Result<(), ConsumeError>> + Send;
}

impl<M: Message, C: Consumer<M>> Consumer<M> for Arc<C> {
    fn consume(
        &self,
        ctx: &ConsumeContext<M>,
    ) -> impl Future<Output = Result<(), ConsumeError>> + Send {
        (**self).consume(ctx)
    }
}

/// Per-consumer pipeline options, set with `consumer_with(..)`.
#[derive(Debug, Default)]
pub struct ConsumerConfigurator {
    retry: Option<Retry>,
    timeout: Option<Duration>,
    concurrency: Option<usize>,
    layers: Vec<ConsumeLayer>,
}

impl ConsumerConfigurator {
    /// Retries this consumer alone (other consumers at the endpoint are not re-run).
    pub fn retry(mut self, policy: Retry) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Limits each attempt of this consumer.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Runs at most `limit` messages through this consumer at once.
    pub fn concurrency_limit(mut self, limit: usize) -> Self {
        self.concurrency = Some(limit.max(1));
        self
    }

    /// Adds a `tower::Layer` around this consumer (first added is outermost).
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<ConsumeService> + Send + Sync + 'static,
        L::Service: Service<ReceiveContext, Response = (), Error = ConsumeError>
            + Clone
            + Send
            + Sync
            + 'static,
        <L::Service as Service<ReceiveContext>>::Future: Send + 'static,
    {
        self.layers.push(ConsumeLayer::new(layer));
        self
    }

    fn wrap(&self, invoker: ConsumeService) -> ConsumeService {
        let mut svc = invoker;
        if let Some(t) = self.timeout {
            svc = BoxCloneSyncService::new(TimeoutLayer::new(t).layer(svc));
        }
        if let Some(r) = &self.retry {
            svc = BoxCloneSyncService::new(RetryLayer::new(r.clone()).layer(svc));
        }
        if let Some(c) = self.concurrency {
            svc = BoxCloneSyncService::new(ConcurrencyLimitLayer::new(c).layer(svc));
        }
        apply_consume_layers(&self.layers, svc)
    }
}

/// Makes a registration's invoker once the bus knows its observers.
type MakeInvoker = Box<dyn FnOnce(Observers) -> ConsumeService + Send + Sync>;

/// One consumer of one message type, ready to be placed at an endpoint.
pub struct ConsumerRegistration {
    pub(crate) consumer_type: String,
    pub(crate) message_type: Urn,
    make: MakeInvoker,
    config: Option<ConsumerConfigurator>,
}

impl ConsumerRegistration {
    /// A registration of `consumer` for message type `M`.
    pub fn new<M: Message, C: Consumer<M>>(consumer: Arc<C>) -> Self {
        let consumer_type = std::any::type_name::<C>().to_string();
        let name = consumer_type.clone();
        Self {
            make: Box::new(move |observers| {
                BoxCloneSyncService::new(Invoker::<M, _>::service(
                    ByConsumer(consumer),
                    name,
                    observers,
                ))
            }),
            config: None,
            consumer_type,
            message_type: M::message_type().clone(),
        }
    }

    /// A registration of a handler function for message type `M`.
    pub fn handler<M, F, Fut>(handler: F) -> Self
    where
        M: Message,
        F: Fn(ConsumeContext<M>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), ConsumeError>> + Send + 'static,
    {
        let consumer_type = format!("handler<{}>", std::any::type_name::<M>());
        let name = consumer_type.clone();
        Self {
            make: Box::new(move |observers| {
                BoxCloneSyncService::new(Invoker::<M, _>::service(
                    ByHandler(handler),
                    name,
                    observers,
                ))
            }),
            config: None,
            consumer_type,
            message_type: M::message_type().clone(),
        }
    }

    pub(crate) fn configure(mut self, config: ConsumerConfigurator) -> Self {
        self.config = Some(config);
        self
    }

    /// The consumer's service at its endpoint: the invoker (which tells `observers` about
    /// each attempt) inside the consumer's own pipeline options.
    pub(crate) fn into_service(self, observers: Observers) -> ConsumeService {
        let invoker = (self.make)(observers);
        match &self.config {
            Some(config) => config.wrap(invoker),
            None => invoker,
        }
    }

    /// The consumer's type name.
    pub fn consumer_type(&self) -> &str {
        &self.consumer_type
    }

    /// The message type it consumes.
    pub fn message_type(&self) -> &Urn {
        &self.message_type
    }
}

impl fmt::Debug for ConsumerRegistration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerRegistration")
            .field("consumer_type", &self.consumer_type)
            .field("message_type", &self.message_type)
            .finish()
    }
}

/// A consumer of every message type in the tuple `Ms`: `(A,)`, `(A, B)`, ... up to 8.
///
/// Implemented for every type that implements `Consumer<A> + Consumer<B> + ...`; used by
/// `consumer_for::<(A, B)>(consumer)`.
pub trait ConsumerOf<Ms>: Send + Sync + Sized + 'static {
    /// One registration per message type.
    fn registrations(self: Arc<Self>) -> Vec<ConsumerRegistration>;
}

macro_rules! impl_consumer_of {
    ($($m:ident),+) => {
        impl<C, $($m),+> ConsumerOf<($($m,)+)> for C
        where
            C: Send + Sync + 'static $(+ Consumer<$m>)+,
            $($m: Message,)+
        {
            fn registrations(self: Arc<Self>) -> Vec<ConsumerRegistration> {
                vec![$(ConsumerRegistration::new::<$m, C>(self.clone())),+]
            }
        }
    };
}

impl_consumer_of!(A);
impl_consumer_of!(A, B);
impl_consumer_of!(A, B, C2);
impl_consumer_of!(A, B, C2, D);
impl_consumer_of!(A, B, C2, D, E);
impl_consumer_of!(A, B, C2, D, E, F);
impl_consumer_of!(A, B, C2, D, E, F, G);
impl_consumer_of!(A, B, C2, D, E, F, G, H);

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "the consumer panicked with a non-text payload".to_string()
    }
}

fn decode<M: Message>(rc: &ReceiveContext) -> Result<M, ConsumeError> {
    decode_json::<M>(rc.message_json().as_bytes()).map_err(|e| {
        ConsumeError::with_kind(
            ConsumeErrorKind::Deserialize,
            "serde_json::Error",
            Error::with_source(
                ErrorKind::Deserialize,
                format!(
                    "the message body is not a valid {} ({})",
                    std::any::type_name::<M>(),
                    M::message_type()
                ),
                e,
            ),
        )
    })
}

async fn guarded<F>(fut: F) -> Result<(), ConsumeError>
where
    F: Future<Output = Result<(), ConsumeError>>,
{
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(result) => result,
        Err(payload) => Err(ConsumeError::kind_msg(
            ConsumeErrorKind::Panic,
            "panic",
            format!("the consumer panicked: {}", panic_message(payload)),
        )),
    }
}

fn finish(
    rc: &ReceiveContext,
    observers: &Observers,
    consumer_type: &str,
    message_type: &Urn,
    result: Result<(), ConsumeError>,
) -> Result<(), ConsumeError> {
    observers.on_consume(rc, consumer_type, message_type, result.as_ref().err());
    if result.is_err() {
        rc.set_fault_source(consumer_type, message_type);
    }
    result
}

/// What the invoker calls with the typed context: a consumer, or a handler function.
trait Invoke<M>: Send + Sync + 'static {
    /// Runs one attempt, with panics caught.
    fn invoke(
        &self,
        ctx: ConsumeContext<M>,
    ) -> impl Future<Output = Result<(), ConsumeError>> + Send;
}

/// A [`Consumer`] as the invoker calls it.
struct ByConsumer<C>(Arc<C>);

impl<M: Message, C: Consumer<M>> Invoke<M> for ByConsumer<C> {
    async fn invoke(&self, ctx: ConsumeContext<M>) -> Result<(), ConsumeError> {
        guarded(self.0.consume(&ctx)).await
    }
}

/// A handler function as the invoker calls it (a panic while it builds its future is caught
/// too).
struct ByHandler<F>(F);

impl<M, F, Fut> Invoke<M> for ByHandler<F>
where
    M: Message,
    F: Fn(ConsumeContext<M>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), ConsumeError>> + Send + 'static,
{
    async fn invoke(&self, ctx: ConsumeContext<M>) -> Result<(), ConsumeError> {
        match std::panic::catch_unwind(AssertUnwindSafe(|| (self.0)(ctx))) {
            Ok(fut) => guarded(fut).await,
            Err(payload) => Err(ConsumeError::kind_msg(
                ConsumeErrorKind::Panic,
                "panic",
                format!("the handler panicked: {}", panic_message(payload)),
            )),
        }
    }
}

/// The one service that runs a consumer or a handler for message type `M`: decode the body,
/// build the typed context, call, tell the observers, and record the fault source. Cloned
/// per call, so everything is behind one `Arc`.
struct Invoker<M, I> {
    shared: Arc<InvokerShared<I>>,
    _message: PhantomData<fn() -> M>,
}

struct InvokerShared<I> {
    target: I,
    consumer_type: String,
    observers: Observers,
}

impl<M, I> Invoker<M, I> {
    fn service(target: I, consumer_type: String, observers: Observers) -> Self {
        Self {
            shared: Arc::new(InvokerShared {
                target,
                consumer_type,
                observers,
            }),
            _message: PhantomData,
        }
    }
}

impl<M, I> Clone for Invoker<M, I> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            _message: PhantomData,
        }
    }
}

impl<M: Message, I: Invoke<M>> Service<ReceiveContext> for Invoker<M, I> {
    type Response = ();
    type Error = ConsumeError;
    type Future = BoxFuture<'static, Result<(), ConsumeError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConsumeError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, rc: ReceiveContext) -> Self::Future {
        let this = self.shared.clone();
        Box::pin(async move {
            let result = match decode::<M>(&rc) {
                Ok(message) => {
                    this.target
                        .invoke(ConsumeContext::new(message, rc.clone()))
                        .await
                }
                Err(e) => Err(e),
            };
            finish(
                &rc,
                &this.observers,
                &this.consumer_type,
                M::message_type(),
                result,
            )
        })
    }
}

/// Routes a delivery to the consumers at an endpoint that handle its message types.
#[derive(Clone)]
pub(crate) struct Dispatcher {
    shared: Arc<DispatcherShared>,
}

struct DispatcherShared {
    consumers: Vec<ConsumeService>,
    by_type: HashMap<Urn, Vec<usize>>,
}

impl Dispatcher {
    pub(crate) fn new(registrations: Vec<ConsumerRegistration>, observers: &Observers) -> Self {
        let mut by_type: HashMap<Urn, Vec<usize>> = HashMap::new();
        let mut consumers = Vec::with_capacity(registrations.len());
        for (index, reg) in registrations.into_iter().enumerate() {
            by_type
                .entry(reg.message_type.clone())
                .or_default()
                .push(index);
            consumers.push(reg.into_service(observers.clone()));
        }
        Self {
            shared: Arc::new(DispatcherShared { consumers, by_type }),
        }
    }

    /// The consumers a delivery goes to, by index: borrowed from the type map when one of
    /// the message's types has consumers here (the usual case), collected otherwise.
    fn matching(&self, rc: &ReceiveContext) -> std::borrow::Cow<'_, [usize]> {
        use std::borrow::Cow;
        if rc.any_message_type() && rc.message_types().is_empty() {
            return Cow::Owned((0..self.shared.consumers.len()).collect());
        }
        let mut hits = rc
            .message_types()
            .iter()
            .filter_map(|urn| self.shared.by_type.get(urn));
        match (hits.next(), hits.next()) {
            (None, _) => return Cow::Owned(self.matching_any_case(rc)),
            (Some(only), None) => return Cow::Borrowed(only.as_slice()),
            _ => {}
        }
        let mut out = Vec::new();
        for urn in rc.message_types() {
            if let Some(indices) = self.shared.by_type.get(urn) {
                for i in indices {
                    if !out.contains(i) {
                        out.push(*i);
                    }
                }
            }
        }
        Cow::Owned(out)
    }

    /// The slow path when no type matched exactly: MassTransit compares message type URNs
    /// without regard to case, so `urn:message:contracts:orderplaced` reaches a consumer of
    /// `urn:message:Contracts:OrderPlaced`.
    fn matching_any_case(&self, rc: &ReceiveContext) -> Vec<usize> {
        let mut out = Vec::new();
        for urn in rc.message_types() {
            for (registered, indices) in &self.shared.by_type {
                if registered.matches(urn.as_str()) {
                    for i in indices {
                        if !out.contains(i) {
                            out.push(*i);
                        }
                    }
                }
            }
        }
        out
    }
}

impl Service<ReceiveContext> for Dispatcher {
    type Response = ();
    type Error = ConsumeError;
    type Future = BoxFuture<'static, Result<(), ConsumeError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConsumeError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, rc: ReceiveContext) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let matching = this.matching(&rc);
            if matching.is_empty() {
                let types: Vec<&str> = rc.message_types().iter().map(Urn::as_str).collect();
                return Err(ConsumeError::kind_msg(
                    ConsumeErrorKind::NoConsumer,
                    "busway::NoConsumer",
                    format!(
                        "no consumer at endpoint `{}` handles message type(s) [{}]",
                        rc.endpoint_name(),
                        types.join(", ")
                    ),
                ));
            }
            let mut first_error = None;
            for &index in matching.iter() {
                // A retry of the whole endpoint pipeline does not re-run consumers that
                // already succeeded for this delivery.
                if rc.is_completed(index) {
                    continue;
                }
                let svc = this.shared.consumers[index].clone();
                match svc.oneshot(rc.clone()).await {
                    Ok(()) => rc.mark_completed(index),
                    Err(e) => {
                        if first_error.is_none() {
                            first_error = Some(e);
                        }
                    }
                }
            }
            match first_error {
                Some(e) => Err(e),
                None => Ok(()),
            }
        })
    }
}
