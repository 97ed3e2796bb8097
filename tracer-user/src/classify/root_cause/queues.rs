//! A listener whose accept queue is full: SYNs unanswered behind it are `backlog_overflow`.
//! The queues are read from /proc (`capture::procfs::accept_queues`) at most once a second per
//! network namespace.

use std::{
    collections::HashSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use super::{Listeners, RootCause};
use crate::{capture::procfs::AcceptQueues, decode::Failure};

/// Reads the accept queues of a network namespace's listeners (from /proc in the agent).
pub type QueueReader = Box<dyn FnMut(u32) -> Option<AcceptQueues> + Send>;

/// How long a namespace's accept queues, once read, answer for it.
pub const QUEUES_FRESH: Duration = Duration::from_secs(1);

/// A namespace's accept queues as last read, and the listeners that look full without their
/// backlog being known: a non-empty queue while the namespace's overflow count rose, and still
/// as long as that queue does not shrink.
pub(super) struct QueuesRead {
    pub(super) at: Instant,
    pub(super) queues: AcceptQueues,
    pub(super) full: HashSet<SocketAddr>,
}

impl Listeners {
    /// SYNs unanswered by a listener that is open: its accept queue may be full. It is when it
    /// holds more than the listen() backlog (seen when it started listening, or read from the
    /// socket diagnostics); when the backlog is not known, when it holds any while the
    /// namespace's overflow count goes up.
    pub(super) fn behind_timeout(&mut self, failure: &Failure) -> Option<RootCause> {
        let upstream = failure.upstream.socket_addr()?;
        let i = self
            .serving(upstream, failure.proxy.netns)
            .find(|i| self.listeners[*i].closed.is_none())?;
        let l = &self.listeners[i];
        let (listener, netns, max_backlog) = (l.addr, l.netns, l.max_backlog);
        let read = self.accept_queues(netns)?;
        let queued = *read.queues.queued.get(&listener)?;
        let overflows = read.queues.overflows;
        let max_backlog = max_backlog.or_else(|| read.queues.backlogs.get(&listener).copied());
        let full = match max_backlog {
            Some(max) => queued > max,
            None => read.full.contains(&listener),
        };
        full.then(|| RootCause::BacklogFull {
            listener,
            process: self.listeners[i].owner.clone(),
            queued,
            overflows,
        })
    }

    /// Namespace `netns`'s accept queues, read at most once per [`QUEUES_FRESH`].
    pub(super) fn accept_queues(&mut self, netns: u32) -> Option<&QueuesRead> {
        let now = Instant::now();
        let fresh = self
            .queues
            .get(&netns)
            .is_some_and(|read| now.duration_since(read.at) < QUEUES_FRESH);
        if !fresh {
            let queues = (self.read_queues)(netns)?;
            let before = self.queues.get(&netns);
            let rose = before.map_or(queues.overflows > 0, |b| {
                queues.overflows > b.queues.overflows
            });
            let still_full = |addr: &SocketAddr, queued: u32| {
                before.is_some_and(|b| {
                    b.full.contains(addr) && b.queues.queued.get(addr).is_some_and(|q| queued >= *q)
                })
            };
            let full = queues
                .queued
                .iter()
                .filter(|(addr, queued)| **queued > 0 && (rose || still_full(addr, **queued)))
                .map(|(addr, _)| *addr)
                .collect();
            self.queues.insert(
                netns,
                QueuesRead {
                    at: now,
                    queues,
                    full,
                },
            );
        }
        self.queues.get(&netns)
    }
}
