//! The first bytes each side of a followed connection sends (`tracer_common::peek`): a
//! ClientHello answered in plaintext or with an alert, a handshake the proxy broke off,
//! plaintext sent to a TLS port. Read from the proxy's own reads and writes on the
//! connection's file descriptor, at the syscalls, so any TLS library is seen the same way.
//!
//! Cost: every read and write on the host runs one of these programs, which returns after one
//! array lookup (inlined by the verifier) unless the process connected out since tracer
//! started; a proxy's other descriptors (its clients') cost one hash lookup more. Only a
//! followed connection still in its first bytes costs more, and only until they are seen.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user, generated},
    macros::tracepoint,
    programs::TracePointContext,
};
use tracer_common::{
    ConnTrack, Outcome, Program, Source, Stat, Verdict,
    peek::{ALERT_MAX_BYTES, DeferredClose, PEEK_BYTES, Peek, is_alert_shaped},
};

use crate::{
    counting::{Report, count_detail, count_verdict, note_error, report, stat, uncount_outcome},
    kernel::{ARG0, ARG1, ARG2, RET, local_port, netns_of, read_kernel, syscall_word},
    maps::{CONNS, DEFERRED, PEEK_READS, PEEK_TGIDS, PEEKS},
    sockets::{record, socket_error, tracked},
};

/// How a syscall's buffer argument points at the bytes.
#[derive(Clone, Copy)]
enum Buffer {
    /// write(), read(), sendto(), recvfrom(): the bytes.
    Flat,
    /// writev(), readv(): an array of `struct iovec`.
    Iovec,
    /// sendmsg(), recvmsg(): a `struct user_msghdr`, whose `msg_iov` (at 16) is one.
    Msghdr,
}

macro_rules! send_probe {
    ($name:ident, $tp:literal, $buffer:expr) => {
        #[tracepoint(category = "syscalls", name = $tp)]
        pub fn $name(ctx: TracePointContext) -> u32 {
            note_error(Program::PeekSend, sending(&ctx, $buffer));
            0
        }
    };
}

macro_rules! receive_probe {
    ($name:ident, $tp:literal, $buffer:expr) => {
        #[tracepoint(category = "syscalls", name = $tp)]
        pub fn $name(ctx: TracePointContext) -> u32 {
            note_error(Program::PeekReceive, receiving(&ctx, $buffer));
            0
        }
    };
}

macro_rules! received_probe {
    ($name:ident, $tp:literal) => {
        #[tracepoint(category = "syscalls", name = $tp)]
        pub fn $name(ctx: TracePointContext) -> u32 {
            note_error(Program::PeekReceived, received(&ctx));
            0
        }
    };
}

send_probe!(sys_enter_write, "sys_enter_write", Buffer::Flat);
send_probe!(sys_enter_sendto, "sys_enter_sendto", Buffer::Flat);
send_probe!(sys_enter_writev, "sys_enter_writev", Buffer::Iovec);
send_probe!(sys_enter_sendmsg, "sys_enter_sendmsg", Buffer::Msghdr);
receive_probe!(sys_enter_read, "sys_enter_read", Buffer::Flat);
receive_probe!(sys_enter_recvfrom, "sys_enter_recvfrom", Buffer::Flat);
receive_probe!(sys_enter_readv, "sys_enter_readv", Buffer::Iovec);
receive_probe!(sys_enter_recvmsg, "sys_enter_recvmsg", Buffer::Msghdr);
received_probe!(sys_exit_read, "sys_exit_read");
received_probe!(sys_exit_recvfrom, "sys_exit_recvfrom");
received_probe!(sys_exit_readv, "sys_exit_readv");
received_probe!(sys_exit_recvmsg, "sys_exit_recvmsg");

/// close(): the descriptor's watch ends; a connection closed before the proxy read what the
/// upstream sent is decided now, with what was read (nothing).
#[tracepoint(category = "syscalls", name = "sys_enter_close")]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    note_error(Program::PeekReceived, closing(&ctx));
    0
}

