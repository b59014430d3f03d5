//! The wire format: MassTransit's JSON envelope and raw JSON, read and written.

use busway::headers::names;
use busway::prelude::*;
use busway::serializer::{MASSTRANSIT_JSON, RAW_JSON, Serializers, decode_message};
use busway::{Envelope, Fault, MassTransitJson, RawJson, Serializer, TransportMessage, Urn};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use uuid::Uuid;

/// MassTransit's documented example envelope
/// (doc/content/3.documentation/2.configuration/serialization.md, "Message Envelope").
const DOCUMENTED: &str = r#"{
    "messageId": "181c0000-6393-3630-36a4-08daf4e7c6da",
    "requestId": "ef375b18-69ee-4a9e-b5ec-44ee1177a27e",
    "correlationId": null,
    "conversationId": null,
    "initiatorId": null,
    "sourceAddress": "rabbitmq://localhost/source",
    "destinationAddress": "rabbitmq://localhost/destination",
    "responseAddress": "rabbitmq://localhost/response",
    "faultAddress": "rabbitmq://localhost/fault",
    "messageType": [
        "urn:message:Company.Project:SubmitOrder"
    ],
    "message": {
        "orderId": "181c0000-6393-3630-36a4-08daf4e7c6da",
        "timestamp": "2023-01-12T21:55:53.714Z"
    },
    "expirationTime": null,
    "sentTime": "2023-01-12T21:55:53.715882Z",
    "headers": {
        "Application-Header": "SomeValue"
    },
    "host": {
        "machineName": "MyComputer",
        "processName": "dotnet",
        "processId": 427,
        "assembly": "TestProject",
        "assemblyVersion": "2.11.1.93",
        "frameworkVersion": "6.0.7",
        "massTransitVersion": "8.0.10.0",
        "operatingSystemVersion": "Unix 12.6.2"
    }
}"#;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Company.Project:SubmitOrder")]
struct SubmitOrder {
    order_id: Uuid,
    timestamp: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "Contracts:OrderPlaced")]
struct OrderPlaced {
    #[message(correlation_id)]
    order_id: Uuid,
    #[message(key)]
    customer_id: Uuid,
    total: Decimal,
}

fn transport_message(body: &str, content_type: &str) -> TransportMessage {
    TransportMessage::new(body.to_string()).with_content_type(content_type)
}

#[test]
fn reads_the_documented_masstransit_envelope() {
    let read = MassTransitJson
        .deserialize(&transport_message(DOCUMENTED, MASSTRANSIT_JSON))
        .expect("the documented envelope reads");
    let e = &read.envelope;
    assert_eq!(
        e.message_id.map(|u| u.to_string()).as_deref(),
        Some("181c0000-6393-3630-36a4-08daf4e7c6da")
    );
    assert_eq!(
        e.request_id.map(|u| u.to_string()).as_deref(),
        Some("ef375b18-69ee-4a9e-b5ec-44ee1177a27e")
    );
    assert_eq!(e.correlation_id, None);
    assert_eq!(
        e.source_address.as_deref(),
        Some("rabbitmq://localhost/source")
    );
    assert_eq!(
        e.destination_address.as_deref(),
        Some("rabbitmq://localhost/destination")
    );
    assert_eq!(
        e.response_address.as_deref(),
        Some("rabbitmq://localhost/response")
    );
    assert_eq!(
        e.fault_address.as_deref(),
        Some("rabbitmq://localhost/fault")
    );
    assert_eq!(
        e.message_type,
        vec![Urn::new("urn:message:Company.Project:SubmitOrder")]
    );
    assert_eq!(
        e.headers.get_str("application-header").as_deref(),
        Some("SomeValue")
    );
    assert_eq!(
        e.sent_time
            .map(|t| busway::envelope::format_time(&t))
            .as_deref(),
        Some("2023-01-12T21:55:53.715882Z")
    );
    let host = e.host.as_ref().expect("host");
    assert_eq!(host.machine_name.as_deref(), Some("MyComputer"));
    assert_eq!(host.process_id, Some(427));
    assert_eq!(host.mass_transit_version.as_deref(), Some("8.0.10.0"));

    let message: SubmitOrder = decode_message(&read.message).expect("the message reads");
    assert_eq!(
        message.order_id.to_string(),
        "181c0000-6393-3630-36a4-08daf4e7c6da"
    );
}

