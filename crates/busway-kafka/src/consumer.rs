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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use busway_core::headers::names;
use busway_core::transport::{Backoff, Delivery, MoveError, MoveKind, Receiver, Settlement};
use busway_core::{Error, ErrorKind, Result, TransportMessage};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::client::{Client, from_record, kafka_error};
use crate::config::DeadLetterFailure;

type PartitionKey = (String, i32);

/// How long the pump waits for room in a full partition before pausing it.
const PAUSE_AFTER: Duration = Duration::from_secs(5);

/// The first pause after a failed commit; it doubles up to [`COMMIT_RETRY_MAX`].
const COMMIT_RETRY_MIN: Duration = Duration::from_millis(100);
const COMMIT_RETRY_MAX: Duration = Duration::from_secs(5);

struct Part {
    /// Offsets handed out and not yet committed past: offset → finished.
    offsets: BTreeMap<i64, bool>,
    /// Where the next commit would put the group (lowest unfinished, or one past the last).
    position: Option<i64>,
    /// The last position committed.
    committed: Option<i64>,
    last_commit: Instant,
    paused: bool,
    generation: u64,
    /// The highest offset received in this assignment of the partition.
    last_received: Option<i64>,
}

impl Part {
    /// Not paused, with its in-flight window full.
    fn stalls_at(&self, window: usize) -> bool {
        !self.paused && self.offsets.len() >= window
    }
}

struct Lane {
    partition: PartitionKey,
    /// The assignment of the partition this lane belongs to: a record of an earlier
    /// assignment (revoked, then assigned again) must not release it.
    generation: u64,
    waiting: VecDeque<Record>,
}

struct Record {
    topic: String,
    partition: i32,
    offset: i64,
    key: Option<String>,
    message: TransportMessage,
    redelivered: bool,
    generation: u64,
}

#[derive(Default)]
struct State {
    parts: HashMap<PartitionKey, Part>,
    lanes: HashMap<(String, String), Lane>,
    ready: VecDeque<Record>,
    generation: u64,
    stopped: bool,
    handed_out: usize,
}

