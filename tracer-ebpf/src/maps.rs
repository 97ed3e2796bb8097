//! Every map the programs share with each other and with the agent. Sizes are in
//! `tracer_common::counts`, where the agent reads them too.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use tracer_common::{
    ConnTrack, CountKey, Program, Stat, Tally,
    conn::PendingConnect,
    counts::{
        CONNECTS_MAX_ENTRIES, CONNS_MAX_ENTRIES, COUNTS_MAX_ENTRIES, DEFERRED_MAX_ENTRIES,
        EVENTS_RING_BYTES, LIFECYCLE_RING_BYTES, LISTENER_OWNERS_MAX_ENTRIES, OVERFLOW_SLOTS,
        PEEK_READS_MAX_ENTRIES, PEEK_TGID_WORDS, PEEKS_MAX_ENTRIES, SIGNALLED_MAX_ENTRIES,
        UNIX_PATHS_MAX_ENTRIES,
    },
    counts::{UnixFail, UnixFailKey},
    event::Signalled,
    net::UnixPath,
    peek::DeferredClose,
};

/// Live outbound connections, keyed by `struct sock *`.
#[map]
pub static CONNS: LruHashMap<u64, ConnTrack> = LruHashMap::with_max_entries(CONNS_MAX_ENTRIES, 0);

/// Each thread's last connect() call (`active` while it is under way), keyed by `pid_tgid`:
/// written over in place by the thread's next call; threads that are gone fall out.
#[map]
pub static CONNECTS: LruHashMap<u64, PendingConnect> =
    LruHashMap::with_max_entries(CONNECTS_MAX_ENTRIES, 0);

/// Exact counts per proxy × upstream × outcome (× connect-time bucket, for connects).
#[map]
pub static COUNTS: PerCpuHashMap<CountKey, Tally> =
    PerCpuHashMap::with_max_entries(COUNTS_MAX_ENTRIES, 0);

/// Counts per outcome that did not fit in `COUNTS`.
#[map]
pub static OVERFLOW_COUNTS: PerCpuArray<Tally> = PerCpuArray::with_max_entries(OVERFLOW_SLOTS, 0);

/// The agent's health counters, indexed by `Stat`.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

/// Runs that stopped before finishing, per program (indexed by `Program`).
#[map]
pub static PROGRAM_ERRORS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Program::COUNT, 0);

/// The paths of the Unix sockets connected to, by `unix_path_key` (the `Endpoint` of a Unix
/// upstream holds only the key).
#[map]
pub static UNIX_PATHS: LruHashMap<u64, UnixPath> =
    LruHashMap::with_max_entries(UNIX_PATHS_MAX_ENTRIES, 0);

/// Failures, for user space.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// Listeners opening and closing, OOM kills, listener owners' exits: rare, and kept apart.
#[map]
pub static LIFECYCLE: RingBuf = RingBuf::with_byte_size(LIFECYCLE_RING_BYTES, 0);

/// Processes (tgid) that own a listener: their exits are reported. User space adds the ones
/// that were listening before tracer started.
#[map]
pub static LISTENER_OWNERS: HashMap<u32, u32> =
    HashMap::with_max_entries(LISTENER_OWNERS_MAX_ENTRIES, 0);

/// Unix socket paths a process just failed to connect to, with what was counted: if the
/// process binds the path soon after, the connect() was its own probe and is taken back.
#[map]
pub static UNIX_CONNECT_FAILS: LruHashMap<UnixFailKey, UnixFail> =
    LruHashMap::with_max_entries(1024, 0);

/// The last signal that ends a process each process was sent, by target tgid.
#[map]
pub static SIGNALLED: LruHashMap<u32, Signalled> =
    LruHashMap::with_max_entries(SIGNALLED_MAX_ENTRIES, 0);

/// The events-per-second budget of server-side ends, per CPU.
#[map]
pub static SERVER_END_BUDGET: PerCpuArray<Tally> = PerCpuArray::with_max_entries(1, 0);

/// The processes (one bit per tgid) that connected out since tracer started: only their reads
/// and writes go further than this one look (an array lookup the verifier inlines).
#[map]
pub static PEEK_TGIDS: Array<u64> = Array::with_max_entries(PEEK_TGID_WORDS, 0);

/// Connections whose first bytes are still awaited: `struct sock *` by tgid << 32 | fd, 0 once
/// they are not (the slot stays for the descriptor's next connection: written over in place).
#[map]
pub static PEEKS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(PEEKS_MAX_ENTRIES, 0);

/// A read under way on such a connection, by thread: `[struct sock *, buffer, its size]`;
/// the thread's slot is written over by its next one, and its socket is 0 once the read ended.
#[map]
pub static PEEK_READS: LruHashMap<u64, [u64; 3]> =
    LruHashMap::with_max_entries(PEEK_READS_MAX_ENTRIES, 0);

/// Closed connections whose verdict waits for the proxy's read (`Peek::CLOSED`), by
/// `struct sock *`: what their close decided.
#[map]
pub static DEFERRED: LruHashMap<u64, DeferredClose> =
    LruHashMap::with_max_entries(DEFERRED_MAX_ENTRIES, 0);
