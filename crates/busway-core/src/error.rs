//! Errors: [`Error`] for the bus and transports, [`ConsumeError`] for consumers.

use std::borrow::Cow;
use std::fmt;

use crate::exception::{ExceptionInfo, truncate};

/// A boxed error that can cross threads; what layers and transports pass around.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with busway's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its causes as one line: `outer: cause: root cause`.
#[doc(hidden)] // used by busway's own crates; not part of the API
pub fn chain_text(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut next = err.source();
    while let Some(e) = next {
        text.push_str(": ");
        text.push_str(&e.to_string());
        next = e.source();
    }
    text
}

/// What went wrong, for callers that want to match rather than ask `is_*()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The bus or an endpoint was configured in a way that cannot work.
    Config,
    /// The transport (broker connection, channel, client) failed.
    Transport,
    /// The broker cannot be reached right now (connection down, reconnecting); trying again
    /// later may succeed.
    Unavailable,
    /// A message could not be serialized.
    Serialize,
    /// A message could not be deserialized.
    Deserialize,
    /// An address (`queue:x`, `loopback://localhost/x`, ...) could not be understood.
    Address,
    /// An operation did not finish within its deadline.
    Timeout,
    /// The operation was cancelled by its caller.
    Cancelled,
    /// A request was answered with a `Fault<T>`.
    RequestFault,
    /// The bus or transport is closed or not started.
    Closed,
    /// The transport does not support what was asked (for example delayed delivery).
    Unsupported,
    /// A database used by the bus (the outbox and inbox) failed.
    Database,
}

impl ErrorKind {
    fn describe(self) -> &'static str {
        match self {
            ErrorKind::Config => "configuration error",
            ErrorKind::Transport => "transport error",
            ErrorKind::Unavailable => "broker unavailable",
            ErrorKind::Serialize => "serialization error",
            ErrorKind::Deserialize => "deserialization error",
            ErrorKind::Address => "invalid address",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::RequestFault => "request faulted",
            ErrorKind::Closed => "closed",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Database => "database error",
        }
    }
}

/// The error type of the bus, its transports and request clients.
///
/// It is an opaque struct the size of one pointer. Ask it questions (`is_timeout()`,
/// `is_transport()`, ...) or match on [`Error::kind`]; walk [`std::error::Error::source`] for
/// the cause.
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    message: Cow<'static, str>,
    source: Option<BoxError>,
    fault: Option<RequestFault>,
}

