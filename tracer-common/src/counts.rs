//! The kernel's exact counters: every connection attempt and every failure, counted where it is
//! decided, in per-CPU maps, so counts are right at any rate even when events are dropped.

use crate::net::Endpoint;

/// The key of the kernel's `COUNTS` per-CPU hash: proxy × upstream × outcome.
///
/// The proxy is its process name and cgroup rather than its pid, so worker restarts and
/// short-lived clients do not multiply the keys.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CountKey {
    pub comm: [u8; 16],
    pub cgroup_id: u64,
    pub upstream: Endpoint,
    /// An [`crate::Outcome`] code.
    pub outcome: u8,
    pub _pad: [u8; 7],
}

/// The value of `COUNTS`: how many, and the sum of their durations (connect time for
/// `connected`, waited time for failures) in nanoseconds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub count: u64,
    pub sum_ns: u64,
}

/// Size of `COUNTS`. When it is full, new keys are counted per outcome only, in
/// `OVERFLOW_COUNTS`, and [`Stat::CountsOverflowed`] goes up.
pub const COUNTS_MAX_ENTRIES: u32 = 16_384;
/// Size of the live-connection table `CONNS` (an LRU hash keyed by socket).
pub const CONNS_MAX_ENTRIES: u32 = 65_536;
/// Size of the in-flight connect() table `CONNECTS` (keyed by thread).
pub const CONNECTS_MAX_ENTRIES: u32 = 16_384;
/// Size of the failure-event ring buffer in bytes.
pub const EVENTS_RING_BYTES: u32 = 1 << 20;
/// Entries of `OVERFLOW_COUNTS`, indexed by outcome code.
pub const OVERFLOW_SLOTS: u32 = 16;

/// The agent's own health counters, indices of the kernel's `STATS` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Failure events written to the ring buffer.
    EventsSent = 0,
    /// Failure events lost because the ring buffer was full (the counts still have them).
    EventsLost = 1,
    /// Outbound connections taken into `CONNS`.
    ConnsTracked = 2,
    /// Connections that could not be tracked (`CONNS` insert failed).
    ConnsUntracked = 3,
    /// Counts folded into `OVERFLOW_COUNTS` because `COUNTS` was full.
    CountsOverflowed = 4,
    /// connect() calls that could not be followed (`CONNECTS` insert failed).
    ConnectsUntracked = 5,
}

impl Stat {
    pub const COUNT: u32 = 8;
    pub const ALL: [Stat; 6] = [
        Stat::EventsSent,
        Stat::EventsLost,
        Stat::ConnsTracked,
        Stat::ConnsUntracked,
        Stat::CountsOverflowed,
        Stat::ConnectsUntracked,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Stat::EventsSent => "events_sent",
            Stat::EventsLost => "events_lost",
            Stat::ConnsTracked => "connections_tracked",
            Stat::ConnsUntracked => "connections_untracked",
            Stat::CountsOverflowed => "counts_overflowed",
            Stat::ConnectsUntracked => "connects_untracked",
        }
    }
}
