//! The wire form on Kafka: a [`TransportMessage`] as a record's headers, key and value, and
//! a record read back, as MassTransit's rider writes them (identity in headers, the value the
//! message's JSON, `Content-Type` as a header).

use busway_core::headers::names;
use busway_core::{Headers, TransportMessage};
use bytes::Bytes;
use rdkafka::message::{Header, Headers as _, Message, OwnedHeaders};

/// Headers of a message as Kafka headers: strings as UTF-8, other values as JSON; the
/// content type as `Content-Type`.
pub(crate) fn to_kafka_headers(message: &TransportMessage) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(message.headers.len() + 1);
    if let Some(ct) = &message.content_type {
        headers = headers.insert(Header {
            key: names::CONTENT_TYPE,
            value: Some(ct.as_bytes()),
        });
    }
    for (k, v) in message.headers.iter() {
        if k.eq_ignore_ascii_case(names::CONTENT_TYPE) {
            continue;
        }
        let text = match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => continue,
            other => other.to_string(),
        };
        headers = headers.insert(Header {
            key: k,
            value: Some(text.as_bytes()),
        });
    }
    headers
}

/// A Kafka record as a transport message. Header values are read as text.
pub(crate) fn from_record<M: Message>(record: &M) -> TransportMessage {
    let mut entries = Vec::new();
    let mut content_type = None;
    if let Some(h) = record.headers() {
        for header in h.iter() {
            let value = header
                .value
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            if header.key.eq_ignore_ascii_case(names::CONTENT_TYPE) {
                content_type = Some(value);
                continue;
            }
            entries.push((header.key, serde_json::Value::String(value)));
        }
    }
    // Collected in one pass: inserting one by one scans the set each time, which a record
    // with tens of thousands of headers turns into seconds on a runtime worker.
    let headers = Headers::from_wire(entries);
    let body = Bytes::copy_from_slice(record.payload().unwrap_or_default());
    // MassTransit's Kafka rider labels raw JSON bodies `application/vnd.masstransit+json`;
    // read such bodies as the raw JSON they are.
    if content_type.as_deref() == Some(busway_core::serializer::MASSTRANSIT_JSON)
        && !looks_like_envelope(&body)
    {
        content_type = Some(busway_core::serializer::RAW_JSON.to_string());
    }
    let mut message = TransportMessage::new(body);
    message.message_id = headers.get_str(names::MESSAGE_ID).map(|s| s.into_owned());
    message.correlation_id = headers
        .get_str(names::CORRELATION_ID)
        .map(|s| s.into_owned());
    message.content_type = content_type;
    message.headers = headers;
    message.partition_key = record
        .key()
        .map(|k| String::from_utf8_lossy(k).into_owned());
    message
}

/// False only for a JSON object without the envelope's `message` and `messageType` (a body
/// that is not JSON at all is left to the envelope reader, which says what is wrong).
fn looks_like_envelope(body: &[u8]) -> bool {
    let Ok(map) =
        serde_json::from_slice::<std::collections::HashMap<String, serde::de::IgnoredAny>>(body)
    else {
        return true;
    };
    let has = |k: &str| map.keys().any(|key| key.eq_ignore_ascii_case(k));
    has("message") && has("messageType")
}
