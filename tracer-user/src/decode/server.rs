//! The server's side of a connection, when the upstream runs on this host: how it ended before
//! the server answered, by which task, and the last signal that task was sent.

use std::{net::SocketAddr, time::SystemTime};

use tracer_common::event::{ServerEndEvent, Signalled, server_end, task_flags::PF_EXITING};

use super::{Clock, DecodeError, Ending, Task, comm, socket_addr};

/// How the server's side ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerEndHow {
    /// Its process closed it (a FIN).
    Closed,
    /// Its process aborted it (a reset: closed with unread data).
    Aborted,
    /// The proxy ended it first (it gave up).
    PeerFirst,
}

/// A signal that ends a process, sent to the one that closed the server's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalSent {
    pub time: SystemTime,
    pub signal: i32,
    /// `si_code`: 0 kill(), 0x80 the kernel, > 0 a fault the kernel raised.
    pub code: i32,
    pub sender_pid: u32,
    pub sender_comm: String,
    /// The target's parent when it was sent.
    pub target_parent: u32,
}

impl SignalSent {
    /// Whether the target raised it itself (a fault, abort(), or a signal to itself).
    pub fn self_inflicted(&self, target: u32) -> bool {
        self.sender_pid == target || self.code > 0
    }
}

/// The server's side of a connection ended before it answered (or as its process died).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerEnd {
    pub time: SystemTime,
    pub how: ServerEndHow,
    /// The server's address (what the proxy connected to) and the proxy's.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The task that closed it (not when the proxy ended first).
    pub closer: Option<Task>,
    /// When the closer was exiting: how it ended.
    pub dying: Option<Ending>,
    /// The last ending signal the closer had been sent (any time before).
    pub signal: Option<SignalSent>,
    /// Whether a process had accept()ed it, and its socket's inode.
    pub accepted: bool,
    pub inode: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

impl ServerEnd {
    pub fn from_event(event: &ServerEndEvent, clock: &Clock) -> Result<ServerEnd, DecodeError> {
        let how = match event.how {
            server_end::CLOSED => ServerEndHow::Closed,
            server_end::ABORTED => ServerEndHow::Aborted,
            _ => ServerEndHow::PeerFirst,
        };
        let closer = (how != ServerEndHow::PeerFirst).then(|| Task::from_kernel(&event.task));
        Ok(ServerEnd {
            time: clock.wall(event.time_ns),
            how,
            local: socket_addr(&event.local)?,
            remote: socket_addr(&event.remote)?,
            dying: (closer.is_some() && event.task_flags & PF_EXITING != 0)
                .then(|| Ending::of(event.exit_code)),
            closer,
            signal: signal_sent(&event.signal, clock),
            accepted: event.accepted != 0,
            inode: event.inode,
            bytes_received: event.bytes_received,
            bytes_sent: event.bytes_sent,
        })
    }
}

fn signal_sent(s: &Signalled, clock: &Clock) -> Option<SignalSent> {
    (s.signal != 0).then(|| SignalSent {
        time: clock.wall(s.time_ns),
        signal: s.signal as i32,
        code: s.code,
        sender_pid: s.sender_tgid,
        sender_comm: comm(&s.sender_comm),
        target_parent: s.target_parent,
    })
}
