//! Serializers: MassTransit's JSON envelope (the default) and raw JSON.
//!
//! A [`Serializer`] turns an [`Envelope`] plus the message's JSON into a
//! [`TransportMessage`] and back. On receive the content type picks the serializer; typed
//! message bodies are then read by [`decode_message`], which is lenient the way MassTransit's
//! reader is.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::envelope::{Envelope, ReadEnvelope, WireEnvelope, parse_guid};
use crate::error::{Error, ErrorKind};
use crate::headers::{Headers, names};
use crate::host::{HostInfo, SharedHost};
use crate::transport::message::TransportMessage;
use crate::urn::Urn;

/// MassTransit's envelope content type.
pub const MASSTRANSIT_JSON: &str = "application/vnd.masstransit+json";
/// Raw JSON content type.
pub const RAW_JSON: &str = "application/json";

/// A message read off the wire: envelope fields and the message body as raw JSON.
#[derive(Debug, Clone)]
pub struct ReceivedMessage {
    /// The envelope fields.
    pub envelope: Envelope,
    /// The message body.
    pub message: MessageJson,
    /// True when the message carries no type information and may be handed to any consumer
    /// (raw JSON with `accept_any_message_type`).
    pub any_message_type: bool,
}

/// A message's JSON as it was received: the span of the transport body it came in, shared
/// with that body rather than copied, or JSON of its own.
///
/// ```
/// use busway_core::serializer::MessageJson;
/// use bytes::Bytes;
///
/// let body = Bytes::from_static(br#"{"messageId":null,"message":{"n":7}}"#);
/// let json = MessageJson::within(&body, "{\"n\":7}");
/// assert_eq!(json.get(), r#"{"n":7}"#);
/// ```
#[derive(Clone)]
pub struct MessageJson {
    body: Bytes,
}

impl MessageJson {
    /// The JSON text `json`, a slice of `body` (borrowed from it by a serde read): shares
    /// `body` with no copy. Text that is not within `body` is copied.
    pub fn within(body: &Bytes, json: &str) -> Self {
        let start = (json.as_ptr() as usize).wrapping_sub(body.as_ptr() as usize);
        let inside = json.is_empty() || (start <= body.len() && json.len() <= body.len() - start);
        Self {
            body: if inside {
                body.slice(start..start + json.len())
            } else {
                Bytes::copy_from_slice(json.as_bytes())
            },
        }
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        // Taken from a `&str`, so always UTF-8; checked again rather than trusted.
        std::str::from_utf8(&self.body).unwrap_or("null")
    }

    /// The JSON bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.body
    }

    /// The JSON as an owned [`RawValue`] (a copy), for writing it into other JSON.
    pub fn to_raw_value(&self) -> Box<RawValue> {
        RawValue::from_string(self.get().to_owned())
            .unwrap_or_else(|_| RawValue::from_string("null".to_owned()).expect("`null` is JSON"))
    }
}

impl From<Box<RawValue>> for MessageJson {
    fn from(raw: Box<RawValue>) -> Self {
        Self {
            body: Bytes::from(Box::<str>::from(raw).into_string().into_bytes()),
        }
    }
}

impl From<&RawValue> for MessageJson {
    fn from(raw: &RawValue) -> Self {
        Self {
            body: Bytes::copy_from_slice(raw.get().as_bytes()),
        }
    }
}

impl fmt::Debug for MessageJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("MessageJson").field(&self.get()).finish()
    }
}

/// Writes and reads one content type.
pub trait Serializer: Send + Sync + fmt::Debug + 'static {
    /// The content type this serializer writes and reads.
    fn content_type(&self) -> &str;

    /// Builds the transport message for an envelope and a message body already in JSON.
    fn serialize(&self, envelope: &Envelope, message: &RawValue)
    -> Result<TransportMessage, Error>;

    /// Reads a transport message.
    fn deserialize(&self, message: &TransportMessage) -> Result<ReceivedMessage, Error>;
}

