//! The message envelope: identity, addresses, times, headers and host of a message, and
//! MassTransit's JSON envelope form of it (`application/vnd.masstransit+json`).

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::headers::Headers;
use crate::host::HostInfo;
use crate::keys::KeyIn;
use crate::urn::Urn;

/// Everything about a message but its body.
///
/// The fields are MassTransit's `MessageEnvelope`; the JSON envelope serializer writes all of
/// them (nulls included) and the raw JSON serializer carries them in transport headers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Envelope {
    /// The message id, unique per message (a GUID).
    pub message_id: Option<Uuid>,
    /// The request id, on requests and their responses and faults.
    pub request_id: Option<Uuid>,
    /// The correlation id: ties messages about one business process together.
    pub correlation_id: Option<Uuid>,
    /// The conversation id: shared by every message caused by the first one.
    pub conversation_id: Option<Uuid>,
    /// The id of the message that caused this one.
    pub initiator_id: Option<Uuid>,
    /// Where the message was produced (the producing endpoint or bus address).
    pub source_address: Option<String>,
    /// Where the message was sent.
    pub destination_address: Option<String>,
    /// Where responses should go.
    pub response_address: Option<String>,
    /// Where faults should go.
    pub fault_address: Option<String>,
    /// The message's type URNs, most specific first.
    pub message_type: Vec<Urn>,
    /// When the message expires.
    pub expiration_time: Option<DateTime<Utc>>,
    /// When the message was sent.
    pub sent_time: Option<DateTime<Utc>>,
    /// Application headers.
    pub headers: Headers,
    /// The producing host.
    pub host: Option<Arc<HostInfo>>,
}

/// Formats a time as MassTransit writes it: ISO 8601, UTC, microseconds, `Z`.
pub fn format_time(time: &DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Parses a time leniently: RFC 3339 with any offset, or a local-less timestamp taken as UTC.
pub fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(text, format) {
            return Some(t.and_utc());
        }
    }
    None
}

/// Parses a GUID in any of .NET's forms ("D", "N", "B", "P") or as a URN.
pub fn parse_guid(text: &str) -> Option<Uuid> {
    let text = text.trim();
    let text = text
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .unwrap_or(text);
    Uuid::parse_str(text).ok()
}

struct Time<'a>(&'a Option<DateTime<Utc>>);

impl Serialize for Time<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(t) => s.serialize_str(&format_time(t)),
            None => s.serialize_none(),
        }
    }
}

/// An envelope with its message body, in MassTransit's JSON envelope layout.
///
/// Serializing writes every field in MassTransit's order with camelCase names and `null` for
/// absent values; GUIDs are written in the "D" form.
#[derive(Debug)]
pub struct WireEnvelope<'a> {
    /// The envelope fields.
    pub envelope: &'a Envelope,
    /// The message body, already JSON.
    pub message: &'a RawValue,
}

impl Serialize for WireEnvelope<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let e = self.envelope;
        let mut s = serializer.serialize_struct("MessageEnvelope", 15)?;
        s.serialize_field("messageId", &e.message_id)?;
        s.serialize_field("requestId", &e.request_id)?;
        s.serialize_field("correlationId", &e.correlation_id)?;
        s.serialize_field("conversationId", &e.conversation_id)?;
        s.serialize_field("initiatorId", &e.initiator_id)?;
        s.serialize_field("sourceAddress", &e.source_address)?;
        s.serialize_field("destinationAddress", &e.destination_address)?;
        s.serialize_field("responseAddress", &e.response_address)?;
        s.serialize_field("faultAddress", &e.fault_address)?;
        s.serialize_field("messageType", &e.message_type)?;
        s.serialize_field("message", self.message)?;
        s.serialize_field("expirationTime", &Time(&e.expiration_time))?;
        s.serialize_field("sentTime", &Time(&e.sent_time))?;
        s.serialize_field("headers", &e.headers)?;
        s.serialize_field("host", &e.host)?;
        s.end()
    }
}

/// An envelope read from the wire, with the message body still as raw JSON borrowed from
/// the text it was read from (no copy).
///
/// Read it with serde_json from a slice or a string (`from_slice`, `from_str`): the message
/// and host blocks are taken as raw JSON, which a streaming reader cannot lend.
#[derive(Debug)]
pub struct ReadEnvelope<'a> {
    /// The envelope fields.
    pub envelope: Envelope,
    /// The message body, if the envelope had one.
    pub message: Option<&'a RawValue>,
}

/// Reads an optional JSON string and turns it into a value with `parse`, without copying
/// the text: null and empty (or blank) strings read as `None`.
struct ParsedText<T> {
    parse: fn(&str) -> Option<T>,
    what: &'static str,
}

impl<'de, T> Visitor<'de> for ParsedText<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} as a string, or null", self.what)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Option<T>, E> {
        if v.trim().is_empty() {
            return Ok(None);
        }
        match (self.parse)(v) {
            Some(t) => Ok(Some(t)),
            None => Err(E::custom(format_args!("`{v}` is not {}", self.what))),
        }
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
        d.deserialize_str(self)
    }
}

/// A lenient optional GUID: null, empty, or any GUID form.
struct LenientGuid(Option<Uuid>);

impl<'de> Deserialize<'de> for LenientGuid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_option(ParsedText {
            parse: parse_guid,
            what: "a GUID",
        })
        .map(LenientGuid)
    }
}

