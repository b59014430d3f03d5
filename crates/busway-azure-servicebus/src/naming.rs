//! How busway names Service Bus entities: MassTransit's names, so a .NET service and a
//! busway service in one namespace meet at the same topics, subscriptions and queues.
//!
//! An endpoint `orders` is a queue `orders` with queues `orders_error` and `orders_skipped`;
//! a message type is a topic named by [`topic_name`]; a consuming endpoint has a
//! subscription on each of its message types' topics, named by [`subscription_name`], that
//! forwards to its queue.

use busway_core::Urn;
use busway_core::urn::EntityNameStyle;
use sha1::{Digest, Sha1};

/// MassTransit's `ServiceBusMessageNameFormatter` separators: `Ns/Type`, generic arguments
/// as `MassTransit/Fault--Ns/Type--`, `---` between arguments
/// (`src/Transports/MassTransit.Azure.ServiceBus.Core/AzureServiceBusTransport/
/// ServiceBusMessageNameFormatter.cs`).
pub const ENTITY_NAMES: EntityNameStyle = EntityNameStyle::new("---", "--", "/", "-");

/// MassTransit's Service Bus entity name for a message type: `Namespace/TypeName`, with
/// `[]` replaced by `__`.
pub fn topic_name(message_type: &Urn) -> String {
    message_type
        .entity_name(&ENTITY_NAMES)
        .replace(['[', ']'], "_")
}

/// A subscription name for an endpoint: its last path segment, shortened past 50 characters
/// to the first 43, `-`, and 6 characters of a SHA-1 of the whole name (as MassTransit does).
pub fn subscription_name(endpoint: &str) -> String {
    let last = endpoint.rsplit('/').next().unwrap_or(endpoint);
    if last.chars().count() <= 50 {
        return last.to_string();
    }
    let hash = Sha1::digest(last.as_bytes());
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    let head: String = last.chars().take(43).collect();
    format!("{head}-{}", &hex[..6])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_like_masstransit() {
        assert_eq!(
            topic_name(&Urn::new("urn:message:Acme:FileReceived")),
            "Acme/FileReceived"
        );
        assert_eq!(
            topic_name(&Urn::new("urn:message:Acme:FileReceived").fault()),
            "MassTransit/Fault--Acme/FileReceived--"
        );
        assert_eq!(subscription_name("orders/billing"), "billing");
        let long = "a-very-long-endpoint-name-that-goes-on-and-on-past-fifty-characters";
        let short = subscription_name(long);
        assert_eq!(short.len(), 50);
        assert!(short.starts_with(&long[..43]));
    }
}
