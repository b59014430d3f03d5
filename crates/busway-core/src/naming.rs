//! Endpoint names: how `.consumer(c)` names the endpoint it configures.

use std::fmt;

/// Names endpoints from consumer types, like MassTransit's endpoint name formatters.
pub trait EndpointNameFormatter: Send + Sync + fmt::Debug + 'static {
    /// The endpoint name for a consumer type (`std::any::type_name` text).
    fn consumer(&self, type_name: &str) -> String;

    /// A name for a temporary endpoint (the bus's response endpoint): unique per process.
    fn temporary(&self, tag: &str) -> String {
        let host = crate::host::HostInfo::current();
        let clean = |s: &str| -> String {
            s.chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect()
        };
        let machine = clean(host.machine_name.as_deref().unwrap_or("host"));
        let process = clean(host.process_name.as_deref().unwrap_or("process"));
        let id = uuid::Uuid::new_v4().simple().to_string();
        let mut name = format!("{machine}_{process}_{tag}_{}", &id[..20]);
        name.truncate(72);
        name
    }
}

/// The simple type name: the last path segment of the outer type, or for a generic consumer
/// the last generic argument (as MassTransit does), with a trailing `Consumer` removed.
pub fn simple_type_name(type_name: &str) -> &str {
    let base = match (type_name.find('<'), type_name.rfind('>')) {
        (Some(open), Some(close)) if close > open => {
            let args = &type_name[open + 1..close];
            let last = args.rsplit(',').next().unwrap_or(args).trim();
            return simple_type_name(last);
        }
        _ => type_name,
    };
    let last = base.rsplit("::").next().unwrap_or(base);
    match last.strip_suffix("Consumer") {
        Some(stripped) if !stripped.is_empty() => stripped,
        _ => last,
    }
}

fn separated(name: &str, separator: char) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    let mut prev: Option<char> = None;
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            if let Some(p) = prev
                && (p.is_ascii_lowercase() || p.is_ascii_digit())
            {
                out.push(separator);
            }
            out.push(c.to_ascii_lowercase());
        } else if c == '_' || c == '-' {
            out.push(separator);
        } else {
            out.push(c.to_ascii_lowercase());
        }
        prev = Some(c);
    }
    out
}

/// `SubmitOrderConsumer` → `submit-order` (the default).
#[derive(Debug, Clone, Default)]
pub struct KebabCaseEndpointNameFormatter {
    prefix: Option<String>,
}

impl KebabCaseEndpointNameFormatter {
    /// The formatter without a prefix.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `prefix-` before every name (for example an environment name).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }
}

impl EndpointNameFormatter for KebabCaseEndpointNameFormatter {
    fn consumer(&self, type_name: &str) -> String {
        let name = separated(simple_type_name(type_name), '-');
        match &self.prefix {
            Some(p) => format!("{p}-{name}"),
            None => name,
        }
    }
}

/// `SubmitOrderConsumer` → `submit_order`.
#[derive(Debug, Clone, Default)]
pub struct SnakeCaseEndpointNameFormatter {
    prefix: Option<String>,
}

impl SnakeCaseEndpointNameFormatter {
    /// The formatter without a prefix.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `prefix_` before every name.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }
}

impl EndpointNameFormatter for SnakeCaseEndpointNameFormatter {
    fn consumer(&self, type_name: &str) -> String {
        let name = separated(simple_type_name(type_name), '_');
        match &self.prefix {
            Some(p) => format!("{p}_{name}"),
            None => name,
        }
    }
}

/// `SubmitOrderConsumer` → `SubmitOrder` (MassTransit's default formatter).
#[derive(Debug, Clone, Default)]
pub struct DefaultEndpointNameFormatter;

impl EndpointNameFormatter for DefaultEndpointNameFormatter {
    fn consumer(&self, type_name: &str) -> String {
        simple_type_name(type_name).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kebab_case_like_masstransit() {
        let f = KebabCaseEndpointNameFormatter::new();
        assert_eq!(f.consumer("app::SubmitOrderConsumer"), "submit-order");
        assert_eq!(
            f.consumer("app::orders::SendConfirmationEmail"),
            "send-confirmation-email"
        );
        assert_eq!(f.consumer("Consumer"), "consumer");
        assert_eq!(f.consumer("app::Wrapper<app::ChargeCard>"), "charge-card");
        assert_eq!(f.consumer("app::Order2Shipped"), "order2-shipped");
        let p = KebabCaseEndpointNameFormatter::new().prefix("dev");
        assert_eq!(p.consumer("x::Billing"), "dev-billing");
    }

    #[test]
    fn other_formatters() {
        assert_eq!(
            SnakeCaseEndpointNameFormatter::new().consumer("a::SubmitOrderConsumer"),
            "submit_order"
        );
        assert_eq!(
            DefaultEndpointNameFormatter.consumer("a::SubmitOrderConsumer"),
            "SubmitOrder"
        );
        let t = KebabCaseEndpointNameFormatter::new().temporary("bus");
        assert!(t.contains("_bus_") && t.len() <= 72, "{t}");
    }
}
