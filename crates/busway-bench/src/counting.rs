//! A counting global allocator cheap enough to leave on while throughput is measured.
//!
//! Each thread adds to its own cache-line-sized counter (threads share the 32 counters
//! round-robin), so counting costs one uncontended relaxed add per allocation instead of
//! several contended read-modify-writes on shared counters. Frees are not counted.
//!
//! This is the only `unsafe` code in the workspace: implementing `GlobalAlloc` needs it.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

const SHARDS: usize = 32;

#[repr(align(128))]
struct Shard(AtomicU64);

static COUNTS: [Shard; SHARDS] = [const { Shard(AtomicU64::new(0)) }; SHARDS];
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    // Const-initialised and without a destructor, so it is safe to touch from the allocator.
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn count() {
    let shard = SHARD
        .try_with(|s| {
            let mut i = s.get();
            if i == usize::MAX {
                i = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
                s.set(i);
            }
            i
        })
        .unwrap_or(0);
    COUNTS[shard].0.fetch_add(1, Ordering::Relaxed);
}

/// The system allocator, counting allocations.
#[derive(Debug)]
pub(crate) struct Counting;

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; counting
// touches only atomics and a const thread-local, and never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which `System` shares.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` through this allocator with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; growing a block is not counted as a new allocation.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Allocations made by the whole process so far.
pub(crate) fn allocations() -> u64 {
    COUNTS.iter().map(|c| c.0.load(Ordering::Relaxed)).sum()
}
