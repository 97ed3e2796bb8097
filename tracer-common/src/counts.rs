//! The kernel's exact counters: every connection attempt and every failure, counted where it is
//! decided, in per-CPU maps, so counts are right at any rate even when events are dropped.

use crate::net::Endpoint;

/// Who connects to what: the proxy (its process name and cgroup, not its pid, so worker
/// restarts and short-lived clients do not multiply the keys) and the upstream.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteKey {
    pub comm: [u8; 16],
    pub cgroup_id: u64,
    pub upstream: Endpoint,
}

/// The key of the kernel's `COUNTS` per-CPU hash: route × outcome, and for `connected`, the
/// connect time's bucket too: one count per connection is both the total and the histogram.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CountKey {
    pub route: RouteKey,
    /// An [`crate::Outcome`] code.
    pub outcome: u8,
    /// For [`crate::Outcome::Connected`]: an index into [`CONNECT_BUCKETS_NS`]
    /// (`CONNECT_BUCKETS_NS.len()` for slower ones); for
    /// [`crate::Outcome::TlsHandshakeFailed`], a [`crate::peek::TlsReason`]; 0 for every other
    /// outcome.
    pub bucket: u8,
    pub _pad: [u8; 6],
}

/// Upper bounds of the connect-latency buckets, in nanoseconds (100 µs … 5 s).
pub const CONNECT_BUCKETS_NS: [u64; 15] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
];

/// The bucket a connect time falls in: the first whose bound it does not exceed.
pub fn connect_bucket(ns: u64) -> u8 {
    let mut bucket = 0;
    while bucket < CONNECT_BUCKETS_NS.len() && ns > CONNECT_BUCKETS_NS[bucket] {
        bucket += 1;
    }
    bucket as u8
}

/// The value of `COUNTS` (one per CPU): how many, and the sum of their durations (connect time
/// for `connected`, waited time for failures) in nanoseconds; and this CPU's event budget for
/// the key: events sent in the current one-second window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub count: u64,
    pub sum_ns: u64,
    pub window_start_ns: u64,
    pub window_events: u64,
}

impl Tally {
    /// Counts one more of this key (exactly), and says whether an event may go to user space
    /// for it: at most `per_second` per key and CPU (0: no limit). Counts never depend on it.
    pub fn add(&mut self, ns: u64, now_ns: u64, per_second: u32) -> bool {
        self.count += 1;
        self.sum_ns += ns;
        if per_second == 0 {
            return true;
        }
        if now_ns.wrapping_sub(self.window_start_ns) >= 1_000_000_000 {
            self.window_start_ns = now_ns;
            self.window_events = 0;
        }
        if self.window_events < u64::from(per_second) {
            self.window_events += 1;
            true
        } else {
            false
        }
    }
}

