//! tracer's kernel programs: record the fate of every outbound TCP connection.
//!
//! Socket and task events use raw tracepoints: the kernel's own arguments (the `struct sock *`,
//! the `struct task_struct *`), read at offsets from BTF that user space passes in, without the
//! cost of building a trace record and without the agent having to load vmlinux's BTF into aya.
//!
//! Each program is a thin adapter: it reads what its tracepoint offers, finds the connection's
//! record (keyed by `struct sock *`) and calls the shared state machine in
//! `tracer_common::conn`, which decides the outcome. Outcomes are counted exactly here, in
//! per-CPU maps; failures also go to user space through a ring buffer, with their evidence.
//!
//! | program               | tracepoint                     | records                          |
//! |-----------------------|--------------------------------|----------------------------------|
//! | `inet_sock_set_state` | raw `inet_sock_set_state`      | start (process ctx), state, end  |
//! | `tcp_receive_reset`   | raw `tcp_receive_reset`        | the upstream's RST               |
//! | `tcp_retransmit_skb`  | raw `tcp_retransmit_skb`       | SYN and data retransmits         |
//! | `tcp_sendmsg_locked`  | raw `tcp_sendmsg_locked`       | the proxy starts a request       |
//! | `sys_enter_connect`   | `syscalls:sys_enter_connect`   | where connect() goes             |
//! | `sys_exit_connect`    | `syscalls:sys_exit_connect`    | connect() failing before a SYN   |
//! | `sched_process_exit`  | raw `sched_process_exit`       | a listener owner's death         |
//! | `mark_victim`         | `oom:mark_victim`              | the OOM killer's victim          |
//!
//! `inet_sock_set_state` also reports listeners opening and closing (CLOSE↔LISTEN) to the
//! `LIFECYCLE` ring buffer, with the task that closed them: a dying process closes its
//! listeners itself, so its exit code and flags say why the listener went away.
#![no_std]
#![no_main]
#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values go by reference so they are not copied on the 512-byte BPF stack"
)]

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_kernel_buf,
        bpf_probe_read_kernel_str_bytes, bpf_probe_read_user,
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{RawTracePointContext, TracePointContext},
};
use tracer_common::{
    Config, ConnTrack, CountKey, Endpoint, ExitEvent, FailureEvent, LatencyKey, ListenerEvent,
    OomEvent, OomFields, Outcome, Proxy, RecordKind, RouteKey, Source, Stat, Tally,
    conn::{CloseFacts, PendingConnect, errno, tcp_state},
    counts::{
        CONNECTS_MAX_ENTRIES, CONNS_MAX_ENTRIES, COUNTS_MAX_ENTRIES, EVENTS_RING_BYTES,
        LATENCY_MAX_ENTRIES, LIFECYCLE_RING_BYTES, LISTENER_OWNERS_MAX_ENTRIES, OVERFLOW_SLOTS,
        UNIX_PATHS_MAX_ENTRIES, connect_bucket,
    },
    net::{
        AF_INET, AF_INET6, AF_UNIX, IPPROTO_TCP, SOCK_SEQPACKET, SOCK_STREAM, UNIX_PATH_MAX,
        UnixPath, unix_path_key,
    },
};

/// Offsets and settings, filled in by the agent at load time (`EbpfLoader::override_global`).
#[unsafe(no_mangle)]
static CONFIG: Config = Config::UNSET;

/// Reads a field of [`CONFIG`] as the loaded program sees it, not as it was compiled.
macro_rules! config {
    ($($field:tt)+) => {
        // SAFETY: CONFIG is a plain read-only global.
        unsafe { read_volatile(addr_of!(CONFIG.$($field)+)) }
    };
}

/// Live outbound connections, keyed by `struct sock *`.
#[map]
static CONNS: LruHashMap<u64, ConnTrack> = LruHashMap::with_max_entries(CONNS_MAX_ENTRIES, 0);

/// connect() calls in flight, keyed by thread (`pid_tgid`).
#[map]
static CONNECTS: HashMap<u64, PendingConnect> = HashMap::with_max_entries(CONNECTS_MAX_ENTRIES, 0);

