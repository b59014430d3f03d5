//! What the outbox needs from a database, and the rows it stores.

use std::time::Duration;

use async_trait::async_trait;
use busway_core::envelope::{ReadEnvelope, WireEnvelope};
use busway_core::outgoing::SendTarget;
use busway_core::transport::DeliveryOptions;
use busway_core::{Address, Error, ErrorKind, OutgoingMessage, Result};
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Table names: a prefix (default `busway_`) and an optional schema.
#[derive(Debug, Clone)]
pub struct TableNames {
    /// `busway_outbox`: one row per stored message.
    pub outbox: String,
    /// `busway_outbox_state`: one row per outbox id; dispatchers lock it.
    pub state: String,
    /// `busway_inbox`: one row per (endpoint, message id) consumed.
    pub inbox: String,
    /// `busway_migrations`: applied schema versions.
    pub migrations: String,
    /// The PostgreSQL notification channel (`busway_outbox`).
    pub channel: String,
    /// The prefix alone.
    pub prefix: String,
}

/// True for a plain SQL identifier that can go into SQL text unquoted: ASCII letters,
/// digits and `_`, not starting with a digit, at most 63 bytes (PostgreSQL's limit). The
/// outbox's table names and busway-saga's use it.
pub fn is_plain_identifier(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 63
        && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !text.starts_with(|c: char| c.is_ascii_digit())
}

/// A prefix or schema: a plain identifier short enough to leave room for the table names.
fn valid_identifier(text: &str) -> bool {
    text.len() <= 40 && is_plain_identifier(text)
}

impl TableNames {
    /// Names with `prefix` (letters, digits, `_`) in `schema` (if given).
    pub fn new(schema: Option<&str>, prefix: &str) -> Result<Self> {
        if !prefix.is_empty() && !valid_identifier(prefix) {
            return Err(Error::config(format!(
                "the outbox table prefix `{prefix}` must be letters, digits and `_`"
            )));
        }
        if let Some(schema) = schema.filter(|s| !valid_identifier(s)) {
            return Err(Error::config(format!(
                "the outbox schema `{schema}` must be letters, digits and `_`"
            )));
        }
        let qualify = |name: &str| match schema {
            Some(s) => format!("{s}.{prefix}{name}"),
            None => format!("{prefix}{name}"),
        };
        Ok(Self {
            outbox: qualify("outbox"),
            state: qualify("outbox_state"),
            inbox: qualify("inbox"),
            migrations: qualify("migrations"),
            channel: format!(
                "{}{prefix}outbox",
                schema.map(|s| format!("{s}_")).unwrap_or_default()
            ),
            prefix: prefix.to_string(),
        })
    }
}

impl Default for TableNames {
    fn default() -> Self {
        Self {
            outbox: "busway_outbox".into(),
            state: "busway_outbox_state".into(),
            inbox: "busway_inbox".into(),
            migrations: "busway_migrations".into(),
            channel: "busway_outbox".into(),
            prefix: "busway_".into(),
        }
    }
}

/// A message to store: the fully built envelope (as MassTransit's JSON envelope, message
/// included) and where it goes.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// The outbox (ordering scope) it belongs to.
    pub outbox_id: String,
    /// The message id.
    pub message_id: Uuid,
    /// The first message type URN (for people reading the table).
    pub message_type: String,
    /// `publish`, or the address it is sent to.
    pub destination: String,
    /// The envelope and message, as JSON.
    pub envelope: String,
    /// Deliver no earlier than this long after it was stored.
    pub delay_ms: Option<i64>,
    /// Time to live.
    pub time_to_live_ms: Option<i64>,
    /// Partition key.
    pub partition_key: Option<String>,
}

/// The destination text for a publish.
pub const PUBLISH: &str = "publish";

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl NewMessage {
    /// The row for an outgoing message.
    pub fn from_outgoing(outbox_id: &str, outgoing: &OutgoingMessage) -> Result<Self> {
        let envelope = serde_json::to_string(&WireEnvelope {
            envelope: &outgoing.envelope,
            message: &outgoing.message,
        })
        .map_err(|e| {
            Error::with_source(
                ErrorKind::Serialize,
                "could not write the envelope for the outbox",
                e,
            )
        })?;
        let destination = match &outgoing.target {
            SendTarget::Publish => PUBLISH.to_string(),
            SendTarget::Send(address) => address.as_str().to_string(),
            _ => {
                return Err(Error::config(
                    "the outbox cannot store this kind of destination",
                ));
            }
        };
        Ok(Self {
            outbox_id: outbox_id.to_string(),
            message_id: outgoing
                .envelope
                .message_id
                .unwrap_or_else(busway_core::new_id),
            message_type: outgoing
                .envelope
                .message_type
                .first()
                .map(|u| u.as_str().to_string())
                .unwrap_or_default(),
            destination,
            envelope,
            delay_ms: outgoing.delivery.delay.map(millis),
            time_to_live_ms: outgoing.time_to_live.map(millis),
            partition_key: outgoing.partition_key.clone(),
        })
    }
}

/// A stored message claimed for delivery.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    /// Its sequence number (the delivery order within its outbox).
    pub sequence: i64,
    /// Its outbox.
    pub outbox_id: String,
    /// Its message id.
    pub message_id: Uuid,
    /// `publish` or an address.
    pub destination: String,
    /// The envelope JSON.
    pub envelope: String,
    /// Requested delay.
    pub delay_ms: Option<i64>,
    /// Time to live.
    pub time_to_live_ms: Option<i64>,
    /// Partition key.
    pub partition_key: Option<String>,
    /// When it was stored.
    pub created_at: DateTime<Utc>,
    /// Failed delivery attempts so far.
    pub attempts: i32,
}

