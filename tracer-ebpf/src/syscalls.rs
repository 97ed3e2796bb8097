//! Attempts a system call decides by itself, with no TCP state to follow: connect() failing
//! before any SYN left (no route, no local port), every connect() to a Unix socket, and
//! socket()/accept() failing for want of file descriptors. And bind(): a server that binds the
//! Unix socket path it just failed to connect to was probing its own socket (php-fpm does as it
//! starts), and that connect() is taken back.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user, bpf_probe_read_user_buf},
    macros::tracepoint,
    programs::TracePointContext,
};
use tracer_common::{
    Endpoint, Outcome, Program, RecordKind, Source, Stat, Task,
    conn::{PendingConnect, errno},
    counts::{SELF_PROBE_WINDOW_NS, UnixFail, UnixFailKey},
    event::SelfProbeEvent,
    net::{
        AF_INET, AF_INET6, AF_UNIX, IPPROTO_TCP, SOCK_SEQPACKET, SOCK_STREAM, UNIX_PATH_MAX,
        UnixPath, unix_path_key,
    },
};

use crate::{
    counting::{Report, count, count_key, note_error, report, stat, uncount},
    kernel::{
        ARG0, ARG1, ARG2, RET, current_is_ignored, current_netns, current_task, fill_current_proxy,
        now, read_field, read_kernel, syscall_word,
    },
    maps::{CONNECTS, CONNS, LIFECYCLE, UNIX_CONNECT_FAILS, UNIX_PATHS},
};

#[tracepoint(category = "syscalls", name = "sys_enter_connect")]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    note_error(Program::SysEnterConnect, connect_called(&ctx));
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_connect")]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    note_error(Program::SysExitConnect, connect_returned(&ctx));
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_bind")]
pub fn sys_enter_bind(ctx: TracePointContext) -> u32 {
    note_error(Program::SysEnterBind, bind_called(&ctx));
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_socket")]
pub fn sys_exit_socket(ctx: TracePointContext) -> u32 {
    let result = out_of_descriptors(&ctx, config!(syscalls.socket_ret), Source::SocketCall);
    note_error(Program::SysExitSocket, result);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    let result = out_of_descriptors(&ctx, config!(syscalls.accept_ret), Source::AcceptCall);
    note_error(Program::SysExitAccept4, result);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept")]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    let result = out_of_descriptors(&ctx, config!(syscalls.accept_ret), Source::AcceptCall);
    note_error(Program::SysExitAccept, result);
    0
}

/// connect() called: notes where to (read only if it fails before any SYN) in this thread's
/// record, written over in place. Nothing else: most calls decide nothing here.
fn connect_called(ctx: &TracePointContext) -> Result<(), i64> {
    if config!(ready) == 0 {
        return Ok(());
    }
    let fd = syscall_word::<ARG0>(ctx, config!(syscalls.connect_fd))?;
    let uservaddr = syscall_word::<ARG1>(ctx, config!(syscalls.connect_uservaddr))?;
    let addrlen = syscall_word::<ARG2>(ctx, config!(syscalls.connect_addrlen))?;
    let thread = bpf_get_current_pid_tgid();
    let start_ns = now();
    if let Some(pending) = CONNECTS.get_ptr_mut(&thread) {
        // SAFETY: a pointer into the map's value, valid while this program runs; the record
        // is this thread's.
        let pending = unsafe { &mut *pending };
        pending.uservaddr = uservaddr;
        pending.addrlen = addrlen;
        pending.start_ns = start_ns;
        pending.sk = 0;
        pending.closed_in_call = 0;
        pending.active = 1;
        pending.fd = fd as u32;
        return Ok(());
    }
    let pending = PendingConnect {
        uservaddr,
        addrlen,
        start_ns,
        sk: 0,
        closed_in_call: 0,
        active: 1,
        _pad: [0; 2],
        fd: fd as u32,
    };
    if CONNECTS.insert(&thread, &pending, 0).is_err() {
        stat(Stat::ConnectsUntracked);
    }
    Ok(())
}

/// The destination of a connect() from the caller's `struct sockaddr`, if it is an IP one:
/// written into `into`, and `false` for other families. (An out-parameter rather than an
/// `Option<Endpoint>`: LLVM copies a `None`'s undefined payload, which the verifier rejects.)
fn destination(uservaddr: u64, addrlen: u64, into: &mut Endpoint) -> Result<bool, i64> {
    let sockaddr = uservaddr as *const u8;
    // SAFETY (all reads below): bpf_probe_read_user copes with any user pointer.
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
    let Some(pending) = CONNECTS.get_ptr_mut(&bpf_get_current_pid_tgid()) else {
        return Ok(());
    };
    // SAFETY: a pointer into the map's value, valid while this program runs; copied, and
    // marked done (the record stays for the thread's next call).
    let pending = unsafe {
        if (*pending).active == 0 {
            return Ok(());
        }
        (*pending).active = 0;
        *pending
    };
    let ret = syscall_word::<RET>(ctx, config!(syscalls.connect_ret))? as i64;
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
        if pending.sk != 0
            && (ret == 0 || ret == -i64::from(errno::EINPROGRESS))
            && config!(peek) != 0
        {
            // A followed connection under way: its first bytes are wanted.
            crate::peek::watch(
                (bpf_get_current_pid_tgid() >> 32) as u32,
                pending.fd,
                pending.sk,
            );
        }
        return Ok(());
    };
    if pending.sk != 0 {
        // It reached SYN_SENT, so it is TCP; its record is no longer needed.
        let _ = CONNS.remove(&pending.sk);
    } else if !fresh_tcp_attempt(pending.fd)? {
        // A UDP socket's connect() failing (no route for a DNS query…) is not our business;
        // nor is a connect() that only collects how an earlier attempt ended.
        return Ok(());
    }
    let mut upstream = Endpoint::default();
    if !destination(pending.uservaddr, pending.addrlen, &mut upstream)? {
        return Ok(());
    }
    let _ = decided_in_call(
        &upstream,
        pending.start_ns,
        outcome,
        ret,
        Source::ConnectCall,
    );
    Ok(())
}