/// What finishing a record asks of the caller.
#[derive(Debug, Default)]
struct Finished {
    /// A full partition has room again: wake the pump.
    room: bool,
    /// A paused partition is down to half its window: resume it.
    resume: Option<PartitionKey>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl State {
    /// Files a received record; returns whether its partition's window is now full.
    fn file(&mut self, record: Record, window: usize) -> bool {
        let pk = (record.topic.clone(), record.partition);
        let generation = {
            self.generation += 1;
            self.generation
        };
        let part = self.parts.entry(pk.clone()).or_insert_with(|| Part {
            offsets: BTreeMap::new(),
            position: None,
            committed: None,
            last_commit: Instant::now(),
            paused: false,
            generation,
            last_received: None,
        });
        // Offsets of a plain topic are contiguous; a jump means records this consumer never
        // saw (transaction markers and compaction make legitimate gaps too). The commit
        // position follows what was received, so such records are not consumed again.
        if let Some(last) = part.last_received
            && record.offset > last + 1
        {
            tracing::debug!(
                topic = %pk.0,
                partition = pk.1,
                after = last,
                next = record.offset,
                "offset gap: records between were not received"
            );
        }
        part.last_received = Some(
            part.last_received
                .map_or(record.offset, |l| l.max(record.offset)),
        );
        let record = Record {
            generation: part.generation,
            ..record
        };
        part.offsets.insert(record.offset, false);
        let full = part.offsets.len() >= window && !part.paused;
        match record.key.clone() {
            None => self.ready.push_back(record),
            Some(key) => {
                let lane_key = (record.topic.clone(), key);
                match self.lanes.get_mut(&lane_key) {
                    Some(lane) => lane.waiting.push_back(record),
                    None => {
                        self.lanes.insert(
                            lane_key,
                            Lane {
                                partition: pk.clone(),
                                generation: record.generation,
                                waiting: VecDeque::new(),
                            },
                        );
                        self.ready.push_back(record);
                    }
                }
            }
        }
        full
    }

    /// Whether a partition that is not paused has a full in-flight window.
    fn any_full(&self, window: usize) -> bool {
        self.parts.values().any(|p| p.stalls_at(window))
    }

    /// Marks every full partition that is not paused as paused, and returns them.
    fn pause_full(&mut self, window: usize) -> Vec<PartitionKey> {
        let mut paused = Vec::new();
        for (pk, p) in self.parts.iter_mut() {
            if p.stalls_at(window) {
                p.paused = true;
                paused.push(pk.clone());
            }
        }
        paused
    }

    /// Drops what belongs to revoked partitions; returns their commit positions.
    fn revoke(&mut self, revoked: &[PartitionKey]) -> Vec<(PartitionKey, i64)> {
        let mut commits = Vec::new();
        for pk in revoked {
            if let Some(part) = self.parts.remove(pk)
                && let Some(position) = part.position.filter(|p| Some(*p) != part.committed)
            {
                commits.push((pk.clone(), position));
            }
        }
        self.ready
            .retain(|r| !revoked.contains(&(r.topic.clone(), r.partition)));
        self.lanes
            .retain(|_, lane| !revoked.contains(&lane.partition));
        commits
    }

    /// Marks a handed-out record finished: its partition's commit position moves past every
    /// finished offset at the front, and its key's lane lets the next record go. Says what
    /// the caller must do next (wake the pump, resume a paused partition).
    fn finish(&mut self, record: &RecordRef, window: usize) -> Finished {
        self.handed_out = self.handed_out.saturating_sub(1);
        let pk = (record.topic.clone(), record.partition);
        let mut finished = Finished::default();
        if let Some(part) = self
            .parts
            .get_mut(&pk)
            .filter(|p| p.generation == record.generation)
        {
            if let Some(done) = part.offsets.get_mut(&record.offset) {
                *done = true;
            }
            let was_full = part.offsets.len() >= window;
            while let Some((&offset, &done)) = part.offsets.iter().next() {
                if !done {
                    break;
                }
                part.offsets.remove(&offset);
                part.position = Some(offset + 1);
            }
            finished.room = was_full && part.offsets.len() < window;
            if part.paused && part.offsets.len() <= window / 2 {
                part.paused = false;
                finished.resume = Some(pk);
            }
        }
        self.release_lane(record);
        finished
    }

    /// Releases `record`'s key lane: the next record of the key becomes ready (returns
    /// true), or the lane ends. A record of an earlier assignment of its partition leaves
    /// the lane alone: after a rebalance the lane belongs to the new assignment's records,
    /// and releasing it would run two records of one key at once.
    fn release_lane(&mut self, record: &RecordRef) -> bool {
        let Some(key) = &record.key else {
            return false;
        };
        let lane_key = (record.topic.clone(), key.clone());
        let Some(lane) = self
            .lanes
            .get_mut(&lane_key)
            .filter(|l| l.generation == record.generation)
        else {
            return false;
        };
        match lane.waiting.pop_front() {
            Some(next) => {
                self.ready.push_back(next);
                true
            }
            None => {
                self.lanes.remove(&lane_key);
                false
            }
        }
    }

    /// Forgets that these positions were committed (the commit failed), so the next due
    /// check or revoke commits them again.
    fn commit_failed(&mut self, commits: &[(PartitionKey, i64)]) {
        for (pk, position) in commits {
            if let Some(part) = self.parts.get_mut(pk)
                && part.committed == Some(*position)
            {
                part.committed = None;
            }
        }
    }

    /// Positions that moved since their last commit (all, or only those due).
    fn due_commits(
        &mut self,
        every: i64,
        interval: Duration,
        force: bool,
    ) -> Vec<(PartitionKey, i64)> {
        let mut out = Vec::new();
        for (pk, part) in self.parts.iter_mut() {
            let Some(position) = part.position else {
                continue;
            };
            if part.committed == Some(position) {
                continue;
            }
            let moved = position - part.committed.unwrap_or(position - every.max(1));
            if force || moved >= every || part.last_commit.elapsed() >= interval {
                part.committed = Some(position);
                part.last_commit = Instant::now();
                out.push((pk.clone(), position));
            }
        }
        out
    }
}

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
    client: Arc<Client>,
    group: String,
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