/// Exact counts per proxy × upstream × outcome.
#[map]
static COUNTS: PerCpuHashMap<CountKey, Tally> =
    PerCpuHashMap::with_max_entries(COUNTS_MAX_ENTRIES, 0);

/// Per-CPU scratch space (too big for the stack): the leading bytes of a `struct sock`, read in
/// one go, or a Unix socket path.
#[map]
static SCRATCH: PerCpuArray<[u8; Config::SOCK_COMMON_BLOCK as usize]> =
    PerCpuArray::with_max_entries(1, 0);

/// The paths of the Unix sockets connected to, by [`unix_path_key`] (the `Endpoint` of a Unix
/// upstream holds only the key).
#[map]
static UNIX_PATHS: LruHashMap<u64, UnixPath> =
    LruHashMap::with_max_entries(UNIX_PATHS_MAX_ENTRIES, 0);

/// Successful connects per route × connect-time bucket.
#[map]
static CONNECT_LATENCY: PerCpuHashMap<LatencyKey, u64> =
    PerCpuHashMap::with_max_entries(LATENCY_MAX_ENTRIES, 0);

/// Counts per outcome that did not fit in `COUNTS`.
#[map]
static OVERFLOW_COUNTS: PerCpuArray<Tally> = PerCpuArray::with_max_entries(OVERFLOW_SLOTS, 0);

/// The agent's health counters, indexed by `Stat`.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

/// Failures, for user space.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// Listeners opening and closing, OOM kills, listener owners' exits: rare, and kept apart.
#[map]
static LIFECYCLE: RingBuf = RingBuf::with_byte_size(LIFECYCLE_RING_BYTES, 0);

/// Processes (tgid) that own a listener: their exits are reported. User space adds the ones
/// that were listening before tracer started.
#[map]
static LISTENER_OWNERS: HashMap<u32, u32> =
    HashMap::with_max_entries(LISTENER_OWNERS_MAX_ENTRIES, 0);

// ---------------------------------------------------------------------------------------------
// Programs

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: RawTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    let _ = sock_state_changed(sk, old, new);
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

#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit(ctx: RawTracePointContext) -> i32 {
    let task: *const u8 = ctx.arg(0);
    let _ = process_exited(task);
    0
}

#[tracepoint(category = "oom", name = "mark_victim")]
pub fn mark_victim(ctx: TracePointContext) -> u32 {
    let _ = oom_victim_chosen(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_connect")]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    let _ = connect_called(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_connect")]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    let _ = connect_returned(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_socket")]
pub fn sys_exit_socket(ctx: TracePointContext) -> u32 {
    let _ = out_of_descriptors(&ctx, config!(syscalls.socket_ret), Source::SocketCall);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    let _ = out_of_descriptors(&ctx, config!(syscalls.accept_ret), Source::AcceptCall);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept")]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    let _ = out_of_descriptors(&ctx, config!(syscalls.accept_ret), Source::AcceptCall);
    0
}

// ---------------------------------------------------------------------------------------------
// Socket state changes

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
        return Ok(());
    };
    let now = now();
    if new == tcp_state::CLOSE {
        connection_closed(sk, conn, old, now);
        if CONNS.remove(&(sk as u64)).is_ok() {
            stat(Stat::ConnsClosed);
        }
    } else if old == tcp_state::SYN_SENT && new == tcp_state::ESTABLISHED {
        let took = conn.on_established(now);
        conn.local.port = local_port(sk);
        let route = route_of(&conn.proxy, &conn.upstream);
        count(&route, Outcome::Connected, took);
        count_latency(&route, took);
    } else {
        conn.on_state_change(old, new, now);
    }
    Ok(())
}