/// Size of `COUNTS` (a route's connects take a few connect-time buckets; idle entries are
/// retired by the agent). When it is full, new keys are counted per outcome only, in
/// `OVERFLOW_COUNTS`, and [`Stat::CountsOverflowed`] goes up. (32,768 raised the agent's peak
/// memory past 30 MB when every entry is in use: it reads them all at each scrape.)
pub const COUNTS_MAX_ENTRIES: u32 = 16_384;
/// Size of the live-connection table `CONNS` (an LRU hash keyed by socket).
pub const CONNS_MAX_ENTRIES: u32 = 65_536;
/// Size of the in-flight connect() table `CONNECTS` (keyed by thread).
pub const CONNECTS_MAX_ENTRIES: u32 = 16_384;
/// Size of the failure-event ring buffer in bytes.
pub const EVENTS_RING_BYTES: u32 = 1 << 20;
/// Size of the lifecycle ring buffer (listeners, OOM kills, exits) in bytes.
pub const LIFECYCLE_RING_BYTES: u32 = 1 << 16;
/// Size of `LISTENER_OWNERS` (processes that own listeners, whose exits are reported).
pub const LISTENER_OWNERS_MAX_ENTRIES: u32 = 16_384;
/// Size of `SIGNALLED` (the last ending signal sent to each process; an LRU hash).
pub const SIGNALLED_MAX_ENTRIES: u32 = 4_096;
/// Size of `UNIX_PATHS` (Unix socket path key → path; an LRU hash).
pub const UNIX_PATHS_MAX_ENTRIES: u32 = 4_096;
/// Entries of `PEEKS`: connections whose first bytes are still awaited, by process and fd.
pub const PEEKS_MAX_ENTRIES: u32 = 16_384;
/// Entries of `DEFERRED`: closed connections whose verdict waits for the proxy's read.
pub const DEFERRED_MAX_ENTRIES: u32 = 4_096;
/// Entries of `PEEK_READS`: reads under way on such connections, by thread.
pub const PEEK_READS_MAX_ENTRIES: u32 = 4_096;
/// Words of `PEEK_TGIDS`, a bitmap of the processes that connected out: one bit for each of
/// the 2^22 process ids Linux can hand out (`pid_max` at most 4,194,304), 512 KiB.
pub const PEEK_TGID_WORDS: u32 = 65_536;
/// Entries of `OVERFLOW_COUNTS`, indexed by outcome code.
pub const OVERFLOW_SLOTS: u32 = 32;

/// tracer's kernel programs that can stop before finishing (a read from the kernel or from the
/// calling process failed): indices of the kernel's `PROGRAM_ERRORS` per-CPU array. The other
/// programs cannot fail.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    InetSockSetState = 0,
    TcpProbe = 1,
    SysEnterConnect = 2,
    SysExitConnect = 3,
    SysEnterBind = 4,
    SysExitSocket = 5,
    SysExitAccept4 = 6,
    SysExitAccept = 7,
    SchedProcessExit = 8,
    MarkVictim = 9,
    SignalGenerate = 10,
    PeekSend = 11,
    PeekReceive = 12,
    PeekReceived = 13,
}

impl Program {
    pub const COUNT: u32 = 14;
    pub const ALL: [Program; 14] = [
        Program::InetSockSetState,
        Program::TcpProbe,
        Program::SysEnterConnect,
        Program::SysExitConnect,
        Program::SysEnterBind,
        Program::SysExitSocket,
        Program::SysExitAccept4,
        Program::SysExitAccept,
        Program::SchedProcessExit,
        Program::MarkVictim,
        Program::SignalGenerate,
        Program::PeekSend,
        Program::PeekReceive,
        Program::PeekReceived,
    ];

    /// The program's name (its tracepoint's), as `tracer check` and the metrics show it.
    pub const fn name(self) -> &'static str {
        match self {
            Program::InetSockSetState => "inet_sock_set_state",
            Program::TcpProbe => "tcp_probe",
            Program::SysEnterConnect => "sys_enter_connect",
            Program::SysExitConnect => "sys_exit_connect",
            Program::SysEnterBind => "sys_enter_bind",
            Program::SysExitSocket => "sys_exit_socket",
            Program::SysExitAccept4 => "sys_exit_accept4",
            Program::SysExitAccept => "sys_exit_accept",
            Program::SchedProcessExit => "sched_process_exit",
            Program::MarkVictim => "mark_victim",
            Program::SignalGenerate => "signal_generate",
            Program::PeekSend => "sys_enter_write",
            Program::PeekReceive => "sys_enter_read",
            Program::PeekReceived => "sys_exit_read",
        }
    }
}

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
    /// Tracked connections that reached TCP_CLOSE (tracked − closed − stale − live = evicted).
    ConnsClosed = 6,
    /// Lifecycle records (listeners, OOM kills, exits) lost because their ring buffer was full.
    LifecycleLost = 7,
    /// Failure events not sent because their key was over its events-per-second budget (they
    /// are counted all the same).
    EventsSampledOut = 8,
    /// Server-side ends (a local upstream closed before answering, or its process was dying)
    /// written to the event ring buffer.
    ServerEndsSent = 9,
    /// Server-side ends not sent: over the events-per-second budget, or the ring buffer full.
    ServerEndsDropped = 10,
    /// Connections whose first bytes the kernel watched (TLS failures), and those it could not
    /// (`PEEKS` insert failed).
    FirstBytesWatched = 11,
    FirstBytesUnwatched = 12,
    /// Records dropped because their socket's close went unseen (the kernel skipped the
    /// program) and another socket had taken its address (`ConnTrack::follows`).
    ConnsStale = 13,
}