/// connect() on `fd` of process `tgid` started the followed connection `sk`: its first bytes
/// are wanted.
#[inline(always)]
pub fn watch(tgid: u32, fd: u32, sk: u64) {
    let Some(conn) = tracked(sk as *const u8) else {
        return;
    };
    // The descriptor's slot is written over in place when it has one (descriptors are reused,
    // lowest first: a proxy's next upstream connection mostly gets the last one's): an insert
    // into the LRU costs several times a lookup, and a removal at close() about two.
    let key = key(tgid, fd);
    match PEEKS.get_ptr_mut(&key) {
        // SAFETY: a pointer into the map's value, valid while this program runs; only this
        // process's own calls on this descriptor touch it.
        Some(slot) => unsafe { *slot = sk },
        None => {
            if PEEKS.insert(&key, &sk, 0).is_err() {
                stat(Stat::FirstBytesUnwatched);
                return;
            }
        }
    }
    stat(Stat::FirstBytesWatched);
    conn.peek.flags |= tracer_common::peek::Peek::WATCHED;
    if let Some(word) = PEEK_TGIDS.get_ptr_mut(tgid >> 6) {
        let bit = 1u64 << (tgid & 63);
        // SAFETY: a pointer into the array's value. Not atomic (5.10 has no atomic or): two
        // CPUs setting bits of one word at once may lose one, which the process's next
        // connect() sets again.
        unsafe {
            if *word & bit == 0 {
                *word |= bit;
            }
        }
    }
}

#[inline(always)]
fn key(tgid: u32, fd: u32) -> u64 {
    (u64::from(tgid) << 32) | u64::from(fd)
}

/// Whether process `tgid` connected out since tracer started.
#[inline(always)]
fn may_watch(tgid: u32) -> bool {
    match PEEK_TGIDS.get(tgid >> 6) {
        Some(word) => word & (1u64 << (tgid & 63)) != 0,
        None => false,
    }
}

/// The watched connection behind the current process's `fd`, if its first bytes are still
/// wanted or it is an established TLS connection (whose alerts are no requests); the slot of
/// one that is gone, or told, is emptied (0) in place, for the descriptor's next connection.
/// It may be closed already, waiting for this very read.
#[inline(always)]
fn watched(tgid: u32, fd: u64) -> Option<(u64, &'static mut ConnTrack)> {
    let slot = PEEKS.get_ptr_mut(&key(tgid, fd as u32))?;
    // SAFETY: a pointer into the map's value, valid while this program runs.
    let sk = unsafe { *slot };
    if sk == 0 {
        return None;
    }
    match record(sk) {
        Some(conn)
            if conn.peek.flags & Peek::WATCHED != 0
                && (!conn.peek.done() || conn.peek.tls_established()) =>
        {
            Some((sk, conn))
        }
        _ => {
            // SAFETY: as above.
            unsafe { *slot = 0 };
            None
        }
    }
}

/// The address and size of the bytes a syscall's buffer argument `arg` leads to.
#[inline(always)]
fn first_buffer(ctx: &TracePointContext, arg: u64, buffer: Buffer) -> Result<(u64, u64), i64> {
    let iov = match buffer {
        Buffer::Flat => {
            let size = syscall_word::<ARG2>(ctx, config!(syscalls.io_buf) + 8)?;
            return Ok((arg, size));
        }
        Buffer::Iovec => arg,
        // SAFETY: bpf_probe_read_user copes with any user pointer.
        Buffer::Msghdr => unsafe { bpf_probe_read_user((arg + 16) as *const u64)? },
    };
    // SAFETY: as above; struct iovec is { void *iov_base; size_t iov_len; }.
    let [base, len] = unsafe { bpf_probe_read_user(iov as *const [u64; 2])? };
    Ok((base, len))
}

/// At most [`PEEK_BYTES`] of `size` (the verifier sees the bound).
#[inline(always)]
fn peek_size(size: u64) -> u32 {
    if size > PEEK_BYTES as u64 {
        PEEK_BYTES as u32
    } else {
        size as u32
    }
}