/// A system call decided an attempt by itself (there is no TCP state to follow): counts
/// `outcome` for the current process toward `upstream`, and reports it when it is a failure.
/// Returns how long it waited (what the count added), or [`NOT_COUNTED`]. (Not an `Option`:
/// its out-pointer would be a sixth argument, more than BPF calls take.)
#[inline(never)]
fn decided_in_call(
    upstream: &Endpoint,
    start_ns: u64,
    outcome: Outcome,
    ret: i64,
    source: Source,
) -> u64 {
    if current_is_ignored() {
        return NOT_COUNTED;
    }
    let mut proxy = Task::default();
    fill_current_proxy(&mut proxy, current_netns());
    let now = now();
    let waited_ns = now.saturating_sub(start_ns);
    // (A Unix socket that connected is counted with its connect time, as TCP at ESTABLISHED.)
    let send = count(&proxy, upstream, outcome, waited_ns, now);
    if outcome.is_failure() {
        report(
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
            |into| {
                into.begin(upstream, &Endpoint::default(), start_ns);
                into.proxy = proxy;
            },
        );
    }
    waited_ns
}

/// What [`decided_in_call`] returns when it counted nothing.
const NOT_COUNTED: u64 = u64::MAX;

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

/// Whether file descriptor `fd` of the current process is a TCP socket on which this connect()
/// failed before any SYN left, as a first attempt. A socket that had an attempt before has a
/// send sequence number (`tcp_sock.write_seq`, set when the first SYN is built and never reset
/// to 0): a connect() on it that failed without a SYN of its own only collected the earlier
/// attempt's error (HAProxy learns how a non-blocking connect() ended by calling it again), and
/// that attempt was counted when its socket closed. (An application that reuses a failed
/// socket for a new attempt that then fails before any SYN is not counted: servers open a new
/// socket per attempt.)
fn fresh_tcp_attempt(fd: u32) -> Result<bool, i64> {
    let socket = fd_socket(fd)?;
    let sk: *const u8 = read_kernel(socket, config!(offsets.socket_sk))?;
    let protocol: u16 = read_kernel(sk, config!(offsets.sk_protocol))?;
    if protocol != IPPROTO_TCP {
        return Ok(false);
    }
    Ok(read_kernel::<u32>(sk, config!(offsets.tcp_write_seq))? == 0)
}

