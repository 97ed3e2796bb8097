//! A Unix socket whose listener's queue is full (`unix_backlog_full`: connect() fails with
//! EAGAIN at once): every worker is busy and the queue holds its backlog. The kernel's socket
//! diagnostics give the queue and the backlog (`ss -lx`), read in the proxy's network
//! namespace at most once a second; the listening process is found once per socket.

use std::{collections::HashMap, time::Instant};

use super::{Listeners, QUEUES_FRESH, RootCause};
use crate::{
    capture::{
        procfs::socket_holder_anywhere,
        sock_diag::{UnixListener, unix_listeners_of},
    },
    decode::{Failure, Task, Upstream, unix_name_text},
};

/// Reads the Unix listeners of the network namespace process `pid` is in.
pub type UnixQueueReader = Box<dyn FnMut(u32) -> Option<Vec<UnixListener>> + Send>;

/// How many listening processes (by socket inode) are remembered.
const OWNERS_MAX: usize = 256;
/// In how many network namespaces a Unix listener is looked for.
const NAMESPACES_MAX: usize = 8;
/// How many namespaces' readings are kept.
const READINGS_MAX: usize = 256;

pub(super) struct UnixQueues {
    read: UnixQueueReader,
    /// By network namespace: when read, and what (a namespace that vanished stays until
    /// read again; at most one entry per namespace looked in).
    read_at: HashMap<u32, (Instant, Vec<UnixListener>)>,
    /// By socket inode: the process listening, when found.
    owners: HashMap<u64, Option<(u32, String)>>,
    find_owner: Box<dyn FnMut(u64) -> Option<(u32, String)> + Send>,
}

impl Default for UnixQueues {
    fn default() -> Self {
        UnixQueues {
            read: Box::new(|pid| {
                unix_listeners_of(&std::path::Path::new("/proc").join(pid.to_string())).ok()
            }),
            read_at: HashMap::new(),
            owners: HashMap::new(),
            find_owner: Box::new(socket_holder_anywhere),
        }
    }
}

impl UnixQueues {
    /// Reads with `read` and finds listening processes with `find_owner` (tests give theirs).
    #[cfg(test)]
    pub(super) fn with(
        read: UnixQueueReader,
        find_owner: Box<dyn FnMut(u64) -> Option<(u32, String)> + Send>,
    ) -> UnixQueues {
        UnixQueues {
            read,
            read_at: HashMap::new(),
            owners: HashMap::new(),
            find_owner,
        }
    }
}

impl Listeners {
    /// connect() to a Unix socket found its listener's queue full.
    pub(super) fn behind_full_unix(&mut self, failure: &Failure) -> Option<RootCause> {
        let Upstream::Unix(path) = &failure.upstream else {
            return None;
        };
        // A Unix socket lives in its creator's network namespace, which the proxy reaches
        // through the filesystem: the proxy's own first, then those of known listeners.
        let mut places = vec![(failure.proxy.netns, failure.proxy.pid)];
        for l in self.listeners.iter().filter(|l| l.closed.is_none()) {
            if places.len() >= NAMESPACES_MAX {
                break;
            }
            if !places.iter().any(|(netns, _)| *netns == l.netns) {
                places.push((l.netns, l.owner.pid));
            }
        }
        let now = Instant::now();
        let queues = &mut self.unix_queues;
        let mut found = None;
        for (netns, pid) in places {
            let fresh = queues
                .read_at
                .get(&netns)
                .is_some_and(|(at, _)| now.duration_since(*at) < QUEUES_FRESH);
            if !fresh {
                let listeners = (queues.read)(pid).unwrap_or_default();
                if queues.read_at.len() >= READINGS_MAX {
                    queues.read_at.clear();
                }
                queues.read_at.insert(netns, (now, listeners));
            }
            found = queues.read_at.get(&netns).and_then(|(_, listeners)| {
                listeners
                    .iter()
                    .find(|l| unix_name_text(&l.name) == *path)
                    .map(|l| (netns, l.clone()))
            });
            if found.is_some() {
                break;
            }
        }
        let (netns, listener) = found?;
        if !queues.owners.contains_key(&listener.inode) {
            // A full /proc walk, once per socket, within the lookups' budget.
            if !self.server_ends.may_look_up() {
                return Some(never_accepted(path, None, &listener));
            }
            if queues.owners.len() >= OWNERS_MAX {
                queues.owners.clear();
            }
            let owner = (queues.find_owner)(listener.inode);
            queues.owners.insert(listener.inode, owner);
        }
        let owner = queues
            .owners
            .get(&listener.inode)
            .cloned()
            .flatten()
            .map(|(pid, comm)| Task::process(comm, pid, netns));
        Some(never_accepted(path, owner, &listener))
    }
}

fn never_accepted(path: &str, owner: Option<Task>, listener: &UnixListener) -> RootCause {
    RootCause::NeverAccepted {
        listener: format!("unix:{path}"),
        owner,
        queued: Some(listener.queued),
        backlog: Some(listener.backlog),
    }
}
