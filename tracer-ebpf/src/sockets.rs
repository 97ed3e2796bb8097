//! A connection's life, from the SYN the proxy sends to TCP_CLOSE: where it goes, what came
//! back, what the proxy sent, and how it ended. The outcome is decided at TCP_CLOSE by
//! `ConnTrack::on_close`.

use core::mem::MaybeUninit;

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, generated},
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};
use tracer_common::{
    Config, ConnTrack, Endpoint, Outcome, Program, Source, Stat, Task,
    conn::{CloseFacts, EndKind, tcp_state},
    net::{AF_INET, AF_INET6, IPPROTO_TCP},
    peek::Peek,
};

use crate::{
    counting::{Report, count, count_verdict, note_error, report, stat},
    kernel::{field, fill_current_task, is_ignored, local_port, netns_of, now, read_kernel},
    lifecycle::listener_changed,
    maps::{CONNECTS, CONNS},
    workers::server_side_changed,
};

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: RawTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    note_error(Program::InetSockSetState, sock_state_changed(sk, old, new));
    0
}

#[raw_tracepoint(tracepoint = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: RawTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    if let Some(conn) = tracked(sk) {
        conn.on_reset_received(now());
    }
    0
}

#[raw_tracepoint(tracepoint = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb(ctx: RawTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    if let Some(conn) = tracked(sk) {
        conn.on_retransmit();
    }
    0
}

/// Linux 6.16+: the proxy starts sending.
#[raw_tracepoint(tracepoint = "tcp_sendmsg_locked")]
pub fn tcp_sendmsg_locked(ctx: RawTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    if let Some(conn) = tracked(sk) {
        // Fires before this send's first byte is queued: no answer to it can be counted yet.
        let bytes_received = read_kernel::<u64>(sk, config!(offsets.tcp_bytes_received));
        conn.on_send(now(), bytes_received.unwrap_or(0));
    }
    0
}

/// Where `tcp_sendmsg_locked` is missing (before Linux 6.16): a segment arrives on an
/// established connection, before it is processed. Sends are inferred here, before the segment
/// (data, the FIN or RST, or an ACK) changes what was received.
#[raw_tracepoint(tracepoint = "tcp_probe")]
pub fn tcp_probe(ctx: RawTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    note_error(Program::TcpProbe, segment_arriving(sk));
    0
}

fn segment_arriving(sk: *const u8) -> Result<(), i64> {
    if config!(sends) != Config::SENDS_INFERRED {
        return Ok(());
    }
    // Segments of sockets tracer does not follow (a proxy's clients', a local upstream's)
    // return after one lookup; the others after one read, unless the proxy sent since.
    if let Some(conn) = tracked(sk) {
        note_sends(sk, conn);
    }
    Ok(())
}

/// Where sends are inferred: tells the record where the proxy's `write_seq` stands now. Only
/// when it moved since the last look (the proxy sent) is more read: what the connection had
/// received by then (this segment is not processed yet), and when.
#[inline(always)]
fn note_sends(sk: *const u8, conn: &mut ConnTrack) {
    let Ok(write_seq) = read_kernel::<u32>(sk, config!(offsets.tcp_write_seq)) else {
        return;
    };
    if write_seq == conn.seen_write_seq {
        return;
    }
    let bytes_received = read_kernel::<u64>(sk, config!(offsets.tcp_bytes_received)).unwrap_or(0);
    let now = now();
    // When the kernel last sent or received on this connection: the send, the first segment
    // to arrive after it being the one looked at now.
    let clock_at = config!(offsets.tcp_clock_cache);
    let sent_ns = if clock_at == tracer_common::KernelOffsets::MISSING {
        now
    } else {
        match read_kernel::<u64>(sk, clock_at) {
            Ok(at) if at != 0 && at <= now => at,
            _ => now,
        }
    };
    conn.on_write_seq(write_seq, bytes_received, sent_ns);
}