/// A GUID in the hyphenated "D" form, without going through `fmt`.
fn guid_text(id: uuid::Uuid) -> String {
    id.hyphenated()
        .encode_lower(&mut uuid::Uuid::encode_buffer())
        .to_owned()
}

fn deserialize_error(why: impl fmt::Display, source: Option<serde_json::Error>) -> Error {
    match source {
        Some(src) => Error::with_source(ErrorKind::Deserialize, why.to_string(), src),
        None => Error::new(ErrorKind::Deserialize, why.to_string()),
    }
}

/// MassTransit's JSON envelope (`application/vnd.masstransit+json`), the default.
///
/// Writes every envelope field (nulls included) with camelCase names; reads field names in
/// any case, GUIDs in any .NET form and times with or without an offset. Application headers
/// are copied to transport headers too, as MassTransit does.
#[derive(Debug, Clone, Copy, Default)]
pub struct MassTransitJson;

impl Serializer for MassTransitJson {
    fn content_type(&self) -> &str {
        MASSTRANSIT_JSON
    }

    fn serialize(
        &self,
        envelope: &Envelope,
        message: &RawValue,
    ) -> Result<TransportMessage, Error> {
        // The envelope's fixed fields, ids, addresses and host come to about 1 KiB; sizing
        // the buffer up front saves the growth copies.
        let mut body = Vec::with_capacity(1024 + message.get().len());
        serde_json::to_writer(&mut body, &WireEnvelope { envelope, message }).map_err(|e| {
            Error::with_source(ErrorKind::Serialize, "could not write the envelope", e)
        })?;
        Ok(TransportMessage {
            body: Bytes::from(body),
            content_type: Some(MASSTRANSIT_JSON.to_string()),
            message_id: envelope.message_id.map(guid_text),
            correlation_id: envelope.correlation_id.map(guid_text),
            headers: envelope.headers.clone(),
            time_to_live: None,
            partition_key: None,
            reply_to: None,
        })
    }

    fn deserialize(&self, message: &TransportMessage) -> Result<ReceivedMessage, Error> {
        let read: ReadEnvelope<'_> = serde_json::from_slice(&message.body).map_err(|e| {
            deserialize_error("the body is not a valid MassTransit JSON envelope", Some(e))
        })?;
        let body = read
            .message
            .map(|raw| MessageJson::within(&message.body, raw.get()))
            .ok_or_else(|| deserialize_error("the envelope has no `message` field", None))?;
        let mut envelope = read.envelope;
        if envelope.message_id.is_none() {
            envelope.message_id = message.message_id.as_deref().and_then(parse_guid);
        }
        if envelope.correlation_id.is_none() {
            envelope.correlation_id = message.correlation_id.as_deref().and_then(parse_guid);
        }
        // Transport headers carry what was added after serialization (redelivery counts,
        // fault headers on moved messages); they win over the envelope's copies.
        envelope.headers.extend_from(&message.headers);
        Ok(ReceivedMessage {
            envelope,
            message: body,
            any_message_type: false,
        })
    }
}

/// Raw JSON (`application/json`): the body is the message alone; identity travels in
/// transport headers (`MessageId`, `CorrelationId`, `MT-MessageType`, ...), as MassTransit's
/// raw serializer writes them.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawJson {
    accept_any_message_type: bool,
    rider_names: bool,
}

impl RawJson {
    /// Raw JSON that only matches consumers of the types listed in `MT-MessageType`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Hands messages without an `MT-MessageType` header to every consumer at the endpoint
    /// (MassTransit's `RawSerializerOptions.AnyMessageType`), for producers that are not
    /// MassTransit or busway.
    pub fn accept_any_message_type(mut self) -> Self {
        self.accept_any_message_type = true;
        self
    }

