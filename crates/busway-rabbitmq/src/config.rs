//! Configuration: the broker URL and client options, and [`RabbitMqBuilder`] that sets them.

use std::str::FromStr;
use std::time::Duration;

use busway_core::{Error, ErrorKind};
use lapin::uri::{AMQPScheme, AMQPUri};

use crate::transport::RabbitMq;

/// The environment variable [`crate::RabbitMq::from_env`] reads.
pub const URL_ENV: &str = "BUSWAY_RABBITMQ_URL";

/// The URL used when [`URL_ENV`] is not set: the local broker with the default guest user.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// RabbitMQ client options. Build it with [`crate::RabbitMq::builder`].
///
/// Its `Debug` output shows the URL with the password hidden.
#[derive(Clone)]
pub struct RabbitMqConfig {
    pub(crate) uri: AMQPUri,
    pub(crate) url_for_display: String,
    pub(crate) connection_name: String,
    pub(crate) prefetch: Option<u16>,
    pub(crate) publisher_confirms: bool,
    pub(crate) connect_timeout: Duration,
    pub(crate) publish_timeout: Duration,
    pub(crate) reconnect_min: Duration,
    pub(crate) reconnect_max: Duration,
}

impl std::fmt::Debug for RabbitMqConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not `uri`: it holds the password in clear.
        f.debug_struct("RabbitMqConfig")
            .field("url", &self.url_for_display)
            .field("connection_name", &self.connection_name)
            .field("prefetch", &self.prefetch)
            .field("publisher_confirms", &self.publisher_confirms)
            .field("connect_timeout", &self.connect_timeout)
            .field("publish_timeout", &self.publish_timeout)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .finish()
    }
}

fn invalid(url: &str, why: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Config,
        format!("`{}` is not a valid RabbitMQ URL: {why}", redact(url)),
    )
}

/// The URL with its password replaced by `***`, for messages and logs.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // The authority ends at the first `/` or `?`; the user info ends at its last `@` (a
    // password may hold `@`, as the URL parser allows).
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

impl RabbitMqConfig {
    pub(crate) fn parse(url: &str) -> Result<Self, Error> {
        let url = url.trim();
        if url.is_empty() {
            return Err(invalid(url, "it is empty"));
        }
        let mut uri = AMQPUri::from_str(url).map_err(|e| invalid(url, e))?;
        let prefetch = query_param(url, "prefetch")
            .map(|p| {
                p.parse::<u16>()
                    .map_err(|_| invalid(url, "`prefetch` must be a number from 1 to 65535"))
            })
            .transpose()?
            .filter(|p| *p > 0);
        if uri.query.heartbeat.is_none() {
            uri.query.heartbeat = Some(10);
        }
        let process = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "busway".to_string());
        Ok(Self {
            uri,
            url_for_display: redact(url),
            connection_name: process,
            prefetch,
            publisher_confirms: true,
            connect_timeout: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(30),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
        })
    }

    /// The broker URL with the password hidden.
    pub fn url(&self) -> &str {
        &self.url_for_display
    }

    /// Host name.
    pub fn host(&self) -> &str {
        &self.uri.authority.host
    }

    /// Port.
    pub fn port(&self) -> u16 {
        self.uri.authority.port
    }

    /// Virtual host.
    pub fn vhost(&self) -> &str {
        &self.uri.vhost
    }

    /// True for `amqps://`.
    pub fn tls(&self) -> bool {
        self.uri.scheme == AMQPScheme::AMQPS
    }

    /// The heartbeat, in seconds.
    pub fn heartbeat(&self) -> Option<u16> {
        self.uri.query.heartbeat
    }

    /// The client-provided connection name shown in the management UI.
    pub fn connection_name(&self) -> &str {
        &self.connection_name
    }

    /// The `rabbitmq://host[:port]/[vhost/]` prefix of endpoint addresses (the default port
    /// and the `/` vhost are left out, as MassTransit does).
    pub(crate) fn address_prefix(&self) -> String {
        let (scheme, default_port) = if self.tls() {
            ("rabbitmqs", 5671)
        } else {
            ("rabbitmq", 5672)
        };
        let mut out = format!("{scheme}://{}", self.host());
        if self.port() != default_port {
            out.push_str(&format!(":{}", self.port()));
        }
        out.push('/');
        if self.vhost() != "/" && !self.vhost().is_empty() {
            out.push_str(self.vhost());
            out.push('/');
        }
        out
    }
}

fn query_param<'a>(url: &'a str, key: &str) -> Option<&'a str> {
    let (_, query) = url.split_once('?')?;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        k.eq_ignore_ascii_case(key).then_some(v)
    })
}

/// Builds a [`RabbitMq`] transport with options beyond the URL.
#[derive(Debug, Clone)]
pub struct RabbitMqBuilder {
    config: std::result::Result<RabbitMqConfig, String>,
}

