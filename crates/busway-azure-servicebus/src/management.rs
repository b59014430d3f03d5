//! Creating queues, topics and subscriptions over the Service Bus REST management API
//! (Atom entries), with the same SAS auth as the data plane.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use azure_core::{HttpClient, Method, Request, StatusCode, Url};
use busway_core::{Error, ErrorKind, Result};

use crate::connection::{ConnectionString, sas_token};

const API_VERSION: &str = "2021-05";
const CONNECT_NS: &str = "http://schemas.microsoft.com/netservices/2010/10/servicebus/connect";

/// Queue settings busway declares.
#[derive(Debug, Clone)]
pub(crate) struct QueueSettings {
    pub(crate) lock_duration: Duration,
    pub(crate) max_delivery_count: u32,
    pub(crate) auto_delete_on_idle: Option<Duration>,
}

/// ISO 8601 duration (`PT5M`, `PT2.5S`).
pub(crate) fn iso_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let millis = d.subsec_millis();
    if millis == 0 {
        format!("PT{secs}S")
    } else {
        format!("PT{secs}.{millis:03}S")
    }
}

fn entry(description: &str, inner: &str) -> String {
    format!(
        "<entry xmlns=\"http://www.w3.org/2005/Atom\"><content type=\"application/xml\"><{description} xmlns:i=\"http://www.w3.org/2001/XMLSchema-instance\" xmlns=\"{CONNECT_NS}\">{inner}</{description}></content></entry>"
    )
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Entity management for one namespace.
#[derive(Debug)]
pub(crate) struct Management {
    pub(crate) http: Arc<dyn HttpClient>,
    pub(crate) connection: ConnectionString,
    known: Mutex<HashSet<String>>,
}

impl Management {
    pub(crate) fn new(http: Arc<dyn HttpClient>, connection: ConnectionString) -> Self {
        Self {
            http,
            connection,
            known: Mutex::new(HashSet::new()),
        }
    }

    fn auth_error(&self, status: StatusCode, what: &str) -> Error {
        Error::new(
            ErrorKind::Config,
            format!(
                "Service Bus namespace `{}` refused the shared access key `{}` ({} {status}) while {what}; check SharedAccessKeyName and SharedAccessKey in the connection string (creating entities needs Manage rights; turn provisioning off otherwise)",
                self.connection.namespace,
                self.connection.key_name,
                u16::from(status)
            ),
        )
    }

    /// Sends one signed management request for `path` and returns the response.
    async fn execute(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
        what: &str,
    ) -> Result<azure_core::Response> {
        let url = format!("{}/{path}", self.connection.service_url());
        let token = sas_token(&self.connection, &url, 3600)?;
        let parsed = Url::parse(&format!("{url}?api-version={API_VERSION}")).map_err(|e| {
            Error::with_source(
                ErrorKind::Address,
                format!("`{path}` is not a valid entity path"),
                e,
            )
        })?;
        let mut request = Request::new(parsed, method);
        request.insert_header("authorization", token);
        match body {
            Some(body) => {
                request.insert_header(
                    "content-type",
                    "application/atom+xml;type=entry;charset=utf-8",
                );
                request.set_body(body);
            }
            None => request.insert_header("content-length", "0"),
        }
        self.http.execute_request(&request).await.map_err(|e| {
            Error::with_source(
                ErrorKind::Unavailable,
                format!("Service Bus did not answer while {what}"),
                e,
            )
        })
    }

    async fn put(&self, path: &str, body: String, what: &str) -> Result<()> {
        if self.known.lock().map(|k| k.contains(path)).unwrap_or(false) {
            return Ok(());
        }
        let response = self.execute(Method::Put, path, Some(body), what).await?;
        let status = response.status();
        match u16::from(status) {
            200..=299 | 409 => {
                if let Ok(mut k) = self.known.lock() {
                    k.insert(path.to_string());
                }
                Ok(())
            }
            401 | 403 => Err(self.auth_error(status, what)),
            _ => {
                let body = response
                    .into_body()
                    .collect_string()
                    .await
                    .unwrap_or_default();
                Err(Error::new(
                    ErrorKind::Transport,
                    format!(
                        "Service Bus answered {} while {what}: {}",
                        u16::from(status),
                        body.chars().take(300).collect::<String>()
                    ),
                ))
            }
        }
    }

    /// Creates a queue if missing.
    pub(crate) async fn queue(&self, name: &str, settings: &QueueSettings) -> Result<()> {
        let mut inner = format!(
            "<LockDuration>{}</LockDuration><MaxDeliveryCount>{}</MaxDeliveryCount>",
            iso_duration(settings.lock_duration),
            settings.max_delivery_count
        );
        if let Some(idle) = settings.auto_delete_on_idle {
            inner.push_str(&format!(
                "<AutoDeleteOnIdle>{}</AutoDeleteOnIdle>",
                iso_duration(idle)
            ));
        }
        self.put(
            name,
            entry("QueueDescription", &inner),
            &format!("creating queue `{name}`"),
        )
        .await
    }

    /// Creates a topic if missing.
    pub(crate) async fn topic(&self, name: &str) -> Result<()> {
        self.put(
            name,
            entry("TopicDescription", ""),
            &format!("creating topic `{name}`"),
        )
        .await
    }

    /// Creates a subscription on `topic` that forwards to queue `forward_to`.
    pub(crate) async fn subscription(
        &self,
        topic: &str,
        name: &str,
        forward_to: &str,
        settings: &QueueSettings,
    ) -> Result<()> {
        let inner = format!(
            "<LockDuration>{}</LockDuration><MaxDeliveryCount>{}</MaxDeliveryCount><ForwardTo>{}</ForwardTo>",
            iso_duration(settings.lock_duration),
            settings.max_delivery_count,
            escape(forward_to)
        );
        self.put(
            &format!("{topic}/subscriptions/{name}"),
            entry("SubscriptionDescription", &inner),
            &format!("creating subscription `{name}` on topic `{topic}`"),
        )
        .await
    }

    /// Deletes an entity (missing is fine).
    pub(crate) async fn delete(&self, path: &str) -> Result<()> {
        let what = format!("deleting `{path}`");
        let response = self.execute(Method::Delete, path, None, &what).await?;
        if let Ok(mut k) = self.known.lock() {
            k.remove(path);
        }
        match u16::from(response.status()) {
            200..=299 | 404 => Ok(()),
            401 | 403 => Err(self.auth_error(response.status(), &what)),
            other => Err(Error::new(
                ErrorKind::Transport,
                format!("Service Bus answered {other} while deleting `{path}`"),
            )),
        }
    }

    /// The Atom entry describing an entity, or `None` if it does not exist.
    pub(crate) async fn get(&self, path: &str) -> Result<Option<String>> {
        let what = format!("reading `{path}`");
        let response = self.execute(Method::Get, path, None, &what).await?;
        let status = response.status();
        match u16::from(status) {
            200..=299 => Ok(Some(response.into_body().collect_string().await.map_err(
                |e| {
                    Error::with_source(
                        ErrorKind::Unavailable,
                        "reading an entity description failed",
                        e,
                    )
                },
            )?)),
            404 => Ok(None),
            401 | 403 => Err(self.auth_error(status, &format!("reading `{path}`"))),
            other => Err(Error::new(
                ErrorKind::Transport,
                format!("Service Bus answered {other} while reading `{path}`"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_durations() {
        assert_eq!(iso_duration(Duration::from_secs(300)), "PT300S");
        assert_eq!(iso_duration(Duration::from_millis(2500)), "PT2.500S");
    }
}
