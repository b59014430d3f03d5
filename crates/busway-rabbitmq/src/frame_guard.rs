//! A guard between the socket and lapin's frame parser.
//!
//! lapin (through amq-protocol) parses AMQP field tables recursively on its io thread, a few
//! kilobytes of stack per nesting level: a message whose header table nests a few hundred
//! levels (2 KB of headers) overflows that thread's stack and aborts the process before
//! busway sees the delivery, and the broker hands the message to the next consumer, which
//! aborts too. Header tables reach a consumer only in content header frames, so this guard
//! reads the socket for lapin, holds each content header frame until it is whole, measures its
//! header table without recursion, and replaces every header whose value nests deeper than
//! [`MAX_TABLE_DEPTH`] levels with a string saying so (a table it cannot read at all is
//! replaced by one header saying that). Every other byte passes unchanged; the body of such a
//! message is intact and it is consumed as usual.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_rs::traits::Reactor;
use async_rs::util::RuntimeParts;
use async_rs::{Runtime, Tokio};
use futures_io::{AsyncRead, AsyncWrite};
use lapin::tcp::{AMQPUriTcpExt, OwnedTLSConfig};
use lapin::uri::AMQPUri;
use lapin::{AsyncTcpStream, Connection, ConnectionProperties};

/// The deepest a header table may nest (the headers table itself is level 1). busway and
/// MassTransit write flat headers; lapin's parser needs a few kilobytes of stack per level.
pub(crate) const MAX_TABLE_DEPTH: usize = 32;

/// What replaces a header value nested deeper than [`MAX_TABLE_DEPTH`].
pub(crate) const TOO_DEEP: &str = "[removed by busway: nested deeper than 32 levels]";

/// The header that replaces a header table that cannot be read.
pub(crate) const UNREADABLE_HEADERS: &str = "busway-unreadable-headers";

/// Content header frames longer than this pass unchecked (frames are bounded by the
/// negotiated `frame_max`, 128 KiB by default; lapin refuses longer ones).
const MAX_HELD_FRAME: usize = 16 * 1024 * 1024;
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 64 * 1024;
const FRAME_HEADER_LEN: usize = 7;
const FRAME_METHOD: u8 = 1;
const FRAME_CONTENT_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
const BASIC_CLASS: u16 = 60;
const PROPERTY_CONTENT_TYPE: u16 = 1 << 15;
const PROPERTY_CONTENT_ENCODING: u16 = 1 << 14;
const PROPERTY_HEADERS: u16 = 1 << 13;

/// Opens a lapin connection whose incoming frames pass through the guard (TLS, when the URI
/// asks for it, is below the guard).
pub(crate) async fn connect(
    uri: AMQPUri,
    properties: ConnectionProperties,
) -> lapin::Result<Connection> {
    let tokio = Tokio::current();
    let runtime = Runtime::new(RuntimeParts::new(
        tokio.clone(),
        GuardedReactor(tokio.clone()),
    ));
    let plain = Runtime::new(tokio);
    Connection::connector(
        uri,
        runtime,
        async move |uri: AMQPUri, _runtime| {
            let stream = uri
                .connect_with_config_async(OwnedTLSConfig::default().as_ref(), &plain)
                .await
                .map_err(lapin::Error::from)?;
            Ok(AsyncTcpStream::Plain(GuardedStream::new(stream)))
        },
        properties,
    )
    .await
}

/// tokio's reactor, with sockets wrapped in the guard.
#[derive(Clone, Debug)]
pub(crate) struct GuardedReactor(Tokio);

type PlainStream = AsyncTcpStream<<Tokio as Reactor>::TcpStream>;

impl Reactor for GuardedReactor {
    type TcpStream = GuardedStream<PlainStream>;
    type Sleep = <Tokio as Reactor>::Sleep;

    fn register<H: io::Read + io::Write + AsFd + AsRawFd + Send + 'static>(
        &self,
        socket: H,
    ) -> io::Result<impl AsyncRead + AsyncWrite + Send + Unpin + 'static> {
        self.0.register(socket)
    }

    fn sleep(&self, dur: Duration) -> Self::Sleep {
        self.0.sleep(dur)
    }

    fn interval(
        &self,
        dur: Duration,
    ) -> impl futures_util::Stream<Item = Instant> + Send + 'static {
        self.0.interval(dur)
    }

    fn tcp_connect_addr(
        &self,
        addr: SocketAddr,
    ) -> impl Future<Output = io::Result<Self::TcpStream>> + Send + 'static {
        let connect = self.0.tcp_connect_addr(addr);
        async move { Ok(GuardedStream::new(AsyncTcpStream::Plain(connect.await?))) }
    }
}