impl Error {
    /// A new error of `kind` with a message.
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            inner: Box::new(Inner {
                kind,
                message: message.into(),
                source: None,
                fault: None,
            }),
        }
    }

    /// A new error of `kind` with a message and a cause.
    pub fn with_source(
        kind: ErrorKind,
        message: impl Into<Cow<'static, str>>,
        source: impl Into<BoxError>,
    ) -> Self {
        let mut err = Self::new(kind, message);
        err.inner.source = Some(source.into());
        err
    }

    /// A transport failure with a cause, for transport implementations.
    pub fn transport(message: impl Into<Cow<'static, str>>, source: impl Into<BoxError>) -> Self {
        Self::with_source(ErrorKind::Transport, message, source)
    }

    /// A configuration error.
    pub fn config(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Config, message)
    }

    /// A timeout.
    pub fn timeout(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Timeout, message)
    }

    /// The bus or transport is closed.
    pub fn closed(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Closed, message)
    }

    pub(crate) fn request_fault(fault: RequestFault) -> Self {
        let mut err = Self::new(
            ErrorKind::RequestFault,
            format!("the request faulted: {}", fault.message()),
        );
        err.inner.fault = Some(fault);
        err
    }

    /// What kind of error this is.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// True when the transport failed (connection, channel, broker refusal, or the broker
    /// is unavailable).
    pub fn is_transport(&self) -> bool {
        matches!(
            self.inner.kind,
            ErrorKind::Transport | ErrorKind::Unavailable
        )
    }

    /// True when the broker cannot be reached right now; the same operation may succeed
    /// later (an outbox keeps retrying these without counting attempts).
    pub fn is_unavailable(&self) -> bool {
        self.inner.kind == ErrorKind::Unavailable
    }

    /// True when an operation ran out of time.
    pub fn is_timeout(&self) -> bool {
        self.inner.kind == ErrorKind::Timeout
    }

    /// True when the caller cancelled the operation.
    pub fn is_cancelled(&self) -> bool {
        self.inner.kind == ErrorKind::Cancelled
    }

    /// True for configuration mistakes.
    pub fn is_config(&self) -> bool {
        self.inner.kind == ErrorKind::Config
    }

    /// True when a message could not be serialized or deserialized.
    pub fn is_serialization(&self) -> bool {
        matches!(
            self.inner.kind,
            ErrorKind::Serialize | ErrorKind::Deserialize
        )
    }

    /// True for an address that could not be parsed or resolved.
    pub fn is_address(&self) -> bool {
        self.inner.kind == ErrorKind::Address
    }

    /// True when the bus or transport is closed or not started.
    pub fn is_closed(&self) -> bool {
        self.inner.kind == ErrorKind::Closed
    }

    /// True when a request was answered with a `Fault<T>`; see [`Error::fault`].
    pub fn is_request_fault(&self) -> bool {
        self.inner.kind == ErrorKind::RequestFault
    }

    /// True when the transport cannot do what was asked.
    pub fn is_unsupported(&self) -> bool {
        self.inner.kind == ErrorKind::Unsupported
    }

    /// True when the outbox or inbox database failed.
    pub fn is_database(&self) -> bool {
        self.inner.kind == ErrorKind::Database
    }

    /// The fault that answered a request, when [`Error::is_request_fault`].
    pub fn fault(&self) -> Option<&RequestFault> {
        self.inner.fault.as_ref()
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("busway::Error");
        s.field("kind", &self.inner.kind)
            .field("message", &self.inner.message);
        if let Some(source) = &self.inner.source {
            s.field("source", source);
        }
        s.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.inner.message.is_empty() {
            f.write_str(self.inner.kind.describe())
        } else {
            write!(f, "{}: {}", self.inner.kind.describe(), self.inner.message)
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}

/// The fault that answered a request: the consumer of the request failed.
#[derive(Debug, Clone)]
pub struct RequestFault {
    exceptions: Vec<ExceptionInfo>,
}

impl RequestFault {
    pub(crate) fn new(exceptions: Vec<ExceptionInfo>) -> Self {
        Self { exceptions }
    }

    /// The exceptions the fault carries (first is the outermost).
    pub fn exceptions(&self) -> &[ExceptionInfo] {
        &self.exceptions
    }

    /// The message of the first exception, or an empty string.
    pub fn message(&self) -> &str {
        self.exceptions
            .first()
            .map(|e| e.message.as_str())
            .unwrap_or("")
    }
}

/// Why a consume attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConsumeErrorKind {
    /// The consumer returned an error.
    Consumer,
    /// The message body could not be read as the consumer's message type.
    Deserialize,
    /// The consumer did not finish within the endpoint's timeout.
    Timeout,
    /// The consumer panicked.
    Panic,
    /// No consumer at the endpoint handles any of the message's types.
    NoConsumer,
    /// The attempt was cancelled (bus shutdown past its deadline).
    Cancelled,
}

/// The error a consumer returns.
///
/// Any `std::error::Error + Send + Sync + 'static` converts into it with `?`, and
/// [`ConsumeError::msg`] makes one from text. The kind says why the attempt failed; retry and
/// redelivery policies filter on it, and fault headers report the original error's type.
///
/// Like `anyhow::Error`, it does not implement `std::error::Error` itself (that would conflict
/// with the blanket conversion); use [`ConsumeError::source`] for the cause.
pub struct ConsumeError {
    inner: Box<ConsumeInner>,
}

struct ConsumeInner {
    kind: ConsumeErrorKind,
    type_name: Cow<'static, str>,
    source: BoxError,
}