fn sending(ctx: &TracePointContext, buffer: Buffer) -> Result<(), i64> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !may_watch(tgid) {
        return Ok(());
    }
    let fd = syscall_word::<ARG0>(ctx, config!(syscalls.io_fd))?;
    let Some((_, conn)) = watched(tgid, fd) else {
        return Ok(());
    };
    if conn.peek.flags & Peek::CLOSED != 0 {
        return Ok(());
    }
    let arg = syscall_word::<ARG1>(ctx, config!(syscalls.io_buf))?;
    let (at, size) = first_buffer(ctx, arg, buffer)?;
    let n = peek_size(size);
    if n == 0 {
        return Ok(());
    }
    let established = conn.peek.done();
    if established && size > ALERT_MAX_BYTES {
        // A request or more of one: only a lone alert record is looked at.
        return Ok(());
    }
    let mut head = [0u8; PEEK_BYTES];
    // SAFETY: the helper copes with any user pointer; n is at most the destination's size.
    if unsafe { generated::bpf_probe_read_user(head.as_mut_ptr().cast(), n, at as *const _) } != 0 {
        return Err(-1);
    }
    if established {
        if is_alert_shaped(&head, n as u8, size) {
            conn.peek.alert_sending = size as u8;
        }
        return Ok(());
    }
    conn.peek.on_send(&head, size);
    Ok(())
}

fn receiving(ctx: &TracePointContext, buffer: Buffer) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !may_watch(tgid) {
        return Ok(());
    }
    let fd = syscall_word::<ARG0>(ctx, config!(syscalls.io_fd))?;
    let Some((sk, conn)) = watched(tgid, fd) else {
        return Ok(());
    };
    if !conn.peek.wants_receive() {
        return Ok(());
    }
    let arg = syscall_word::<ARG1>(ctx, config!(syscalls.io_buf))?;
    let (at, size) = first_buffer(ctx, arg, buffer)?;
    // The thread's slot is written over in place (an insert costs several times a lookup);
    // its exit marks it used.
    let read = [sk, at, size];
    match PEEK_READS.get_ptr_mut(&pid_tgid) {
        // SAFETY: a pointer into the map's value, valid while this program runs; only this
        // thread's programs use its slot.
        Some(slot) => unsafe { *slot = read },
        None => {
            let _ = PEEK_READS.insert(&pid_tgid, &read, 0);
        }
    }
    Ok(())
}

fn received(ctx: &TracePointContext) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !may_watch((pid_tgid >> 32) as u32) {
        return Ok(());
    }
    let Some(slot) = PEEK_READS.get_ptr_mut(&pid_tgid) else {
        return Ok(());
    };
    // SAFETY: a pointer into the map's value, valid while this program runs; only this
    // thread's programs use its slot.
    let [sk, at, size] = unsafe { *slot };
    if sk == 0 {
        // Used already: this read is not on a watched connection.
        return Ok(());
    }
    // SAFETY: as above.
    unsafe { (*slot)[0] = 0 };
    let ret = syscall_word::<RET>(ctx, config!(syscalls.io_ret))? as i64;
    if ret <= 0 {
        // Nothing more will come: a closed connection is decided with what was read.
        settle_if_closed(sk);
        return Ok(());
    }
    let Some(conn) = record(sk) else {
        return Ok(());
    };
    if conn.peek.flags & Peek::WATCHED == 0 {
        // The socket's address is another's now.
        return Ok(());
    }
    let have = conn.peek.received_len as usize;
    if have < PEEK_BYTES {
        let got = if (ret as u64) < size {
            ret as u64
        } else {
            size
        };
        let n = peek_size(got);
        if n > 0 {
            let into = conn
                .peek
                .received
                .as_mut_ptr()
                .wrapping_add(have & (PEEK_BYTES - 1));
            // SAFETY: the helper copes with any user pointer; `received` is 16 bytes, so n (at
            // most 8) bytes at an offset below 8 stay inside.
            if unsafe { generated::bpf_probe_read_user(into.cast(), n, at as *const _) } != 0 {
                return Err(-1);
            }
        }
    }
    conn.peek.on_receive(ret as u64);
    if conn.peek.flags & Peek::CLOSED != 0 {
        settle(sk, conn);
    }
    Ok(())
}

