//! The server's side, when the upstream runs on this host: the worker behind a connection the
//! proxy saw fail. Two facts, both cheap and both rare:
//! - the signals that end processes (`signal_generate`): who sent which to whom, kept per
//!   target process in `SIGNALLED`;
//! - a server-side socket that ends before its server sent a byte of an answer (or whose
//!   process is dying as it closes it): which task closed it (with its exit code and the last
//!   ending signal it was sent), or, when the proxy ended first, whether any process had
//!   accept()ed it at all. These go to user space in the `EVENTS` ring, before the proxy's own
//!   failure record (the server's end comes first), under an events-per-second budget.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::raw_tracepoint, programs::RawTracePointContext,
};
use tracer_common::{
    Endpoint, Program, RecordKind, Stat, Task,
    conn::tcp_state,
    event::{ServerEndEvent, Signalled, server_end, task_flags::PF_EXITING},
    net::{AF_INET, AF_INET6, IPPROTO_TCP},
};

use crate::{
    counting::{note_error, stat},
    kernel::{current_task, fill_current_proxy, local_port, netns_of, now, read_kernel},
    maps::{EVENTS, SERVER_END_BUDGET, SIGNALLED},
};

/// `signal_generate(int sig, struct kernel_siginfo *info, struct task_struct *task, int group,
/// int result)`.
#[raw_tracepoint(tracepoint = "signal_generate")]
pub fn signal_generate(ctx: RawTracePointContext) -> i32 {
    let signal: i32 = ctx.arg(0);
    // Most signals (SIGCHLD, SIGALRM, SIGIO…) return here, before any read.
    if !ends_a_process(signal) {
        return 0;
    }
    let info: *const u8 = ctx.arg(1);
    let task: *const u8 = ctx.arg(2);
    let result: i32 = ctx.arg(4);
    note_error(
        Program::SignalGenerate,
        signalled(signal, info, task, result),
    );
    0
}

/// Signals whose default action ends the process, and that a worker's end is put down to.
/// (Not SIGPIPE, SIGALRM, SIGUSR1/2, SIGHUP: servers use them for other things.)
#[inline(always)]
fn ends_a_process(signal: i32) -> bool {
    matches!(signal, 2 | 3 | 4 | 6 | 7 | 8 | 9 | 11 | 15 | 24 | 25 | 31)
}

/// How long after another's signal a process's own is taken for a re-raise.
const RERAISE_NS: u64 = 5_000_000_000;

/// `TRACE_SIGNAL_DELIVERED` and `TRACE_SIGNAL_ALREADY_PENDING`: the target has it.
const DELIVERED: i32 = 0;
const ALREADY_PENDING: i32 = 2;

fn signalled(signal: i32, info: *const u8, task: *const u8, result: i32) -> Result<(), i64> {
    if config!(ready) == 0 || (result != DELIVERED && result != ALREADY_PENDING) {
        return Ok(());
    }
    let target = read_kernel::<u32>(task, config!(offsets.task_tgid))?;
    let parent = read_kernel::<*const u8>(task, config!(offsets.task_real_parent))
        .and_then(|parent| read_kernel::<u32>(parent, config!(offsets.task_tgid)))
        .unwrap_or(0);
    // SEND_SIG_NOINFO (0) and SEND_SIG_PRIV (1) stand for kill() and the kernel's own sends.
    let code = match info as usize {
        0 => 0,
        1 => 0x80,
        // `kernel_siginfo`: si_signo, si_errno, si_code.
        _ => read_kernel::<i32>(info, 8).unwrap_or(0),
    };
    let sender = (bpf_get_current_pid_tgid() >> 32) as u32;
    let now = now();
    // A process that re-raises a signal it was sent (to die of it after cleaning up, as
    // php-fpm's children do with SIGTERM) must not hide who sent it first.
    if sender == target
        && let Some(earlier) = SIGNALLED.get_ptr(&target)
    {
        // SAFETY: a pointer into the map's value, valid while this program runs.
        let earlier = unsafe { &*earlier };
        if earlier.sender_tgid != target && now.wrapping_sub(earlier.time_ns) < RERAISE_NS {
            return Ok(());
        }
    }
    let record = Signalled {
        time_ns: now,
        signal: signal as u32,
        code,
        sender_tgid: sender,
        target_parent: parent,
        sender_comm: process_name(),
    };
    SIGNALLED.insert(&target, &record, 0)?;
    Ok(())
}

/// The current process's name: its main thread's (a thread's own may be anything).
fn process_name() -> [u8; 16] {
    let mut task = Task::default();
    fill_current_proxy(&mut task, 0);
    task.comm
}