    /// Raw JSON with the header names MassTransit's Kafka and Event Hub riders write
    /// (`MessageId`, `CorrelationId`, `ConversationId`, `InitiatorId`, `SourceAddress`,
    /// `DestinationAddress`, plus `MT-MessageType`). Reading accepts both namings.
    pub fn rider() -> Self {
        Self {
            accept_any_message_type: false,
            rider_names: true,
        }
    }
}

/// `host` as JSON. A bus stamps one `Arc<HostInfo>` on everything it sends, so each thread
/// keeps the text of the last host it wrote and reuses it while the host is the same.
fn host_json(host: &Arc<HostInfo>) -> Result<String, Error> {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(Arc<HostInfo>, String)>> =
            const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        if let Some((seen, json)) = last.borrow().as_ref()
            && (Arc::ptr_eq(seen, host) || **seen == **host)
        {
            return Ok(json.clone());
        }
        let json = serde_json::to_string(&**host).map_err(|e| {
            Error::with_source(ErrorKind::Serialize, "could not write host info", e)
        })?;
        *last.borrow_mut() = Some((host.clone(), json.clone()));
        Ok(json)
    })
}

fn header_guid(headers: &Headers, names: &[&str]) -> Option<uuid::Uuid> {
    names
        .iter()
        .find_map(|n| headers.get_str(n).and_then(|v| parse_guid(&v)))
}

fn header_text(headers: &Headers, names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|n| headers.get_str(n).map(|v| v.into_owned()))
        .filter(|v| !v.is_empty())
}

impl Serializer for RawJson {
    fn content_type(&self) -> &str {
        RAW_JSON
    }

    fn serialize(
        &self,
        envelope: &Envelope,
        message: &RawValue,
    ) -> Result<TransportMessage, Error> {
        let mut headers = envelope.headers.clone();
        let mut set_id = |name: &str, id: Option<uuid::Uuid>| {
            if let Some(id) = id {
                headers.insert(name, guid_text(id));
            }
        };
        set_id(names::MESSAGE_ID, envelope.message_id);
        set_id(names::CORRELATION_ID, envelope.correlation_id);
        set_id(names::CONVERSATION_ID, envelope.conversation_id);
        set_id(
            if self.rider_names {
                "InitiatorId"
            } else {
                names::INITIATOR_ID
            },
            envelope.initiator_id,
        );
        set_id(names::REQUEST_ID, envelope.request_id);
        let types: Vec<&str> = envelope.message_type.iter().map(Urn::as_str).collect();
        headers.insert(names::MESSAGE_TYPE, types.join(";"));
        let source = if self.rider_names {
            "SourceAddress"
        } else {
            names::SOURCE_ADDRESS
        };
        for (name, value) in [
            (names::RESPONSE_ADDRESS, &envelope.response_address),
            (names::FAULT_ADDRESS, &envelope.fault_address),
            (source, &envelope.source_address),
        ] {
            if let Some(v) = value {
                headers.insert(name, v.as_str());
            }
        }
        if self.rider_names
            && let Some(v) = &envelope.destination_address
        {
            headers.insert("DestinationAddress", v.as_str());
        }
        if let Some(host) = &envelope.host {
            headers.insert(names::HOST_INFO, host_json(host)?);
        }
        Ok(TransportMessage {
            body: Bytes::copy_from_slice(message.get().as_bytes()),
            content_type: Some(RAW_JSON.to_string()),
            message_id: envelope.message_id.map(guid_text),
            correlation_id: envelope.correlation_id.map(guid_text),
            headers,
            time_to_live: None,
            partition_key: None,
            reply_to: None,
        })
    }