fn start_tracking(sk: *const u8) -> Result<(), i64> {
    let protocol = read_kernel::<u16>(sk, config!(offsets.sk_protocol))?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    // The sock_common fields in one read (user space checked they lie in the block).
    let block = SCRATCH.get_ptr_mut(0).ok_or(-1i64)?;
    // SAFETY: this CPU's scratch slot; bpf_probe_read_kernel_buf copes with any address.
    let common = unsafe {
        bpf_probe_read_kernel_buf(sk, &mut *block).map_err(i64::from)?;
        &*block
    };
    let family = u16::from_ne_bytes(field(common, config!(offsets.skc_family))?);
    let dport = u16::from_be_bytes(field(common, config!(offsets.skc_dport))?);
    let (upstream, local) = match family {
        AF_INET => (
            Endpoint::v4(field(common, config!(offsets.skc_daddr))?, dport),
            Endpoint::v4(field(common, config!(offsets.skc_rcv_saddr))?, 0),
        ),
        AF_INET6 => (
            Endpoint::v6(field(common, config!(offsets.skc_v6_daddr))?, dport),
            Endpoint::v6(field(common, config!(offsets.skc_v6_rcv_saddr))?, 0),
        ),
        _ => return Ok(()),
    };
    let net = usize::from_ne_bytes(field(common, config!(offsets.skc_net))?) as *const u8;
    let netns = read_kernel::<u32>(net, config!(offsets.net_ns_inum)).unwrap_or(0);
    let key = sk as u64;
    let conn = ConnTrack::connecting(current_proxy(netns), upstream, local, now());
    match CONNS.insert(&key, &conn, 0) {
        Ok(()) => stat(Stat::ConnsTracked),
        Err(_) => stat(Stat::ConnsUntracked),
    }
    // Tell the connect() in flight which socket it is about.
    if let Some(pending) = CONNECTS.get_ptr_mut(&bpf_get_current_pid_tgid()) {
        // SAFETY: a pointer into the map's value, valid while this program runs.
        unsafe { (*pending).sk = key };
    }
    Ok(())
}

/// `N` bytes at `offset` in a block read from the kernel.
#[inline(always)]
fn field<const N: usize>(block: &[u8], offset: u32) -> Result<[u8; N], i64> {
    let offset = offset as usize;
    let bytes = block.get(offset..offset + N).ok_or(-1i64)?;
    let mut out = [0u8; N];
    out.copy_from_slice(bytes);
    Ok(out)
}

fn connection_closed(sk: *const u8, conn: &mut ConnTrack, old_state: i32, now: u64) {
    let sk_err = read_kernel::<i32>(sk, config!(offsets.sk_err)).unwrap_or(0);
    let bytes_received = read_kernel::<u64>(sk, config!(offsets.tcp_bytes_received)).unwrap_or(0);
    if conn.established_ns == 0 && conn.reset_received == 0 && sk_err == 0 {
        // SYN_SENT→CLOSE with no error of its own inside connect() (no local port left): the
        // syscall's return value says why, at sys_exit_connect.
        if let Some(pending) = CONNECTS.get_ptr_mut(&bpf_get_current_pid_tgid()) {
            // SAFETY: a pointer into the map's value, valid while this program runs.
            let pending = unsafe { &mut *pending };
            if pending.sk == sk as u64 {
                pending.closed_in_call = 1;
                return;
            }
        }
    }
    if conn.local.port == 0 {
        conn.local.port = local_port(sk);
    }
    let verdict = conn.on_close(CloseFacts {
        now_ns: now,
        old_state,
        sk_err,
        bytes_received,
        min_wait_ns: config!(min_wait_ns),
        sends_tracked: config!(sends_tracked) != 0,
    });
    let Some(outcome) = verdict.outcome else {
        return;
    };
    let send = count(
        &route_of(&conn.proxy, &conn.upstream),
        outcome,
        verdict.waited_ns,
    );
    if outcome.is_failure() {
        let bytes_acked = read_kernel::<u64>(sk, config!(offsets.tcp_bytes_acked)).unwrap_or(0);
        report(
            conn,
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
        );
    }
}

// ---------------------------------------------------------------------------------------------
// connect() failing before a SYN leaves

