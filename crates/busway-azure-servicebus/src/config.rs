//! Configuration: the connection string, HTTP client, base URL, entity settings, provisioning
//! and timeouts, and the [`ServiceBusBuilder`] that sets them.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use azure_core::HttpClient;
use busway_core::Result;
use busway_core::transport::TemporaryEntities;

use crate::connection::{ConnectionString, Rebased, Timed};
use crate::management::{Management, QueueSettings};
use crate::transport::{ServiceBus, Shared};

/// The environment variable with a connection string for tests against a real namespace.
pub const CONNECTION_STRING_ENV: &str = "BUSWAY_ASB_CONNECTION_STRING";

/// The environment variable with a base URL to use instead of the namespace's (optional).
///
/// [`ServiceBus::from_env`] honours it only for a loopback address (a local stand-in or
/// proxy): requests carry tokens for the real namespace, which must not go to another host
/// because a variable says so. Call [`ServiceBusBuilder::base_url`] to send them elsewhere.
pub const BASE_URL_ENV: &str = "BUSWAY_ASB_BASE_URL";

/// Builds a [`ServiceBus`] transport.
pub struct ServiceBusBuilder {
    connection: Result<ConnectionString>,
    http: Option<Arc<dyn HttpClient>>,
    base_url: Option<String>,
    settings: QueueSettings,
    provision: bool,
    receive_wait: Duration,
    request_timeout: Option<Duration>,
}

impl fmt::Debug for ServiceBusBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceBusBuilder")
            .field("connection", &self.connection.as_ref().ok())
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl ServiceBusBuilder {
    /// The defaults for a connection string (parsed now; an error surfaces in `build`).
    pub(crate) fn new(connection_string: &str) -> Self {
        Self {
            connection: ConnectionString::parse(connection_string),
            http: None,
            base_url: None,
            settings: QueueSettings {
                lock_duration: Duration::from_secs(300),
                max_delivery_count: 5,
                auto_delete_on_idle: None,
            },
            provision: true,
            receive_wait: Duration::from_secs(1),
            request_timeout: None,
        }
    }

    /// Sends every request to `base_url` (`http://127.0.0.1:8080`) instead of
    /// `https://<namespace>.servicebus.windows.net` (a local stand-in, a proxy).
    pub fn base_url(mut self, base_url: impl Into<String>) -> Self {
        self.base_url = Some(base_url.into());
        self
    }

    /// The HTTP client requests go through (default: azure_core's reqwest client).
    pub fn http_client(mut self, client: Arc<dyn HttpClient>) -> Self {
        self.http = Some(client);
        self
    }

    /// Lock duration of queues and subscriptions busway creates (default 5 minutes).
    pub fn lock_duration(mut self, duration: Duration) -> Self {
        self.settings.lock_duration = duration;
        self
    }

    /// Delivery attempts before Service Bus dead-letters a message (default 5).
    pub fn max_delivery_count(mut self, count: u32) -> Self {
        self.settings.max_delivery_count = count.max(1);
        self
    }

    /// Whether busway creates queues, topics and subscriptions (default true). Turn it off
    /// for keys without Manage rights; the entities must then exist.
    pub fn provision(mut self, on: bool) -> Self {
        self.provision = on;
        self
    }

    /// How long one receive request waits for a message (default 1 s; whole seconds).
    pub fn receive_wait(mut self, wait: Duration) -> Self {
        self.receive_wait = wait;
        self
    }

    /// How long any one request to Service Bus (send, receive, complete, abandon, renew,
    /// management) may take before it fails (default 30 s or the receive wait plus 10 s,
    /// whichever is longer; never less than the receive wait plus 1 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        self
    }

    /// The transport.
    pub fn build(self) -> Result<ServiceBus> {
        let connection = self.connection?;
        // A receive waits up to `receive_wait` on the server: leave it room to answer.
        let timeout = match self.request_timeout {
            Some(t) => t.max(self.receive_wait + Duration::from_secs(1)),
            None => Duration::from_secs(30).max(self.receive_wait + Duration::from_secs(10)),
        };
        let inner: Arc<dyn HttpClient> = Arc::new(Timed {
            inner: self.http.unwrap_or_else(azure_core::new_http_client),
            timeout,
        });
        let http: Arc<dyn HttpClient> = match &self.base_url {
            Some(base) => Arc::new(Rebased {
                inner,
                service: connection.service_url(),
                base: base.clone(),
            }),
            None => inner,
        };
        Ok(ServiceBus {
            shared: Arc::new(Shared {
                management: Management::new(http.clone(), connection.clone()),
                http,
                connection,
                settings: self.settings,
                provision: self.provision,
                base_url: self.base_url,
                receive_wait: self.receive_wait,
                temporaries: TemporaryEntities::default(),
            }),
        })
    }
}