#[derive(Debug)]
struct TextError(Cow<'static, str>);

impl fmt::Display for TextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TextError {}

impl ConsumeError {
    /// A consumer error from text.
    pub fn msg(message: impl Into<Cow<'static, str>>) -> Self {
        Self::with_kind(
            ConsumeErrorKind::Consumer,
            "busway::ConsumeError",
            TextError(message.into()),
        )
    }

    /// A consumer error wrapping `err`, whose type name is reported in fault headers.
    pub fn new<E>(err: E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        Self::with_kind(ConsumeErrorKind::Consumer, std::any::type_name::<E>(), err)
    }

    /// An error of a given kind; `type_name` is what fault headers report as the exception type.
    pub fn with_kind(
        kind: ConsumeErrorKind,
        type_name: impl Into<Cow<'static, str>>,
        source: impl Into<BoxError>,
    ) -> Self {
        Self {
            inner: Box::new(ConsumeInner {
                kind,
                type_name: type_name.into(),
                source: source.into(),
            }),
        }
    }

    pub(crate) fn kind_msg(
        kind: ConsumeErrorKind,
        type_name: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self::with_kind(kind, type_name, TextError(message.into()))
    }

    /// A timeout error.
    pub fn timeout(after: std::time::Duration) -> Self {
        Self::kind_msg(
            ConsumeErrorKind::Timeout,
            "busway::Timeout",
            format!("the consumer did not finish within {after:?}"),
        )
    }

    /// Why the attempt failed.
    pub fn kind(&self) -> ConsumeErrorKind {
        self.inner.kind
    }

    /// The type name of the original error (reported as `MT-Fault-ExceptionType`).
    pub fn type_name(&self) -> &str {
        &self.inner.type_name
    }

    /// The original error.
    pub fn source(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self.inner.source.as_ref()
    }

    /// The original error as `E`, if it is one.
    pub fn downcast_ref<E: std::error::Error + 'static>(&self) -> Option<&E> {
        self.inner.source.downcast_ref::<E>()
    }

    /// The error chain as text, one cause per line (reported as `MT-Fault-StackTrace`).
    pub fn chain_text(&self) -> String {
        let mut out = String::new();
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(self.inner.source.as_ref());
        let mut first = true;
        while let Some(err) = next {
            if !first {
                out.push_str("\ncaused by: ");
            }
            first = false;
            out.push_str(&err.to_string());
            next = err.source();
        }
        out
    }

    /// Turns the error into a boxed `std::error::Error`.
    pub fn into_boxed(self) -> BoxError {
        self.inner.source
    }

    /// True when the consumer timed out.
    pub fn is_timeout(&self) -> bool {
        self.inner.kind == ConsumeErrorKind::Timeout
    }

    /// True when the consumer panicked.
    pub fn is_panic(&self) -> bool {
        self.inner.kind == ConsumeErrorKind::Panic
    }
}

impl<E> From<E> for ConsumeError
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn from(err: E) -> Self {
        Self::new(err)
    }
}

impl fmt::Debug for ConsumeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumeError")
            .field("kind", &self.inner.kind)
            .field("type", &self.inner.type_name)
            .field("source", &self.inner.source)
            .finish()
    }
}

impl fmt::Display for ConsumeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.inner.source, f)
    }
}

impl ExceptionInfo {
    /// Describes a consume error, with its cause chain as inner exceptions.
    pub fn from_consume_error(err: &ConsumeError) -> Self {
        let mut causes = Vec::new();
        let mut next = err.source().source();
        while let Some(cause) = next {
            causes.push(cause.to_string());
            next = cause.source();
        }
        let mut inner: Option<Box<ExceptionInfo>> = None;
        for message in causes.into_iter().rev() {
            inner = Some(Box::new(ExceptionInfo {
                exception_type: "Error".to_string(),
                inner_exception: inner,
                stack_trace: None,
                message,
                source: None,
                data: None,
            }));
        }
        ExceptionInfo {
            exception_type: err.type_name().to_string(),
            inner_exception: inner,
            stack_trace: Some(truncate(&err.chain_text())),
            message: err.to_string(),
            source: Some("busway".to_string()),
            data: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_is_one_pointer_and_thread_safe() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Error>();
        assert_send_sync::<ConsumeError>();
        assert_eq!(std::mem::size_of::<Error>(), std::mem::size_of::<usize>());
    }

    #[test]
    fn consume_error_keeps_the_type_name_and_chain() {
        let io = std::io::Error::other("disk full");
        let err: ConsumeError = io.into();
        assert_eq!(err.kind(), ConsumeErrorKind::Consumer);
        assert_eq!(err.type_name(), "std::io::error::Error");
        assert_eq!(err.to_string(), "disk full");
        assert!(err.downcast_ref::<std::io::Error>().is_some());

        let outer = Error::transport("publish failed", std::io::Error::other("refused"));
        let err = ConsumeError::new(outer);
        assert_eq!(
            err.chain_text(),
            "transport error: publish failed\ncaused by: refused"
        );
    }
}
