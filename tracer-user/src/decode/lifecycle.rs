//! The lifecycle records: listeners opening and closing, OOM kills and process exits, as the
//! root-cause registry reads them.

use std::{net::SocketAddr, time::SystemTime};

use tracer_common::event::task_flags::PF_EXITING;

use super::{Clock, DecodeError, Record, Task, comm, socket_addr};

/// How a process ended, from its `exit_code` and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// exit(code).
    Exited(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl Ending {
    /// From `task_struct.exit_code`. (The flags do not decide: when one thread calls exit(),
    /// the others are killed with PF_SIGNALED set, yet carry the group's exit code.)
    pub fn of(exit_code: i32) -> Ending {
        match exit_code & 0x7f {
            0 => Ending::Exited((exit_code >> 8) & 0xff),
            signal => Ending::Signal(signal),
        }
    }
}

/// A socket started or stopped listening.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerChange {
    pub opened: bool,
    pub time: SystemTime,
    /// The listening address (unspecified IP for a wildcard listener).
    pub local: SocketAddr,
    /// The task in whose context it happened.
    pub task: Task,
    /// When the task was dying as it closed the listener: how it ended.
    pub dying: Option<Ending>,
    /// Its listen() backlog: the accept queue is full when it holds more.
    pub max_backlog: u32,
}

/// The OOM killer chose a victim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OomKill {
    pub time: SystemTime,
    pub pid: u32,
    pub comm: String,
    pub anon_rss_kb: u64,
    pub total_vm_kb: u64,
}

/// A process that owned a listener exited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessExit {
    pub time: SystemTime,
    pub process: Task,
    pub ending: Ending,
}

/// A listener that was there before tracer started (from the /proc scan).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExistingListenerInfo {
    pub local: SocketAddr,
    pub netns: u32,
    /// The first process holding it (lowest pid).
    pub owner: Task,
}

impl From<&crate::capture::procfs::ExistingListener> for ExistingListenerInfo {
    fn from(l: &crate::capture::procfs::ExistingListener) -> Self {
        ExistingListenerInfo {
            local: l.local,
            netns: l.netns,
            owner: Task::process(
                l.comm.clone(),
                l.pids.first().copied().unwrap_or(0),
                l.netns,
            ),
        }
    }
}

/// What the lifecycle ring buffer says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lifecycle {
    Listener(ListenerChange),
    Oom(OomKill),
    Exit(ProcessExit),
}

impl Lifecycle {
    pub fn from_record(record: &Record, clock: &Clock) -> Result<Option<Lifecycle>, DecodeError> {
        Ok(Some(match record {
            Record::Listener(l) => Lifecycle::Listener(ListenerChange {
                opened: l.opened != 0,
                time: clock.wall(l.time_ns),
                local: socket_addr(&l.local)?,
                task: Task::from_kernel(&l.task),
                dying: (l.opened == 0 && l.task_flags & PF_EXITING != 0)
                    .then(|| Ending::of(l.exit_code)),
                max_backlog: l.max_backlog,
            }),
            Record::Oom(o) => Lifecycle::Oom(OomKill {
                time: clock.wall(o.time_ns),
                pid: o.pid,
                comm: comm(&o.comm),
                anon_rss_kb: o.anon_rss_kb,
                total_vm_kb: o.total_vm_kb,
            }),
            Record::Exit(e) => Lifecycle::Exit(ProcessExit {
                time: clock.wall(e.time_ns),
                process: Task::from_kernel(&e.task),
                ending: Ending::of(e.exit_code),
            }),
            Record::Failure(_) | Record::SelfProbe(_) | Record::ServerEnd(_) => return Ok(None),
        }))
    }
}
