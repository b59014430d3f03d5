//! Consuming: per-key lanes, a bounded in-flight window per partition, and commits that
//! never pass an unfinished message.
//!
//! A pump task reads records and files them:
//! - each partition keeps the offsets it handed out and whether each is finished; its commit
//!   position is the lowest unfinished offset (or one past the highest finished);
//! - a record with a key waits in its key's lane while an earlier record with the same key is
//!   in flight, so one key is processed in order while different keys run in parallel (up to
//!   the endpoint's concurrency); records without a key are not ordered;
//! - when a partition holds `max_in_flight` unfinished records the pump stops polling until
//!   one of them is done, so librdkafka keeps what it has prefetched (pausing a partition
//!   makes it drop that and fetch again on resume, which cost 5x in draining a backlog); if
//!   no room opens for [`PAUSE_AFTER`] the full partitions are paused and polling goes on,
//!   so the other partitions and the group's poll interval keep moving; a paused partition
//!   resumes when half of its records are done.
//!
//! Offsets are committed when a partition's position moved by `commit_every`, every
//! `commit_interval`, when partitions are revoked, and when the endpoint closes. A committer
//! task sends one synchronous commit at a time (on a blocking thread) with the latest
//! positions, so the result of every commit is known and a failed one is sent again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use busway_core::headers::names;
use busway_core::transport::{Backoff, Delivery, Receiver};
use busway_core::{Error, ErrorKind, Result};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::client::{Client, kafka_error};
use crate::settle::KafkaSettlement;
use crate::wire::from_record;

pub(crate) mod state;

use state::{PartitionKey, Record, RecordRef, State, lock};

/// How long the pump waits for room in a full partition before pausing it.
const PAUSE_AFTER: Duration = Duration::from_secs(5);

/// The first pause after a failed commit; it doubles up to [`COMMIT_RETRY_MAX`].
const COMMIT_RETRY_MIN: Duration = Duration::from_millis(100);
const COMMIT_RETRY_MAX: Duration = Duration::from_secs(5);

/// Consumer callbacks: commit what is finished before partitions are taken away.
pub(crate) struct Ctx {
    state: Arc<Mutex<State>>,
    group: String,
    assigned: Arc<Notify>,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked: Vec<PartitionKey> = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_string(), e.partition()))
                .collect();
            let commits = lock(&self.state).revoke(&revoked);
            if !commits.is_empty() {
                let list = to_list(&commits);
                if let Err(e) = consumer.commit(&list, CommitMode::Sync) {
                    tracing::warn!(group = %self.group, error = %e, "committing before a rebalance failed; those messages will be consumed again");
                }
            }
            tracing::debug!(group = %self.group, partitions = revoked.len(), "partitions revoked");
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        // rust-rdkafka 0.39 does not call this for manual commits (fede1024/rust-rdkafka#856),
        // which is why busway commits synchronously on a task of its own; it is kept for the
        // commits librdkafka itself reports.
        if let Err(e) = result {
            // An asynchronous commit that the broker refused is not done: commit these
            // positions again at the next tick.
            let failed: Vec<(PartitionKey, i64)> = offsets
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    rdkafka::Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
                    _ => None,
                })
                .collect();
            lock(&self.state).commit_failed(&failed);
            tracing::warn!(group = %self.group, error = %e, "an offset commit failed; it is retried at the next tick");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            tracing::debug!(group = %self.group, partitions = tpl.count(), "partitions assigned");
            self.assigned.notify_waiters();
        }
    }
}

fn to_list(commits: &[(PartitionKey, i64)]) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    for ((topic, partition), offset) in commits {
        let _ = list.add_partition_offset(topic, *partition, Offset::Offset(*offset));
    }
    list
}

fn one_partition(pk: &PartitionKey) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    list.add_partition(&pk.0, pk.1);
    list
}

/// One endpoint's consumer, shared by its receiver and the settlements it hands out.
pub(crate) struct Shared {
    consumer: StreamConsumer<Ctx>,
    state: Arc<Mutex<State>>,
    ready: Notify,
    /// Wakes the pump when a full partition has room again.
    room: Notify,
    /// Wakes the committer: a position may have moved, or the commit interval passed.
    commit_due: Notify,
    pub(crate) client: Arc<Client>,
    pub(crate) group: String,
    window: usize,
    stop: CancellationToken,
    /// Records without `MT-MessageType` are taken as this type (the endpoint's only one).
    default_type: Option<String>,
    /// Deliveries handed out and not settled, at most (the endpoint's prefetch).
    prefetch: usize,
}

impl Shared {
    /// Commits `commits` now; a failure marks them not committed (they go in the next
    /// commit). Returns whether the broker took them.
    fn commit(&self, commits: &[(PartitionKey, i64)], mode: CommitMode) -> bool {
        if commits.is_empty() {
            return true;
        }
        if let Err(e) = self.consumer.commit(&to_list(commits), mode) {
            lock(&self.state).commit_failed(commits);
            tracing::warn!(group = %self.group, error = %e, "offset commit failed; it is retried with the next one");
            return false;
        }
        true
    }