    fn finish(&self, record: &RecordRef) {
        let finished = lock(&self.state).finish(record, self.window);
        if finished.room {
            self.room.notify_one();
        }
        let resume = finished.resume;
        self.ready.notify_one();
        self.commit_due.notify_one();
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
    fn halt(&self) {
        lock(&self.state).stopped = true;
        self.ready.notify_waiters();
    }

    fn requeue(&self, record: Record) {
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
                    return Some(Ok(Delivery {
                        message,
                        redelivered,
                        delivery_count: None,
                        lost: None,
                        settlement: Box::new(KafkaSettlement {
                            shared: self.shared.clone(),
                            record: Some(record),
                            move_failures: 0,
                        }),
                    }));
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

/// What a settlement needs to know about its record after handing the message out.
struct RecordRef {
    topic: String,
    partition: i32,
    offset: i64,
    key: Option<String>,
    generation: u64,
}

impl From<&Record> for RecordRef {
    fn from(r: &Record) -> Self {
        Self {
            topic: r.topic.clone(),
            partition: r.partition,
            offset: r.offset,
            key: r.key.clone(),
            generation: r.generation,
        }
    }
}

struct KafkaSettlement {
    shared: Arc<Shared>,
    record: Option<Record>,
    /// Failed writes of this record's dead-letter or skipped copy.
    move_failures: u32,
}

impl KafkaSettlement {
    fn complete(&mut self) {
        if let Some(record) = self.record.take() {
            self.shared.finish(&RecordRef::from(&record));
        }
    }
}

#[async_trait]
impl Settlement for KafkaSettlement {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.complete();
        Ok(())
    }

    async fn requeue(mut self: Box<Self>) -> Result<()> {
        if let Some(record) = self.record.take() {
            self.shared.requeue(record);
        }
        Ok(())
    }

    async fn move_to(
        mut self: Box<Self>,
        kind: MoveKind,
        mut message: TransportMessage,
    ) -> std::result::Result<(), MoveError> {
        let Some(record) = self.record.as_ref() else {
            return Ok(());
        };
        let config = &self.shared.client.config;
        let topic = match kind {
            MoveKind::Skipped => config.skipped_topic(&record.topic, &self.shared.group),
            _ => config.dead_letter_topic(&record.topic, &self.shared.group),
        };
        message
            .headers
            .insert("MT-Fault-Topic", record.topic.as_str());
        message
            .headers
            .insert("MT-Fault-Partition", i64::from(record.partition));
        message.headers.insert("MT-Fault-Offset", record.offset);
        if message.partition_key.is_none() {
            message.partition_key = record.key.clone();
        }
        if message.content_type.is_none() {
            message.content_type = record.message.content_type.clone();
        }
        message.headers.remove(names::CONTENT_TYPE);
        if let Err(err) = self.shared.client.produce(&topic, &message).await {
            self.move_failures = self.move_failures.saturating_add(1);
            if let DeadLetterFailure::SkipAfter(limit) = config.dead_letter_failure
                && self.move_failures >= limit
            {
                tracing::error!(
                    group = %self.shared.group,
                    topic = %record.topic,
                    partition = record.partition,
                    offset = record.offset,
                    key = ?record.key,
                    dead_letter_topic = %topic,
                    failures = self.move_failures,
                    error = %err,
                    "MESSAGE LOST: its dead-letter copy could not be written; skipping it as configured (DeadLetterFailure::SkipAfter)"
                );
                self.complete();
                return Ok(());
            }
            if let DeadLetterFailure::StopAfter(limit) = config.dead_letter_failure
                && self.move_failures >= limit
            {
                tracing::error!(
                    group = %self.shared.group,
                    topic = %record.topic,
                    partition = record.partition,
                    offset = record.offset,
                    key = ?record.key,
                    dead_letter_topic = %topic,
                    failures = self.move_failures,
                    error = %err,
                    "ENDPOINT STOPPED: a dead-letter copy could not be written (DeadLetterFailure::StopAfter); the record is not committed and runs again when the endpoint starts again"
                );
                self.shared.halt();
                // Dropping the settlement hands the record back unfinished.
                return Err(MoveError::from(err));
            }
            // The record stays unfinished (its offset is not committed): the bus backs off
            // and writes the dead-letter copy again.
            return Err(MoveError::retry(err, self));
        }
        self.complete();
        Ok(())
    }

    async fn redeliver(
        self: Box<Self>,
        _message: TransportMessage,
        _delay: std::time::Duration,
    ) -> Result<()> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "Kafka has no delayed delivery; use in-process retry",
        ))
    }
}