/// socket() or accept() returned (`ret` at offset `ret_at`): out of file descriptors, the proxy
/// can neither start an attempt (nginx: "socket() failed (24: Too many open files) while
/// connecting to upstream") nor take a client's connection ("accept4() failed (24: …)"). No
/// upstream is known yet.
fn out_of_descriptors(ctx: &TracePointContext, ret_at: u32, source: Source) -> Result<(), i64> {
    if config!(ready) == 0 {
        return Ok(());
    }
    let ret = syscall_word::<RET>(ctx, ret_at)? as i64;
    if ret != -i64::from(errno::EMFILE) && ret != -i64::from(errno::ENFILE) {
        return Ok(());
    }
    let _ = decided_in_call(
        &Endpoint::default(),
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
    let Some(outcome) = pending.on_unix_exit(ret) else {
        return Ok(());
    };
    // Only stream sockets are upstreams: a datagram socket's connect() (syslog's /dev/log
    // with no syslog running) is not.
    let kind: u16 = read_kernel(fd_socket(pending.fd)?, config!(offsets.socket_type))?;
    if kind != SOCK_STREAM && kind != SOCK_SEQPACKET {
        return Ok(());
    }
    let key = remember_unix_path(pending.uservaddr, pending.addrlen)?;
    let waited = decided_in_call(
        &Endpoint::unix(key),
        pending.start_ns,
        outcome,
        ret,
        Source::ConnectCall,
    );
    if waited != NOT_COUNTED && matches!(outcome, Outcome::UnixMissing | Outcome::UnixRefused) {
        remember_unix_failure(key, outcome, waited);
    }
    Ok(())
}

/// Notes a failed connect() to Unix socket path `path_key` by the current process, with what
/// was counted, in case the process binds that path next (see `bind_called`).
#[inline(never)]
fn remember_unix_failure(path_key: u64, outcome: Outcome, waited_ns: u64) {
    let mut proxy = Task::default();
    fill_current_proxy(&mut proxy, current_netns());
    let key = UnixFailKey {
        tgid: proxy.tgid,
        _pad: 0,
        path_key,
    };
    let fail = UnixFail {
        count: count_key(&proxy, &Endpoint::unix(path_key), outcome),
        waited_ns,
        at_ns: now(),
    };
    let _ = UNIX_CONNECT_FAILS.insert(&key, &fail, 0);
}

/// bind() called: when a process binds a Unix socket path it failed to connect to a moment
/// ago, that connect() was the server probing its own socket before listening on it (php-fpm:
/// "is another FPM already listening here?"). Its count is taken back and user space told, so
/// that a server's restart does not look like a failing upstream.
fn bind_called(ctx: &TracePointContext) -> Result<(), i64> {
    if config!(ready) == 0 {
        return Ok(());
    }
    let uservaddr: u64 = read_field(ctx, config!(syscalls.bind_umyaddr))?;
    // SAFETY: bpf_probe_read_user copes with any user pointer.
    let family: u16 = unsafe { bpf_probe_read_user(uservaddr as *const u16)? };
    if family != AF_UNIX {
        return Ok(());
    }
    let addrlen: u64 = read_field(ctx, config!(syscalls.bind_addrlen))?;
    let path_key = remember_unix_path(uservaddr, addrlen)?;
    take_back_self_probe(path_key);
    Ok(())
}

#[inline(never)]
fn take_back_self_probe(path_key: u64) {
    let key = UnixFailKey {
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        _pad: 0,
        path_key,
    };
    let Some(fail) = UNIX_CONNECT_FAILS.get_ptr(&key) else {
        return;
    };
    // SAFETY: a pointer into the map's value; copied before the entry is removed.
    let fail = unsafe { *fail };
    let _ = UNIX_CONNECT_FAILS.remove(&key);
    let now = now();
    if now.saturating_sub(fail.at_ns) > SELF_PROBE_WINDOW_NS {
        return;
    }
    uncount(&fail);
    let Some(mut entry) = LIFECYCLE.reserve::<SelfProbeEvent>(0) else {
        stat(Stat::LifecycleLost);
        return;
    };
    // SAFETY: the reserved record, ours until it is submitted; every field is written.
    let record = unsafe { &mut *entry.as_mut_ptr() };
    record.kind = RecordKind::SelfProbe as u32;
    record.tgid = key.tgid;
    record.time_ns = now;
    record.path_key = path_key;
    entry.submit(0);
}

/// Reads a `struct sockaddr_un`'s path, stores it in `UNIX_PATHS` if it is new, returns its key.
/// The path is on this function's own stack (per-CPU scratch is not private, see main.rs).
#[inline(never)]
fn remember_unix_path(uservaddr: u64, addrlen: u64) -> Result<u64, i64> {
    let mut path: UnixPath = [0; UNIX_PATH_MAX];
    // sun_path follows the 2-byte family; an abstract name runs to the address length.
    let len = (addrlen.saturating_sub(2) as usize).min(UNIX_PATH_MAX);
    if len > 0 {
        // SAFETY: bpf_probe_read_user copes with any user pointer; len ≤ the buffer.
        unsafe { bpf_probe_read_user_buf((uservaddr + 2) as *const u8, &mut path[..len])? };
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
    let key = unix_path_key(&path);
    if UNIX_PATHS.get_ptr(&key).is_none() {
        let _ = UNIX_PATHS.insert(&key, &path, 0);
    }
    Ok(key)
}