impl RabbitMqBuilder {
    /// A builder for `url`; a bad URL fails in [`RabbitMqBuilder::build`].
    pub(crate) fn new(url: &str) -> Self {
        Self {
            config: RabbitMqConfig::parse(url).map_err(|e| e.to_string()),
        }
    }

    fn update(mut self, f: impl FnOnce(&mut RabbitMqConfig)) -> Self {
        if let Ok(c) = &mut self.config {
            f(c);
        }
        self
    }

    /// The connection name shown in the management UI (default: the process name).
    pub fn connection_name(self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.update(|c| c.connection_name = name)
    }

    /// The heartbeat interval in seconds (default 10; the URL's `?heartbeat=` also works).
    pub fn heartbeat(self, seconds: u16) -> Self {
        self.update(|c| c.uri.query.heartbeat = Some(seconds))
    }

    /// The prefetch of endpoints that set none (the URL's `?prefetch=` also works).
    pub fn prefetch(self, prefetch: u16) -> Self {
        self.update(|c| c.prefetch = Some(prefetch.max(1)))
    }

    /// Whether `publish`/`send` wait for the broker's confirm (default true). Without
    /// confirms a message can be lost when the connection drops right after sending.
    pub fn publisher_confirms(self, on: bool) -> Self {
        self.update(|c| c.publisher_confirms = on)
    }

    /// How long the first connection may take before `build` fails (default 10 s).
    pub fn connect_timeout(self, timeout: Duration) -> Self {
        self.update(|c| c.connect_timeout = timeout)
    }

    /// How long a publish or send waits for the broker (including a reconnect) before it
    /// fails (default 30 s).
    pub fn publish_timeout(self, timeout: Duration) -> Self {
        self.update(|c| c.publish_timeout = timeout)
    }

    /// Reconnect back-off: from `min`, doubling, at most `max` (default 100 ms to 5 s).
    pub fn reconnect_backoff(self, min: Duration, max: Duration) -> Self {
        self.update(|c| {
            c.reconnect_min = min;
            c.reconnect_max = max.max(min);
        })
    }

    /// The transport.
    pub fn build(self) -> busway_core::Result<RabbitMq> {
        let config = self.config.map_err(Error::config)?;
        Ok(RabbitMq::with_config(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let c =
            RabbitMqConfig::parse("amqp://guest:secret@127.0.0.1:5672/%2f?heartbeat=5&prefetch=32")
                .unwrap();
        assert_eq!((c.host(), c.port(), c.vhost()), ("127.0.0.1", 5672, "/"));
        assert_eq!(c.heartbeat(), Some(5));
        assert_eq!(c.prefetch, Some(32));
        assert_eq!(
            c.url(),
            "amqp://guest:***@127.0.0.1:5672/%2f?heartbeat=5&prefetch=32"
        );
        assert_eq!(c.address_prefix(), "rabbitmq://127.0.0.1/");
        let v = RabbitMqConfig::parse("amqps://u:p@broker:5999/sales").unwrap();
        assert!(v.tls());
        assert_eq!(v.heartbeat(), Some(10), "a heartbeat by default");
        assert_eq!(v.address_prefix(), "rabbitmqs://broker:5999/sales/");
    }

    #[test]
    fn debug_output_never_shows_the_password() {
        for url in [
            "amqp://guest:hunter2@127.0.0.1:5672/%2f",
            "amqp://guest:p@ss@word@127.0.0.1:5672/%2f",
            "amqps://svc:s3cr%40t@broker/vhost?heartbeat=5",
        ] {
            let config = RabbitMqConfig::parse(url).unwrap();
            let debug = format!("{config:?}");
            for secret in ["hunter2", "ss@word", "word@", "s3cr"] {
                assert!(!debug.contains(secret), "{debug}");
                assert!(!config.url().contains(secret), "{}", config.url());
            }
            let builder = format!("{:?}", crate::RabbitMq::builder(url));
            assert!(
                !builder.contains("hunter2") && !builder.contains("word@"),
                "{builder}"
            );
            assert!(!builder.contains("s3cr"), "{builder}");
        }
        assert_eq!(
            redact("amqp://guest:p@ss@word@host/vh"),
            "amqp://guest:***@host/vh"
        );
    }

    #[test]
    fn bad_urls_say_why_without_the_password() {
        let err = RabbitMqConfig::parse("http://u:hunter2@host/").unwrap_err();
        assert!(err.is_config());
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let err = RabbitMqConfig::parse("amqp://h/?prefetch=lots").unwrap_err();
        assert!(err.to_string().contains("prefetch"), "{err}");
        assert!(RabbitMqConfig::parse("").is_err());
    }
}
