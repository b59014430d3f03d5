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

/// An envelope read from the wire, with the message body still as raw JSON.
#[derive(Debug)]
pub struct ReadEnvelope {
    /// The envelope fields.
    pub envelope: Envelope,
    /// The message body, if the envelope had one.
    pub message: Option<Box<RawValue>>,
}

/// A lenient optional GUID: null, empty, or any GUID form.
struct LenientGuid(Option<Uuid>);

impl<'de> Deserialize<'de> for LenientGuid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = Option::<std::borrow::Cow<'de, str>>::deserialize(d)?;
        match value {
            None => Ok(LenientGuid(None)),
            Some(s) if s.trim().is_empty() => Ok(LenientGuid(None)),
            Some(s) => parse_guid(&s)
                .map(|g| LenientGuid(Some(g)))
                .ok_or_else(|| serde::de::Error::custom(format!("`{s}` is not a GUID"))),
        }
    }
}

/// A lenient optional time.
struct LenientTime(Option<DateTime<Utc>>);

impl<'de> Deserialize<'de> for LenientTime {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = Option::<std::borrow::Cow<'de, str>>::deserialize(d)?;
        match value {
            None => Ok(LenientTime(None)),
            Some(s) if s.trim().is_empty() => Ok(LenientTime(None)),
            Some(s) => parse_time(&s)
                .map(|t| LenientTime(Some(t)))
                .ok_or_else(|| serde::de::Error::custom(format!("`{s}` is not a date and time"))),
        }
    }
}

/// Message types: an array of URNs, or a single string.
struct LenientTypes(Vec<Urn>);

impl<'de> Deserialize<'de> for LenientTypes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(Urn),
            Many(Vec<Urn>),
        }
        Ok(LenientTypes(match Option::<OneOrMany>::deserialize(d)? {
            None => Vec::new(),
            Some(OneOrMany::One(u)) => vec![u],
            Some(OneOrMany::Many(v)) => v,
        }))
    }
}

impl<'de> Deserialize<'de> for ReadEnvelope {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EnvelopeVisitor;

        impl<'de> Visitor<'de> for EnvelopeVisitor {
            type Value = ReadEnvelope;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a MassTransit message envelope (a JSON object)")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ReadEnvelope, A::Error> {
                let mut e = Envelope::default();
                let mut message = None;
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    let key = key.to_ascii_lowercase();
                    match key.as_str() {
                        "messageid" => e.message_id = map.next_value::<LenientGuid>()?.0,
                        "requestid" => e.request_id = map.next_value::<LenientGuid>()?.0,
                        "correlationid" => e.correlation_id = map.next_value::<LenientGuid>()?.0,
                        "conversationid" => e.conversation_id = map.next_value::<LenientGuid>()?.0,
                        "initiatorid" => e.initiator_id = map.next_value::<LenientGuid>()?.0,
                        "sourceaddress" => e.source_address = map.next_value()?,
                        "destinationaddress" => e.destination_address = map.next_value()?,
                        "responseaddress" => e.response_address = map.next_value()?,
                        "faultaddress" => e.fault_address = map.next_value()?,
                        "messagetype" => e.message_type = map.next_value::<LenientTypes>()?.0,
                        "message" => message = Some(map.next_value::<Box<RawValue>>()?),
                        "expirationtime" => e.expiration_time = map.next_value::<LenientTime>()?.0,
                        "senttime" => e.sent_time = map.next_value::<LenientTime>()?.0,
                        "headers" => e.headers = map.next_value()?,
                        "host" => e.host = map.next_value()?,
                        _ => {
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
