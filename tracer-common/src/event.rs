//! The records the kernel sends to user space: failures through the `EVENTS` ring buffer, and the
//! life of listeners and of their processes through the `LIFECYCLE` one (rare, and kept apart so
//! that a storm of failures cannot crowd them out). Every record starts with its [`RecordKind`].

use crate::{
    conn::{ConnTrack, Task},
    net::Endpoint,
};

/// What a record is, its first four bytes.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    Failure = 1,
    Listener = 2,
    Oom = 3,
    Exit = 4,
    SelfProbe = 5,
    ServerEnd = 6,
}

impl RecordKind {
    pub const fn from_u32(v: u32) -> Option<RecordKind> {
        Some(match v {
            1 => RecordKind::Failure,
            2 => RecordKind::Listener,
            3 => RecordKind::Oom,
            4 => RecordKind::Exit,
            5 => RecordKind::SelfProbe,
            6 => RecordKind::ServerEnd,
            _ => return None,
        })
    }
}

/// `task_struct.flags` bits (include/linux/sched.h).
pub mod task_flags {
    /// The task is exiting.
    pub const PF_EXITING: u32 = 0x0000_0004;
    /// Killed by a signal.
    pub const PF_SIGNALED: u32 = 0x0000_0400;
}

/// A socket started or stopped listening (CLOSE→LISTEN, LISTEN→CLOSE), with the task in whose
/// context it happened: for a listener closed by a dying process, the process and why it died.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerEvent {
    pub kind: u32,
    /// 1 when it started listening, 0 when it stopped.
    pub opened: u32,
    pub time_ns: u64,
    /// The listening address (unspecified for a wildcard listener) and port.
    pub local: Endpoint,
    /// The task that made the change (its `netns` is the socket's).
    pub task: Task,
    /// The task's `flags` and `exit_code` (meaningful when it is exiting).
    pub task_flags: u32,
    pub exit_code: i32,
    /// The listen() backlog (`sk_max_ack_backlog`): its accept queue is full beyond it.
    pub max_backlog: u32,
    pub _pad: u32,
}

/// The kernel's OOM killer chose a victim (`oom:mark_victim`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OomEvent {
    pub kind: u32,
    pub pid: u32,
    pub time_ns: u64,
    /// Anonymous resident memory and total virtual memory, in kB (0 when not known).
    pub anon_rss_kb: u64,
    pub total_vm_kb: u64,
    pub comm: [u8; 16],
}

/// The main thread of a process that owns (or owned) a listener exited
/// (`sched:sched_process_exit`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitEvent {
    pub kind: u32,
    /// `task_struct.exit_code`: `status << 8`, or the fatal signal (| 0x80 with a core dump).
    pub exit_code: i32,
    pub time_ns: u64,
    pub task: Task,
    pub task_flags: u32,
    pub _pad: u32,
}

/// Where the failure was decided.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The socket reached TCP_CLOSE (`sock:inet_sock_set_state`).
    SocketClosed = 1,
    /// connect() returned an error before any SYN left (`syscalls:sys_exit_connect`).
    ConnectCall = 2,
    /// socket() failed (`syscalls:sys_exit_socket`): no connection could be opened.
    SocketCall = 3,
    /// accept4() or accept() failed (`syscalls:sys_exit_accept4`, `sys_exit_accept`): a
    /// client's connection could not be taken.
    AcceptCall = 4,
}

impl Source {
    pub fn from_u8(value: u8) -> Source {
        match value {
            2 => Source::ConnectCall,
            3 => Source::SocketCall,
            4 => Source::AcceptCall,
            _ => Source::SocketClosed,
        }
    }
}

/// One failed (or abandoned) upstream attempt, with everything the kernel knew about it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailureEvent {
    /// [`RecordKind::Failure`].
    pub kind: u32,
    pub _pad0: u32,
    /// The connection's record as it stood when it ended.
    pub conn: ConnTrack,
    /// When the socket closed or connect() returned (CLOCK_MONOTONIC ns).
    pub close_ns: u64,
    /// See [`crate::Verdict::waited_ns`].
    pub waited_ns: u64,
    /// At the end: data bytes the upstream sent (its FIN not counted), and bytes of the
    /// proxy's it acknowledged (`tcp_sock.bytes_acked`).
    pub bytes_received: u64,
    pub bytes_acked: u64,
    /// `sk->sk_err` at close, or the errno connect() returned.
    pub errno: i32,
    /// An [`crate::Outcome`] code.
    pub outcome: u8,
    /// A [`Source`].
    pub source: u8,
    pub _pad: [u8; 2],
}

/// A process bound the Unix socket path it had just failed to connect to: that connect() was
/// the server probing its own socket as it starts (php-fpm does), not an upstream attempt. Its
/// count has been taken back; user space drops its failure event.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SelfProbeEvent {
    pub kind: u32,
    pub tgid: u32,
    pub time_ns: u64,
    /// The path's key in `UNIX_PATHS`.
    pub path_key: u64,
}

/// How the server's side of a connection ended ([`ServerEndEvent::how`]).
pub mod server_end {
    /// Its process closed it (FIN): ESTABLISHED→FIN_WAIT1, CLOSE_WAIT→LAST_ACK.
    pub const CLOSED: u32 = 1;
    /// Its process aborted it (RST: closed with unread data, or SO_LINGER 0): →CLOSE.
    pub const ABORTED: u32 = 2;
    /// The peer (the proxy) ended it first, by a FIN (→CLOSE_WAIT) or a reset.
    pub const PEER_FIRST: u32 = 3;
}

/// The last signal that ends a process (SIGKILL, SIGTERM, SIGABRT, SIGSEGV…) a process was
/// sent (`signal:signal_generate`), kept per target process in the kernel's `SIGNALLED` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Signalled {
    pub time_ns: u64,
    pub signal: u32,
    /// `si_code`: 0 (`SI_USER`, kill()), 0x80 (`SI_KERNEL`), negative for other user sends
    /// (tkill, sigqueue), positive for a fault the kernel raised (SEGV_MAPERR…).
    pub code: i32,
    /// The sending process (the current task at the time: the faulting process itself for a
    /// fault, the allocating one for the OOM killer).
    pub sender_tgid: u32,
    /// The target's parent, to tell a master's signal from another's.
    pub target_parent: u32,
    pub sender_comm: [u8; 16],
}

/// The server's side of a connection ended before it answered, or its process was dying: the
/// other end of what a proxy may see as a failure, when the upstream runs on this host. Sent
/// only when the server had received bytes and sent none, or when the closing process exits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerEndEvent {
    pub kind: u32,
    /// A [`server_end`] value.
    pub how: u32,
    pub time_ns: u64,
    /// The server's address (what the proxy connected to) and the proxy's.
    pub local: Endpoint,
    pub remote: Endpoint,
    /// The task that closed it (zero when the peer ended first: that happens in no task's
    /// context), with its `flags` and `exit_code` (meaningful when it is exiting).
    pub task: Task,
    pub task_flags: u32,
    pub exit_code: i32,
    /// Data bytes the server received (the proxy's FIN not counted) and sent.
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// 1 when a process had accept()ed it (`sk->sk_socket` set), and that socket's inode.
    pub accepted: u32,
    pub _pad: u32,
    pub inode: u64,
    /// The last ending signal the closing process was sent (`signal` 0: none known).
    pub signal: Signalled,
}