fn closing(ctx: &TracePointContext) -> Result<(), i64> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !may_watch(tgid) {
        return Ok(());
    }
    let fd = syscall_word::<ARG0>(ctx, config!(syscalls.io_fd))?;
    let Some(slot) = PEEKS.get_ptr_mut(&key(tgid, fd as u32)) else {
        return Ok(());
    };
    // SAFETY: a pointer into the map's value, valid while this program runs. Emptied in place:
    // the descriptor's next connection writes over it.
    let sk = unsafe { core::mem::replace(&mut *slot, 0) };
    if sk != 0 {
        settle_if_closed(sk);
    }
    Ok(())
}

/// The socket reached TCP_CLOSE before the proxy read anything of what the upstream sent (an
/// upstream that answered and reset at once): counts the verdict as it stands, keeps the
/// record (marked closed) and what the close decided, and waits for the proxy's read (or its
/// close()) to tell whether the first bytes change it. Returns true (the record stays).
#[inline(never)]
pub fn wait_for_read(
    sk: *const u8,
    conn: &mut ConnTrack,
    verdict: &Verdict,
    data_received: u64,
    now: u64,
) -> bool {
    let mut send = false;
    if let Some(outcome) = verdict.outcome {
        send = count_verdict(&conn.proxy, &conn.upstream, outcome, verdict, now);
    }
    let end = tracer_common::EndKind::from_u8(conn.end);
    let deferred = DeferredClose {
        close_ns: now,
        waited_ns: verdict.waited_ns,
        bytes_received: data_received,
        bytes_acked: read_kernel::<u64>(sk, config!(offsets.tcp_bytes_acked)).unwrap_or(0),
        errno: socket_error(sk),
        outcome: verdict.outcome.map_or(0, |o| o as u8),
        send: u8::from(send),
        upstream_ended: u8::from(matches!(
            end,
            tracer_common::EndKind::PeerReset | tracer_common::EndKind::PeerFin
        )),
        detail: verdict.detail,
    };
    if conn.local.port == 0 {
        conn.local.port = local_port(sk);
    }
    conn.proxy.netns = netns_of(sk);
    if DEFERRED.insert(&(sk as u64), &deferred, 0).is_err() {
        // No room to wait: what the close decided stands, unreported.
        return false;
    }
    conn.peek.flags |= Peek::CLOSED;
    true
}

/// A closed connection waiting for the proxy's read under `sk`, decided now.
#[inline(always)]
fn settle_if_closed(sk: u64) {
    if let Some(conn) = record(sk)
        && conn.peek.flags & Peek::CLOSED != 0
    {
        settle(sk, conn);
    }
}

/// Decides a closed connection that waited for the proxy's read: its first bytes may make it a
/// TLS failure (the count of what its close decided is taken back), else what the close
/// decided stands; a failure is reported. The record goes.
#[inline(never)]
fn settle(sk: u64, conn: &mut ConnTrack) {
    // SAFETY: a copy of the map's value.
    if let Some(deferred) = unsafe { DEFERRED.get(&sk).copied() } {
        let counted = Outcome::from_u8(deferred.outcome);
        let mut outcome = counted;
        let mut send = deferred.send != 0;
        if let Some((tls, detail)) = conn.peek.verdict(deferred.upstream_ended != 0)
            && (counted, deferred.detail) != (Some(tls), detail)
        {
            if let Some(counted) = counted {
                uncount_outcome(
                    &conn.proxy,
                    &conn.upstream,
                    counted,
                    deferred.detail,
                    deferred.waited_ns,
                );
            }
            send = count_detail(&conn.proxy, &conn.upstream, tls, detail, deferred.waited_ns);
            outcome = Some(tls);
        }
        if let Some(outcome) = outcome
            && outcome.is_failure()
        {
            report(
                &Report {
                    send,
                    close_ns: deferred.close_ns,
                    waited_ns: deferred.waited_ns,
                    bytes_received: deferred.bytes_received,
                    bytes_acked: deferred.bytes_acked,
                    errno: deferred.errno,
                    outcome,
                    source: Source::SocketClosed,
                },
                |into| *into = *conn,
            );
        }
        let _ = DEFERRED.remove(&sk);
    }
    let _ = CONNS.remove(&sk);
}