impl Drop for KafkaSettlement {
    fn drop(&mut self) {
        if let Some(record) = self.record.take() {
            self.shared.requeue(record);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(offset: i64, key: &str) -> Record {
        Record {
            topic: "t".into(),
            partition: 0,
            offset,
            key: Some(key.into()),
            message: TransportMessage::default(),
            redelivered: false,
            generation: 0,
        }
    }

    fn take_ready(state: &mut State) -> Record {
        state.ready.pop_front().expect("a ready record")
    }

    /// Issue 12.13: after a rebalance (revoke, then the same partition assigned again), a
    /// record still in flight from the old assignment must not release the new assignment's
    /// lane for its key: two records of one key would then run at once.
    #[test]
    fn an_old_assignments_record_does_not_release_the_new_lane() {
        let mut state = State::default();
        state.file(record(0, "k"), 100);
        let old = take_ready(&mut state);
        state.revoke(&[("t".into(), 0)]);
        // Assigned again: offset 0 comes back (not committed), then offset 1, same key.
        state.file(record(0, "k"), 100);
        state.file(record(1, "k"), 100);
        let new_first = take_ready(&mut state);
        assert!(
            state.ready.is_empty(),
            "offset 1 waits behind offset 0 in its lane"
        );
        assert!(!state.release_lane(&RecordRef::from(&old)));
        assert!(state.ready.is_empty(), "the old record released nothing");
        assert!(state.release_lane(&RecordRef::from(&new_first)));
        assert_eq!(take_ready(&mut state).offset, 1);
    }

    /// Issue 12.13: a commit that failed is not recorded as done; the next due check offers
    /// the same position again.
    #[test]
    fn a_failed_commit_is_offered_again() {
        let mut state = State::default();
        state.file(record(0, "k"), 100);
        let r = take_ready(&mut state);
        let part = state.parts.get_mut(&("t".into(), 0)).expect("part");
        part.offsets.insert(r.offset, true);
        part.offsets.remove(&r.offset);
        part.position = Some(1);
        let due = state.due_commits(1, Duration::from_secs(3600), false);
        assert_eq!(due, vec![(("t".to_string(), 0), 1)]);
        assert!(
            state
                .due_commits(1, Duration::from_secs(3600), false)
                .is_empty()
        );
        state.commit_failed(&due);
        assert_eq!(
            state.due_commits(1, Duration::from_secs(3600), false),
            due,
            "offered again after the failure"
        );
        // A revoke commits it too.
        state.commit_failed(&due);
        assert_eq!(state.revoke(&[("t".into(), 0)]), due);
    }
}

/// Property tests of the offset bookkeeping: random interleavings of receiving, handing
/// out, finishing, handing back, revoking and committing, against a model of the broker.
#[cfg(test)]
mod properties {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// The broker delivers the next record of the key's partition (key % 2).
        Receive(u8),
        HandOut,
        Finish(usize),
        HandBack(usize),
        Revoke(i32),
        Commit,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..6u8).prop_map(Op::Receive),
            3 => Just(Op::HandOut),
            3 => any::<usize>().prop_map(Op::Finish),
            1 => any::<usize>().prop_map(Op::HandBack),
            1 => (0..2i32).prop_map(Op::Revoke),
            2 => Just(Op::Commit),
        ]
    }

    fn record(partition: i32, offset: i64, key: u8) -> Record {
        Record {
            topic: "t".into(),
            partition,
            offset,
            key: Some(key.to_string()),
            message: TransportMessage::default(),
            redelivered: false,
            generation: 0,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// No commit (due or at a revoke) ever passes an offset that was not finished, and
        /// no two records of one key of one assignment are in flight at once.
        #[test]
        fn no_commit_passes_an_unfinished_offset(ops in proptest::collection::vec(op(), 1..300)) {
            let window = 6;
            let mut state = State::default();
            // The broker: committed positions, and where the current assignment reads next.
            let mut committed: HashMap<i32, i64> = HashMap::new();
            let mut next: HashMap<i32, i64> = HashMap::new();
            let mut keys: HashMap<(i32, i64), u8> = HashMap::new();
            let mut finished: HashSet<(i32, i64)> = HashSet::new();
            let mut in_flight: Vec<Record> = Vec::new();
            let check = |commits: Vec<(PartitionKey, i64)>,
                             committed: &mut HashMap<i32, i64>,
                             finished: &HashSet<(i32, i64)>|
             -> Result<(), TestCaseError> {
                for ((_, partition), position) in commits {
                    let from = committed.get(&partition).copied().unwrap_or(0);
                    for offset in from.min(position)..position {
                        prop_assert!(
                            finished.contains(&(partition, offset)),
                            "partition {} committed at {} past unfinished offset {}",
                            partition, position, offset
                        );
                    }
                    committed.insert(partition, position);
                }
                Ok(())
            };
            for op in ops {
                match op {
                    Op::Receive(key) => {
                        let partition = i32::from(key % 2);
                        let start = committed.get(&partition).copied().unwrap_or(0);
                        let offset = *next.entry(partition).or_insert(start);
                        // A partition's records keep their keys when read again.
                        let key = *keys.entry((partition, offset)).or_insert(key);
                        let key = if i32::from(key % 2) == partition { key } else { key + 1 };
                        next.insert(partition, offset + 1);
                        state.file(record(partition, offset, key), window);
                    }
                    Op::HandOut => {
                        if let Some(r) = state.ready.pop_front() {
                            state.handed_out += 1;
                            prop_assert!(
                                !in_flight
                                    .iter()
                                    .any(|o| o.key == r.key && o.generation == r.generation),
                                "two records of key {:?} in flight at once", r.key
                            );
                            in_flight.push(r);
                        }
                    }
                    Op::Finish(i) => {
                        if !in_flight.is_empty() {
                            let r = in_flight.remove(i % in_flight.len());
                            finished.insert((r.partition, r.offset));
                            state.finish(&RecordRef::from(&r), window);
                        }
                    }
                    Op::HandBack(i) => {
                        if !in_flight.is_empty() {
                            let r = in_flight.remove(i % in_flight.len());
                            // As `Shared::requeue`: back to the front, if still assigned.
                            state.handed_out = state.handed_out.saturating_sub(1);
                            let alive = state
                                .parts
                                .get(&(r.topic.clone(), r.partition))
                                .is_some_and(|p| p.generation == r.generation);
                            if alive {
                                state.ready.push_front(Record { redelivered: true, ..r });
                            }
                        }
                    }
                    Op::Revoke(partition) => {
                        let commits = state.revoke(&[("t".to_string(), partition)]);
                        check(commits, &mut committed, &finished)?;
                        // Assigned again later: read from the committed position.
                        next.remove(&partition);
                    }
                    Op::Commit => {
                        let commits = state.due_commits(1, Duration::ZERO, false);
                        check(commits, &mut committed, &finished)?;
                    }
                }
            }
            let commits = state.due_commits(0, Duration::ZERO, true);
            check(commits, &mut committed, &finished)?;
        }
    }
}