fn sock_state_changed(sk: *const u8, old: i32, new: i32) -> Result<(), i64> {
    if config!(ready) == 0 {
        return Ok(());
    }
    if old == tcp_state::CLOSE && new == tcp_state::SYN_SENT {
        // Inside connect(), in the proxy's own context.
        return start_tracking(sk);
    }
    // A listener opens (CLOSE→LISTEN) or closes (LISTEN→CLOSE). Not LISTEN→SYN_RECV: that is
    // the clone a listener makes for each connection it accepts.
    if old == tcp_state::CLOSE && new == tcp_state::LISTEN {
        return listener_changed(sk, true);
    }
    if old == tcp_state::LISTEN && new == tcp_state::CLOSE {
        return listener_changed(sk, false);
    }
    // Only these transitions can matter to a tracked connection; every server-side socket
    // (SYN_RECV, ESTABLISHED from SYN_RECV, FIN_WAIT2, TIME_WAIT) returns before any lookup.
    let relevant = match new {
        tcp_state::ESTABLISHED => old == tcp_state::SYN_SENT,
        tcp_state::CLOSE
        | tcp_state::CLOSE_WAIT
        | tcp_state::FIN_WAIT1
        | tcp_state::LAST_ACK
        | tcp_state::CLOSING => true,
        _ => false,
    };
    if !relevant {
        return Ok(());
    }
    let Some(conn) = tracked(sk) else {
        // Not a proxy's connection: perhaps a local upstream's side of one.
        return server_side_changed(sk, old, new);
    };
    // The record of a socket whose close the kernel skipped the program for may be found by
    // another socket that has its address now: a local upstream's side of a later connection,
    // or a new connection whose own start went unseen too. It would judge that socket's life
    // as the old connection's. A transition that cannot follow the record's last one gives it
    // away (no record goes back to SYN_SENT; else the peer's port tells), and so does the
    // peer's port at the close, which decides (the other socket's life can look like the
    // record's: both ESTABLISHED→CLOSE on a reset). Such a record is dropped; the transition
    // is the other socket's.
    let stale = if conn.follows(old) {
        new == tcp_state::CLOSE && !same_peer(sk, conn)
    } else {
        old == tcp_state::SYN_SENT || !same_peer(sk, conn)
    };
    if stale {
        if CONNS.remove(&(sk as u64)).is_ok() {
            stat(Stat::ConnsStale);
        }
        return server_side_changed(sk, old, new);
    }
    let inferred = config!(sends) == Config::SENDS_INFERRED;
    // The proxy's last sends before its FIN (which moves write_seq: ESTABLISHED→FIN_WAIT1,
    // CLOSE_WAIT→LAST_ACK) or before an end without one (→CLOSE). The upstream's FIN was
    // already looked at in tcp_probe.
    let proxy_may_have_sent = old == tcp_state::ESTABLISHED || old == tcp_state::CLOSE_WAIT;
    let ends_here = matches!(
        new,
        tcp_state::FIN_WAIT1 | tcp_state::LAST_ACK | tcp_state::CLOSE
    );
    if inferred && proxy_may_have_sent && ends_here {
        note_sends(sk, conn);
    }
    let now = now();
    if new == tcp_state::CLOSE {
        if conn.established_unseen(old) {
            // Its handshake went unseen (a simultaneous open through SYN_RECV, or a skipped
            // run): it connected, so it is counted as a connect now and judged as an
            // established connection, not a failed attempt.
            let took = conn.on_established(now);
            count(&conn.proxy, &conn.upstream, Outcome::Connected, took, now);
        }
        let waits = connection_closed(sk, conn, old, now);
        // A record whose verdict waits for the proxy's read stays (marked closed) until then.
        if waits || CONNS.remove(&(sk as u64)).is_ok() {
            stat(Stat::ConnsClosed);
        }
    } else if old == tcp_state::SYN_SENT && new == tcp_state::ESTABLISHED {
        // (The local port is read when the connection closes: only a failure's report shows it.)
        let took = conn.on_established(now);
        if inferred {
            conn.start_write_seq(read_kernel(sk, config!(offsets.tcp_write_seq)).unwrap_or(0));
        }
        count(&conn.proxy, &conn.upstream, Outcome::Connected, took, now);
        conn.seen_state(new);
    } else {
        conn.on_state_change(old, new, now);
        conn.seen_state(new);
    }
    Ok(())
}

