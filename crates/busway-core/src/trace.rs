//! W3C trace context (`traceparent`) carried across the bus.
//!
//! Every publish and send gets a producer span id; the `traceparent` header carries it to the
//! consumer, whose consume span continues the same trace. Inside a consumer, the current
//! trace context is task-local, so messages published there (through the context or the bus)
//! are children of the consume span.

use std::fmt;
use std::future::Future;

use crate::headers::{Headers, names};

/// A W3C trace context: trace id, span id and sampled flag.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    trace_id: u128,
    span_id: u64,
    sampled: bool,
}

tokio::task_local! {
    static CURRENT: TraceContext;
}

fn nonzero_u64() -> u64 {
    loop {
        let v = fastrand::u64(..);
        if v != 0 {
            return v;
        }
    }
}

impl TraceContext {
    /// A new trace with a random trace id and span id, sampled.
    pub fn new_root() -> Self {
        let trace_id = loop {
            let v = fastrand::u128(..);
            if v != 0 {
                break v;
            }
        };
        Self {
            trace_id,
            span_id: nonzero_u64(),
            sampled: true,
        }
    }

    /// A new span in the same trace.
    pub fn child(&self) -> Self {
        Self {
            trace_id: self.trace_id,
            span_id: nonzero_u64(),
            sampled: self.sampled,
        }
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        self.trace_id_hex().to_string()
    }

    /// The span id as 16 lowercase hex digits.
    pub fn span_id(&self) -> String {
        self.span_id_hex().to_string()
    }

    /// The trace id, formatted as [`TraceContext::trace_id`] without allocating.
    pub(crate) fn trace_id_hex(&self) -> impl std::fmt::Display + use<> {
        Hex::<32>(self.trace_id)
    }

    /// The span id, formatted as [`TraceContext::span_id`] without allocating.
    pub(crate) fn span_id_hex(&self) -> impl std::fmt::Display + use<> {
        Hex::<16>(u128::from(self.span_id))
    }

    /// Whether the trace is sampled.
    pub fn sampled(&self) -> bool {
        self.sampled
    }

    /// Parses a `traceparent` value (`00-<trace>-<span>-<flags>`).
    pub fn parse(traceparent: &str) -> Option<Self> {
        let mut parts = traceparent.trim().split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let span = parts.next()?;
        let flags = parts.next()?;
        if version.len() != 2
            || version == "ff"
            || trace.len() != 32
            || span.len() != 16
            || flags.len() != 2
        {
            return None;
        }
        if u8::from_str_radix(version, 16).is_err() || (version == "00" && parts.next().is_some()) {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        if trace_id == 0 || span_id == 0 {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The `traceparent` header value.
    pub fn to_traceparent(&self) -> String {
        // Written by hand: this runs for every message sent, and `{:032x}` on a u128 costs
        // several times more than a table lookup per nibble.
        let mut out = [0u8; 55];
        out[..3].copy_from_slice(b"00-");
        write_hex(&mut out[3..35], self.trace_id);
        out[35] = b'-';
        write_hex(&mut out[36..52], u128::from(self.span_id));
        out[52..].copy_from_slice(if self.sampled { b"-01" } else { b"-00" });
        out.iter().map(|&b| char::from(b)).collect()
    }

    /// Reads MassTransit's `MT-Activity-Id`, or else `traceparent`, from headers.
    ///
    /// `MT-Activity-Id` wins when both are there: MassTransit writes only that header
    /// (`LogContextActivityExtensions`) and carries every other non-`MT-` header on as it was,
    /// so a message a .NET service sent while consuming a busway message has busway's old
    /// `traceparent` next to its own fresh `MT-Activity-Id`. busway writes the two alike.
    pub fn from_headers(headers: &Headers) -> Option<Self> {
        [names::MT_ACTIVITY_ID, names::TRACEPARENT]
            .iter()
            .find_map(|n| headers.get_str(n).and_then(|v| Self::parse(&v)))
    }

    /// Writes `traceparent` and `MT-Activity-Id` (so MassTransit services continue the trace).
    pub fn write_headers(&self, headers: &mut Headers) {
        let value = self.to_traceparent();
        headers.insert(names::MT_ACTIVITY_ID, value.clone());
        headers.insert(names::TRACEPARENT, value);
    }

    /// Gives outgoing `headers` their producer trace context and returns it with its parent:
    /// an explicit `traceparent` already in the headers is kept; otherwise a child of
    /// `parent` (or of the consume in progress on this task) is written, or a new trace.
    pub fn stamp(
        headers: &mut Headers,
        parent: Option<TraceContext>,
    ) -> (TraceContext, Option<TraceContext>) {
        let parent = parent.or_else(TraceContext::current);
        match TraceContext::from_headers(headers) {
            Some(explicit) => (explicit, parent),
            None => {
                let t = parent
                    .map(|p| p.child())
                    .unwrap_or_else(TraceContext::new_root);
                t.write_headers(headers);
                (t, parent)
            }
        }
    }

    /// The trace context of the consume in progress on this task, if any.
    pub fn current() -> Option<Self> {
        CURRENT.try_with(|c| *c).ok()
    }

    /// Runs `fut` with `self` as the current trace context.
    pub async fn scope<F: Future>(self, fut: F) -> F::Output {
        CURRENT.scope(self, fut).await
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_traceparent())
    }
}

/// Writes the low `out.len()` nibbles of `value` as lowercase hex, most significant first.
fn write_hex(out: &mut [u8], mut value: u128) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(value & 0xf) as usize];
        value >>= 4;
    }
}

/// `value` as `N` lowercase hex digits (N ≤ 32), zero-padded.
struct Hex<const N: usize>(u128);

impl<const N: usize> std::fmt::Display for Hex<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut digits = [0u8; 32];
        write_hex(&mut digits[..N], self.0);
        digits[..N].iter().try_for_each(|&b| {
            use std::fmt::Write;
            f.write_char(char::from(b))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_text_is_the_w3c_form() {
        let t = TraceContext {
            trace_id: 0x0af7651916cd43dd8448eb211c80319c,
            span_id: 0x00f067aa0ba902b7,
            sampled: true,
        };
        assert_eq!(
            t.to_traceparent(),
            "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"
        );
        assert_eq!(t.trace_id(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(t.span_id(), "00f067aa0ba902b7");
        let unsampled = TraceContext {
            trace_id: 1,
            span_id: u64::MAX,
            sampled: false,
        };
        assert_eq!(
            unsampled.to_traceparent(),
            "00-00000000000000000000000000000001-ffffffffffffffff-00"
        );
    }

    #[test]
    fn round_trip() {
        let t = TraceContext::new_root();
        let parsed = TraceContext::parse(&t.to_traceparent()).unwrap();
        assert_eq!(parsed, t);
        let c = t.child();
        assert_eq!(c.trace_id(), t.trace_id());
        assert_ne!(c.span_id(), t.span_id());
    }

    #[test]
    fn rejects_bad_values() {
        for bad in [
            "",
            "00-00000000000000000000000000000000-0000000000000001-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::parse(bad).is_none(), "{bad}");
        }
        let ok =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(ok.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(ok.sampled());
    }
}