    pub(crate) fn finish(&self, record: &RecordRef) {
        let every = self.client.config.commit_every;
        let finished = lock(&self.state).finish(record, self.window, every);
        if finished.room {
            self.room.notify_one();
        }
        let resume = finished.resume;
        self.ready.notify_one();
        if finished.commit_due {
            self.commit_due.notify_one();
        }
        if let Some(pk) = resume {
            match self.consumer.resume(&one_partition(&pk)) {
                Ok(()) => {
                    tracing::debug!(group = %self.group, topic = %pk.0, partition = pk.1, "partition resumed")
                }
                Err(e) => {
                    tracing::warn!(group = %self.group, error = %e, "could not resume a partition")
                }
            }
        }
    }

    /// Stops handing out records (the endpoint's `next` ends), for `DeadLetterFailure::StopAfter`.
    pub(crate) fn halt(&self) {
        lock(&self.state).stopped = true;
        self.ready.notify_waiters();
    }

    pub(crate) fn requeue(&self, record: Record) {
        let mut state = lock(&self.state);
        state.handed_out = state.handed_out.saturating_sub(1);
        let alive = state
            .parts
            .get(&(record.topic.clone(), record.partition))
            .is_some_and(|p| p.generation == record.generation);
        if alive {
            state.ready.push_front(Record {
                redelivered: true,
                ..record
            });
            drop(state);
            self.ready.notify_one();
        }
    }
}

/// Starts consuming `topics` as consumer group `group`.
pub(crate) async fn start(
    client: Arc<Client>,
    group: &str,
    topics: &[String],
    window: usize,
    prefetch: usize,
    default_type: Option<String>,
) -> Result<KafkaReceiver> {
    for t in topics {
        client.ensure_topic(t).await?;
    }
    let mut config = Client::base_config(&client.config);
    config.set("group.id", group);
    for (k, v) in [
        ("auto.offset.reset", "earliest"),
        ("session.timeout.ms", "10000"),
        ("heartbeat.interval.ms", "2000"),
        ("enable.partition.eof", "false"),
        // A partition resumed after its in-flight window emptied is only fetched again when
        // the broker answers the fetch already waiting for the other partitions; with
        // librdkafka's 500 ms default every pause costs up to half a second (measured: a
        // backlog drained at 5,200 msg/s with 500 ms, 53,600 msg/s with 20 ms, on tansu).
        ("fetch.wait.max.ms", "50"),
    ] {
        if !client.config.properties.contains_key(k)
            && !client.config.consumer_properties.contains_key(k)
        {
            config.set(k, v);
        }
    }
    for (k, v) in &client.config.consumer_properties {
        config.set(k, v);
    }
    config.set("enable.auto.commit", "false");
    config.set("enable.auto.offset.store", "false");
    let state = Arc::new(Mutex::new(State::default()));
    let assigned = Arc::new(Notify::new());
    let consumer: StreamConsumer<Ctx> = config
        .create_with_context(Ctx {
            state: state.clone(),
            group: group.to_string(),
            assigned: assigned.clone(),
        })
        .map_err(|e| {
            Error::with_source(
                ErrorKind::Config,
                "the Kafka consumer configuration is not valid",
                e,
            )
        })?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names).map_err(|e| {
        kafka_error(
            format!("subscribing group `{group}` to {topics:?} failed"),
            e,
        )
    })?;
    let shared = Arc::new(Shared {
        consumer,
        state,
        ready: Notify::new(),
        room: Notify::new(),
        commit_due: Notify::new(),
        client,
        group: group.to_string(),
        window: window.max(1),
        stop: CancellationToken::new(),
        default_type,
        prefetch: prefetch.max(1),
    });
    // Join the group before returning, so messages sent right after `start` are consumed by
    // a settled group (a member that joins later takes partitions away mid-stream).
    let joined = assigned.notified();
    tokio::pin!(joined);
    joined.as_mut().enable();
    let pump = tokio::spawn(pump(shared.clone()));
    let committer = tokio::spawn(committer(shared.clone()));
    if tokio::time::timeout(Duration::from_secs(30), joined)
        .await
        .is_err()
    {
        tracing::warn!(group = %group, "no partitions were assigned within 30 s; consuming will start when they are");
    }
    Ok(KafkaReceiver {
        shared,
        pump: Some(pump),
        committer: Some(committer),
    })
}