fn connect_called(ctx: &TracePointContext) -> Result<(), i64> {
    if config!(ready) == 0 {
        return Ok(());
    }
    // Only where the destination is: it is read at exit, and only if connect() failed early.
    let pending = PendingConnect {
        uservaddr: read_field(ctx, config!(syscalls.connect_uservaddr))?,
        addrlen: read_field(ctx, config!(syscalls.connect_addrlen))?,
        start_ns: now(),
        sk: 0,
        closed_in_call: 0,
        _pad: [0; 3],
        fd: read_field::<u64>(ctx, config!(syscalls.connect_fd))? as u32,
    };
    if CONNECTS
        .insert(&bpf_get_current_pid_tgid(), &pending, 0)
        .is_err()
    {
        stat(Stat::ConnectsUntracked);
    }
    Ok(())
}

/// The destination of a connect() from the caller's `struct sockaddr`, if it is an IP one:
/// written into `into`, and `false` for other families. (An out-parameter rather than an
/// `Option<Endpoint>`: LLVM copies a `None`'s undefined payload, which the verifier rejects.)
fn destination(uservaddr: u64, addrlen: u64, into: &mut Endpoint) -> Result<bool, i64> {
    let sockaddr = uservaddr as *const u8;
    // SAFETY: bpf_probe_read_user copes with any user pointer.
    let family: u16 = unsafe { bpf_probe_read_user(sockaddr.cast())? };
    // struct sockaddr_in{,6}: port at 2 (big-endian), IPv4 address at 4, IPv6 address at 8.
    let port = u16::from_be(unsafe { bpf_probe_read_user(sockaddr.wrapping_add(2).cast())? });
    *into = match family {
        AF_INET if addrlen >= 16 => Endpoint::v4(
            unsafe { bpf_probe_read_user(sockaddr.wrapping_add(4).cast())? },
            port,
        ),
        AF_INET6 if addrlen >= 28 => Endpoint::v6(
            unsafe { bpf_probe_read_user(sockaddr.wrapping_add(8).cast())? },
            port,
        ),
        _ => return Ok(false),
    };
    Ok(true)
}

fn connect_returned(ctx: &TracePointContext) -> Result<(), i64> {
    let thread = bpf_get_current_pid_tgid();
    let Some(pending) = CONNECTS.get_ptr(&thread) else {
        return Ok(());
    };
    // SAFETY: a pointer into the map's value; copied before the entry is removed.
    let pending = unsafe { *pending };
    let _ = CONNECTS.remove(&thread);
    let ret: i64 = read_field(ctx, config!(syscalls.connect_ret))?;
    // A socket that reached SYN_SENT is TCP; otherwise it may be a Unix one (the caller's
    // sockaddr says), read only then to keep TCP connects cheap.
    if pending.sk == 0 {
        // SAFETY: bpf_probe_read_user copes with any user pointer.
        let family: u16 = unsafe { bpf_probe_read_user(pending.uservaddr as *const u16)? };
        if family == AF_UNIX {
            return unix_connect_returned(&pending, ret);
        }
    }
    let Some(outcome) = pending.on_exit(ret) else {
        return Ok(());
    };
    if pending.sk != 0 {
        // It reached SYN_SENT, so it is TCP; its record is no longer needed.
        let _ = CONNS.remove(&pending.sk);
    } else if !fd_is_tcp(pending.fd)? {
        // A UDP socket's connect() failing (no route for a DNS query…) is not our business.
        return Ok(());
    }
    let mut upstream = Endpoint::default();
    if !destination(pending.uservaddr, pending.addrlen, &mut upstream)? {
        return Ok(());
    }
    decided_in_call(
        upstream,
        pending.start_ns,
        outcome,
        ret,
        Source::ConnectCall,
    );
    Ok(())
}