#[test]
fn writes_every_field_in_masstransit_order_and_reads_it_back() {
    let read = MassTransitJson
        .deserialize(&transport_message(DOCUMENTED, MASSTRANSIT_JSON))
        .expect("reads");
    let written = MassTransitJson
        .serialize(&read.envelope, &read.message.to_raw_value())
        .expect("writes");
    assert_eq!(written.content_type.as_deref(), Some(MASSTRANSIT_JSON));
    assert_eq!(
        written.message_id.as_deref(),
        Some("181c0000-6393-3630-36a4-08daf4e7c6da")
    );
    assert_eq!(
        written.headers.get_str("Application-Header").as_deref(),
        Some("SomeValue"),
        "headers are copied to the transport"
    );

    let ours: Value = serde_json::from_slice(&written.body).expect("json");
    let theirs: Value = serde_json::from_str(DOCUMENTED).expect("json");
    assert_eq!(
        ours, theirs,
        "the same JSON as MassTransit's example, field for field"
    );

    // Field order and explicit nulls, as MassTransit writes them.
    let text = std::str::from_utf8(&written.body).expect("utf-8");
    let keys: Vec<&str> = [
        "messageId",
        "requestId",
        "correlationId",
        "conversationId",
        "initiatorId",
        "sourceAddress",
        "destinationAddress",
        "responseAddress",
        "faultAddress",
        "messageType",
        "message",
        "expirationTime",
        "sentTime",
        "headers",
        "host",
    ]
    .to_vec();
    let positions: Vec<usize> = keys
        .iter()
        .map(|k| {
            text.find(&format!("\"{k}\":"))
                .unwrap_or_else(|| panic!("{k} missing"))
        })
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "fields in MassTransit's order: {text}"
    );
    assert!(text.contains("\"correlationId\":null"), "nulls are written");
}

#[test]
fn reading_is_lenient_like_masstransit() {
    // PascalCase envelope names (Newtonsoft), GUIDs in "N" form, a time without offset,
    // a decimal as a number, PascalCase message fields, comments are not JSON: skipped.
    let body = r#"{
        "MessageId": "181c0000639336306a4408daf4e7c6da",
        "ConversationId": "{ef375b18-69ee-4a9e-b5ec-44ee1177a27e}",
        "MessageType": "urn:message:Contracts:OrderPlaced",
        "Message": { "OrderId": "181c0000-6393-3630-36a4-08daf4e7c6da", "CustomerId": "ef375b18-69ee-4a9e-b5ec-44ee1177a27e", "Total": 12.5 },
        "SentTime": "2023-01-12T21:55:53.7158823",
        "Extra": {"ignored": true}
    }"#;
    let read = MassTransitJson
        .deserialize(&transport_message(
            body,
            "application/vnd.masstransit+json; charset=utf-8",
        ))
        .expect("lenient read");
    assert_eq!(
        read.envelope.message_id.map(|u| u.to_string()).as_deref(),
        Some("181c0000-6393-3630-6a44-08daf4e7c6da")
    );
    assert!(read.envelope.conversation_id.is_some());
    assert_eq!(
        read.envelope.message_type,
        vec![OrderPlaced::message_type().clone()]
    );
    assert!(read.envelope.sent_time.is_some());
    let m: OrderPlaced = decode_message(&read.message).expect("PascalCase body reads");
    assert_eq!(m.total, Decimal::new(125, 1));

    // Decimals as strings, the way MassTransit writes them.
    let raw = RawValue::from_string(
        r#"{"orderId":"181c0000-6393-3630-36a4-08daf4e7c6da","customerId":"ef375b18-69ee-4a9e-b5ec-44ee1177a27e","total":"12.50"}"#.to_string(),
    )
    .expect("raw");
    let m: OrderPlaced = decode_message(&raw).expect("decimal as string");
    assert_eq!(m.total.to_string(), "12.50");
    assert_eq!(
        serde_json::to_value(&m).expect("json")["total"],
        "12.50",
        "decimals are written as strings"
    );
}