/// A socket whose incoming content header frames are checked before lapin parses them.
pub(crate) struct GuardedStream<S> {
    inner: S,
    /// Bytes read from the socket; `buf[start..filled]` is not handed out yet, of which
    /// `buf[start..ready]` is checked. `buf.len()` is the initialised capacity.
    buf: Vec<u8>,
    start: usize,
    ready: usize,
    filled: usize,
    /// Bytes of the current frame still to pass unchecked (method, body, heartbeat frames).
    pass: usize,
    /// The peer does not speak AMQP frames (a protocol header came back): pass everything.
    raw: bool,
    eof: bool,
}

impl<S> GuardedStream<S> {
    pub(crate) fn new(inner: S) -> Self {
        Self {
            inner,
            buf: vec![0; READ_CHUNK],
            start: 0,
            ready: 0,
            filled: 0,
            pass: 0,
            raw: false,
            eof: false,
        }
    }

    /// Marks as ready what can be handed out: whole frames, and content header frames once
    /// checked (rewritten when they need it).
    fn advance(&mut self) {
        loop {
            if self.raw {
                self.ready = self.filled;
                return;
            }
            if self.pass > 0 {
                let step = self.pass.min(self.filled - self.ready);
                self.ready += step;
                self.pass -= step;
                if self.pass > 0 {
                    return;
                }
                continue;
            }
            let available = &self.buf[self.ready..self.filled];
            let Some(&kind) = available.first() else {
                return;
            };
            if !matches!(
                kind,
                FRAME_METHOD | FRAME_CONTENT_HEADER | FRAME_BODY | FRAME_HEARTBEAT
            ) {
                self.raw = true;
                continue;
            }
            if available.len() < FRAME_HEADER_LEN {
                return;
            }
            let size = u32::from_be_bytes([available[3], available[4], available[5], available[6]])
                as usize;
            let total = FRAME_HEADER_LEN + size + 1;
            if kind != FRAME_CONTENT_HEADER || total > MAX_HELD_FRAME {
                self.pass = total;
                continue;
            }
            if available.len() < total {
                return;
            }
            let payload = &available[FRAME_HEADER_LEN..FRAME_HEADER_LEN + size];
            match safe_header_payload(payload) {
                None => self.ready += total,
                Some(payload) => {
                    let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + payload.len() + 1);
                    frame.extend_from_slice(&available[..3]);
                    frame.extend_from_slice(&frame_len(payload.len()).to_be_bytes());
                    frame.extend_from_slice(&payload);
                    frame.push(FRAME_END);
                    self.splice(total, &frame);
                }
            }
        }
    }

    /// Replaces the `old_len` bytes at `ready` with `frame` and marks it ready.
    fn splice(&mut self, old_len: usize, frame: &[u8]) {
        let rest = self.ready + old_len..self.filled;
        let mut buf = Vec::with_capacity(self.filled - self.start + frame.len() + READ_CHUNK);
        buf.extend_from_slice(&self.buf[self.start..self.ready]);
        buf.extend_from_slice(frame);
        let ready = buf.len();
        buf.extend_from_slice(&self.buf[rest]);
        let filled = buf.len();
        buf.resize(filled + READ_CHUNK, 0);
        self.buf = buf;
        self.start = 0;
        self.ready = ready;
        self.filled = filled;
    }

    /// Room for the next read: moves pending bytes to the front, grows when a held frame
    /// needs more.
    fn make_room(&mut self) {
        if self.start > 0
            && (self.start == self.filled || self.buf.len() - self.filled < READ_CHUNK)
        {
            self.buf.copy_within(self.start..self.filled, 0);
            self.ready -= self.start;
            self.filled -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.filled < READ_CHUNK / 4 {
            let len = (self.filled + READ_CHUNK).max(self.buf.len() * 2);
            self.buf.resize(len, 0);
        }
    }
}

