//! The wire form on Service Bus: a [`TransportMessage`] as a message's body, broker
//! properties and custom properties (headers as JSON text, ids in "N" form,
//! `ScheduledEnqueueTimeUtc` for a delay), and a received message read back.

use std::time::Duration;

use azure_messaging_servicebus::service_bus::{
    PeekLockResponse, SendMessageOptions, SettableBrokerProperties,
};
use busway_core::{Error, ErrorKind, Headers, Result, TransportMessage};
use bytes::Bytes;
use serde::Deserialize;

pub(crate) fn utf8(message: &TransportMessage) -> Result<&str> {
    std::str::from_utf8(&message.body).map_err(|e| {
        Error::with_source(
            ErrorKind::Serialize,
            "the Service Bus REST API carries text bodies; this body is not UTF-8",
            e,
        )
    })
}

/// The "N" form of a GUID (32 hex digits), as MassTransit writes Service Bus ids.
fn n_form(id: &str) -> String {
    match uuid::Uuid::parse_str(id.trim()) {
        Ok(u) => u.simple().to_string(),
        Err(_) => id.to_string(),
    }
}

/// A JSON header value as the REST API wants custom properties: JSON text, ASCII only.
fn property_value(value: &serde_json::Value) -> String {
    let json = serde_json::to_string(value).unwrap_or_default();
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut buf = [0u16; 2];
            for unit in c.encode_utf16(&mut buf) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

pub(crate) fn send_options(
    message: &TransportMessage,
    delay: Option<Duration>,
) -> SendMessageOptions {
    let scheduled = delay.filter(|d| !d.is_zero()).map(|d| {
        // The REST API takes whole seconds (RFC 2822); round up so a delay is never shortened.
        let at = time::OffsetDateTime::now_utc() + d;
        let rounded = at.replace_nanosecond(0).unwrap_or(at);
        if rounded < at {
            rounded + time::Duration::SECOND
        } else {
            rounded
        }
    });
    let reply_to = message
        .headers
        .get_str(busway_core::headers::names::RESPONSE_ADDRESS)
        .map(|s| s.into_owned());
    let mut custom = std::collections::HashMap::new();
    for (k, v) in message.headers.iter() {
        if v.is_null() {
            continue;
        }
        custom.insert(k.to_string(), property_value(v));
    }
    SendMessageOptions {
        content_type: message.content_type.clone(),
        broker_properties: Some(SettableBrokerProperties {
            message_id: message.message_id.as_deref().map(n_form),
            correlation_id: message.correlation_id.as_deref().map(n_form),
            time_to_live: message.time_to_live,
            scheduled_enqueue_time_utc: scheduled,
            reply_to,
            ..SettableBrokerProperties::default()
        }),
        custom_properties: Some(custom),
    }
}

/// The broker properties busway reads from a received message.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ReceivedProperties {
    delivery_count: u32,
    #[serde(default)]
    lock_token: String,
    #[serde(default)]
    locked_until_utc: Option<String>,
    #[serde(default)]
    message_id: Option<String>,
    #[serde(default)]
    correlation_id: Option<String>,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    reply_to: Option<String>,
    #[serde(default)]
    time_to_live: Option<f64>,
}

const STANDARD_HEADERS: [&str; 12] = [
    "brokerproperties",
    "content-type",
    "content-length",
    "location",
    "date",
    "server",
    "transfer-encoding",
    "strict-transport-security",
    "connection",
    "keep-alive",
    "x-ms-request-id",
    "vary",
];

pub(crate) struct Received {
    pub(crate) message: TransportMessage,
    pub(crate) delivery_count: u32,
    pub(crate) lock_left: Option<Duration>,
}

impl Received {
    pub(crate) fn read(response: &PeekLockResponse) -> Result<Option<Received>> {
        let status = u16::from(*response.status());
        match status {
            204 => return Ok(None),
            200 | 201 => {}
            401 | 403 => {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("Service Bus refused the key ({status})"),
                ));
            }
            404 | 410 => {
                return Err(Error::new(
                    ErrorKind::Transport,
                    "the entity does not exist (it was deleted, or was never created with provisioning off)",
                ));
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!("Service Bus answered {status} to a receive"),
                ));
            }
        }
        let headers: azure_core::headers::Headers = match response.custom_properties() {
            Ok(h) => h,
            Err(never) => match never {},
        };
        let mut props: Option<ReceivedProperties> = None;
        let mut content_type = None;
        let mut out = Vec::new();
        for (name, value) in headers.iter() {
            let name = name.as_str();
            let value = value.as_str();
            match name {
                "brokerproperties" => props = serde_json::from_str(value).ok(),
                "content-type" => content_type = Some(value.to_string()),
                _ if STANDARD_HEADERS.contains(&name) => {}
                _ => {
                    let parsed = serde_json::from_str::<serde_json::Value>(value)
                        .unwrap_or_else(|_| serde_json::Value::String(value.to_string()));
                    out.push((name.to_string(), parsed));
                }
            }
        }
        let Some(props) = props else {
            // A message was locked for us but cannot be read: an error, so the receiver
            // unlocks it (it comes back at once, its delivery count counting the attempt)
            // rather than leaving it locked until the lock runs out.
            return Err(Error::new(
                ErrorKind::Transport,
                format!(
                    "Service Bus answered a receive ({status}) without readable BrokerProperties"
                ),
            ));
        };
        // Collected in one pass (linear, unlike an insert per property).
        let mut out: Headers = out.into_iter().collect();
        if let Some(label) = &props.label {
            out.insert_if_absent("Label", label.as_str());
        }
        if let Some(reply_to) = &props.reply_to {
            out.insert_if_absent("ReplyTo", reply_to.as_str());
        }
        let lock_left = props
            .locked_until_utc
            .as_deref()
            .and_then(|t| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc2822).ok()
            })
            .map(|until| until - time::OffsetDateTime::now_utc())
            .and_then(|d| Duration::try_from(d).ok());
        let _ = &props.lock_token;
        Ok(Some(Received {
            message: {
                let mut message = TransportMessage::new(Bytes::from(response.body()));
                message.content_type = content_type;
                message.message_id = props.message_id.clone();
                message.correlation_id = props.correlation_id.clone();
                message.headers = out;
                message.time_to_live = props
                    .time_to_live
                    .filter(|t| t.is_finite() && *t > 0.0 && *t < 1e9)
                    .map(Duration::from_secs_f64);
                message
            },
            delivery_count: props.delivery_count,
            lock_left,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_forms_like_masstransit() {
        assert_eq!(
            n_form("181c0000-6393-3630-36a4-08daf4e7c6da"),
            "181c00006393363036a408daf4e7c6da"
        );
        assert_eq!(property_value(&serde_json::json!("é\n")), "\"\\u00e9\\n\"");
    }
}