/// Whether socket `sk`'s peer port is the upstream's of record `conn` (a socket that skipped
/// a transition), not another's (a socket at a stale record's address). Read at the close, and
/// where a transition does not follow the record's last.
#[inline(always)]
fn same_peer(sk: *const u8, conn: &ConnTrack) -> bool {
    // 0 where it cannot be read: taken for the same.
    let port = read_kernel::<u16>(sk, config!(offsets.skc_dport)).unwrap_or(0);
    port == 0 || u16::from_be(port) == conn.upstream.port
}

/// CLOSE→SYN_SENT, inside connect(): a new outbound connection. Its record is built on this
/// function's own stack (per-CPU scratch is not private where the kernel can preempt a
/// program) and copied into `CONNS`.
#[inline(never)]
fn start_tracking(sk: *const u8) -> Result<(), i64> {
    // CLOSE→SYN_SENT happens inside connect(), so the current task is the one connecting.
    let pid_tgid = bpf_get_current_pid_tgid();
    if is_ignored(pid_tgid) || read_kernel::<u16>(sk, config!(offsets.sk_protocol))? != IPPROTO_TCP
    {
        return Ok(());
    }
    // The sock_common fields in one read (user space checked they lie in the block), into
    // memory not zeroed first.
    let mut block = MaybeUninit::<[u8; Config::SOCK_COMMON_BLOCK as usize]>::uninit();
    // SAFETY: the helper copes with any source address and fills the whole block, or fails.
    let common = unsafe {
        if generated::bpf_probe_read_kernel(
            block.as_mut_ptr().cast(),
            Config::SOCK_COMMON_BLOCK,
            sk.cast(),
        ) != 0
        {
            return Err(-1);
        }
        block.assume_init_ref()
    };
    let family = u16::from_ne_bytes(field(common, config!(offsets.skc_family))?);
    let dport = u16::from_be_bytes(field(common, config!(offsets.skc_dport))?);
    let mut conn = ConnTrack::connecting(
        Task::default(),
        Endpoint::default(),
        Endpoint::default(),
        now(),
    );
    match family {
        AF_INET => {
            conn.upstream = Endpoint::v4(field(common, config!(offsets.skc_daddr))?, dport);
            conn.local = Endpoint::v4(field(common, config!(offsets.skc_rcv_saddr))?, 0);
        }
        AF_INET6 => {
            conn.upstream = Endpoint::v6(field(common, config!(offsets.skc_v6_daddr))?, dport);
            conn.local = Endpoint::v6(field(common, config!(offsets.skc_v6_rcv_saddr))?, 0);
        }
        _ => return Ok(()),
    }
    // The network namespace is read when a failure is reported (most connections never are).
    fill_current_task(&mut conn.proxy, pid_tgid, 0);
    let key = sk as u64;
    match CONNS.insert(&key, &conn, 0) {
        Ok(()) => stat(Stat::ConnsTracked),
        Err(_) => stat(Stat::ConnsUntracked),
    }
    // Tell the connect() in flight which socket it is about.
    if let Some(pending) = CONNECTS.get_ptr_mut(&pid_tgid) {
        // SAFETY: a pointer into the map's value, valid while this program runs.
        unsafe {
            if (*pending).active != 0 {
                (*pending).sk = key;
            }
        }
    }
    Ok(())
}