impl Stat {
    pub const COUNT: u32 = 14;
    pub const ALL: [Stat; 14] = [
        Stat::EventsSent,
        Stat::EventsLost,
        Stat::ConnsTracked,
        Stat::ConnsUntracked,
        Stat::CountsOverflowed,
        Stat::ConnectsUntracked,
        Stat::ConnsClosed,
        Stat::LifecycleLost,
        Stat::EventsSampledOut,
        Stat::ServerEndsSent,
        Stat::ServerEndsDropped,
        Stat::FirstBytesWatched,
        Stat::FirstBytesUnwatched,
        Stat::ConnsStale,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Stat::EventsSent => "events_sent",
            Stat::EventsLost => "events_lost",
            Stat::ConnsTracked => "connections_tracked",
            Stat::ConnsUntracked => "connections_untracked",
            Stat::CountsOverflowed => "counts_overflowed",
            Stat::ConnectsUntracked => "connects_untracked",
            Stat::ConnsClosed => "connections_closed",
            Stat::LifecycleLost => "lifecycle_lost",
            Stat::EventsSampledOut => "events_sampled_out",
            Stat::ServerEndsSent => "server_ends_sent",
            Stat::ServerEndsDropped => "server_ends_dropped",
            Stat::FirstBytesWatched => "first_bytes_watched",
            Stat::FirstBytesUnwatched => "first_bytes_unwatched",
            Stat::ConnsStale => "connections_stale",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_exact_and_events_are_limited_per_second() {
        let mut tally = Tally::default();
        let sent = (0..5)
            .filter(|i| tally.add(10, 1_000_000_000 + i * 1_000, 3))
            .count();
        assert_eq!((tally.count, tally.sum_ns, sent), (5, 50, 3));
        // A new second: a new budget.
        assert!(tally.add(10, 2_000_000_001, 3));
        assert_eq!(tally.count, 6);
        // No limit.
        let mut free = Tally::default();
        assert!((0..10).all(|_| free.add(0, 5, 0)));
    }

    #[test]
    fn connect_times_fall_in_the_first_bucket_they_fit() {
        assert_eq!(connect_bucket(0), 0);
        assert_eq!(connect_bucket(100_000), 0);
        assert_eq!(connect_bucket(100_001), 1);
        assert_eq!(connect_bucket(1_000_000), 3);
        assert_eq!(connect_bucket(5_000_000_000), 14);
        assert_eq!(connect_bucket(5_000_000_001), 15);
        assert_eq!(connect_bucket(u64::MAX), CONNECT_BUCKETS_NS.len() as u8);
        assert!(CONNECT_BUCKETS_NS.windows(2).all(|w| w[0] < w[1]));
    }
}

/// The key of the kernel's `UNIX_CONNECT_FAILS`: a process and a Unix socket path it failed to
/// connect to (missing or refused).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnixFailKey {
    pub tgid: u32,
    pub _pad: u32,
    pub path_key: u64,
}

/// What `UNIX_CONNECT_FAILS` keeps of such a failure, to take its count back if the process
/// binds the path soon after (a server probing its own socket).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnixFail {
    pub count: CountKey,
    pub waited_ns: u64,
    pub at_ns: u64,
}

/// How soon after its failed connect() a process must bind the path for the connect() to be
/// its own probe.
pub const SELF_PROBE_WINDOW_NS: u64 = 500_000_000;
