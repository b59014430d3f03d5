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

/// A subscription name for an endpoint, as MassTransit names it: the endpoint's last path
/// segment, and if that is longer than 50 characters, its first 43, `-`, and the first 6
/// characters of the z-base-32 form of the SHA-1 of the whole segment (UTF-8)
/// (`ServiceBusPublishTopology.FormatSubscriptionName` with `FormatUtil.Formatter`, a
/// `ZBase32Formatter`, in MassTransit 8).
///
/// ```
/// use busway_azure_servicebus::naming::subscription_name;
///
/// assert_eq!(subscription_name("orders/billing"), "billing");
/// assert_eq!(
///     subscription_name("submit-order-consumer-with-a-really-long-endpoint-name"),
///     "submit-order-consumer-with-a-really-long-en-pme37o"
/// );
/// ```
pub fn subscription_name(endpoint: &str) -> String {
    subscription_name_in_scope(endpoint, None)
}

/// [`subscription_name`] for a bus whose host address has a path scope
/// (`sb://ns.servicebus.windows.net/dev`): MassTransit appends `-{scope}` before shortening
/// (`ServiceBusPublishTopology.GenerateSubscriptionName`). busway's transport addresses the
/// namespace root, so it uses no scope; this is for naming subscriptions a scoped .NET bus
/// created.
pub fn subscription_name_in_scope(endpoint: &str, scope: Option<&str>) -> String {
    let last = endpoint.rsplit('/').next().unwrap_or(endpoint);
    let name = match scope.filter(|s| !s.is_empty()) {
        Some(scope) => format!("{last}-{scope}"),
        None => last.to_string(),
    };
    if name.chars().count() <= 50 {
        return name;
    }
    let hash = Sha1::digest(name.as_bytes());
    let head: String = name.chars().take(43).collect();
    format!("{head}-{}", zbase32_prefix(&hash, 6))
}

/// The first `chars` characters of the z-base-32 form of `bytes`: 5 bits per character, most
/// significant bit first, alphabet `ybndrfg8ejkmcpqxot1uwisza345h769` (MassTransit's
/// `ZBase32Formatter`, whose first 24 characters are exactly these groups).
fn zbase32_prefix(bytes: &[u8], chars: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ybndrfg8ejkmcpqxot1uwisza345h769";
    (0..chars)
        .map(|i| {
            let group = (0..5).fold(0usize, |acc, b| {
                let bit = i * 5 + b;
                let set = bytes
                    .get(bit / 8)
                    .is_some_and(|byte| byte & (0x80 >> (bit % 8)) != 0);
                (acc << 1) | usize::from(set)
            });
            char::from(ALPHABET[group])
        })
        .collect()
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

    /// Vectors worked out from MassTransit's rule (SHA-1 of the UTF-8 name, the first 30
    /// bits in z-base-32): `6a d1 9e c1` = 01101 01011 01000 11001 11101 10000 = 13 11 8 25
    /// 29 16 = `p m e 3 7 o`.
    #[test]
    fn long_subscription_names_shortened_like_masstransit() {
        assert_eq!(
            subscription_name("submit-order-consumer-with-a-really-long-endpoint-name"),
            "submit-order-consumer-with-a-really-long-en-pme37o"
        );
        assert_eq!(
            subscription_name(&"a".repeat(51)),
            format!("{}-i1t1sw", "a".repeat(43))
        );
        assert_eq!(subscription_name(&"x".repeat(50)), "x".repeat(50));
        // The host scope is appended before shortening.
        assert_eq!(
            subscription_name_in_scope(
                "my-service-very-long-queue-name-for-testing-purposes",
                Some("dev")
            ),
            "my-service-very-long-queue-name-for-testing-hi86sg"
        );
        assert_eq!(
            subscription_name_in_scope("orders", Some("dev")),
            "orders-dev"
        );
        assert_eq!(zbase32_prefix(&[0x6a, 0xd1, 0x9e, 0xc1], 6), "pme37o");
    }
}
