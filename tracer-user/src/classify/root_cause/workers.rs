//! The worker behind a failure, when the upstream runs on this host: a pre-fork server's
//! master keeps the listener open while its workers are killed, crash or stay busy, so the
//! listener's life says nothing; the server's side of the very connection does.
//!
//! The kernel sends the server's end of a connection when it ended before the server answered
//! (or as its process died): which task closed it, how that task ended, the last signal that
//! ends a process it had been sent and by whom; or, when the proxy ended first, whether any
//! process had accepted the connection at all. That record comes before the proxy's own
//! failure (the server's end is what the proxy then sees), and waits here for it, keyed by the
//! connection's two addresses.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    time::{Duration, Instant, SystemTime},
};

use tracer_common::Outcome;

use super::{Listeners, RootCause, cause::WorkerEnd};
use crate::decode::{Ending, Failure, ServerEnd, ServerEndHow, Task};

/// How many server ends wait for their proxy's failure at most.
pub(super) const WAITING_MAX: usize = 4096;
/// How long one waits (the proxy's failure follows within milliseconds).
const WAIT: Duration = Duration::from_secs(10);
/// How many times a second the agent may look through /proc for the worker holding a
/// connection (a slow upstream's).
const HOLDER_LOOKUPS_PER_SECOND: u32 = 20;
/// A signal counts when it came at most this long before the request (clocks of two records).
const SLACK: Duration = Duration::from_secs(1);

type ConnKey = (SocketAddr, SocketAddr);

/// Server ends waiting for the proxy's failure on the same connection: at most two per
/// connection (the proxy's end seen first, then the server's own close).
#[derive(Default)]
pub(super) struct ServerEnds {
    waiting: HashMap<ConnKey, Vec<ServerEnd>>,
    order: VecDeque<(ConnKey, SystemTime)>,
    lookups: (Option<Instant>, u32),
}

/// Finds the process that holds a socket (by inode) among some processes and their children.
pub type HolderFinder = Box<dyn FnMut(u64, &[u32]) -> Option<(u32, String)> + Send>;

fn key(server: SocketAddr, client: SocketAddr) -> ConnKey {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    (canonical(server), canonical(client))
}

impl ServerEnds {
    pub(super) fn insert(&mut self, end: ServerEnd) {
        let now = end.time;
        while let Some((k, at)) = self.order.front().copied() {
            let stale = now.duration_since(at).is_ok_and(|d| d > WAIT);
            if !stale && self.order.len() < WAITING_MAX {
                break;
            }
            self.order.pop_front();
            if let Some(ends) = self.waiting.get_mut(&k) {
                ends.retain(|e| e.time != at);
                if ends.is_empty() {
                    self.waiting.remove(&k);
                }
            }
        }
        let k = key(end.local, end.remote);
        self.order.push_back((k, end.time));
        let ends = self.waiting.entry(k).or_default();
        if ends.len() >= 2 {
            ends.remove(0);
        }
        ends.push(end);
    }

    /// The server's end of the failed connection: the proxy's own end when the proxy gave up
    /// (response_timeout), else the server's close.
    fn take(&mut self, failure: &Failure) -> Option<ServerEnd> {
        let ends = self
            .waiting
            .remove(&key(failure.upstream.socket_addr()?, failure.local?))?;
        // Only an end of this attempt: not a record from a connection before it on the same
        // two addresses.
        let started = failure.time.checked_sub(failure.evidence.waited + WAIT)?;
        let proxy_first = failure.cause == Outcome::ResponseTimeout;
        ends.into_iter()
            .filter(|e| e.time >= started)
            .find(|e| (e.how == ServerEndHow::PeerFirst) == proxy_first)
    }

    /// How many connections have ends waiting.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Whether one more /proc lookup fits this second's budget.
    pub(super) fn may_look_up(&mut self) -> bool {
        let now = Instant::now();
        let (since, used) = &mut self.lookups;
        if since.is_none_or(|s| now.duration_since(s) >= Duration::from_secs(1)) {
            *since = Some(now);
            *used = 0;
        }
        *used += 1;
        *used <= HOLDER_LOOKUPS_PER_SECOND
    }
}