#[test]
fn bad_envelopes_say_why() {
    for (body, why) in [
        ("{not json", "not a valid MassTransit JSON envelope"),
        ("[1,2]", "not a valid MassTransit JSON envelope"),
        (
            r#"{"messageId":"not-a-guid","message":{}}"#,
            "not a valid MassTransit JSON envelope",
        ),
        (
            r#"{"messageId":"181c0000-6393-3630-36a4-08daf4e7c6da"}"#,
            "no `message` field",
        ),
    ] {
        let err = MassTransitJson
            .deserialize(&transport_message(body, MASSTRANSIT_JSON))
            .expect_err(body);
        assert!(err.to_string().contains(why), "{body}: {err}");
        assert!(err.is_serialization());
    }
    let serializers = Serializers::default();
    let mut m = transport_message("{}", "text/plain");
    assert!(
        serializers
            .deserialize(&m)
            .expect_err("unknown")
            .to_string()
            .contains("no deserializer for content type `text/plain`")
    );
    m.content_type = None;
    assert!(
        serializers
            .deserialize(&m)
            .expect_err("missing")
            .to_string()
            .contains("no content type")
    );
    let mut lenient = Serializers::default();
    lenient.set_missing_content_type(Some(RAW_JSON.to_string()));
    assert!(
        lenient.deserialize(&m).is_ok(),
        "a default content type can be configured"
    );
}

