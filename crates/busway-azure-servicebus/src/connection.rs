//! Connection strings, SAS tokens, and the HTTP client seam that points the transport at any
//! base URL.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use azure_core::{HttpClient, Request, Response, Url};
use base64::Engine;
use busway_core::{Error, ErrorKind, Result};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The parts of a Service Bus connection string.
#[derive(Clone)]
pub struct ConnectionString {
    /// The namespace (`contoso` of `sb://contoso.servicebus.windows.net/`).
    pub namespace: String,
    /// The shared access policy name (`SharedAccessKeyName`).
    pub key_name: String,
    pub(crate) key: String,
}

impl fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionString")
            .field("namespace", &self.namespace)
            .field("key_name", &self.key_name)
            .field("key", &"***")
            .finish()
    }
}

impl ConnectionString {
    /// Parses `Endpoint=sb://<ns>.servicebus.windows.net/;SharedAccessKeyName=..;SharedAccessKey=..`.
    /// Errors never contain the key.
    pub fn parse(text: &str) -> Result<Self> {
        let mut endpoint = None;
        let mut key_name = None;
        let mut key = None;
        for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((k, v)) = part.split_once('=') else {
                return Err(Error::config(
                    "the Service Bus connection string has a part without `=`",
                ));
            };
            match k.trim().to_ascii_lowercase().as_str() {
                "endpoint" => endpoint = Some(v.trim().to_string()),
                "sharedaccesskeyname" => key_name = Some(v.trim().to_string()),
                "sharedaccesskey" => key = Some(v.trim().to_string()),
                _ => {}
            }
        }
        let endpoint = endpoint
            .ok_or_else(|| Error::config("the Service Bus connection string has no Endpoint"))?;
        let host = endpoint
            .strip_prefix("sb://")
            .or_else(|| endpoint.strip_prefix("https://"))
            .unwrap_or(&endpoint)
            .trim_end_matches('/');
        let namespace = host
            .strip_suffix(".servicebus.windows.net")
            .ok_or_else(|| {
                Error::config(format!(
                    "the Service Bus endpoint `{endpoint}` is not `sb://<namespace>.servicebus.windows.net/`"
                ))
            })?
            .to_string();
        if namespace.is_empty() {
            return Err(Error::config("the Service Bus endpoint names no namespace"));
        }
        let key_name = key_name.ok_or_else(|| {
            Error::config("the Service Bus connection string has no SharedAccessKeyName")
        })?;
        let key = key.ok_or_else(|| {
            Error::config("the Service Bus connection string has no SharedAccessKey")
        })?;
        Ok(Self {
            namespace,
            key_name,
            key,
        })
    }

    /// `https://<namespace>.servicebus.windows.net`.
    pub fn service_url(&self) -> String {
        format!("https://{}.servicebus.windows.net", self.namespace)
    }
}

/// A SAS token for `url`, valid for `ttl_seconds` (the same scheme the crate uses: HMAC-SHA256
/// of the URL-encoded resource and the expiry, keyed with the key as given).
pub fn sas_token(connection: &ConnectionString, url: &str, ttl_seconds: i64) -> Result<String> {
    let sr: String = url::form_urlencoded::byte_serialize(url.as_bytes()).collect();
    let se = chrono::Utc::now().timestamp() + ttl_seconds;
    let mut mac = Hmac::<Sha256>::new_from_slice(connection.key.as_bytes()).map_err(|e| {
        Error::with_source(ErrorKind::Config, "the SharedAccessKey cannot be used", e)
    })?;
    mac.update(format!("{sr}\n{se}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let sig: String = url::form_urlencoded::byte_serialize(sig.as_bytes()).collect();
    Ok(format!(
        "SharedAccessSignature sr={sr}&sig={sig}&se={se}&skn={}",
        connection.key_name
    ))
}

/// Bounds every request: a half-open connection or a stalled gateway makes the call fail
/// after `timeout` instead of stalling a poller, a settlement or a send forever.
#[derive(Debug)]
pub(crate) struct Timed {
    pub(crate) inner: Arc<dyn HttpClient>,
    pub(crate) timeout: std::time::Duration,
}

#[async_trait]
impl HttpClient for Timed {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<Response> {
        match tokio::time::timeout(self.timeout, self.inner.execute_request(request)).await {
            Ok(result) => result,
            Err(_) => Err(azure_core::Error::message(
                azure_core::error::ErrorKind::Io,
                format!(
                    "Service Bus did not answer {} {} within {:?}",
                    request.method(),
                    request.url().path(),
                    self.timeout
                ),
            )),
        }
    }
}

/// True when `base` names this machine (`localhost`, `127.0.0.0/8`, `[::1]`).
pub(crate) fn is_loopback_url(base: &str) -> bool {
    let Ok(url) = Url::parse(base) else {
        return false;
    };
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Sends every request to `base` instead of `https://<ns>.servicebus.windows.net`, keeping
/// path, query, headers and body (signatures are computed over the original URL).
#[derive(Debug)]
pub(crate) struct Rebased {
    pub(crate) inner: Arc<dyn HttpClient>,
    pub(crate) service: String,
    pub(crate) base: String,
}

#[async_trait]
impl HttpClient for Rebased {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<Response> {
        let original = request.url().as_str();
        match original.strip_prefix(&self.service) {
            Some(rest) => {
                let mut rebased = request.clone();
                let url = Url::parse(&format!("{}{rest}", self.base.trim_end_matches('/')))
                    .map_err(|e| {
                        azure_core::Error::new(azure_core::error::ErrorKind::DataConversion, e)
                    })?;
                *rebased.url_mut() = url;
                self.inner.execute_request(&rebased).await
            }
            None => self.inner.execute_request(request).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_base_urls_count_as_local() {
        for local in [
            "http://127.0.0.1:8080",
            "http://localhost:1",
            "http://[::1]:9/",
        ] {
            assert!(is_loopback_url(local), "{local}");
        }
        for remote in [
            "https://evil.example.com",
            "http://10.0.0.1:80",
            "not a url",
        ] {
            assert!(!is_loopback_url(remote), "{remote}");
        }
    }

    #[test]
    fn parses_connection_strings_without_leaking_the_key() {
        let c = ConnectionString::parse(
            "Endpoint=sb://contoso.servicebus.windows.net/;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=c2VjcmV0",
        )
        .unwrap();
        assert_eq!(c.namespace, "contoso");
        assert_eq!(c.key_name, "RootManageSharedAccessKey");
        assert!(!format!("{c:?}").contains("c2VjcmV0"));
        for bad in [
            "",
            "Endpoint=sb://x.example.com/;SharedAccessKeyName=a;SharedAccessKey=b",
            "Endpoint=sb://x.servicebus.windows.net/;SharedAccessKey=b",
        ] {
            let err = ConnectionString::parse(bad).unwrap_err();
            assert!(err.is_config());
            assert!(!err.to_string().contains("=b"), "{err}");
        }
    }

    #[test]
    fn sas_tokens_have_the_documented_shape() {
        let c = ConnectionString::parse(
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=s",
        )
        .unwrap();
        let t = sas_token(&c, "https://ns.servicebus.windows.net/q", 60).unwrap();
        assert!(
            t.starts_with(
                "SharedAccessSignature sr=https%3A%2F%2Fns.servicebus.windows.net%2Fq&sig="
            ),
            "{t}"
        );
        assert!(t.ends_with("&skn=k"));
    }
}
