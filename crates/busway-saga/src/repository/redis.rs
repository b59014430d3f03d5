//! Saga instances in Redis: one hash per instance (`state`, `version`, `meta`, `data`),
//! written by Lua scripts that check the version in the same step. By id only: Redis has no
//! query over the instances' fields.

use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use busway_core::ReceiveContext;
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use uuid::Uuid;

use super::{SagaError, SagaRepository, decode_instance, encode_instance};
use crate::instance::{Instance, SagaState};
use crate::testing::InspectSagas;

/// Writes the hash only when the key does not exist.
static INSERT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
         redis.call('HSET', KEYS[1], 'state', ARGV[1], 'version', ARGV[2], 'meta', ARGV[3], 'data', ARGV[4])
         return 1",
    )
});

/// Replaces the hash only when its version is ARGV[5].
static UPDATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('HGET', KEYS[1], 'version') ~= ARGV[5] then return 0 end
         redis.call('HSET', KEYS[1], 'state', ARGV[1], 'version', ARGV[2], 'meta', ARGV[3], 'data', ARGV[4])
         return 1",
    )
});

/// Deletes the hash only when its version is ARGV[1].
static DELETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('HGET', KEYS[1], 'version') ~= ARGV[1] then return 0 end
         redis.call('DEL', KEYS[1])
         return 1",
    )
});

/// Saga instances in Redis, optimistic and by id only (MassTransit's Redis repository does
/// the same): each instance is a hash under `{prefix}:{correlation_id}`, and every write is
/// a script that checks the version it read. The connection reconnects on its own after
/// Redis restarts; while Redis is away, events fault with the repository's error.
pub struct RedisSagaRepository<S> {
    connection: ConnectionManager,
    prefix: Arc<str>,
    _state: PhantomData<fn() -> S>,
}

impl<S> Clone for RedisSagaRepository<S> {
    fn clone(&self) -> Self {
        RedisSagaRepository {
            connection: self.connection.clone(),
            prefix: self.prefix.clone(),
            _state: PhantomData,
        }
    }
}

impl<S> fmt::Debug for RedisSagaRepository<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSagaRepository")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn redis_error(what: &'static str) -> impl FnOnce(redis::RedisError) -> SagaError {
    move |e| SagaError::storage_with(format!("Redis: {what} failed"), e)
}

impl<S: SagaState> RedisSagaRepository<S> {
    /// Connects to `url` (`redis://127.0.0.1:6379`) and keeps instances under
    /// `{prefix}:{correlation_id}` (`order-state`, say). Commands time out after 5 s and
    /// connection attempts after 2 s, so an event fails (and is retried) rather than waits
    /// while Redis is away; the connection comes back on its own.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, SagaError> {
        let client = redis::Client::open(url).map_err(redis_error("reading the URL"))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(2));
        let connection = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(redis_error("connecting"))?;
        Ok(Self::with_connection(connection, prefix))
    }

    /// Uses a connection the application made (give it a response timeout, or events wait
    /// for as long as Redis is away).
    pub fn with_connection(connection: ConnectionManager, prefix: &str) -> Self {
        RedisSagaRepository {
            connection,
            prefix: prefix.into(),
            _state: PhantomData,
        }
    }

    /// The key of an instance.
    pub fn key(&self, correlation_id: Uuid) -> String {
        format!("{}:{correlation_id}", self.prefix)
    }

    async fn get(&self, id: Uuid) -> Result<Option<Instance<S>>, SagaError> {
        let mut conn = self.connection.clone();
        let fields: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.key(id))
            .arg(&["state", "version", "meta", "data"])
            .query_async(&mut conn)
            .await
            .map_err(redis_error("loading a saga instance"))?;
        match fields.as_slice() {
            [None, None, None, None] => Ok(None),
            [Some(state), Some(version), meta, Some(data)] => {
                let version = version.parse::<i64>().map_err(|e| {
                    SagaError::corrupt(format!("the saga instance {id} has a bad version"), e)
                })?;
                decode_instance(
                    id,
                    state.clone(),
                    version,
                    meta.as_deref().unwrap_or(""),
                    data,
                )
                .map(Some)
            }
            _ => Err(SagaError::corrupt(
                format!("the saga instance {id} is missing fields in Redis"),
                "expected the hash fields state, version, meta and data",
            )),
        }
    }

    async fn write(
        &self,
        script: &Script,
        instance: &Instance<S>,
        expected: Option<i64>,
    ) -> Result<bool, SagaError> {
        let (meta, data) = encode_instance(instance)?;
        let mut invocation = script.key(self.key(instance.correlation_id));
        invocation
            .arg(&instance.current_state)
            .arg(instance.version)
            .arg(meta)
            .arg(data);
        if let Some(expected) = expected {
            invocation.arg(expected);
        }
        let mut conn = self.connection.clone();
        let done: i64 = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error("saving a saga instance"))?;
        Ok(done == 1)
    }
}

impl<S: SagaState> SagaRepository<S> for RedisSagaRepository<S> {
    async fn load(
        &self,
        _cx: &ReceiveContext,
        correlation_id: Uuid,
    ) -> Result<Option<Instance<S>>, SagaError> {
        self.get(correlation_id).await
    }

    async fn insert(&self, _cx: &ReceiveContext, instance: &Instance<S>) -> Result<(), SagaError> {
        if self.write(&INSERT, instance, None).await? {
            Ok(())
        } else {
            Err(SagaError::exists(instance.correlation_id))
        }
    }

    async fn update(
        &self,
        _cx: &ReceiveContext,
        instance: &Instance<S>,
        expected_version: i64,
    ) -> Result<(), SagaError> {
        if self
            .write(&UPDATE, instance, Some(expected_version))
            .await?
        {
            Ok(())
        } else {
            Err(SagaError::moved_on(
                instance.correlation_id,
                expected_version,
            ))
        }
    }

    async fn delete(
        &self,
        _cx: &ReceiveContext,
        correlation_id: Uuid,
        expected_version: i64,
    ) -> Result<(), SagaError> {
        let mut conn = self.connection.clone();
        let done: i64 = DELETE
            .key(self.key(correlation_id))
            .arg(expected_version)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error("deleting a saga instance"))?;
        if done == 1 {
            Ok(())
        } else {
            Err(SagaError::moved_on(correlation_id, expected_version))
        }
    }
}

impl<S: SagaState> InspectSagas<S> for RedisSagaRepository<S> {
    async fn instance(&self, correlation_id: Uuid) -> Result<Option<Instance<S>>, SagaError> {
        self.get(correlation_id).await
    }
}
