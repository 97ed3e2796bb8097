//! The record a failure sends to user space through the `EVENTS` ring buffer.

use crate::conn::ConnTrack;

/// Where the failure was decided.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The socket reached TCP_CLOSE (`sock:inet_sock_set_state`).
    SocketClosed = 1,
    /// connect() returned an error before any SYN left (`syscalls:sys_exit_connect`).
    ConnectCall = 2,
}

/// One failed (or abandoned) upstream attempt, with everything the kernel knew about it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailureEvent {
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
