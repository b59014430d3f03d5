//! Message headers: a small ordered map with case-insensitive names and JSON values.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// Names of the headers busway and MassTransit read and write.
// A name added here belongs in `WELL_KNOWN` below too, so it is not copied when read.
pub mod names {
    /// Why a message was moved: `fault` (error queue) or `dead-letter` (skipped queue).
    pub const REASON: &str = "MT-Reason";
    /// Short type name of the error that faulted the message.
    pub const FAULT_EXCEPTION_TYPE: &str = "MT-Fault-ExceptionType";
    /// Address of the endpoint where the message faulted.
    pub const FAULT_INPUT_ADDRESS: &str = "MT-Fault-InputAddress";
    /// The error message (at most 2048 characters).
    pub const FAULT_MESSAGE: &str = "MT-Fault-Message";
    /// When the fault happened (ISO 8601).
    pub const FAULT_TIMESTAMP: &str = "MT-Fault-Timestamp";
    /// The error chain (at most 2048 characters).
    pub const FAULT_STACK_TRACE: &str = "MT-Fault-StackTrace";
    /// The consumer that faulted.
    pub const FAULT_CONSUMER_TYPE: &str = "MT-Fault-ConsumerType";
    /// The message type the faulting consumer consumed.
    pub const FAULT_MESSAGE_TYPE: &str = "MT-Fault-MessageType";
    /// How many in-process retries ran before the fault.
    pub const FAULT_RETRY_COUNT: &str = "MT-Fault-RetryCount";
    /// How many delayed redeliveries ran before the fault.
    pub const FAULT_REDELIVERY_COUNT: &str = "MT-Fault-RedeliveryCount";
    /// How many times the message was redelivered by delayed redelivery.
    pub const REDELIVERY_COUNT: &str = "MT-Redelivery-Count";
    /// The message id before a redelivery or schedule replaced it.
    pub const ORIGINAL_MESSAGE_ID: &str = "MT-OriginalMessageId";
    /// The message types a request accepts as a response (URNs).
    pub const REQUEST_ACCEPT_TYPE: &str = "MT-Request-AcceptType";
    /// The conversation a new conversation was started from.
    pub const INITIATING_CONVERSATION_ID: &str = "MT-InitiatingConversationId";
    /// Host machine name (error and skipped moves).
    pub const HOST_MACHINE_NAME: &str = "MT-Host-MachineName";
    /// Host process name.
    pub const HOST_PROCESS_NAME: &str = "MT-Host-ProcessName";
    /// Host process id.
    pub const HOST_PROCESS_ID: &str = "MT-Host-ProcessId";
    /// Host assembly (the application).
    pub const HOST_ASSEMBLY: &str = "MT-Host-Assembly";
    /// Host assembly version.
    pub const HOST_ASSEMBLY_VERSION: &str = "MT-Host-AssemblyVersion";
    /// The framework version (busway's, here).
    pub const HOST_MASSTRANSIT_VERSION: &str = "MT-Host-MassTransitVersion";
    /// The runtime version.
    pub const HOST_FRAMEWORK_VERSION: &str = "MT-Host-FrameworkVersion";
    /// The operating system version.
    pub const HOST_OPERATING_SYSTEM_VERSION: &str = "MT-Host-OperatingSystemVersion";
    /// The token of a scheduled send (MassTransit's `MessageHeaders.SchedulingTokenId`).
    pub const SCHEDULING_TOKEN_ID: &str = "MT-Scheduling-TokenId";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace state.
    pub const TRACESTATE: &str = "tracestate";
    /// MassTransit's name for the W3C trace context.
    pub const MT_ACTIVITY_ID: &str = "MT-Activity-Id";

    // Raw JSON serializer transport headers.
    /// Raw JSON: message id.
    pub const MESSAGE_ID: &str = "MessageId";
    /// Raw JSON: correlation id.
    pub const CORRELATION_ID: &str = "CorrelationId";
    /// Raw JSON: conversation id.
    pub const CONVERSATION_ID: &str = "ConversationId";
    /// Raw JSON: request id.
    pub const REQUEST_ID: &str = "RequestId";
    /// Raw JSON: initiator id.
    pub const INITIATOR_ID: &str = "MT-InitiatorId";
    /// Raw JSON: message types, `;`-separated.
    pub const MESSAGE_TYPE: &str = "MT-MessageType";
    /// Raw JSON: response address.
    pub const RESPONSE_ADDRESS: &str = "MT-Response-Address";
    /// Raw JSON: fault address.
    pub const FAULT_ADDRESS: &str = "MT-Fault-Address";
    /// Raw JSON: source address.
    pub const SOURCE_ADDRESS: &str = "MT-Source-Address";
    /// Raw JSON: host info as JSON.
    pub const HOST_INFO: &str = "MT-Host-Info";
    /// Content type, where a transport carries it as a header (Kafka, SQS).
    pub const CONTENT_TYPE: &str = "Content-Type";
}

