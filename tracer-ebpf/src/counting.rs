//! Exact counting in per-CPU maps, failure reports to user space, and the health counters.

use aya_ebpf::bindings::{BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};
use tracer_common::{
    ConnTrack, CountKey, Endpoint, FailureEvent, Outcome, Program, RecordKind, RouteKey, Source,
    Stat, Tally, Task, Verdict,
    counts::{EVENTS_RING_BYTES, UnixFail, connect_bucket},
};

use crate::{
    kernel::now,
    maps::{COUNTS, EVENTS, OVERFLOW_COUNTS, PROGRAM_ERRORS, STATS},
};

/// What a failure report adds to the connection's record.
pub struct Report {
    /// Whether its key's event budget lets it go to user space (counted either way).
    pub send: bool,
    pub close_ns: u64,
    pub waited_ns: u64,
    pub bytes_received: u64,
    pub bytes_acked: u64,
    pub errno: i32,
    pub outcome: Outcome,
    pub source: Source,
}

/// Sends a failure to user space (or counts it as sampled out or lost). The record is written
/// straight into the ring buffer, not built on the stack first; `conn_into` writes the
/// connection's record into it.
#[inline(never)]
pub fn report(report: &Report, conn_into: impl FnOnce(&mut ConnTrack)) {
    if !report.send {
        stat(Stat::EventsSampledOut);
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<FailureEvent>(0) else {
        stat(Stat::EventsLost);
        return;
    };
    // SAFETY: the reserved record, ours until it is submitted; every field is written below.
    let event = unsafe { &mut *entry.as_mut_ptr() };
    event.kind = RecordKind::Failure as u32;
    event._pad0 = 0;
    conn_into(&mut event.conn);
    event.close_ns = report.close_ns;
    event.waited_ns = report.waited_ns;
    event.bytes_received = report.bytes_received;
    event.bytes_acked = report.bytes_acked;
    event.errno = report.errno;
    event.outcome = report.outcome as u8;
    event.source = report.source as u8;
    event._pad = [0; 2];
    // Wake the agent only when the buffer fills up: it also drains on a short timer, and a
    // wakeup per event costs more than the event.
    let filling = EVENTS.query(BPF_RB_AVAIL_DATA as u64) > u64::from(EVENTS_RING_BYTES / 8);
    entry.submit(if filling {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    } as u64);
    stat(Stat::EventsSent);
}

/// The route (proxy name × cgroup × upstream) a count goes under.
#[inline(always)]
fn route(proxy: &Task, upstream: &Endpoint) -> RouteKey {
    RouteKey {
        comm: proxy.comm,
        cgroup_id: proxy.cgroup_id,
        upstream: *upstream,
    }
}

/// Counts one `outcome` of `proxy` toward `upstream`, exactly (a connect under its connect
/// time's bucket: one count is both the total and the histogram); returns whether an event may go
/// to user space for it (the events-per-second budget of this key on this CPU). The key is on
/// this function's own stack: per-CPU scratch is not private where the kernel can preempt a
/// program (7.x), or where a softirq interrupts one.
#[inline(never)]
pub fn count(proxy: &Task, upstream: &Endpoint, outcome: Outcome, ns: u64, now: u64) -> bool {
    let mut key = count_key(proxy, upstream, outcome);
    if outcome == Outcome::Connected {
        key.bucket = connect_bucket(ns);
    }
    add(&key, outcome, ns, now)
}

/// Counts what a connection's close decided: `outcome` (the verdict's) under its detail where
/// it has one (a `TlsReason`), else as [`count`] does.
#[inline(always)]
pub fn count_verdict(
    proxy: &Task,
    upstream: &Endpoint,
    outcome: Outcome,
    verdict: &Verdict,
    now: u64,
) -> bool {
    if verdict.detail == 0 {
        count(proxy, upstream, outcome, verdict.waited_ns, now)
    } else {
        count_detail(proxy, upstream, outcome, verdict.detail, verdict.waited_ns)
    }
}

/// [`count`] for an outcome with a detail in its key (a `TlsReason` for
/// `tls_handshake_failed`), at the current time.
#[inline(never)]
pub fn count_detail(
    proxy: &Task,
    upstream: &Endpoint,
    outcome: Outcome,
    detail: u8,
    ns: u64,
) -> bool {
    let mut key = count_key(proxy, upstream, outcome);
    key.bucket = detail;
    add(&key, outcome, ns, now())
}

#[inline(always)]
fn add(key: &CountKey, outcome: Outcome, ns: u64, now: u64) -> bool {
    let per_second = config!(events_per_second);
    if let Some(tally) = COUNTS.get_ptr_mut(key) {
        // SAFETY: this CPU's value of a per-CPU map entry.
        return unsafe { (*tally).add(ns, now, per_second) };
    }
    let mut first = Tally::default();
    let send = first.add(ns, now, per_second);
    // Another CPU may create the key between the lookup and the insert: look again.
    if COUNTS.insert(key, &first, BPF_NOEXIST as u64).is_ok() {
        return send;
    }
    if let Some(tally) = COUNTS.get_ptr_mut(key) {
        // SAFETY: as above.
        return unsafe { (*tally).add(ns, now, per_second) };
    }
    // COUNTS is full: keep the exact total per outcome.
    stat(Stat::CountsOverflowed);
    match OVERFLOW_COUNTS.get_ptr_mut(outcome as u32) {
        // SAFETY: this CPU's slot of a per-CPU array; programs do not migrate while running.
        Some(tally) => unsafe { (*tally).add(ns, now, per_second) },
        None => false,
    }
}

/// The key `count` counts `outcome` of `proxy` toward `upstream` under.
#[inline(always)]
pub fn count_key(proxy: &Task, upstream: &Endpoint, outcome: Outcome) -> CountKey {
    CountKey {
        route: route(proxy, upstream),
        outcome: outcome as u8,
        bucket: 0,
        _pad: [0; 6],
    }
}

/// Takes back one count that `count` made (a connect() that turned out to be a server probing
/// its own socket). This CPU's value may go below zero: the values are summed over CPUs with
/// wrapping arithmetic, and the sum is right.
#[inline(never)]
pub fn uncount(fail: &UnixFail) {
    uncount_key(&fail.count, fail.waited_ns);
}

/// Takes back one count of `outcome` (with `detail`) of `proxy` toward `upstream`, made by
/// [`count_verdict`], as [`uncount`] does.
#[inline(never)]
pub fn uncount_outcome(proxy: &Task, upstream: &Endpoint, outcome: Outcome, detail: u8, ns: u64) {
    let mut key = count_key(proxy, upstream, outcome);
    key.bucket = detail;
    uncount_key(&key, ns);
}

#[inline(always)]
fn uncount_key(key: &CountKey, ns: u64) {
    if let Some(tally) = COUNTS.get_ptr_mut(key) {
        // SAFETY: this CPU's value of a per-CPU map entry.
        unsafe {
            (*tally).count = (*tally).count.wrapping_sub(1);
            (*tally).sum_ns = (*tally).sum_ns.wrapping_sub(ns);
        }
    }
}

/// Counts a run of `program` that stopped early: `result` is what its body returned.
#[inline(always)]
pub fn note_error<T>(program: Program, result: Result<T, i64>) {
    if result.is_err()
        && let Some(value) = PROGRAM_ERRORS.get_ptr_mut(program as u32)
    {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe { *value += 1 };
    }
}

/// Adds one to a health counter.
#[inline(always)]
pub fn stat(which: Stat) {
    if let Some(value) = STATS.get_ptr_mut(which as u32) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe { *value += 1 };
    }
}