async fn pump(shared: Arc<Shared>) {
    let config = &shared.client.config;
    let mut tick = tokio::time::interval(config.commit_interval);
    let mut failures = 0u32;
    let mut full = false;
    loop {
        if full {
            full = wait_for_room(&shared, &mut tick).await;
            if shared.stop.is_cancelled() {
                break;
            }
            continue;
        }
        tokio::select! {
            _ = shared.stop.cancelled() => break,
            _ = tick.tick() => shared.commit_due.notify_one(),
            received = shared.consumer.recv() => match received {
                Ok(m) => {
                    failures = 0;
                    let mut message = from_record(&m);
                    if let Some(t) = &shared.default_type {
                        message.headers.insert_if_absent(names::MESSAGE_TYPE, t.as_str());
                    }
                    let record = Record {
                        topic: m.topic().to_string(),
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                        message,
                        redelivered: false,
                        generation: 0,
                    };
                    drop(m);
                    full = lock(&shared.state).file(record, shared.window);
                    shared.ready.notify_one();
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(50) {
                        tracing::warn!(group = %shared.group, error = %e, "Kafka consume error");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Commits what is due, one commit at a time: positions that move while a commit waits for
/// the broker go in the next one, so commits never queue up behind a slow coordinator, and
/// the result of each is known (rust-rdkafka does not report asynchronous commits, #856). A
/// commit runs synchronously on a blocking thread; a failed one is retried with back-off.
async fn committer(shared: Arc<Shared>) {
    let config = &shared.client.config;
    let mut failures = Backoff::new(COMMIT_RETRY_MIN, COMMIT_RETRY_MAX);
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => break,
            _ = shared.commit_due.notified() => {}
        }
        let commits =
            lock(&shared.state).due_commits(config.commit_every, config.commit_interval, false);
        if commits.is_empty() {
            continue;
        }
        let s = shared.clone();
        let done = tokio::task::spawn_blocking(move || s.commit(&commits, CommitMode::Sync))
            .await
            .unwrap_or(false);
        if done {
            failures.reset();
        } else {
            if !failures.wait(&shared.stop).await {
                break;
            }
            shared.commit_due.notify_one();
        }
    }
}

/// Waits, without polling, while a partition's in-flight window is full; wakes the committer on the tick
/// meanwhile. After [`PAUSE_AFTER`] with no room the full partitions are paused so polling
/// can go on. Returns whether a window is still full.
async fn wait_for_room(shared: &Shared, tick: &mut tokio::time::Interval) -> bool {
    let deadline = tokio::time::sleep(PAUSE_AFTER);
    tokio::pin!(deadline);
    loop {
        let room = shared.room.notified();
        tokio::pin!(room);
        room.as_mut().enable();
        if !lock(&shared.state).any_full(shared.window) {
            return false;
        }
        tokio::select! {
            _ = shared.stop.cancelled() => return false,
            _ = &mut room => {}
            _ = tick.tick() => shared.commit_due.notify_one(),
            _ = &mut deadline => {
                let paused = lock(&shared.state).pause_full(shared.window);
                for pk in paused {
                    match shared.consumer.pause(&one_partition(&pk)) {
                        Ok(()) => tracing::debug!(group = %shared.group, topic = %pk.0, partition = pk.1, "partition paused: its in-flight window stayed full"),
                        Err(e) => tracing::warn!(group = %shared.group, error = %e, "could not pause a full partition"),
                    }
                }
                return false;
            }
        }
    }
}

/// The receiver the bus drives for one endpoint.
pub(crate) struct KafkaReceiver {
    shared: Arc<Shared>,
    pump: Option<tokio::task::JoinHandle<()>>,
    committer: Option<tokio::task::JoinHandle<()>>,
}

#[async_trait]
impl Receiver for KafkaReceiver {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            let notified = self.shared.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = lock(&self.shared.state);
                if state.stopped {
                    return None;
                }
                let room = state.handed_out < self.shared.prefetch;
                if let Some(record) = if room { state.ready.pop_front() } else { None } {
                    state.handed_out += 1;
                    drop(state);
                    let message = record.message.clone();
                    let redelivered = record.redelivered;
                    let settlement = Box::new(KafkaSettlement::new(self.shared.clone(), record));
                    let mut delivery = Delivery::new(message, settlement);
                    delivery.redelivered = redelivered;
                    return Some(Ok(delivery));
                }
                tracing::trace!(
                    group = %self.shared.group,
                    ready = state.ready.len(),
                    handed_out = state.handed_out,
                    lanes = state.lanes.len(),
                    "waiting for records"
                );
            }
            notified.await;
        }
    }

    async fn stop(&mut self) -> Result<()> {
        lock(&self.shared.state).stopped = true;
        self.shared.stop.cancel();
        self.shared.ready.notify_waiters();
        if let Some(pump) = self.pump.take() {
            let _ = pump.await;
        }
        // The committer's last commit ends before `close` commits the final positions, so
        // an older position never lands after a newer one.
        if let Some(committer) = self.committer.take() {
            let _ = committer.await;
        }
        Ok(())
    }

    async fn close(&mut self) -> Result<()> {
        let commits = lock(&self.shared.state).due_commits(0, Duration::ZERO, true);
        if !commits.is_empty() {
            let shared = self.shared.clone();
            let _ = tokio::task::spawn_blocking(move || shared.commit(&commits, CommitMode::Sync))
                .await;
        }
        self.shared.consumer.unsubscribe();
        Ok(())
    }
}