/// The socket reached TCP_CLOSE from `old_state`: count the connection's outcome, and report it
/// when it is a failure. Returns true when the verdict waits for the proxy's read of what the
/// upstream sent (`Peek::must_wait_for_read`): the record stays, marked closed.
#[inline(never)]
fn connection_closed(sk: *const u8, conn: &mut ConnTrack, old_state: i32, now: u64) -> bool {
    // The socket's error decides only an attempt that never connected, or an end nothing
    // announced (most connections ended with a FIN, seen already); a failure's report shows it.
    let err_decides = conn.established_ns == 0 || conn.end == EndKind::Open as u8;
    let sk_err = if err_decides { socket_error(sk) } else { 0 };
    // What came back decides only a connection that was established.
    let bytes_received = if conn.established_ns == 0 {
        0
    } else {
        read_kernel::<u64>(sk, config!(offsets.tcp_bytes_received)).unwrap_or(0)
    };
    if conn.established_ns == 0 && conn.reset_received == 0 && sk_err == 0 {
        // SYN_SENT→CLOSE with no error of its own inside connect() (no local port left): the
        // syscall's return value says why, at sys_exit_connect.
        if let Some(pending) = CONNECTS.get_ptr_mut(&bpf_get_current_pid_tgid()) {
            // SAFETY: a pointer into the map's value, valid while this program runs.
            let pending = unsafe { &mut *pending };
            if pending.active != 0 && pending.sk == sk as u64 {
                pending.closed_in_call = 1;
                return false;
            }
        }
    }
    let verdict = conn.on_close(CloseFacts {
        now_ns: now,
        old_state,
        sk_err,
        bytes_received,
        min_wait_ns: config!(min_wait_ns),
        sends_tracked: config!(sends) != Config::SENDS_UNSEEN,
    });
    let data_received = conn.data_received(old_state, bytes_received);
    let proxy_holds_it = conn.end != EndKind::ProxyClose as u8;
    if conn.established_ns != 0 && conn.peek.must_wait_for_read(data_received, proxy_holds_it) {
        return crate::peek::wait_for_read(sk, conn, &verdict, data_received, now);
    }
    let Some(outcome) = verdict.outcome else {
        return false;
    };
    let send = count_verdict(&conn.proxy, &conn.upstream, outcome, &verdict, now);
    if !outcome.is_failure() {
        return false;
    }
    if !send {
        // Over its key's events-per-second budget (a storm): counted, not reported, so
        // nothing more is read.
        stat(Stat::EventsSampledOut);
        return false;
    }
    // What only the report shows.
    if conn.local.port == 0 {
        conn.local.port = local_port(sk);
    }
    let bytes_acked = read_kernel::<u64>(sk, config!(offsets.tcp_bytes_acked)).unwrap_or(0);
    let sk_err = if err_decides {
        sk_err
    } else {
        socket_error(sk)
    };
    conn.proxy.netns = netns_of(sk);
    report(
        &Report {
            send,
            close_ns: now,
            waited_ns: verdict.waited_ns,
            bytes_received: conn.data_received(old_state, bytes_received),
            bytes_acked,
            errno: sk_err,
            outcome,
            source: Source::SocketClosed,
        },
        |into| *into = *conn,
    );
    false
}

/// `sk->sk_err`, 0 when it cannot be read.
#[inline(always)]
pub fn socket_error(sk: *const u8) -> i32 {
    read_kernel::<i32>(sk, config!(offsets.sk_err)).unwrap_or(0)
}

/// The record of a tracked connection (not one closed and waiting for the proxy's read: that
/// socket is gone, and its address may be another socket's now).
#[inline(always)]
pub fn tracked(sk: *const u8) -> Option<&'static mut ConnTrack> {
    record(sk as u64).filter(|conn| conn.peek.flags & Peek::CLOSED == 0)
}

/// The record under `sk` in `CONNS`, closed or not.
#[inline(always)]
pub fn record(sk: u64) -> Option<&'static mut ConnTrack> {
    // SAFETY: a pointer into the map's value, valid while this program runs; the kernel runs
    // one program per CPU at a time and a connection's events rarely race.
    CONNS.get_ptr_mut(&sk).map(|conn| unsafe { &mut *conn })
}