/// A system call decided an attempt by itself (there is no TCP state to follow): counts
/// `outcome` for the current process toward `upstream`, and reports it when it is a failure.
fn decided_in_call(upstream: Endpoint, start_ns: u64, outcome: Outcome, ret: i64, source: Source) {
    let now = now();
    let conn = ConnTrack::connecting(
        current_proxy(current_netns()),
        upstream,
        Endpoint::default(),
        start_ns,
    );
    let waited_ns = now.saturating_sub(start_ns);
    let route = route_of(&conn.proxy, &conn.upstream);
    let send = count(&route, outcome, waited_ns);
    if outcome == Outcome::Connected {
        // A Unix socket connected: its connect time, as for TCP at ESTABLISHED.
        count_latency(&route, waited_ns);
    }
    if outcome.is_failure() {
        report(
            &conn,
            &Report {
                send,
                close_ns: now,
                waited_ns,
                bytes_received: 0,
                bytes_acked: 0,
                errno: (-ret) as i32,
                outcome,
                source,
            },
        );
    }
}

/// The `struct socket` behind the current task's file descriptor `fd`:
/// current->files->fdt->fd[fd]->private_data.
fn fd_socket(fd: u32) -> Result<*const u8, i64> {
    let task = current_task();
    let files: *const u8 = read_kernel(task, config!(offsets.task_files))?;
    let fdt: *const u8 = read_kernel(files, config!(offsets.files_fdt))?;
    let max_fds: u32 = read_kernel(fdt, config!(offsets.fdtable_max_fds))?;
    if fd >= max_fds {
        return Err(-1);
    }
    let fds: *const u8 = read_kernel(fdt, config!(offsets.fdtable_fd))?;
    let file: *const u8 = read_kernel(fds, fd * 8)?;
    read_kernel(file, config!(offsets.file_private_data))
}

/// Whether file descriptor `fd` of the current process is a TCP socket (socket->sk->sk_protocol).
fn fd_is_tcp(fd: u32) -> Result<bool, i64> {
    let socket = fd_socket(fd)?;
    let sk: *const u8 = read_kernel(socket, config!(offsets.socket_sk))?;
    let protocol: u16 = read_kernel(sk, config!(offsets.sk_protocol))?;
    Ok(protocol == IPPROTO_TCP)
}

/// socket() or accept() returned (`ret` at offset `ret_at`): out of file descriptors, the proxy
/// can neither start an attempt (nginx: "socket() failed (24: Too many open files) while
/// connecting to upstream") nor take a client's connection ("accept4() failed (24: …)"). No
/// upstream is known yet.
fn out_of_descriptors(ctx: &TracePointContext, ret_at: u32, source: Source) -> Result<(), i64> {
    if config!(ready) == 0 {
        return Ok(());
    }
    let ret: i64 = read_field(ctx, ret_at)?;
    if ret != -i64::from(errno::EMFILE) && ret != -i64::from(errno::ENFILE) {
        return Ok(());
    }
    decided_in_call(
        Endpoint::default(),
        now(),
        Outcome::FdExhausted,
        ret,
        source,
    );
    Ok(())
}

/// A connect() to a Unix socket returned: the whole attempt, counted (and reported when it
/// failed) under the socket's path.
fn unix_connect_returned(pending: &PendingConnect, ret: i64) -> Result<(), i64> {
    let Some(outcome) = PendingConnect::on_unix_exit(ret) else {
        return Ok(());
    };
    // Only stream sockets are upstreams: a datagram socket's connect() (syslog's /dev/log
    // with no syslog running) is not.
    let kind: u16 = read_kernel(fd_socket(pending.fd)?, config!(offsets.socket_type))?;
    if kind != SOCK_STREAM && kind != SOCK_SEQPACKET {
        return Ok(());
    }
    let key = remember_unix_path(pending.uservaddr, pending.addrlen)?;
    decided_in_call(
        Endpoint::unix(key),
        pending.start_ns,
        outcome,
        ret,
        Source::ConnectCall,
    );
    Ok(())
}