impl Listeners {
    /// The worker's root cause of a failure whose server side tracer saw end.
    pub(super) fn behind_worker(&mut self, failure: &Failure) -> Option<RootCause> {
        let responding = matches!(
            failure.cause,
            Outcome::ClosedBeforeResponse
                | Outcome::ResetBeforeResponse
                | Outcome::ResetMidResponse
                | Outcome::ResponseTimeout
        );
        if !responding {
            return None;
        }
        let end = self.server_ends.take(failure)?;
        // When the proxy sent its request (what it waited from).
        let request_at = failure.time.checked_sub(failure.evidence.waited)?;
        match (end.how, &end.closer) {
            (ServerEndHow::PeerFirst, _) if failure.cause == Outcome::ResponseTimeout => {
                Some(self.behind_waiting(failure, &end))
            }
            (ServerEndHow::Closed | ServerEndHow::Aborted, Some(worker)) => {
                let worker = worker.clone();
                self.worker_end(&end, &worker, request_at)
                    .map(|(how, at)| RootCause::WorkerEnded {
                        worker,
                        how,
                        into_request: at.duration_since(request_at).unwrap_or_default(),
                    })
            }
            _ => None,
        }
    }

    /// How the worker that closed the connection ended, and when.
    fn worker_end(
        &self,
        end: &ServerEnd,
        worker: &Task,
        request_at: SystemTime,
    ) -> Option<(WorkerEnd, SystemTime)> {
        if let Some(kill) = self.oom_kill_of(worker.pid, end.time) {
            let anon_rss_kb = kill.anon_rss_kb;
            return Some((WorkerEnd::OomKilled { anon_rss_kb }, kill.time));
        }
        // A signal sent while the proxy waited (not one from an earlier request).
        let signal = end
            .signal
            .as_ref()
            .filter(|s| s.time + SLACK >= request_at && s.time <= end.time + SLACK);
        let killed_by_another = signal.filter(|s| !s.self_inflicted(worker.pid));
        if let Some(s) = killed_by_another {
            return Some((
                WorkerEnd::Killed {
                    signal: s.signal,
                    sender: Some((s.sender_pid, s.sender_comm.clone())),
                    by_parent: s.sender_pid == s.target_parent && s.target_parent != 0,
                },
                s.time,
            ));
        }
        match end.dying {
            Some(Ending::Signal(fatal)) if crash_signal(fatal) => Some((
                WorkerEnd::Crashed { signal: fatal },
                // When it raised it, if the kernel saw that.
                signal
                    .filter(|s| s.signal == fatal)
                    .map_or(end.time, |s| s.time),
            )),
            Some(Ending::Signal(signal)) => Some((
                WorkerEnd::Killed {
                    signal,
                    sender: None,
                    by_parent: false,
                },
                end.time,
            )),
            Some(Ending::Exited(code)) => Some((WorkerEnd::Exited { code }, end.time)),
            // Alive, and not signalled: it closed the connection on purpose.
            None => signal
                .filter(|s| crash_signal(s.signal))
                .map(|s| (WorkerEnd::Crashed { signal: s.signal }, s.time)),
        }
    }

    /// The proxy gave up: was a worker on it, or did it wait in the accept queue?
    fn behind_waiting(&mut self, failure: &Failure, end: &ServerEnd) -> RootCause {
        let listener = self
            .serving(end.local, failure.proxy.netns)
            .find(|i| self.listeners[*i].closed.is_none());
        let owner = listener.map(|i| self.listeners[i].owner.clone());
        let listener_addr = listener.map(|i| self.listeners[i].addr);
        if end.accepted {
            let worker = match (&owner, end.inode) {
                (Some(owner), inode) if inode != 0 && self.server_ends.may_look_up() => {
                    (self.find_holder)(inode, &[owner.pid])
                        .map(|(pid, comm)| Task::process(comm, pid, owner.netns))
                }
                _ => None,
            };
            return RootCause::SlowUpstream {
                listener: listener_addr,
                worker,
                owner,
            };
        }
        let (queued, backlog) = match listener {
            Some(i) => {
                let (addr, netns, max_backlog) = {
                    let l = &self.listeners[i];
                    (l.addr, l.netns, l.max_backlog)
                };
                let read = self.accept_queues(netns);
                let queued = read.and_then(|r| r.queues.queued.get(&addr).copied());
                let backlog = max_backlog
                    .or_else(|| read.and_then(|r| r.queues.backlogs.get(&addr).copied()));
                (queued, backlog)
            }
            None => (None, None),
        };
        RootCause::NeverAccepted {
            listener: listener_addr.unwrap_or(end.local).to_string(),
            owner,
            queued,
            backlog,
        }
    }
}

/// Signals a process gets from its own fault or its runtime's abort.
fn crash_signal(signal: i32) -> bool {
    matches!(signal, 4 | 5 | 6 | 7 | 8 | 11 | 31)
}