/// A header name: one of the names busway and MassTransit write (kept as a `&'static str`,
/// no allocation) or any other.
type Name = Cow<'static, str>;

/// Every name in [`names`]: headers read off the wire under one of these exact names keep
/// the static text instead of a copy of their own (a delivery carries about ten of them).
const WELL_KNOWN: &[&str] = &[
    names::REASON,
    names::FAULT_EXCEPTION_TYPE,
    names::FAULT_INPUT_ADDRESS,
    names::FAULT_MESSAGE,
    names::FAULT_TIMESTAMP,
    names::FAULT_STACK_TRACE,
    names::FAULT_CONSUMER_TYPE,
    names::FAULT_MESSAGE_TYPE,
    names::FAULT_RETRY_COUNT,
    names::FAULT_REDELIVERY_COUNT,
    names::REDELIVERY_COUNT,
    names::ORIGINAL_MESSAGE_ID,
    names::REQUEST_ACCEPT_TYPE,
    names::INITIATING_CONVERSATION_ID,
    names::HOST_MACHINE_NAME,
    names::HOST_PROCESS_NAME,
    names::HOST_PROCESS_ID,
    names::HOST_ASSEMBLY,
    names::HOST_ASSEMBLY_VERSION,
    names::HOST_MASSTRANSIT_VERSION,
    names::HOST_FRAMEWORK_VERSION,
    names::HOST_OPERATING_SYSTEM_VERSION,
    names::SCHEDULING_TOKEN_ID,
    names::TRACEPARENT,
    names::TRACESTATE,
    names::MT_ACTIVITY_ID,
    names::MESSAGE_ID,
    names::CORRELATION_ID,
    names::CONVERSATION_ID,
    names::REQUEST_ID,
    names::INITIATOR_ID,
    names::MESSAGE_TYPE,
    names::RESPONSE_ADDRESS,
    names::FAULT_ADDRESS,
    names::SOURCE_ADDRESS,
    names::HOST_INFO,
    names::CONTENT_TYPE,
    // The names MassTransit's Kafka rider writes besides the ones above.
    "InitiatorId",
    "SourceAddress",
    "DestinationAddress",
];

/// `text` as a header name, without allocating when it is a well-known one.
fn name_of(text: &str) -> Name {
    name_of_static(text).map_or_else(|| Cow::Owned(text.to_owned()), Cow::Borrowed)
}

fn name_of_static(text: &str) -> Option<&'static str> {
    WELL_KNOWN
        .iter()
        .find(|known| known.len() == text.len() && **known == text)
        .copied()
}

/// Message headers: names are compared without regard to ASCII case, values are JSON.
///
/// Insertion order is kept, which keeps wire output stable. Clones share their entries
/// until one of them is changed (copy on write), so handing a message's headers from
/// envelope to transport message to delivery costs no copying.
#[derive(Clone, Default)]
pub struct Headers {
    /// `None` while empty, so an empty set allocates nothing.
    entries: Option<Arc<Vec<(Name, Value)>>>,
}

impl PartialEq for Headers {
    fn eq(&self, other: &Self) -> bool {
        self.entries() == other.entries()
    }
}

impl Headers {
    /// An empty header set.
    pub fn new() -> Self {
        Self::default()
    }

    fn entries(&self) -> &[(Name, Value)] {
        self.entries.as_deref().map(Vec::as_slice).unwrap_or(&[])
    }

    fn entries_mut(&mut self) -> &mut Vec<(Name, Value)> {
        Arc::make_mut(self.entries.get_or_insert_with(Default::default))
    }