/// Reads a `struct sockaddr_un`'s path, stores it in `UNIX_PATHS` if it is new, returns its key.
fn remember_unix_path(uservaddr: u64, addrlen: u64) -> Result<u64, i64> {
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(-1i64)?;
    // SAFETY: this CPU's scratch slot, at least UNIX_PATH_MAX bytes long.
    let path: &mut UnixPath = unsafe { &mut *scratch.cast::<UnixPath>() };
    *path = [0; UNIX_PATH_MAX];
    // sun_path follows the 2-byte family; an abstract name runs to the address length.
    let len = (addrlen.saturating_sub(2) as usize).min(UNIX_PATH_MAX);
    if len > 0 {
        // SAFETY: bpf_probe_read_user copes with any user pointer; len ≤ the buffer.
        unsafe {
            aya_ebpf::helpers::bpf_probe_read_user_buf(
                (uservaddr + 2) as *const u8,
                &mut path[..len],
            )?
        };
    }
    if path[0] != 0 {
        // A filesystem path ends at its NUL; what follows it in the caller's buffer is not
        // part of it.
        let mut ended = false;
        for byte in path.iter_mut() {
            ended |= *byte == 0;
            if ended {
                *byte = 0;
            }
        }
    }
    let key = unix_path_key(path);
    if UNIX_PATHS.get_ptr(&key).is_none() {
        let _ = UNIX_PATHS.insert(&key, path, 0);
    }
    Ok(key)
}

// ---------------------------------------------------------------------------------------------
// Listeners and the processes that own them

fn listener_changed(sk: *const u8, opened: bool) -> Result<(), i64> {
    let protocol = read_kernel::<u16>(sk, config!(offsets.sk_protocol))?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let family = read_kernel::<u16>(sk, config!(offsets.skc_family))?;
    // Going CLOSE→LISTEN the bound port is in skc_num; going to CLOSE only inet_sport keeps it.
    let port = if opened {
        read_kernel::<u16>(sk, config!(offsets.skc_num))?
    } else {
        local_port(sk)
    };
    let local = match family {
        AF_INET => Endpoint::v4(read_kernel(sk, config!(offsets.skc_rcv_saddr))?, port),
        AF_INET6 => Endpoint::v6(read_kernel(sk, config!(offsets.skc_v6_rcv_saddr))?, port),
        _ => return Ok(()),
    };
    let task = current_task();
    let proxy = current_proxy(netns_of(sk));
    if opened {
        let _ = LISTENER_OWNERS.insert(&proxy.tgid, &1, 0);
    }
    let Some(mut entry) = LIFECYCLE.reserve::<ListenerEvent>(0) else {
        stat(Stat::LifecycleLost);
        return Ok(());
    };
    entry.write(ListenerEvent {
        kind: RecordKind::Listener as u32,
        opened: u32::from(opened),
        time_ns: now(),
        local,
        task: proxy,
        task_flags: read_kernel::<u32>(task, config!(offsets.task_flags)).unwrap_or(0),
        exit_code: read_kernel::<i32>(task, config!(offsets.task_exit_code)).unwrap_or(0),
        // Set by listen() before the socket goes LISTEN.
        max_backlog: read_kernel::<u32>(sk, config!(offsets.sk_max_ack_backlog)).unwrap_or(0),
        _pad: 0,
    });
    entry.submit(0);
    Ok(())
}

fn process_exited(task: *const u8) -> Result<(), i64> {
    if config!(ready) == 0 {
        return Ok(());
    }
    let tgid = read_kernel::<u32>(task, config!(offsets.task_tgid))?;
    if LISTENER_OWNERS.get_ptr(&tgid).is_none() {
        return Ok(());
    }
    // The process is gone when its main thread exits.
    if read_kernel::<u32>(task, config!(offsets.task_pid))? != tgid {
        return Ok(());
    }
    let _ = LISTENER_OWNERS.remove(&tgid);
    let Some(mut entry) = LIFECYCLE.reserve::<ExitEvent>(0) else {
        stat(Stat::LifecycleLost);
        return Ok(());
    };
    entry.write(ExitEvent {
        kind: RecordKind::Exit as u32,
        exit_code: read_kernel::<i32>(task, config!(offsets.task_exit_code)).unwrap_or(0),
        time_ns: now(),
        // This tracepoint runs in the exiting task itself.
        task: current_proxy(current_netns()),
        task_flags: read_kernel::<u32>(task, config!(offsets.task_flags)).unwrap_or(0),
        _pad: 0,
    });
    entry.submit(0);
    Ok(())
}

