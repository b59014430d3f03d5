//! How busway names Kafka topics: a message type's topic is its MassTransit name with `.`
//! for `:` (`Contracts.OrderPlaced`), an endpoint's topic is its name, dead-letter and
//! skipped topics follow the configured patterns (`{topic}.{group}.error` by default), and
//! every derived name gets the configured prefix and is made a valid topic name.

use busway_core::Urn;
use busway_core::urn::EntityNameStyle;

/// The separators of a message type's topic: MassTransit's RabbitMQ names with `.` for `:`
/// (`Ns.Type`, `MassTransit.Fault--Ns.Type--`), since Kafka topic names allow no `:`.
pub const ENTITY_NAMES: EntityNameStyle = EntityNameStyle::new("..", "--", ".", "-");

/// A message type's topic before the prefix (what [`crate::KafkaConfig::topic_for`] uses
/// when no topic was configured for the type).
///
/// ```
/// use busway_core::Urn;
/// use busway_kafka::naming::message_topic;
///
/// let placed = Urn::new("urn:message:Contracts:OrderPlaced");
/// assert_eq!(message_topic(&placed), "Contracts.OrderPlaced");
/// assert_eq!(message_topic(&placed.fault()), "MassTransit.Fault--Contracts.OrderPlaced--");
/// ```
pub fn message_topic(message_type: &Urn) -> String {
    // A URN that is not a type name keeps its own characters: `:` becomes `.` there too.
    message_type.entity_name(&ENTITY_NAMES).replace(':', ".")
}

/// A valid Kafka topic name: `[a-zA-Z0-9._-]`, at most 249 characters.
pub fn sanitize(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    out.truncate(249);
    if out.is_empty() || out == "." || out == ".." {
        out = format!("_{out}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_are_valid() {
        assert_eq!(sanitize("a b/c"), "a_b_c");
        assert_eq!(sanitize(".."), "_..");
        assert_eq!(sanitize(&"x".repeat(300)).len(), 249);
        assert_eq!(message_topic(&Urn::new("urn:message:odd")), "odd");
    }
}
