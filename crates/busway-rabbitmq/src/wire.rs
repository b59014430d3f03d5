//! The wire format: a busway [`TransportMessage`] to and from AMQP basic properties and
//! header tables.

use std::time::Duration;

use busway_core::{Headers, TransportMessage};
use bytes::Bytes;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use serde_json::{Map, Number, Value};

/// Headers RabbitMQ adds on receive that must not travel further (MassTransit's
/// receive-side pseudo-headers).
const RECEIVE_ONLY: [&str; 4] = [
    "RabbitMQ-ExchangeName",
    "RabbitMQ-RoutingKey",
    "RabbitMQ-DeliveryTag",
    "RabbitMQ-ConsumerTag",
];

/// The longest AMQP short string (exchange, queue and header names, message ids): 255 bytes.
pub(crate) const MAX_SHORT: usize = 255;

/// `text` as an AMQP short string, or `None` when it is too long to be one (lapin would
/// panic writing it).
pub(crate) fn short(text: &str) -> Option<ShortString> {
    (text.len() <= MAX_SHORT).then(|| ShortString::from(text))
}

/// A JSON header value as an AMQP field value, the way MassTransit maps them: strings stay
/// strings, numbers stay numbers, `true` becomes the string `"True"`, `false` and nulls are
/// dropped, arrays and objects become field arrays and tables.
pub(crate) fn to_amqp(value: &Value) -> Option<AMQPValue> {
    Some(match value {
        Value::Null => return None,
        Value::Bool(true) => AMQPValue::LongString(LongString::from("True")),
        Value::Bool(false) => return None,
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => AMQPValue::LongLongInt(i),
            (None, Some(f)) => AMQPValue::Double(f),
            (None, None) => AMQPValue::LongString(LongString::from(n.to_string())),
        },
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items
                .iter()
                .map(|v| to_amqp(v).unwrap_or(AMQPValue::Void))
                .collect::<Vec<_>>(),
        )),
        Value::Object(map) => {
            let mut table = FieldTable::default();
            for (k, v) in map {
                if let (Some(k), Some(v)) = (short(k), to_amqp(v)) {
                    table.insert(k, v);
                }
            }
            AMQPValue::FieldTable(table)
        }
    })
}

/// An AMQP field value as JSON.
pub(crate) fn from_amqp(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Float(f) => Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number),
        AMQPValue::Double(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
        AMQPValue::DecimalValue(d) => {
            let scaled = f64::from(d.value) / 10f64.powi(i32::from(d.scale));
            Number::from_f64(scaled).map_or(Value::Null, Value::Number)
        }
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_string()),
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(from_amqp).collect()),
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::FieldTable(t) => {
            let mut map = Map::new();
            for (k, v) in t.inner() {
                map.insert(k.as_str().to_string(), from_amqp(v));
            }
            Value::Object(map)
        }
        AMQPValue::ByteArray(b) => {
            Value::String(String::from_utf8_lossy(b.as_slice()).into_owned())
        }
        AMQPValue::Void => Value::Null,
    }
}

/// Headers as an AMQP table.
pub(crate) fn to_table(headers: &Headers) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in headers.iter() {
        if RECEIVE_ONLY.iter().any(|r| r.eq_ignore_ascii_case(k)) {
            continue;
        }
        let Some(key) = short(k) else {
            // No AMQP table can carry the name; dropping it beats failing the whole message.
            tracing::warn!(
                name_bytes = k.len(),
                "dropping a header whose name is longer than 255 bytes"
            );
            continue;
        };
        if let Some(v) = to_amqp(v) {
            table.insert(key, v);
        }
    }
    table
}

/// AMQP properties for a message, as MassTransit sets them: content type, message id,
/// correlation id, persistent delivery, expiration in milliseconds, headers.
pub(crate) fn properties(message: &TransportMessage, persistent: bool) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_delivery_mode(if persistent { 2 } else { 1 })
        .with_headers(to_table(&message.headers));
    // Values too long for a property are left out rather than panicking the client (the
    // envelope in the body still carries the ids).
    if let Some(ct) = message.content_type.as_deref().and_then(short) {
        props = props.with_content_type(ct);
    }
    if let Some(id) = message.message_id.as_deref().and_then(short) {
        props = props.with_message_id(id);
    }
    if let Some(id) = message.correlation_id.as_deref().and_then(short) {
        props = props.with_correlation_id(id);
    }
    if let Some(ttl) = message.time_to_live {
        let ms = ttl.as_millis().max(1);
        props = props.with_expiration(ShortString::from(ms.to_string()));
    }
    props
}