    fn deserialize(&self, message: &TransportMessage) -> Result<ReceivedMessage, Error> {
        let body: &RawValue = serde_json::from_slice(&message.body)
            .map_err(|e| deserialize_error("the body is not valid JSON", Some(e)))?;
        let body = MessageJson::within(&message.body, body.get());
        let h = &message.headers;
        let message_type: Vec<Urn> = header_text(h, &[names::MESSAGE_TYPE])
            .map(|t| {
                t.split(';')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(Urn::new)
                    .collect()
            })
            .unwrap_or_default();
        // A run of messages from one producer repeats the same host text: shared, not
        // parsed again (see `SharedHost`).
        let host = h
            .get_str(names::HOST_INFO)
            .and_then(|json| serde_json::from_str::<SharedHost>(&json).ok())
            .and_then(|shared| shared.0);
        let any_message_type = message_type.is_empty() && self.accept_any_message_type;
        let envelope = Envelope {
            message_type,
            expiration_time: None,
            sent_time: None,
            headers: h.clone(),
            host,
            message_id: header_guid(h, &[names::MESSAGE_ID])
                .or_else(|| message.message_id.as_deref().and_then(parse_guid)),
            request_id: header_guid(h, &[names::REQUEST_ID]),
            correlation_id: header_guid(h, &[names::CORRELATION_ID])
                .or_else(|| message.correlation_id.as_deref().and_then(parse_guid)),
            conversation_id: header_guid(h, &[names::CONVERSATION_ID]),
            initiator_id: header_guid(h, &[names::INITIATOR_ID, "InitiatorId"]),
            source_address: header_text(h, &[names::SOURCE_ADDRESS, "SourceAddress"]),
            destination_address: header_text(h, &["DestinationAddress"]),
            response_address: header_text(h, &[names::RESPONSE_ADDRESS]),
            fault_address: header_text(h, &[names::FAULT_ADDRESS]),
        };
        Ok(ReceivedMessage {
            envelope,
            message: body,
            any_message_type,
        })
    }
}

/// The serializers a bus knows: one to write with, all to read with (by content type).
#[derive(Debug, Clone)]
#[doc(hidden)] // the bus's registry; not part of the API
pub struct Serializers {
    default: Arc<dyn Serializer>,
    readers: Vec<Arc<dyn Serializer>>,
    missing_content_type: Option<String>,
}

impl Default for Serializers {
    fn default() -> Self {
        Self {
            default: Arc::new(MassTransitJson),
            readers: vec![Arc::new(MassTransitJson), Arc::new(RawJson::new())],
            missing_content_type: None,
        }
    }
}

fn base_content_type(ct: &str) -> &str {
    ct.split(';').next().unwrap_or(ct).trim()
}

impl Serializers {
    /// Writes with `serializer` (and reads its content type).
    pub fn set_default(&mut self, serializer: Arc<dyn Serializer>) {
        self.add_reader(serializer.clone());
        self.default = serializer;
    }

    /// Reads `serializer`'s content type with it, replacing a reader of the same type.
    pub fn add_reader(&mut self, serializer: Arc<dyn Serializer>) {
        let ct = serializer.content_type().to_ascii_lowercase();
        self.readers
            .retain(|s| !s.content_type().eq_ignore_ascii_case(&ct));
        self.readers.push(serializer);
    }

    /// Treats messages without a content type as `content_type` instead of faulting them.
    pub fn set_missing_content_type(&mut self, content_type: Option<String>) {
        self.missing_content_type = content_type;
    }

    /// The serializer messages are written with.
    pub fn default_serializer(&self) -> &Arc<dyn Serializer> {
        &self.default
    }

    /// The reader for a content type, or an error naming what was found.
    pub fn reader(&self, content_type: Option<&str>) -> Result<&Arc<dyn Serializer>, Error> {
        let ct = match content_type
            .map(base_content_type)
            .filter(|c| !c.is_empty())
        {
            Some(ct) => ct,
            None => match &self.missing_content_type {
                Some(ct) => base_content_type(ct),
                None => {
                    return Err(Error::new(
                        ErrorKind::Deserialize,
                        "the message has no content type, and no default content type is configured",
                    ));
                }
            },
        };
        self.readers
            .iter()
            .find(|s| s.content_type().eq_ignore_ascii_case(ct))
            .ok_or_else(|| {
                let known: Vec<&str> = self.readers.iter().map(|s| s.content_type()).collect();
                Error::new(
                    ErrorKind::Deserialize,
                    format!(
                        "no deserializer for content type `{ct}` (known: {})",
                        known.join(", ")
                    ),
                )
            })
    }