fn oom_victim_chosen(ctx: &TracePointContext) -> Result<(), i64> {
    if config!(ready) == 0 {
        return Ok(());
    }
    let optional_u64 = |offset: u32| {
        if offset == OomFields::MISSING {
            0
        } else {
            read_field::<u64>(ctx, offset).unwrap_or(0)
        }
    };
    let pid: i32 = read_field(ctx, config!(oom.pid))?;
    let mut comm = [0u8; 16];
    let comm_field = config!(oom.comm);
    if comm_field != OomFields::MISSING {
        // A __data_loc field: the string's offset in the record is the low 16 bits.
        let location: u32 = read_field(ctx, comm_field)?;
        let at = (ctx.as_ptr() as *const u8).wrapping_add((location & 0xffff) as usize);
        // SAFETY: bpf_probe_read_kernel_str copes with any address.
        let _ = unsafe { bpf_probe_read_kernel_str_bytes(at, &mut comm) };
    }
    let Some(mut entry) = LIFECYCLE.reserve::<OomEvent>(0) else {
        stat(Stat::LifecycleLost);
        return Ok(());
    };
    entry.write(OomEvent {
        kind: RecordKind::Oom as u32,
        pid: pid as u32,
        time_ns: now(),
        anon_rss_kb: optional_u64(config!(oom.anon_rss)),
        total_vm_kb: optional_u64(config!(oom.total_vm)),
        comm,
    });
    entry.submit(0);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Counting and reporting

/// What a failure report adds to the connection's record.
struct Report {
    /// Whether its key's event budget lets it go to user space (counted either way).
    send: bool,
    close_ns: u64,
    waited_ns: u64,
    bytes_received: u64,
    bytes_acked: u64,
    errno: i32,
    outcome: Outcome,
    source: Source,
}

fn report(conn: &ConnTrack, report: &Report) {
    if !report.send {
        stat(Stat::EventsSampledOut);
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<FailureEvent>(0) else {
        stat(Stat::EventsLost);
        return;
    };
    entry.write(FailureEvent {
        kind: RecordKind::Failure as u32,
        _pad0: 0,
        conn: *conn,
        close_ns: report.close_ns,
        waited_ns: report.waited_ns,
        bytes_received: report.bytes_received,
        bytes_acked: report.bytes_acked,
        errno: report.errno,
        outcome: report.outcome as u8,
        source: report.source as u8,
        _pad: [0; 2],
    });
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

fn route_of(proxy: &Proxy, upstream: &Endpoint) -> RouteKey {
    RouteKey {
        comm: proxy.comm,
        cgroup_id: proxy.cgroup_id,
        upstream: *upstream,
    }
}

/// Counts one `outcome` on `route`, exactly; returns whether an event may go to user space for
/// it (the events-per-second budget of this key on this CPU).
fn count(route: &RouteKey, outcome: Outcome, ns: u64) -> bool {
    let key = CountKey {
        route: *route,
        outcome: outcome as u8,
        _pad: [0; 7],
    };
    let now = now();
    let per_second = config!(events_per_second);
    if let Some(send) = add(&key, ns, now, per_second) {
        return send;
    }
    let mut first = Tally::default();
    let send = first.add(ns, now, per_second);
    // Another CPU may create the key between the lookup and the insert: look again.
    if COUNTS.insert(&key, &first, BPF_NOEXIST as u64).is_ok() {
        return send;
    }
    if let Some(send) = add(&key, ns, now, per_second) {
        return send;
    }
    // COUNTS is full: keep the exact total per outcome.
    stat(Stat::CountsOverflowed);
    match OVERFLOW_COUNTS.get_ptr_mut(outcome as u32) {
        // SAFETY: this CPU's slot of a per-CPU array; programs do not migrate while running.
        Some(tally) => unsafe { (*tally).add(ns, now, per_second) },
        None => false,
    }
}

fn count_latency(route: &RouteKey, ns: u64) {
    let key = LatencyKey {
        route: *route,
        bucket: connect_bucket(ns),
        _pad: [0; 7],
    };
    if let Some(n) = CONNECT_LATENCY.get_ptr_mut(&key) {
        // SAFETY: this CPU's value of a per-CPU map entry.
        unsafe { *n += 1 };
        return;
    }
    if CONNECT_LATENCY
        .insert(&key, &1, BPF_NOEXIST as u64)
        .is_err()
    {
        match CONNECT_LATENCY.get_ptr_mut(&key) {
            // SAFETY: as above.
            Some(n) => unsafe { *n += 1 },
            None => stat(Stat::LatencyOverflowed),
        }
    }
}

/// Adds to an existing key; `None` when the key is not there.
fn add(key: &CountKey, ns: u64, now: u64, per_second: u32) -> Option<bool> {
    let tally = COUNTS.get_ptr_mut(key)?;
    // SAFETY: this CPU's value of a per-CPU map entry.
    Some(unsafe { (*tally).add(ns, now, per_second) })
}

fn stat(which: Stat) {
    if let Some(value) = STATS.get_ptr_mut(which as u32) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe { *value += 1 };
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers

fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// The record of a tracked connection.
fn tracked(sk: *const u8) -> Option<&'static mut ConnTrack> {
    // SAFETY: a pointer into the map's value, valid while this program runs; the kernel runs
    // one program per CPU at a time and a connection's events rarely race.
    CONNS
        .get_ptr_mut(&(sk as u64))
        .map(|conn| unsafe { &mut *conn })
}

/// Reads a field of a classic tracepoint's record at the offset its format file gives.
fn read_field<T>(ctx: &TracePointContext, offset: u32) -> Result<T, i64> {
    // SAFETY: read_at goes through bpf_probe_read_kernel, which copes with any address.
    unsafe { ctx.read_at(offset as usize).map_err(i64::from) }
}

fn current_task() -> *const u8 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_get_current_task() as *const u8 }
}

/// The socket's local port, in host byte order (0 when not known).
fn local_port(sk: *const u8) -> u16 {
    u16::from_be(read_kernel::<u16>(sk, config!(offsets.inet_sport)).unwrap_or(0))
}

/// Reads a `T` at `base + offset` in kernel memory.
fn read_kernel<T>(base: *const u8, offset: u32) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel copes with any address.
    unsafe { bpf_probe_read_kernel(base.add(offset as usize).cast::<T>()).map_err(i64::from) }
}