    /// Sets `name` to `value`, replacing an existing header of the same name (any case).
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<Value>) {
        let name = name.into();
        let value = value.into();
        let entries = self.entries_mut();
        match entries
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(&name))
        {
            Some(entry) => entry.1 = value,
            None => entries.push((Cow::Owned(name), value)),
        }
    }

    /// Sets `name` only if no header of that name exists.
    pub fn insert_if_absent(&mut self, name: impl Into<String>, value: impl Into<Value>) {
        let name = name.into();
        if !self.contains(&name) {
            self.entries_mut().push((Cow::Owned(name), value.into()));
        }
    }

    /// The value of `name`, if present.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.entries()
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The value of `name` as text: strings as they are, numbers and booleans formatted.
    pub fn get_str(&self, name: &str) -> Option<std::borrow::Cow<'_, str>> {
        match self.get(name)? {
            Value::String(s) => Some(std::borrow::Cow::Borrowed(s.as_str())),
            Value::Null => None,
            Value::Number(n) => Some(std::borrow::Cow::Owned(n.to_string())),
            Value::Bool(b) => Some(std::borrow::Cow::Owned(b.to_string())),
            other => Some(std::borrow::Cow::Owned(other.to_string())),
        }
    }

    /// The value of `name` as an integer: a JSON number or a string holding one.
    pub fn get_i64(&self, name: &str) -> Option<i64> {
        match self.get(name)? {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    /// True if `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Removes `name`, returning its value.
    pub fn remove(&mut self, name: &str) -> Option<Value> {
        let index = self
            .entries()
            .iter()
            .position(|(k, _)| k.eq_ignore_ascii_case(name))?;
        Some(self.entries_mut().remove(index).1)
    }

    /// All headers, in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.entries().iter().map(|(k, v)| (k.as_ref(), v))
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    /// True if there are no headers.
    pub fn is_empty(&self) -> bool {
        self.entries().is_empty()
    }

    /// Headers from names and values read off the wire (an AMQP table, Kafka record
    /// headers), collected as [`FromIterator`] does; well-known names are not copied.
    pub fn from_wire<'a>(entries: impl IntoIterator<Item = (&'a str, Value)>) -> Self {
        let mut builder = HeadersBuilder::default();
        for (k, v) in entries {
            builder.push(name_of(k), v);
        }
        builder.finish()
    }

    /// Copies every header of `other` into `self`, replacing same-named ones.
    pub fn extend_from(&mut self, other: &Headers) {
        if self.is_empty() {
            self.entries = other.entries.clone();
            return;
        }
        // Transport headers usually repeat the envelope's (both are written from one set):
        // nothing to copy then.
        if self.entries() == other.entries() {
            return;
        }
        if other.len() > HeadersBuilder::SCAN_LIMIT {
            let merged: Headers = self
                .iter()
                .chain(other.iter())
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            *self = merged;
            return;
        }
        for (k, v) in other.iter() {
            self.insert(k, v.clone());
        }
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.entries().iter().map(|(k, v)| (k, v)))
            .finish()
    }
}

/// Collects headers in linear time: a later header replaces an earlier one of the same name
/// (any case), as [`Headers::insert`] would, but without a scan per insert. Headers read off
/// the wire (an envelope, an AMQP table, Kafka record headers) are built this way, so a
/// message with tens of thousands of headers costs milliseconds, not seconds.
impl<K: Into<String>, V: Into<Value>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut builder = HeadersBuilder::default();
        for (k, v) in iter {
            builder.push(Cow::Owned(k.into()), v.into());
        }
        builder.finish()
    }
}

/// Builds [`Headers`] from many entries in linear time.
#[derive(Default)]
struct HeadersBuilder {
    entries: Vec<(Name, Value)>,
    /// Lower-cased name → index in `entries`; only built once there are enough entries for
    /// a scan to cost more than hashing.
    index: Option<std::collections::HashMap<String, usize>>,
}

impl HeadersBuilder {
    /// Up to this many entries a linear scan is cheaper than a map.
    const SCAN_LIMIT: usize = 16;

    fn push(&mut self, name: Name, value: Value) {
        if self.index.is_none() && self.entries.len() >= Self::SCAN_LIMIT {
            let map = self
                .entries
                .iter()
                .enumerate()
                .map(|(i, (k, _))| (k.to_ascii_lowercase(), i))
                .collect();
            self.index = Some(map);
        }
        match &mut self.index {
            None => match self
                .entries
                .iter_mut()
                .find(|(k, _)| k.eq_ignore_ascii_case(&name))
            {
                Some(entry) => entry.1 = value,
                None => self.entries.push((name, value)),
            },
            Some(index) => match index.entry(name.to_ascii_lowercase()) {
                std::collections::hash_map::Entry::Occupied(slot) => {
                    self.entries[*slot.get()].1 = value;
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(self.entries.len());
                    self.entries.push((name, value));
                }
            },
        }
    }