fn frame_len(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

impl<S: AsyncRead + Unpin> AsyncRead for GuardedStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            if this.ready > this.start {
                let n = out.len().min(this.ready - this.start);
                out[..n].copy_from_slice(&this.buf[this.start..this.start + n]);
                this.start += n;
                return Poll::Ready(Ok(n));
            }
            if this.eof {
                // A frame cut short by the peer: hand over what there is, lapin reports it.
                if this.filled > this.start {
                    this.ready = this.filled;
                    continue;
                }
                return Poll::Ready(Ok(0));
            }
            this.make_room();
            let filled = this.filled;
            match Pin::new(&mut this.inner).poll_read(cx, &mut this.buf[filled..]) {
                Poll::Ready(Ok(0)) => this.eof = true,
                Poll::Ready(Ok(n)) => {
                    this.filled += n;
                    this.advance();
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for GuardedStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

/// Why a field value was not accepted.
#[derive(Debug, PartialEq, Eq)]
enum Bad {
    TooDeep,
    Malformed,
}

fn read_u32(bytes: &[u8], at: usize) -> Result<usize, Bad> {
    let b = bytes.get(at..at + 4).ok_or(Bad::Malformed)?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// The length of a scalar field value of type `kind` at the start of `bytes` (the type
/// letters amq-protocol reads, RabbitMQ's reading of the spec).
fn scalar_len(kind: u8, bytes: &[u8]) -> Result<usize, Bad> {
    let len = match kind {
        b'V' => 0,
        b't' | b'b' | b'B' => 1,
        b's' | b'U' | b'u' => 2,
        b'I' | b'i' | b'f' => 4,
        b'D' => 5,
        b'l' | b'L' | b'd' | b'T' => 8,
        b'S' | b'x' => 4 + read_u32(bytes, 0)?,
        _ => return Err(Bad::Malformed),
    };
    if bytes.len() < len {
        return Err(Bad::Malformed);
    }
    Ok(len)
}

/// The length of the field value of type `kind` at the start of `bytes`, checking every
/// table and array in it to at most `levels` levels, with an explicit stack.
fn value_len(kind: u8, bytes: &[u8], levels: usize) -> Result<usize, Bad> {
    if !matches!(kind, b'F' | b'A') {
        return scalar_len(kind, bytes);
    }
    let total = 4 + read_u32(bytes, 0)?;
    if total > bytes.len() {
        return Err(Bad::Malformed);
    }
    if levels == 0 {
        return Err(Bad::TooDeep);
    }
    // (where the container ends, whether it is a table)
    let mut open: Vec<(usize, bool)> = vec![(total, kind == b'F')];
    let mut pos = 4;
    while let Some(&(end, table)) = open.last() {
        if pos == end {
            open.pop();
            continue;
        }
        if table {
            let key_len = usize::from(bytes[pos]);
            let key = bytes
                .get(pos + 1..pos + 1 + key_len)
                .filter(|_| pos + 1 + key_len < end)
                .ok_or(Bad::Malformed)?;
            std::str::from_utf8(key).map_err(|_| Bad::Malformed)?;
            pos += 1 + key_len;
        }
        let kind = bytes[pos];
        pos += 1;
        if matches!(kind, b'F' | b'A') {
            let inner_end = pos + 4 + read_u32(bytes, pos)?;
            if inner_end > end {
                return Err(Bad::Malformed);
            }
            if open.len() >= levels {
                return Err(Bad::TooDeep);
            }
            open.push((inner_end, kind == b'F'));
            pos += 4;
        } else {
            pos += scalar_len(kind, &bytes[pos..end])?;
        }
    }
    Ok(total)
}

/// The entries of a header table (without its length prefix) with every value nested
/// deeper than [`MAX_TABLE_DEPTH`] replaced; `None` when nothing needs replacing.
fn safe_table(entries: &[u8]) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    let mut removed = Vec::new();
    let mut pos = 0;
    while pos < entries.len() {
        let entry = pos;
        let key_len = usize::from(entries[pos]);
        let Some(key) = entries
            .get(pos + 1..pos + 1 + key_len)
            .and_then(|k| std::str::from_utf8(k).ok())
        else {
            return Some(unreadable_table());
        };
        pos += 1 + key_len;
        let Some(&kind) = entries.get(pos) else {
            return Some(unreadable_table());
        };
        match value_len(kind, &entries[pos + 1..], MAX_TABLE_DEPTH - 1) {
            Ok(len) => {
                pos += 1 + len;
                if let Some(out) = out.as_mut() {
                    out.extend_from_slice(&entries[entry..pos]);
                }
            }
            Err(Bad::TooDeep) => {
                // `value_len` checked the value's length prefix before its depth.
                let len = 4 + read_u32(entries, pos + 1).unwrap_or(0);
                let out = out.get_or_insert_with(|| entries[..entry].to_vec());
                out.extend_from_slice(&entries[entry..entry + 1 + key_len]);
                push_long_string(out, TOO_DEEP);
                removed.push(key.to_string());
                pos += 1 + len;
            }
            Err(Bad::Malformed) => return Some(unreadable_table()),
        }
    }
    if !removed.is_empty() {
        tracing::warn!(
            headers = ?removed,
            max_depth = MAX_TABLE_DEPTH,
            "a delivery's headers nest too deep to parse safely; their values were replaced"
        );
    }
    out
}

fn push_long_string(out: &mut Vec<u8>, text: &str) {
    out.push(b'S');
    out.extend_from_slice(&frame_len(text.len()).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

fn unreadable_table() -> Vec<u8> {
    tracing::warn!("a delivery's header table cannot be read; it was replaced");
    let mut out = Vec::new();
    out.push(UNREADABLE_HEADERS.len() as u8);
    out.extend_from_slice(UNREADABLE_HEADERS.as_bytes());
    push_long_string(
        &mut out,
        "the message's AMQP header table was malformed and was removed by busway",
    );
    out
}

/// A basic content header frame's payload with its header table made safe to parse;
/// `None` when it already is (or it is not one busway can read: lapin reports that).
fn safe_header_payload(payload: &[u8]) -> Option<Vec<u8>> {
    let u16_at = |at: usize| {
        payload
            .get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    // class id, weight, body size, then property flag words while bit 0 says more follow.
    if u16_at(0)? != BASIC_CLASS {
        return None;
    }
    let flags = u16_at(12)?;
    let mut pos = 14;
    let mut word = flags;
    while word & 1 == 1 {
        word = u16_at(pos)?;
        pos += 2;
    }
    if flags & PROPERTY_HEADERS == 0 {
        return None;
    }
    for bit in [PROPERTY_CONTENT_TYPE, PROPERTY_CONTENT_ENCODING] {
        if flags & bit != 0 {
            pos += 1 + usize::from(*payload.get(pos)?);
        }
    }
    let len = read_u32(payload, pos).ok()?;
    let entries = payload.get(pos + 4..pos + 4 + len)?;
    let table = safe_table(entries)?;
    let mut out = Vec::with_capacity(payload.len() - len + table.len());
    out.extend_from_slice(&payload[..pos]);
    out.extend_from_slice(&frame_len(table.len()).to_be_bytes());
    out.extend_from_slice(&table);
    out.extend_from_slice(&payload[pos + 4 + len..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::parsing::parse_field_table;
    use lapin::types::{AMQPValue, FieldTable};

    /// A header table's bytes (length prefix included) whose `deep` entry nests `levels`
    /// tables, next to a plain `kept` entry.
    fn deep_table(levels: usize, kind: u8) -> Vec<u8> {
        // Built inside out: innermost is an empty table/array.
        let mut value: Vec<u8> = vec![kind, 0, 0, 0, 0];
        for _ in 1..levels {
            let mut outer = vec![kind];
            let mut inner = Vec::new();
            if kind == b'F' {
                inner.push(1);
                inner.push(b'k');
            }
            inner.extend_from_slice(&value);
            outer.extend_from_slice(&(inner.len() as u32).to_be_bytes());
            outer.extend_from_slice(&inner);
            value = outer;
        }
        let mut entries = Vec::new();
        entries.push(4);
        entries.extend_from_slice(b"kept");
        push_long_string(&mut entries, "yes");
        entries.push(4);
        entries.extend_from_slice(b"deep");
        entries.extend_from_slice(&value);
        let mut table = (entries.len() as u32).to_be_bytes().to_vec();
        table.extend_from_slice(&entries);
        table
    }

    /// A basic content header frame carrying `table` as its headers (and a content type).
    fn header_frame(table: &[u8]) -> Vec<u8> {
        let mut payload = Vec::new();
        payload.extend_from_slice(&BASIC_CLASS.to_be_bytes());
        payload.extend_from_slice(&0u16.to_be_bytes());
        payload.extend_from_slice(&5u64.to_be_bytes());
        payload.extend_from_slice(&(PROPERTY_CONTENT_TYPE | PROPERTY_HEADERS).to_be_bytes());
        payload.push(16);
        payload.extend_from_slice(b"application/json");
        payload.extend_from_slice(table);
        let mut frame = vec![FRAME_CONTENT_HEADER, 0, 1];
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(&payload);
        frame.push(FRAME_END);
        frame
    }

    fn method_frame(len: usize) -> Vec<u8> {
        let mut frame = vec![FRAME_METHOD, 0, 1];
        frame.extend_from_slice(&(len as u32).to_be_bytes());
        frame.extend((0..len).map(|i| i as u8));
        frame.push(FRAME_END);
        frame
    }

    /// Everything the guard hands out when `input` arrives in reads of `chunk` bytes.
    fn through_guard(input: &[u8], chunk: usize) -> Vec<u8> {
        struct Chunks<'a>(&'a [u8], usize);
        impl AsyncRead for Chunks<'_> {
            fn poll_read(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
                out: &mut [u8],
            ) -> Poll<io::Result<usize>> {
                let n = self.1.min(self.0.len()).min(out.len());
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Poll::Ready(Ok(n))
            }
        }
        let mut guard = GuardedStream::new(Chunks(input, chunk));
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut out = Vec::new();
        let mut buf = [0u8; 1000];
        loop {
            match Pin::new(&mut guard).poll_read(&mut cx, &mut buf) {
                Poll::Ready(Ok(0)) => return out,
                Poll::Ready(Ok(n)) => out.extend_from_slice(&buf[..n]),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// The header table of a content header frame built by `header_frame`, parsed the way
    /// lapin parses it.
    fn headers_of(frame: &[u8]) -> FieldTable {
        let payload = &frame[FRAME_HEADER_LEN..frame.len() - 1];
        let table = &payload[14 + 17..];
        parse_field_table(table).expect("lapin reads the table").1
    }

    #[test]
    fn frames_that_are_fine_pass_unchanged_whatever_the_reads() {
        let mut input = method_frame(40);
        input.extend(header_frame(&deep_table(MAX_TABLE_DEPTH - 1, b'F')));
        input.extend(method_frame(70_000));
        input.extend(header_frame(&deep_table(10, b'A')));
        for chunk in [1, 3, 7, 100, 65_536, 1 << 20] {
            assert_eq!(
                through_guard(&input, chunk),
                input,
                "reads of {chunk} bytes"
            );
        }
    }

    #[test]
    fn a_header_nested_too_deep_is_replaced_and_the_rest_kept() {
        for kind in [b'F', b'A'] {
            let deep = header_frame(&deep_table(3_000, kind));
            let mut input = method_frame(20);
            input.extend(&deep);
            input.extend(method_frame(20));
            for chunk in [1, 5, 4096, 1 << 20] {
                let out = through_guard(&input, chunk);
                let frame = &out[method_frame(20).len()..out.len() - method_frame(20).len()];
                assert!(frame.len() < deep.len());
                let table = headers_of(frame);
                assert_eq!(
                    table.inner().get("deep"),
                    Some(&AMQPValue::LongString(TOO_DEEP.into()))
                );
                assert_eq!(
                    table.inner().get("kept"),
                    Some(&AMQPValue::LongString("yes".into()))
                );
                assert_eq!(&out[..method_frame(20).len()], &method_frame(20)[..]);
                assert!(out.ends_with(&method_frame(20)));
            }
        }
    }

    #[test]
    fn the_depth_limit_is_exact() {
        // The headers table is level 1: a value of MAX - 1 levels is the deepest kept.
        let fine = header_frame(&deep_table(MAX_TABLE_DEPTH - 1, b'F'));
        assert_eq!(through_guard(&fine, 64), fine);
        let deep = header_frame(&deep_table(MAX_TABLE_DEPTH, b'F'));
        let out = through_guard(&deep, 64);
        assert_eq!(
            headers_of(&out).inner().get("deep"),
            Some(&AMQPValue::LongString(TOO_DEEP.into()))
        );
    }

    #[test]
    fn an_unreadable_table_is_replaced_by_one_header() {
        let mut table = deep_table(2, b'F');
        // An unknown type letter where `kept`'s value starts.
        table[4 + 5] = b'Z';
        let out = through_guard(&header_frame(&table), 1 << 20);
        let parsed = headers_of(&out);
        assert_eq!(parsed.inner().len(), 1);
        assert!(parsed.inner().contains_key(UNREADABLE_HEADERS));
    }

    #[test]
    fn a_peer_that_answers_with_a_protocol_header_passes_through() {
        let input = b"AMQP\x00\x00\x09\x01".to_vec();
        assert_eq!(through_guard(&input, 3), input);
    }

    #[test]
    fn a_cut_frame_is_handed_over_as_it_is() {
        let frame = header_frame(&deep_table(4, b'F'));
        let cut = &frame[..frame.len() / 2];
        assert_eq!(through_guard(cut, 10), cut);
    }
}
