//! An in-process repository: instances kept as JSON in a map, with the same version checks
//! as a database.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard};

use busway_core::ReceiveContext;
use uuid::Uuid;

use crate::testing::InspectSagas;

use super::{Query, SagaError, SagaRepository, decode_instance, encode_instance};
use crate::instance::{Instance, SagaState};

struct Row {
    state: String,
    version: i64,
    meta: String,
    data: String,
}

impl Row {
    fn of<S: SagaState>(instance: &Instance<S>) -> Result<Row, SagaError> {
        let (meta, data) = encode_instance(instance)?;
        Ok(Row {
            state: instance.current_state.clone(),
            version: instance.version,
            meta,
            data,
        })
    }
}

/// Saga instances in memory, for tests and single-process services that can lose their
/// sagas on restart. Instances are kept serialized, so a state type that does not
/// round-trip through JSON fails here as it would in a database. Clones share the store.
pub struct InMemorySagaRepository<S> {
    rows: Arc<Mutex<HashMap<Uuid, Row>>>,
    _state: PhantomData<fn() -> S>,
}

impl<S> Clone for InMemorySagaRepository<S> {
    fn clone(&self) -> Self {
        InMemorySagaRepository {
            rows: self.rows.clone(),
            _state: PhantomData,
        }
    }
}

impl<S> Default for InMemorySagaRepository<S> {
    fn default() -> Self {
        InMemorySagaRepository {
            rows: Arc::default(),
            _state: PhantomData,
        }
    }
}

impl<S> fmt::Debug for InMemorySagaRepository<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemorySagaRepository")
            .field("instances", &self.lock().len())
            .finish()
    }
}

impl<S> InMemorySagaRepository<S> {
    /// An empty repository.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Uuid, Row>> {
        // A panic while the lock was held left whole rows (every write is one insert).
        self.rows.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many instances there are.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

impl<S: SagaState> InMemorySagaRepository<S> {
    /// The instance with this correlation id.
    pub fn get(&self, correlation_id: Uuid) -> Result<Option<Instance<S>>, SagaError> {
        self.lock()
            .get(&correlation_id)
            .map(|row| read(correlation_id, row))
            .transpose()
    }

    /// Every instance.
    pub fn instances(&self) -> Result<Vec<Instance<S>>, SagaError> {
        self.lock().iter().map(|(id, row)| read(*id, row)).collect()
    }

    /// Stores an instance as it is, replacing any with its id (for seeding tests).
    pub fn put(&self, instance: &Instance<S>) -> Result<(), SagaError> {
        let row = Row::of(instance)?;
        self.lock().insert(instance.correlation_id, row);
        Ok(())
    }

    /// Stores raw JSON as an instance's data, as a schema change would leave it (for tests
    /// of instances that no longer read).
    pub fn put_raw(&self, correlation_id: Uuid, state: &str, version: i64, data: &str) {
        self.lock().insert(
            correlation_id,
            Row {
                state: state.to_string(),
                version,
                meta: String::new(),
                data: data.to_string(),
            },
        );
    }
}

fn read<S: SagaState>(id: Uuid, row: &Row) -> Result<Instance<S>, SagaError> {
    decode_instance(id, row.state.clone(), row.version, &row.meta, &row.data)
}

impl<S: SagaState> SagaRepository<S> for InMemorySagaRepository<S> {
    async fn load(
        &self,
        _cx: &ReceiveContext,
        correlation_id: Uuid,
    ) -> Result<Option<Instance<S>>, SagaError> {
        self.get(correlation_id)
    }

    fn supports_queries(&self) -> bool {
        true
    }

    async fn find(
        &self,
        _cx: &ReceiveContext,
        query: &Query,
    ) -> Result<Option<Instance<S>>, SagaError> {
        let rows = self.lock();
        let mut found = None;
        for (id, row) in rows.iter() {
            let data: serde_json::Value = match serde_json::from_str(&row.data) {
                Ok(v) => v,
                Err(_) => continue,
            };
            if query.matches(&data) {
                if found.is_some() {
                    return Err(SagaError::storage(format!(
                        "more than one saga instance matches {}",
                        query.partition_key()
                    )));
                }
                found = Some(read(*id, row)?);
            }
        }
        Ok(found)
    }

    async fn insert(&self, _cx: &ReceiveContext, instance: &Instance<S>) -> Result<(), SagaError> {
        let row = Row::of(instance)?;
        let mut rows = self.lock();
        if rows.contains_key(&instance.correlation_id) {
            return Err(SagaError::exists(instance.correlation_id));
        }
        rows.insert(instance.correlation_id, row);
        Ok(())
    }

    async fn update(
        &self,
        _cx: &ReceiveContext,
        instance: &Instance<S>,
        expected_version: i64,
    ) -> Result<(), SagaError> {
        let new = Row::of(instance)?;
        let mut rows = self.lock();
        match rows.get_mut(&instance.correlation_id) {
            Some(row) if row.version == expected_version => {
                *row = new;
                Ok(())
            }
            _ => Err(SagaError::moved_on(
                instance.correlation_id,
                expected_version,
            )),
        }
    }

    async fn delete(
        &self,
        _cx: &ReceiveContext,
        correlation_id: Uuid,
        expected_version: i64,
    ) -> Result<(), SagaError> {
        let mut rows = self.lock();
        match rows.get(&correlation_id) {
            Some(row) if row.version == expected_version => {
                rows.remove(&correlation_id);
                Ok(())
            }
            _ => Err(SagaError::moved_on(correlation_id, expected_version)),
        }
    }
}

impl<S: SagaState> InspectSagas<S> for InMemorySagaRepository<S> {
    async fn instance(&self, correlation_id: Uuid) -> Result<Option<Instance<S>>, SagaError> {
        self.get(correlation_id)
    }
}
