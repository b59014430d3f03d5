//! The consumer's bookkeeping, without I/O: per-partition offset windows and commit
//! positions, per-key lanes, the ready queue. The pump, the committer and the settlements
//! in `mod.rs` drive it under one lock; it is tested here on its own, including a property
//! test that no commit ever passes an unfinished offset.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use busway_core::TransportMessage;

pub(crate) type PartitionKey = (String, i32);

pub(crate) struct Part {
    /// Offsets handed out and not yet committed past: offset → finished.
    pub(crate) offsets: BTreeMap<i64, bool>,
    /// Where the next commit would put the group (lowest unfinished, or one past the last).
    pub(crate) position: Option<i64>,
    /// The last position committed.
    pub(crate) committed: Option<i64>,
    pub(crate) last_commit: Instant,
    pub(crate) paused: bool,
    pub(crate) generation: u64,
    /// The highest offset received in this assignment of the partition.
    pub(crate) last_received: Option<i64>,
}

impl Part {
    /// The commit position, if it moved by at least `every` since the last commit.
    pub(crate) fn moved_by(&self, every: i64) -> Option<i64> {
        let position = self.position?;
        if self.committed == Some(position) {
            return None;
        }
        let moved = position - self.committed.unwrap_or(position - every.max(1));
        (moved >= every).then_some(position)
    }

    /// Not paused, with its in-flight window full.
    pub(crate) fn stalls_at(&self, window: usize) -> bool {
        !self.paused && self.offsets.len() >= window
    }
}

pub(crate) struct Lane {
    pub(crate) partition: PartitionKey,
    /// The assignment of the partition this lane belongs to: a record of an earlier
    /// assignment (revoked, then assigned again) must not release it.
    pub(crate) generation: u64,
    pub(crate) waiting: VecDeque<Record>,
}

pub(crate) struct Record {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) key: Option<String>,
    pub(crate) message: TransportMessage,
    pub(crate) redelivered: bool,
    pub(crate) generation: u64,
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) parts: HashMap<PartitionKey, Part>,
    pub(crate) lanes: HashMap<(String, String), Lane>,
    pub(crate) ready: VecDeque<Record>,
    pub(crate) generation: u64,
    pub(crate) stopped: bool,
    pub(crate) handed_out: usize,
}

/// What finishing a record asks of the caller.
#[derive(Debug, Default)]
pub(crate) struct Finished {
    /// A full partition has room again: wake the pump.
    pub(crate) room: bool,
    /// A paused partition is down to half its window: resume it.
    pub(crate) resume: Option<PartitionKey>,
    /// The partition's position moved by `commit_every`: wake the committer (the commit
    /// interval is the pump's tick).
    pub(crate) commit_due: bool,
}

pub(crate) fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl State {
    /// Files a received record; returns whether its partition's window is now full.
    pub(crate) fn file(&mut self, record: Record, window: usize) -> bool {
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
    pub(crate) fn any_full(&self, window: usize) -> bool {
        self.parts.values().any(|p| p.stalls_at(window))
    }

    /// Marks every full partition that is not paused as paused, and returns them.
    pub(crate) fn pause_full(&mut self, window: usize) -> Vec<PartitionKey> {
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
    pub(crate) fn revoke(&mut self, revoked: &[PartitionKey]) -> Vec<(PartitionKey, i64)> {
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
    pub(crate) fn finish(
        &mut self,
        record: &RecordRef,
        window: usize,
        commit_every: i64,
    ) -> Finished {
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
            finished.commit_due = part.moved_by(commit_every).is_some();
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
    pub(crate) fn release_lane(&mut self, record: &RecordRef) -> bool {
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
    pub(crate) fn commit_failed(&mut self, commits: &[(PartitionKey, i64)]) {
        for (pk, position) in commits {
            if let Some(part) = self.parts.get_mut(pk)
                && part.committed == Some(*position)
            {
                part.committed = None;
            }
        }
    }

    /// Positions that moved since their last commit (all, or only those due).
    pub(crate) fn due_commits(
        &mut self,
        every: i64,
        interval: Duration,
        force: bool,
    ) -> Vec<(PartitionKey, i64)> {
        let mut out = Vec::new();
        for (pk, part) in self.parts.iter_mut() {
            let Some(position) = part.position.filter(|p| part.committed != Some(*p)) else {
                continue;
            };
            if force || part.moved_by(every).is_some() || part.last_commit.elapsed() >= interval {
                part.committed = Some(position);
                part.last_commit = Instant::now();
                out.push((pk.clone(), position));
            }
        }
        out
    }
}

/// What a settlement needs to know about its record after handing the message out.
pub(crate) struct RecordRef {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) key: Option<String>,
    pub(crate) generation: u64,
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
                            state.finish(&RecordRef::from(&r), window, 1);
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
