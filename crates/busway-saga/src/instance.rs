//! What a repository stores for one saga: the user's state and the machine's bookkeeping.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The user's part of a saga instance: the fields a state machine reads and changes.
///
/// Implemented for every `Serialize + DeserializeOwned + Default + Send + Sync` type; a new
/// instance starts from `Default`. The correlation id, the current state and the version
/// are kept beside it in [`Instance`].
pub trait SagaState: Serialize + DeserializeOwned + Default + Send + Sync + 'static {}

impl<T> SagaState for T where T: Serialize + DeserializeOwned + Default + Send + Sync + 'static {}

/// One saga instance as a repository stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance<S> {
    /// The id that correlates the events of this instance.
    pub correlation_id: Uuid,
    /// The current state's name (`Initial`, `Final` or a state of the machine).
    pub current_state: String,
    /// The stored version: 1 after the first save, one more after each update; 0 for an
    /// instance not saved yet. Repositories check it to refuse lost updates.
    pub version: i64,
    /// Composite event progress and scheduled timeouts.
    pub meta: InstanceMeta,
    /// The user's fields.
    pub data: S,
}

impl<S: SagaState> Instance<S> {
    /// A new instance in `Initial`, not saved yet.
    pub fn new(correlation_id: Uuid) -> Self {
        Instance {
            correlation_id,
            current_state: crate::machine::INITIAL.to_string(),
            version: 0,
            meta: InstanceMeta::default(),
            data: S::default(),
        }
    }
}

/// The machine's own bookkeeping on an instance, stored as one JSON value beside the
/// user's fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceMeta {
    /// For each composite event, a bit per constituent event already seen (MassTransit keeps
    /// the same mask in an `int` property of the instance).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub composite: BTreeMap<String, u64>,
    /// For each schedule with a message on its way, the message's scheduling token
    /// (`MT-Scheduling-TokenId`): a timeout that arrives with another token is stale.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub schedules: BTreeMap<String, Uuid>,
    /// For each request waiting for its outcome, the request's message id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, Uuid>,
}

impl InstanceMeta {
    /// True when there is nothing to store.
    pub fn is_empty(&self) -> bool {
        self.composite.is_empty() && self.schedules.is_empty() && self.requests.is_empty()
    }
}