impl StoredMessage {
    /// Rebuilds the outgoing message. The remaining delay (if any) is computed from when it
    /// was stored.
    pub fn to_outgoing(&self) -> Result<OutgoingMessage> {
        let read: ReadEnvelope<'_> = serde_json::from_str(&self.envelope).map_err(|e| {
            Error::with_source(
                ErrorKind::Deserialize,
                "the stored envelope is not valid",
                e,
            )
        })?;
        let message = read.message.map(ToOwned::to_owned).ok_or_else(|| {
            Error::new(ErrorKind::Deserialize, "the stored envelope has no message")
        })?;
        let target = if self.destination == PUBLISH {
            SendTarget::Publish
        } else {
            SendTarget::Send(Address::parse(&self.destination)?)
        };
        let delay = self.delay_ms.and_then(|ms| {
            let due = self.created_at + chrono::Duration::milliseconds(ms);
            (due - Utc::now()).to_std().ok().filter(|d| !d.is_zero())
        });
        let mut delivery = DeliveryOptions::default();
        delivery.delay = delay;
        Ok(OutgoingMessage {
            envelope: read.envelope,
            message,
            target,
            delivery,
            time_to_live: self
                .time_to_live_ms
                .and_then(|ms| u64::try_from(ms).ok())
                .map(Duration::from_millis),
            partition_key: self.partition_key.clone(),
            serializer: None,
            trace_parent: None,
        })
    }
}

/// How a claim ended.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The message that failed.
    pub sequence: i64,
    /// Why.
    pub error: String,
    /// Stop trying it (it failed too often, or can never succeed).
    pub park: bool,
}

/// Messages of one outbox claimed by one dispatcher. Finish it to record what happened.
#[async_trait]
pub trait Claim: Send + Sync {
    /// The outbox.
    fn outbox_id(&self) -> &str;

    /// The claimed messages, in delivery order.
    fn messages(&self) -> &[StoredMessage];

    /// Extends the claim while its messages are still being delivered; false when it was
    /// lost (it expired and another dispatcher took the outbox). Stores whose claims hold a
    /// lock for as long as they live (PostgreSQL's `FOR UPDATE`) need not do anything.
    async fn renew(&self) -> Result<bool> {
        Ok(true)
    }

    /// Marks `delivered` as delivered, records `failure`, and releases the claim.
    async fn finish(self: Box<Self>, delivered: &[i64], failure: Option<Failure>) -> Result<()>;
}

/// Storage for the outbox and inbox. Implemented for PostgreSQL and SQLite.
#[async_trait]
pub trait OutboxStore: Send + Sync + 'static {
    /// The sqlx database.
    type Database: sqlx::Database;

    /// The table names.
    fn names(&self) -> &TableNames;

    /// Creates or upgrades the tables.
    async fn migrate(&self) -> Result<()>;

    /// Stores messages inside the caller's transaction.
    async fn insert(
        &self,
        conn: &mut <Self::Database as sqlx::Database>::Connection,
        messages: &[NewMessage],
    ) -> Result<()>;

    /// How many connections the store's pool opens at most. The consumer outbox lets one
    /// fewer consume attempts hold a transaction at once (one is left for the dispatcher), so
    /// an endpoint whose concurrency is above the pool size waits for a connection instead of
    /// faulting healthy messages with pool timeouts.
    fn max_connections(&self) -> usize;

    /// Opens a transaction for a consumer (the consumer outbox).
    async fn begin(&self) -> Result<sqlx::Transaction<'static, Self::Database>>;

    /// Records that `endpoint` consumed `message_id`; false if it already had.
    async fn record_inbox(
        &self,
        conn: &mut <Self::Database as sqlx::Database>::Connection,
        endpoint: &str,
        message_id: Uuid,
    ) -> Result<bool>;

    /// Claims up to `limit` undelivered messages of one outbox no other dispatcher holds.
    async fn claim(
        &self,
        dispatcher: &str,
        limit: i64,
        lease: Duration,
    ) -> Result<Option<Box<dyn Claim>>>;

    /// Counts messages not delivered yet, and parked ones (failed for good).
    async fn counts(&self) -> Result<(i64, i64)>;

    /// Deletes messages delivered before `delivered_before` and inbox rows received before
    /// `inbox_before`; returns how many of each.
    async fn cleanup(
        &self,
        delivered_before: DateTime<Utc>,
        inbox_before: DateTime<Utc>,
    ) -> Result<(u64, u64)>;

    /// Waits for a notification that messages were stored, where the database has them
    /// (PostgreSQL `LISTEN`). `None` means: poll.
    async fn listen(&self) -> Result<Option<Box<dyn Notifications>>> {
        Ok(None)
    }
}

/// A stream of "messages were stored" notifications.
#[async_trait]
pub trait Notifications: Send {
    /// The next notification; an error means the listener broke (the dispatcher polls and
    /// listens again later).
    async fn next(&mut self) -> Result<()>;
}

/// A database error as a busway error.
pub(crate) fn db_error(what: &str, err: sqlx::Error) -> Error {
    Error::with_source(ErrorKind::Database, what.to_string(), err)
}