/// A received AMQP message as a transport message.
pub(crate) fn from_delivery(data: Vec<u8>, props: &BasicProperties) -> TransportMessage {
    // Collected in one pass (linear, unlike an insert per key).
    let headers = Headers::from_wire(
        props
            .headers()
            .iter()
            .flat_map(|table| table.inner())
            .map(|(k, v)| (k.as_str(), from_amqp(v))),
    );
    let mut message = TransportMessage::new(Bytes::from(data));
    message.content_type = props
        .content_type()
        .as_ref()
        .map(|s| s.as_str().to_string());
    message.message_id = props.message_id().as_ref().map(|s| s.as_str().to_string());
    message.correlation_id = props
        .correlation_id()
        .as_ref()
        .map(|s| s.as_str().to_string());
    message.headers = headers;
    message.time_to_live = props
        .expiration()
        .as_ref()
        .and_then(|e| e.as_str().parse::<u64>().ok())
        .map(Duration::from_millis);
    message.reply_to = props.reply_to().as_ref().map(|s| s.as_str().to_string());
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_map_like_masstransit() {
        assert_eq!(
            to_amqp(&Value::Bool(true)),
            Some(AMQPValue::LongString("True".into()))
        );
        assert_eq!(to_amqp(&Value::Bool(false)), None);
        assert_eq!(to_amqp(&Value::Null), None);
        assert_eq!(to_amqp(&Value::from(3)), Some(AMQPValue::LongLongInt(3)));
        assert_eq!(to_amqp(&Value::from(2.5)), Some(AMQPValue::Double(2.5)));
        let nested = serde_json::json!({"a": [1, "x"], "b": {"c": 2}});
        assert_eq!(from_amqp(&to_amqp(&nested).unwrap()), nested);
    }

    #[test]
    fn names_too_long_for_amqp_are_left_out() {
        let long = "k".repeat(MAX_SHORT + 1);
        let mut headers = Headers::new();
        headers.insert(long.as_str(), "dropped");
        headers.insert("kept", "yes");
        headers.insert("nested", serde_json::json!({ long.clone(): 1, "ok": 2 }));
        let table = to_table(&headers);
        assert_eq!(table.inner().len(), 2);
        let nested = from_amqp(table.inner().get("nested").unwrap());
        assert_eq!(nested, serde_json::json!({"ok": 2}));
        let message = TransportMessage::default()
            .with_message_id(long.clone())
            .with_correlation_id("c");
        let props = properties(&message, true);
        assert!(props.message_id().is_none());
        assert_eq!(
            props.correlation_id().as_ref().map(|c| c.as_str()),
            Some("c")
        );
        assert!(short(&"x".repeat(MAX_SHORT)).is_some());
    }

    #[test]
    fn properties_round_trip() {
        let mut headers = Headers::new();
        headers.insert("MT-Redelivery-Count", 2);
        headers.insert("Tenant", "acme");
        headers.insert("RabbitMQ-RoutingKey", "dropped");
        let message = TransportMessage::new(Bytes::from_static(b"{}"))
            .with_content_type("application/vnd.masstransit+json")
            .with_message_id("181c0000-6393-3630-36a4-08daf4e7c6da")
            .with_correlation_id("c")
            .with_headers(headers)
            .with_time_to_live(Duration::from_secs(30));
        let props = properties(&message, true);
        assert_eq!(props.delivery_mode(), &Some(2));
        assert_eq!(
            props.expiration().as_ref().map(|e| e.as_str()),
            Some("30000")
        );
        let back = from_delivery(b"{}".to_vec(), &props);
        assert_eq!(back.content_type, message.content_type);
        assert_eq!(back.message_id, message.message_id);
        assert_eq!(back.correlation_id, message.correlation_id);
        assert_eq!(back.time_to_live, message.time_to_live);
        assert_eq!(back.headers.get_i64("MT-Redelivery-Count"), Some(2));
        assert!(!back.headers.contains("RabbitMQ-RoutingKey"));
    }
}