    fn finish(self) -> Headers {
        Headers {
            entries: (!self.entries.is_empty()).then(|| Arc::new(self.entries)),
        }
    }
}

impl Serialize for Headers {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.len()))?;
        for (k, v) in self.entries() {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Headers {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HeadersVisitor;
        impl<'de> Visitor<'de> for HeadersVisitor {
            type Value = Headers;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of headers or null")
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Headers, E> {
                Ok(Headers::new())
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<Headers, E> {
                Ok(Headers::new())
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Headers, D::Error> {
                d.deserialize_any(self)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Headers, A::Error> {
                let mut headers = HeadersBuilder::default();
                while let Some((k, v)) = map.next_entry::<WireName, Value>()? {
                    headers.push(k.0, v);
                }
                Ok(headers.finish())
            }
        }
        deserializer.deserialize_option(HeadersVisitor)
    }
}

/// A header name read by serde: borrowed text is looked up among the well-known names
/// before it is copied.
struct WireName(Name);

impl<'de> Deserialize<'de> for WireName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl Visitor<'_> for NameVisitor {
            type Value = WireName;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a header name")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<WireName, E> {
                Ok(WireName(name_of(v)))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<WireName, E> {
                Ok(WireName(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_known_names_read_off_the_wire_are_not_copied() {
        let wire = Headers::from_wire([
            ("MessageId", Value::from("a")),
            ("traceparent", Value::from("b")),
            ("X-Custom", Value::from("c")),
        ]);
        let json: Headers =
            serde_json::from_str(r#"{"MT-Activity-Id":"d","x-other":1}"#).expect("headers");
        let borrowed = |h: &Headers| {
            h.entries()
                .iter()
                .map(|(k, _)| matches!(k, Cow::Borrowed(_)))
                .collect::<Vec<_>>()
        };
        assert_eq!(borrowed(&wire), [true, true, false]);
        assert_eq!(borrowed(&json), [true, false]);
        assert_eq!(wire.get_str("messageid").as_deref(), Some("a"));
        assert_eq!(json.get_i64("X-OTHER"), Some(1));
    }

    #[test]
    fn names_are_case_insensitive_and_replace() {
        let mut h = Headers::new();
        h.insert("Application-Header", "a");
        h.insert("application-header", "b");
        assert_eq!(h.len(), 1);
        assert_eq!(h.get_str("APPLICATION-HEADER").as_deref(), Some("b"));
        h.insert("MT-Redelivery-Count", 2);
        assert_eq!(h.get_i64("mt-redelivery-count"), Some(2));
        h.insert("n", "7");
        assert_eq!(h.get_i64("n"), Some(7));
        assert_eq!(h.remove("N"), Some(Value::from("7")));
    }

    #[test]
    fn many_headers_are_read_in_linear_time() {
        // 40,000 distinct names took 23 s with an insert-by-scan; a bound of 2 s leaves a
        // slow machine room while still failing a quadratic build by an order of magnitude.
        let n = 40_000;
        let mut json = String::from("{");
        for i in 0..n {
            if i > 0 {
                json.push(',');
            }
            json.push_str(&format!("\"h{i}\":{i}"));
        }
        json.push_str(",\"H7\":\"last\"}");
        let started = std::time::Instant::now();
        let h: Headers = serde_json::from_str(&json).unwrap();
        let elapsed = started.elapsed();
        assert_eq!(h.len(), n);
        assert_eq!(h.get_str("h7").as_deref(), Some("last"));
        assert!(
            elapsed < std::time::Duration::from_secs(2),
            "took {elapsed:?}"
        );
        let collected: Headers = (0..n).map(|i| (format!("k{i}"), i)).collect();
        assert_eq!(collected.len(), n);
        let mut merged = Headers::new();
        merged.insert("K1", "first");
        merged.extend_from(&collected);
        assert_eq!(merged.len(), n);
        assert_eq!(merged.get_i64("k1"), Some(1));
    }

    #[test]
    fn null_reads_as_empty() {
        let h: Headers = serde_json::from_str("null").unwrap();
        assert!(h.is_empty());
    }
}
