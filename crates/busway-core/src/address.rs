//! Addresses: short forms (`queue:orders`, `exchange:orders`, `topic:orders`) and URIs
//! (`loopback://localhost/orders`, `rabbitmq://host/vhost/orders`).

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, ErrorKind};

/// What an address names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AddressKind {
    /// `queue:name`: a queue (on RabbitMQ, an exchange and queue of the same name, bound).
    Queue,
    /// `exchange:name`: an exchange only.
    Exchange,
    /// `topic:name`: a topic (Kafka, Service Bus).
    Topic,
    /// A full URI; the transport decides what its path names.
    Uri,
}

/// A parsed destination address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Address {
    kind: AddressKind,
    name: String,
    scheme: Option<String>,
    host: Option<String>,
    path: Vec<String>,
    query: Vec<(String, String)>,
    text: String,
}

fn invalid(text: &str, why: &str) -> Error {
    Error::new(
        ErrorKind::Address,
        format!("`{text}` is not a valid address: {why}"),
    )
}

fn split_query(text: &str) -> (&str, Vec<(String, String)>) {
    match text.split_once('?') {
        Some((head, query)) => {
            let pairs = query
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => (p.to_string(), String::new()),
                })
                .collect();
            (head, pairs)
        }
        None => (text, Vec::new()),
    }
}

impl Address {
    /// Parses an address.
    ///
    /// ```
    /// use busway_core::{Address, AddressKind};
    /// let a = Address::parse("queue:billing").unwrap();
    /// assert_eq!((a.kind(), a.name()), (AddressKind::Queue, "billing"));
    /// let b = Address::parse("rabbitmq://localhost/sales/billing?durable=false").unwrap();
    /// assert_eq!((b.scheme(), b.name(), b.path()), (Some("rabbitmq"), "billing", &["sales".to_string()][..]));
    /// assert_eq!(b.query("durable"), Some("false"));
    /// ```
    pub fn parse(text: &str) -> Result<Address, Error> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(invalid(text, "it is empty"));
        }
        if let Some((scheme, rest)) = trimmed.split_once("://") {
            if scheme.is_empty()
                || !scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
            {
                return Err(invalid(text, "the scheme is not valid"));
            }
            let (rest, query) = split_query(rest);
            let mut parts = rest.split('/');
            let host = parts.next().unwrap_or_default().to_string();
            let mut segments: Vec<String> = parts
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            let name = segments
                .pop()
                .ok_or_else(|| invalid(text, "the URI has no entity name in its path"))?;
            return Ok(Address {
                kind: AddressKind::Uri,
                name,
                scheme: Some(scheme.to_ascii_lowercase()),
                host: Some(host),
                path: segments,
                query,
                text: trimmed.to_string(),
            });
        }
        let (kind, rest) = if let Some(rest) = trimmed.strip_prefix("queue:") {
            (AddressKind::Queue, rest)
        } else if let Some(rest) = trimmed.strip_prefix("exchange:") {
            (AddressKind::Exchange, rest)
        } else if let Some(rest) = trimmed.strip_prefix("topic:") {
            (AddressKind::Topic, rest)
        } else {
            return Err(invalid(
                text,
                "expected `queue:name`, `exchange:name`, `topic:name` or a URI such as `loopback://localhost/name`",
            ));
        };
        let (name, query) = split_query(rest);
        if name.is_empty() {
            return Err(invalid(text, "the name is empty"));
        }
        if name.contains('/') || name.chars().any(char::is_whitespace) {
            return Err(invalid(text, "the name contains `/` or whitespace"));
        }
        Ok(Address {
            kind,
            name: name.to_string(),
            scheme: None,
            host: None,
            path: Vec::new(),
            query,
            text: trimmed.to_string(),
        })
    }

    /// A `queue:name` address.
    pub fn queue(name: impl Into<String>) -> Address {
        let name = name.into();
        Address {
            kind: AddressKind::Queue,
            text: format!("queue:{name}"),
            name,
            scheme: None,
            host: None,
            path: Vec::new(),
            query: Vec::new(),
        }
    }

    /// What the address names.
    pub fn kind(&self) -> AddressKind {
        self.kind
    }

    /// The entity name (the last path segment of a URI).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The URI scheme, for URI addresses.
    pub fn scheme(&self) -> Option<&str> {
        self.scheme.as_deref()
    }

    /// The URI host (with port, if given), for URI addresses.
    pub fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }

    /// Path segments between the host and the name (a RabbitMQ virtual host, a scope).
    pub fn path(&self) -> &[String] {
        &self.path
    }

    /// A query parameter (`?durable=false`).
    pub fn query(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    /// The address as it was written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Address {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Address::parse(s)
    }
}

/// Anything that names a destination: `&str`, `String` or an [`Address`].
pub trait IntoAddress {
    /// Parses or converts into an address.
    fn into_address(self) -> Result<Address, Error>;
}

impl IntoAddress for Address {
    fn into_address(self) -> Result<Address, Error> {
        Ok(self)
    }
}

impl IntoAddress for &Address {
    fn into_address(self) -> Result<Address, Error> {
        Ok(self.clone())
    }
}

impl IntoAddress for &str {
    fn into_address(self) -> Result<Address, Error> {
        Address::parse(self)
    }
}

impl IntoAddress for String {
    fn into_address(self) -> Result<Address, Error> {
        Address::parse(&self)
    }
}

impl IntoAddress for &String {
    fn into_address(self) -> Result<Address, Error> {
        Address::parse(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_forms() {
        let a = Address::parse("exchange:orders").unwrap();
        assert_eq!(a.kind(), AddressKind::Exchange);
        let t = Address::parse("topic:orders?partitions=6").unwrap();
        assert_eq!(
            (t.kind(), t.name(), t.query("partitions")),
            (AddressKind::Topic, "orders", Some("6"))
        );
        assert_eq!(Address::queue("x").as_str(), "queue:x");
    }

    #[test]
    fn uris() {
        let a = Address::parse("loopback://localhost/orders").unwrap();
        assert_eq!(a.kind(), AddressKind::Uri);
        assert_eq!(a.host(), Some("localhost"));
        assert_eq!(a.name(), "orders");
        assert!(a.path().is_empty());
    }

    #[test]
    fn bad_addresses_say_why() {
        for bad in [
            "",
            "orders",
            "queue:",
            "loopback://localhost/",
            "queue:a b",
            "://x/y",
        ] {
            let err = Address::parse(bad).unwrap_err();
            assert!(err.is_address(), "{bad}: {err}");
        }
        let err = Address::parse("orders").unwrap_err();
        assert!(err.to_string().contains("expected `queue:name`"));
    }
}