/// The network namespace of a socket (its inode number).
fn netns_of(sk: *const u8) -> u32 {
    read_kernel::<*const u8>(sk, config!(offsets.skc_net))
        .and_then(|net| read_kernel::<u32>(net, config!(offsets.net_ns_inum)))
        .unwrap_or(0)
}

/// The network namespace of the current task (`task->nsproxy->net_ns`), for where no socket is
/// at hand; 0 when not known (a task past exit_task_namespaces has no nsproxy).
fn current_netns() -> u32 {
    read_kernel::<*const u8>(current_task(), config!(offsets.task_nsproxy))
        .and_then(|nsproxy| read_kernel::<*const u8>(nsproxy, config!(offsets.nsproxy_net_ns)))
        .and_then(|net| read_kernel::<u32>(net, config!(offsets.net_ns_inum)))
        .unwrap_or(0)
}

/// The process behind the current thread: its main thread's name, pid, tid and cgroup, with the
/// network namespace `netns` of the socket concerned.
fn current_proxy(netns: u32) -> Proxy {
    let pid_tgid = bpf_get_current_pid_tgid();
    let task = current_task();
    let comm = read_kernel::<*const u8>(task, config!(offsets.task_group_leader))
        .and_then(|leader| read_kernel::<[u8; 16]>(leader, config!(offsets.task_comm)))
        .or_else(|_| bpf_get_current_comm().map_err(i64::from))
        .unwrap_or([0; 16]);
    Proxy {
        // SAFETY: a helper without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        tgid: (pid_tgid >> 32) as u32,
        pid: pid_tgid as u32,
        comm,
        netns,
        _pad: 0,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