    /// Reads a transport message with the serializer its content type names.
    pub fn deserialize(&self, message: &TransportMessage) -> Result<ReceivedMessage, Error> {
        self.reader(message.content_type.as_deref())?
            .deserialize(message)
    }
}

/// Reads a typed message from its JSON body.
///
/// Field names are matched as the type's serde attributes say (busway's contracts use
/// `#[serde(rename_all = "camelCase")]`). When that fails, the body is read once more with
/// every object key's first letter lowercased, so PascalCase bodies from older MassTransit
/// producers (Newtonsoft defaults) are accepted too.
pub fn decode_message<M: DeserializeOwned>(
    raw: &(impl JsonText + ?Sized),
) -> Result<M, serde_json::Error> {
    decode_json(raw.json_bytes())
}

/// JSON text a typed message can be read from in place: a received [`MessageJson`], a
/// [`RawValue`], a `str`.
pub trait JsonText {
    /// The JSON bytes.
    fn json_bytes(&self) -> &[u8];
}

impl JsonText for MessageJson {
    fn json_bytes(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl JsonText for RawValue {
    fn json_bytes(&self) -> &[u8] {
        self.get().as_bytes()
    }
}

impl JsonText for str {
    fn json_bytes(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl<T: JsonText + ?Sized> JsonText for Box<T> {
    fn json_bytes(&self) -> &[u8] {
        (**self).json_bytes()
    }
}

/// [`decode_message`] for JSON bytes, read in place.
pub fn decode_json<M: DeserializeOwned>(json: &[u8]) -> Result<M, serde_json::Error> {
    match serde_json::from_slice::<M>(json) {
        Ok(m) => Ok(m),
        Err(first) => {
            let Ok(mut value) = serde_json::from_slice::<Value>(json) else {
                return Err(first);
            };
            if !camelize_keys(&mut value) {
                return Err(first);
            }
            serde_json::from_value(value).map_err(|_| first)
        }
    }
}

/// Lowercases the first letter of every object key; true if anything changed.
fn camelize_keys(value: &mut Value) -> bool {
    match value {
        Value::Object(map) => {
            let mut changed = false;
            let entries: Vec<(String, Value)> = std::mem::take(map).into_iter().collect();
            for (key, mut v) in entries {
                changed |= camelize_keys(&mut v);
                let mut chars = key.chars();
                let new_key = match chars.next() {
                    Some(first) if first.is_ascii_uppercase() => {
                        changed = true;
                        first.to_ascii_lowercase().to_string() + chars.as_str()
                    }
                    _ => key,
                };
                map.insert(new_key, v);
            }
            changed
        }
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |acc, v| camelize_keys(v) | acc),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_received_message_shares_the_body_it_came_in() {
        let body = Bytes::from(
            br#"{"messageId":"0e1b3c9a-0000-4000-8000-000000000001","message":{"n":7},"messageType":["urn:message:T"]}"#
                .to_vec(),
        );
        let received = MassTransitJson
            .deserialize(&TransportMessage::new(body.clone()))
            .expect("an envelope");
        let json = received.message.as_bytes();
        assert_eq!(json, br#"{"n":7}"#);
        let start = json.as_ptr() as usize - body.as_ptr() as usize;
        assert!(
            start < body.len(),
            "the message JSON points into the body: no copy"
        );
        assert_eq!(decode_message::<Value>(&received.message).unwrap()["n"], 7);
    }

    #[test]
    fn text_outside_the_body_is_copied() {
        let body = Bytes::from_static(b"{}");
        let json = MessageJson::within(&body, "[1,2]");
        assert_eq!(json.get(), "[1,2]");
        assert_eq!(json.to_raw_value().get(), "[1,2]");
    }
}