/// A lenient optional time.
struct LenientTime(Option<DateTime<Utc>>);

impl<'de> Deserialize<'de> for LenientTime {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_option(ParsedText {
            parse: parse_time,
            what: "a date and time",
        })
        .map(LenientTime)
    }
}

/// Message types: an array of URNs, a single string, or null.
struct LenientTypes(Vec<Urn>);

impl<'de> Deserialize<'de> for LenientTypes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TypesVisitor;

        impl<'de> Visitor<'de> for TypesVisitor {
            type Value = Vec<Urn>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a message type URN or an array of them")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Vec<Urn>, E> {
                Ok(vec![Urn::new(v)])
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Vec<Urn>, A::Error> {
                let mut types = Vec::with_capacity(seq.size_hint().unwrap_or(1).min(16));
                while let Some(u) = seq.next_element::<Urn>()? {
                    types.push(u);
                }
                Ok(types)
            }

            fn visit_none<E: serde::de::Error>(self) -> Result<Vec<Urn>, E> {
                Ok(Vec::new())
            }

            fn visit_unit<E: serde::de::Error>(self) -> Result<Vec<Urn>, E> {
                Ok(Vec::new())
            }
        }

        d.deserialize_any(TypesVisitor).map(LenientTypes)
    }
}

/// The envelope's fields, matched without regard to case (MassTransit writes camelCase,
/// older writers PascalCase) and without allocating.
#[derive(Clone, Copy)]
enum EnvelopeField {
    MessageId,
    RequestId,
    CorrelationId,
    ConversationId,
    InitiatorId,
    SourceAddress,
    DestinationAddress,
    ResponseAddress,
    FaultAddress,
    MessageType,
    Message,
    ExpirationTime,
    SentTime,
    Headers,
    Host,
}

impl EnvelopeField {
    const ALL: [(&'static str, EnvelopeField); 15] = [
        ("messageId", Self::MessageId),
        ("requestId", Self::RequestId),
        ("correlationId", Self::CorrelationId),
        ("conversationId", Self::ConversationId),
        ("initiatorId", Self::InitiatorId),
        ("sourceAddress", Self::SourceAddress),
        ("destinationAddress", Self::DestinationAddress),
        ("responseAddress", Self::ResponseAddress),
        ("faultAddress", Self::FaultAddress),
        ("messageType", Self::MessageType),
        ("message", Self::Message),
        ("expirationTime", Self::ExpirationTime),
        ("sentTime", Self::SentTime),
        ("headers", Self::Headers),
        ("host", Self::Host),
    ];
}

impl<'de> Deserialize<'de> for ReadEnvelope<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EnvelopeVisitor;

        impl<'de> Visitor<'de> for EnvelopeVisitor {
            type Value = ReadEnvelope<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a MassTransit message envelope (a JSON object)")
            }

            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<ReadEnvelope<'de>, A::Error> {
                let mut e = Envelope::default();
                let mut message = None;
                let next = std::cell::Cell::new(0);
                while let Some(field) = map.next_key_seed(KeyIn::new(&EnvelopeField::ALL, &next))? {
                    match field {
                        Some(EnvelopeField::MessageId) => {
                            e.message_id = map.next_value::<LenientGuid>()?.0
                        }
                        Some(EnvelopeField::RequestId) => {
                            e.request_id = map.next_value::<LenientGuid>()?.0
                        }
                        Some(EnvelopeField::CorrelationId) => {
                            e.correlation_id = map.next_value::<LenientGuid>()?.0
                        }
                        Some(EnvelopeField::ConversationId) => {
                            e.conversation_id = map.next_value::<LenientGuid>()?.0
                        }
                        Some(EnvelopeField::InitiatorId) => {
                            e.initiator_id = map.next_value::<LenientGuid>()?.0
                        }
                        Some(EnvelopeField::SourceAddress) => {
                            e.source_address = map.next_value()?
                        }
                        Some(EnvelopeField::DestinationAddress) => {
                            e.destination_address = map.next_value()?
                        }
                        Some(EnvelopeField::ResponseAddress) => {
                            e.response_address = map.next_value()?
                        }
                        Some(EnvelopeField::FaultAddress) => e.fault_address = map.next_value()?,
                        Some(EnvelopeField::MessageType) => {
                            e.message_type = map.next_value::<LenientTypes>()?.0
                        }
                        Some(EnvelopeField::Message) => {
                            message = Some(map.next_value::<&'de RawValue>()?)
                        }
                        Some(EnvelopeField::ExpirationTime) => {
                            e.expiration_time = map.next_value::<LenientTime>()?.0
                        }
                        Some(EnvelopeField::SentTime) => {
                            e.sent_time = map.next_value::<LenientTime>()?.0
                        }
                        Some(EnvelopeField::Headers) => e.headers = map.next_value()?,
                        Some(EnvelopeField::Host) => {
                            e.host = map.next_value::<crate::host::SharedHost>()?.0
                        }
                        None => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(ReadEnvelope {
                    envelope: e,
                    message,
                })
            }
        }

        deserializer.deserialize_map(EnvelopeVisitor)
    }
}

/// Serde helpers for a required time in MassTransit's format, read leniently.
pub mod time_format {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the time as [`super::format_time`] does.
    pub fn serialize<S: Serializer>(time: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_time(time))
    }

    /// Reads a time as [`super::parse_time`] does.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(d)?;
        super::parse_time(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("`{text}` is not a date and time")))
    }
}