/// A transition of a socket tracer does not follow (not a proxy's outbound connection): the
/// server's side of one, perhaps. Returns at once unless its server had received bytes and
/// sent none, or its process is dying.
#[inline(never)]
pub fn server_side_changed(sk: *const u8, old: i32, new: i32) -> Result<(), i64> {
    let how = match (old, new) {
        (tcp_state::ESTABLISHED, tcp_state::FIN_WAIT1)
        | (tcp_state::CLOSE_WAIT, tcp_state::LAST_ACK) => server_end::CLOSED,
        (tcp_state::ESTABLISHED, tcp_state::CLOSE_WAIT) => server_end::PEER_FIRST,
        (tcp_state::ESTABLISHED | tcp_state::CLOSE_WAIT, tcp_state::CLOSE) => {
            // tcp_reset() sets sk_err before the socket goes to CLOSE; the socket's own abort
            // (close() with unread data, SO_LINGER 0) does not.
            let reset = read_kernel::<i32>(sk, config!(offsets.sk_err))? != 0;
            match (reset, old) {
                (false, _) => server_end::ABORTED,
                (true, tcp_state::ESTABLISHED) => server_end::PEER_FIRST,
                // After the peer's FIN: the peer had ended first already.
                (true, _) => return Ok(()),
            }
        }
        _ => return Ok(()),
    };
    let bytes_sent = read_kernel::<u64>(sk, config!(offsets.tcp_bytes_sent))?;
    let own = how != server_end::PEER_FIRST;
    // In the closing task's context (close(), or a dying process's files closing).
    let task_flags = if own {
        read_kernel::<u32>(current_task(), config!(offsets.task_flags)).unwrap_or(0)
    } else {
        0
    };
    if bytes_sent > 0 && task_flags & PF_EXITING == 0 {
        // It answered (most connections end here), and nobody is dying.
        return Ok(());
    }
    // Sequence space, where the proxy's FIN takes one number: it came in just now
    // (ESTABLISHED→CLOSE_WAIT) or before (from CLOSE_WAIT).
    let peer_fin = u64::from(new == tcp_state::CLOSE_WAIT || old == tcp_state::CLOSE_WAIT);
    let bytes_received =
        read_kernel::<u64>(sk, config!(offsets.tcp_bytes_received))?.saturating_sub(peer_fin);
    if bytes_received == 0 {
        // Nothing was asked of it (a health check that connects and closes, a client that
        // left before asking).
        return Ok(());
    }
    if read_kernel::<u16>(sk, config!(offsets.sk_protocol))? != IPPROTO_TCP {
        return Ok(());
    }
    send_server_end(
        sk,
        &Ending {
            how,
            task_flags,
            // Read only now: most closes return above.
            exit_code: if own {
                read_kernel::<i32>(current_task(), config!(offsets.task_exit_code)).unwrap_or(0)
            } else {
                0
            },
            bytes_sent,
            bytes_received,
        },
    )
}

/// What `server_side_changed` found (BPF functions take at most five arguments).
struct Ending {
    how: u32,
    task_flags: u32,
    exit_code: i32,
    bytes_sent: u64,
    bytes_received: u64,
}

#[inline(never)]
fn send_server_end(sk: *const u8, ending: &Ending) -> Result<(), i64> {
    let now = now();
    let within_budget = SERVER_END_BUDGET.get_ptr_mut(0).is_some_and(|budget| {
        let per_second = config!(events_per_second);
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe { (*budget).add(0, now, per_second) }
    });
    if !within_budget {
        stat(Stat::ServerEndsDropped);
        return Ok(());
    }
    // Field by field, not the 128-byte block the connection path reads: this call chain is
    // the deepest (kernels before 6.13 allow 512 bytes of stack for all its frames together).
    let family = read_kernel::<u16>(sk, config!(offsets.skc_family))?;
    if family != AF_INET && family != AF_INET6 {
        return Ok(());
    }
    let socket =
        read_kernel::<*const u8>(sk, config!(offsets.sk_socket)).unwrap_or(core::ptr::null());
    let Some(mut entry) = EVENTS.reserve::<ServerEndEvent>(0) else {
        stat(Stat::ServerEndsDropped);
        return Ok(());
    };
    // SAFETY: the reserved record, ours until it is submitted; every field is written below.
    let event = unsafe { &mut *entry.as_mut_ptr() };
    event.kind = RecordKind::ServerEnd as u32;
    event.how = ending.how;
    event.time_ns = now;
    fill_endpoints(sk, family, &mut event.local, &mut event.remote);
    event.task_flags = ending.task_flags;
    event.exit_code = ending.exit_code;
    event.bytes_received = ending.bytes_received;
    event.bytes_sent = ending.bytes_sent;
    event.accepted = u32::from(!socket.is_null());
    event._pad = 0;
    event.inode = if socket.is_null() {
        0
    } else {
        read_kernel::<u64>(socket, config!(offsets.socket_inode_ino)).unwrap_or(0)
    };
    if ending.how == server_end::PEER_FIRST {
        event.task = Task::default();
        event.signal = Signalled::default();
    } else {
        fill_current_proxy(&mut event.task, netns_of(sk));
        let tgid = event.task.tgid;
        event.signal = SIGNALLED
            .get_ptr(&tgid)
            // SAFETY: a pointer into the map's value, valid while this program runs.
            .map(|s| unsafe { *s })
            .unwrap_or_default();
    }
    entry.submit(0);
    stat(Stat::ServerEndsSent);
    Ok(())
}

/// The socket's local and remote addresses, read into the record in place.
#[inline(never)]
fn fill_endpoints(sk: *const u8, family: u16, local: &mut Endpoint, remote: &mut Endpoint) {
    let local_port = local_port(sk);
    let remote_port = u16::from_be(read_kernel::<u16>(sk, config!(offsets.skc_dport)).unwrap_or(0));
    if family == AF_INET {
        *local = Endpoint::v4(
            read_kernel(sk, config!(offsets.skc_rcv_saddr)).unwrap_or([0; 4]),
            local_port,
        );
        *remote = Endpoint::v4(
            read_kernel(sk, config!(offsets.skc_daddr)).unwrap_or([0; 4]),
            remote_port,
        );
    } else {
        *local = Endpoint::v6(
            read_kernel(sk, config!(offsets.skc_v6_rcv_saddr)).unwrap_or([0; 16]),
            local_port,
        );
        *remote = Endpoint::v6(
            read_kernel(sk, config!(offsets.skc_v6_daddr)).unwrap_or([0; 16]),
            remote_port,
        );
    }
}