#[test]
fn raw_json_carries_identity_in_headers() {
    let mut envelope = Envelope {
        message_id: Some(Uuid::now_v7()),
        correlation_id: Some(Uuid::now_v7()),
        conversation_id: Some(Uuid::now_v7()),
        initiator_id: Some(Uuid::now_v7()),
        request_id: Some(Uuid::now_v7()),
        source_address: Some("loopback://localhost/src".into()),
        response_address: Some("loopback://localhost/resp".into()),
        fault_address: Some("loopback://localhost/fault".into()),
        message_type: vec![Urn::new("urn:message:A:B"), Urn::new("urn:message:A:Base")],
        host: Some(std::sync::Arc::new(busway::HostInfo::current().clone())),
        ..Envelope::default()
    };
    envelope.headers.insert("Tenant", "acme");
    let body = RawValue::from_string(r#"{"n":1}"#.to_string()).expect("raw");
    let written = RawJson::new().serialize(&envelope, &body).expect("writes");
    assert_eq!(
        &written.body[..],
        br#"{"n":1}"#,
        "the body is the message alone"
    );
    assert_eq!(written.content_type.as_deref(), Some(RAW_JSON));
    let h = &written.headers;
    assert_eq!(
        h.get_str(names::MESSAGE_TYPE).as_deref(),
        Some("urn:message:A:B;urn:message:A:Base")
    );
    assert_eq!(
        h.get_str(names::MESSAGE_ID).map(|s| s.into_owned()),
        envelope.message_id.map(|u| u.to_string())
    );
    assert_eq!(
        h.get_str(names::INITIATOR_ID).map(|s| s.into_owned()),
        envelope.initiator_id.map(|u| u.to_string())
    );
    assert_eq!(
        h.get_str(names::RESPONSE_ADDRESS).as_deref(),
        Some("loopback://localhost/resp")
    );
    assert!(
        h.get_str(names::HOST_INFO)
            .is_some_and(|s| s.contains("machineName"))
    );

    let read = RawJson::new().deserialize(&written).expect("reads back");
    let mut expected = envelope.clone();
    expected.headers = written.headers.clone();
    assert_eq!(
        read.envelope, expected,
        "every field survives the round trip"
    );
    assert_eq!(read.message.get(), r#"{"n":1}"#);
    assert!(!read.any_message_type);

    let bare = transport_message(r#"{"n":2}"#, RAW_JSON);
    assert!(
        !RawJson::new()
            .deserialize(&bare)
            .expect("reads")
            .any_message_type
    );
    assert!(
        RawJson::new()
            .accept_any_message_type()
            .deserialize(&bare)
            .expect("reads")
            .any_message_type
    );
    let err = RawJson::new()
        .deserialize(&transport_message("nope", RAW_JSON))
        .expect_err("not json");
    assert!(err.to_string().contains("not valid JSON"));
}

#[test]
fn derive_sets_urns_keys_and_correlation() {
    assert_eq!(
        OrderPlaced::message_type().as_str(),
        "urn:message:Contracts:OrderPlaced",
        "prefix added"
    );
    assert_eq!(
        SubmitOrder::message_type().as_str(),
        "urn:message:Company.Project:SubmitOrder"
    );

    #[derive(Serialize, Deserialize, Message)]
    struct Defaulted {
        n: u8,
    }
    assert_eq!(
        Defaulted::message_type().as_str(),
        "urn:message:envelope:Defaulted",
        "module path and type name"
    );

    #[derive(Serialize, Deserialize, Message)]
    struct Generic<T> {
        value: T,
    }
    // A generic contract's URN names its arguments per instantiation, as MassTransit's
    // MessageUrn does (`[[System:Byte]]` for a .NET `byte`).
    assert_eq!(
        Generic::<u8>::message_type().as_str(),
        "urn:message:envelope:Generic[[System:Byte]]"
    );
    assert_eq!(
        Generic::<OrderPlaced>::message_type().as_str(),
        "urn:message:envelope:Generic[[Contracts:OrderPlaced]]"
    );
    assert_ne!(
        Generic::<String>::message_type(),
        Generic::<u8>::message_type()
    );
    assert!(
        std::ptr::eq(Generic::<u8>::message_type(), Generic::<u8>::message_type()),
        "computed once"
    );
    let _ = Generic { value: 1u8 }.value;

    #[derive(Serialize, Deserialize, Message)]
    #[message(shared_urn)]
    struct Shared<T> {
        value: T,
    }
    assert_eq!(
        Shared::<String>::message_type(),
        Shared::<u8>::message_type(),
        "shared_urn: one URN for every instantiation"
    );
    assert_eq!(
        Shared::<u8>::message_type().as_str(),
        "urn:message:envelope:Shared"
    );
    let _ = Shared { value: 1u8 }.value;

    let order = OrderPlaced {
        order_id: Uuid::now_v7(),
        customer_id: Uuid::now_v7(),
        total: Decimal::ONE,
    };
    assert_eq!(order.correlation_id(), Some(order.order_id));
    assert_eq!(order.message_key(), Some(order.customer_id.to_string()));
    assert_eq!(Defaulted { n: 1 }.message_key(), None);

    assert_eq!(
        Fault::<OrderPlaced>::message_type().as_str(),
        "urn:message:MassTransit:Fault[[Contracts:OrderPlaced]]"
    );
    assert_eq!(
        Fault::<OrderPlaced>::message_type().entity_name(&busway::rabbitmq::naming::ENTITY_NAMES),
        "MassTransit:Fault--Contracts:OrderPlaced--"
    );
}

#[test]
fn fault_body_has_masstransit_fields() {
    let fault = Fault {
        fault_id: Uuid::now_v7(),
        faulted_message_id: Some(Uuid::now_v7()),
        timestamp: Utc::now(),
        exceptions: vec![busway::ExceptionInfo {
            exception_type: "System.InvalidOperationException".into(),
            inner_exception: None,
            stack_trace: Some("at X".into()),
            message: "boom".into(),
            source: Some("X".into()),
            data: None,
        }],
        host: Some(busway::HostInfo::current().clone()),
        fault_message_types: vec![Urn::new("urn:message:Contracts:OrderPlaced")],
        message: serde_json::json!({"orderId": "x"}),
    };
    let v = serde_json::to_value(&fault).expect("json");
    for key in [
        "faultId",
        "faultedMessageId",
        "timestamp",
        "exceptions",
        "host",
        "faultMessageTypes",
        "message",
    ] {
        assert!(v.get(key).is_some(), "{key}");
    }
    for key in [
        "exceptionType",
        "innerException",
        "stackTrace",
        "message",
        "source",
        "data",
    ] {
        assert!(v["exceptions"][0].get(key).is_some(), "exceptions[0].{key}");
    }
    let back: Fault<Value> = serde_json::from_value(v).expect("reads back");
    assert_eq!(back.exceptions[0].message, "boom");
}
