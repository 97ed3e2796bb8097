//! Root cause: what happened to the upstream's process, behind the refusals and resets the proxy
//! sees, when the upstream runs on the same host.
//!
//! The registry follows every listener: those found in /proc at start-up and every socket that
//! starts listening after. When a listener goes away, the registry notes how. Its process died
//! (OOM-killed, crashed with a signal, exited), or it closed the listener and lives on
//! (restarting). A failure toward that address then gets a root cause. So does a refusal toward
//! an address nothing ever listened on, or whose listener is bound to another interface or sits in
//! another network namespace.
//!
//! `cause.rs` holds what is said (the root causes and their sentences), `queues.rs` the accept
//! queues behind connect timeouts, and this file the registry.

mod cause;
mod queues;
#[cfg(test)]
mod tests;
mod unix_queues;
#[cfg(test)]
mod worker_tests;
mod workers;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    time::{Duration, SystemTime},
};

use tracer_common::Outcome;

pub(crate) use self::cause::{bytes, clock};
pub use self::{
    cause::{Death, Notice, RootCause, WorkerEnd, signal_name},
    queues::QUEUES_FRESH,
    workers::HolderFinder,
};
use self::{
    queues::{QueueReader, QueuesRead},
    unix_queues::UnixQueues,
    workers::ServerEnds,
};
use crate::{
    capture::procfs::{accept_queues, socket_holder},
    decode::{
        Ending, ExistingListenerInfo, Failure, Lifecycle, ListenerChange, OomKill, ProcessExit,
        ServerEnd, Task,
    },
};

struct KnownListener {
    addr: SocketAddr,
    netns: u32,
    owner: Task,
    /// Its listen() backlog, when tracer saw it start listening.
    max_backlog: Option<u32>,
    closed: Option<Closed>,
}

struct Closed {
    at: SystemTime,
    /// The task that closed it (the dying process itself, when it died).
    by: Task,
    death: Option<Death>,
    /// Failures toward it since, per proxy name and cause.
    failures: BTreeMap<(String, Outcome), u64>,
}

/// How long after a death its resets are still put down to it.
const DEATH_ECHO: Duration = Duration::from_secs(5);
/// How many OOM kills and exits are remembered.
const RECENT: usize = 256;
/// How many closed listeners are remembered.
const CLOSED_MAX: usize = 4096;

/// Listeners on this host and what became of them.
pub struct Listeners {
    started: SystemTime,
    listeners: Vec<KnownListener>,
    ooms: VecDeque<OomKill>,
    exits: VecDeque<ProcessExit>,
    read_queues: QueueReader,
    queues: HashMap<u32, QueuesRead>,
    server_ends: ServerEnds,
    find_holder: HolderFinder,
    unix_queues: UnixQueues,
}

impl Listeners {
    pub fn new(started: SystemTime) -> Listeners {
        Listeners::with_queue_reader(started, Box::new(accept_queues))
    }

    /// A registry that reads accept queues with `read_queues` (tests give their own).
    pub fn with_queue_reader(started: SystemTime, read_queues: QueueReader) -> Listeners {
        Listeners {
            started,
            listeners: Vec::new(),
            ooms: VecDeque::new(),
            exits: VecDeque::new(),
            read_queues,
            queues: HashMap::new(),
            server_ends: ServerEnds::default(),
            find_holder: Box::new(socket_holder),
            unix_queues: UnixQueues::default(),
        }
    }

    /// Reads Unix listeners' queues with `queues` (tests give their own).
    #[cfg(test)]
    fn with_unix_queues(mut self, queues: UnixQueues) -> Listeners {
        self.unix_queues = queues;
        self
    }

    /// Finds socket holders with `find` (tests give their own).
    pub fn with_holder_finder(mut self, find: HolderFinder) -> Listeners {
        self.find_holder = find;
        self
    }

    /// The server's side of a connection ended before it answered: kept for the proxy's
    /// failure on the same connection, which follows.
    pub fn on_server_end(&mut self, end: ServerEnd) {
        self.server_ends.insert(end);
    }

    /// The listeners that were there before tracer started.
    pub fn seed(&mut self, existing: impl IntoIterator<Item = ExistingListenerInfo>) {
        for l in existing {
            self.listeners.push(KnownListener {
                addr: l.local,
                netns: l.netns,
                owner: l.owner,
                max_backlog: None,
                closed: None,
            });
        }
    }

    /// A lifecycle record; returns what the user should hear about it.
    pub fn on_lifecycle(&mut self, event: &Lifecycle) -> Option<Notice> {
        match event {
            Lifecycle::Listener(change) if change.opened => self.opened(change),
            Lifecycle::Listener(change) => self.closed(change),
            Lifecycle::Oom(kill) => {
                push_bounded(&mut self.ooms, kill.clone());
                None
            }
            Lifecycle::Exit(exit) => self.exited(exit),
        }
    }

    fn opened(&mut self, change: &ListenerChange) -> Option<Notice> {
        let netns = change.task.netns;
        let index = self
            .listeners
            .iter()
            .position(|l| l.addr == change.local && l.netns == netns);
        let notice = index.and_then(|i| {
            let closed = self.listeners[i].closed.as_ref()?;
            Some(Notice::ListenerBack {
                listener: change.local,
                process: change.task.clone(),
                at: change.time,
                gap: change.time.duration_since(closed.at).unwrap_or_default(),
                failed_meanwhile: closed.failures.values().sum(),
            })
        });
        let listener = KnownListener {
            addr: change.local,
            netns,
            owner: change.task.clone(),
            max_backlog: Some(change.max_backlog),
            closed: None,
        };
        match index {
            Some(i) => self.listeners[i] = listener,
            None => self.listeners.push(listener),
        }
        notice
    }

    fn closed(&mut self, change: &ListenerChange) -> Option<Notice> {
        let death = change
            .dying
            .map(|ending| self.death_of(change.task.pid, ending, change.time));
        let netns = change.task.netns;
        let index = match self
            .listeners
            .iter()
            .position(|l| l.addr == change.local && l.netns == netns && l.closed.is_none())
        {
            Some(i) => i,
            None => {
                // A listener we did not know of (started between the scan and the probes).
                self.listeners.push(KnownListener {
                    addr: change.local,
                    netns,
                    owner: change.task.clone(),
                    max_backlog: None,
                    closed: None,
                });
                self.listeners.len() - 1
            }
        };
        let listener = &mut self.listeners[index];
        listener.closed = Some(Closed {
            at: change.time,
            by: change.task.clone(),
            death,
            failures: BTreeMap::new(),
        });
        let notice = Notice::ListenerGone {
            listener: listener.addr,
            process: listener.owner.clone(),
            at: change.time,
            death,
        };
        self.forget_old_closed();
        Some(notice)
    }

    fn exited(&mut self, exit: &ProcessExit) -> Option<Notice> {
        push_bounded(&mut self.exits, exit.clone());
        // A process that closed its listeners and then exited: it died, it was not restarting.
        let death = self.death_of(exit.process.pid, exit.ending, exit.time);
        for l in &mut self.listeners {
            if let Some(closed) = &mut l.closed
                && closed.death.is_none()
                && closed.by.pid == exit.process.pid
                && exit
                    .time
                    .duration_since(closed.at)
                    .is_ok_and(|d| d <= DEATH_ECHO)
            {
                closed.death = Some(death);
            }
        }
        None
    }

    /// How process `pid` died, given how it ended: an OOM kill when the OOM killer chose it.
    fn death_of(&self, pid: u32, ending: Ending, at: SystemTime) -> Death {
        match (self.oom_kill_of(pid, at), ending) {
            (Some(kill), _) => Death::OomKilled {
                anon_rss_kb: kill.anon_rss_kb,
            },
            (None, Ending::Signal(signal)) if !stopping_signal(signal) => Death::Crashed { signal },
            (None, ending) => Death::Exited(ending),
        }
    }

    /// The OOM killer's choice of process `pid` in the 30 s before `at`, if it chose it.
    fn oom_kill_of(&self, pid: u32, at: SystemTime) -> Option<&OomKill> {
        self.ooms.iter().rev().find(|k| {
            k.pid == pid
                && at
                    .duration_since(k.time)
                    .is_ok_and(|d| d <= Duration::from_secs(30))
        })
    }

    fn forget_old_closed(&mut self) {
        let closed = self.listeners.iter().filter(|l| l.closed.is_some()).count();
        if closed <= CLOSED_MAX {
            return;
        }
        let oldest = self
            .listeners
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.closed.as_ref().map(|c| (i, c.at)))
            .min_by_key(|(_, at)| *at)
            .map(|(i, _)| i);
        if let Some(oldest) = oldest {
            self.listeners.remove(oldest);
        }
    }

    /// The root cause of a failure, if one is known; counts the failure against it.
    pub fn root_cause(&mut self, failure: &Failure) -> Option<RootCause> {
        let listener = match failure.cause {
            Outcome::Refused => self.behind_refusal(failure),
            Outcome::ResetBeforeResponse
            | Outcome::ResetMidResponse
            | Outcome::ClosedBeforeResponse => self.behind_reset(failure),
            Outcome::ConnectTimeout => self.behind_timeout(failure),
            Outcome::UnixBacklogFull => self.behind_full_unix(failure),
            _ => None,
        };
        // The listener's process died: that says it all. Otherwise (a pre-fork server's
        // master keeps listening), the worker on the other end of this very connection.
        listener.or_else(|| self.behind_worker(failure))
    }

    /// Listeners that would accept a connection to `upstream` from namespace `netns`.
    fn serving(&self, upstream: SocketAddr, netns: u32) -> impl Iterator<Item = usize> + '_ {
        self.listeners.iter().enumerate().filter_map(move |(i, l)| {
            (l.addr.port() == upstream.port()
                && covers(l.addr.ip(), upstream.ip())
                && (!upstream.ip().is_loopback() || same_netns(l.netns, netns)))
            .then_some(i)
        })
    }

    /// Listeners are TCP ones: a Unix upstream has none of these root causes.
    fn behind_refusal(&mut self, failure: &Failure) -> Option<RootCause> {
        let upstream = failure.upstream.socket_addr()?;
        let candidates: Vec<usize> = self.serving(upstream, failure.proxy.netns).collect();
        if candidates
            .iter()
            .any(|i| self.listeners[*i].closed.is_none())
        {
            // Something listens there; why it refused is not known.
            return None;
        }
        if let Some(i) = candidates
            .into_iter()
            .max_by_key(|i| self.listeners[*i].closed.as_ref().map(|c| c.at))
        {
            return Some(self.count_against(i, failure));
        }
        // Nothing ever listened there: find what listens nearby.
        let same_port = |l: &KnownListener| l.closed.is_none() && l.addr.port() == upstream.port();
        if let Some(l) = self.listeners.iter().find(|l| {
            same_port(l)
                && !covers(l.addr.ip(), upstream.ip())
                && (!upstream.ip().is_loopback() || same_netns(l.netns, failure.proxy.netns))
        }) {
            return Some(RootCause::WrongAddress {
                listener: l.addr,
                process: l.owner.clone(),
            });
        }
        if upstream.ip().is_loopback()
            && let Some(l) = self.listeners.iter().find(|l| {
                same_port(l)
                    && covers(l.addr.ip(), upstream.ip())
                    && !same_netns(l.netns, failure.proxy.netns)
            })
        {
            return Some(RootCause::OtherNetns {
                listener: l.addr,
                process: l.owner.clone(),
            });
        }
        // Only for a host that is this one: loopback, or an address something listened on.
        let local_host = upstream.ip().is_loopback()
            || self.listeners.iter().any(|l| l.addr.ip() == upstream.ip());
        local_host.then_some(RootCause::NothingListened {
            since: self.started,
        })
    }

    fn behind_reset(&mut self, failure: &Failure) -> Option<RootCause> {
        let candidates: Vec<usize> = self
            .serving(failure.upstream.socket_addr()?, failure.proxy.netns)
            .collect();
        let recent = candidates.into_iter().find(|i| {
            self.listeners[*i].closed.as_ref().is_some_and(|c| {
                c.death.is_some()
                    && failure.time.duration_since(c.at).map_or_else(
                        |e| e.duration() <= Duration::from_secs(1),
                        |d| d <= DEATH_ECHO,
                    )
            })
        })?;
        Some(self.count_against(recent, failure))
    }

    fn count_against(&mut self, index: usize, failure: &Failure) -> RootCause {
        let listener = &mut self.listeners[index];
        let closed = listener.closed.as_mut().expect("a closed listener");
        let since = closed
            .failures
            .entry((failure.proxy.comm.clone(), failure.cause))
            .or_default();
        *since += 1;
        match closed.death {
            Some(death) => RootCause::Died {
                listener: listener.addr,
                process: listener.owner.clone(),
                at: closed.at,
                death,
                since: *since,
            },
            None => RootCause::Restarting {
                listener: listener.addr,
                process: listener.owner.clone(),
                at: closed.at,
                since: *since,
            },
        }
    }
}

fn push_bounded<T>(queue: &mut VecDeque<T>, item: T) {
    if queue.len() >= RECENT {
        queue.pop_front();
    }
    queue.push_back(item);
}

/// Whether a listener bound to `bound` accepts connections to `target`.
fn covers(bound: IpAddr, target: IpAddr) -> bool {
    bound == target
        || bound.is_unspecified() && (bound.is_ipv6() || target.is_ipv4())
        || matches!((bound, target), (IpAddr::V6(v6), IpAddr::V4(v4)) if v6.to_ipv4_mapped() == Some(v4))
}

/// Namespaces the same, or one of them not known.
fn same_netns(a: u32, b: u32) -> bool {
    a == b || a == 0 || b == 0
}

/// Signals that stop a process on purpose (systemd, Kubernetes, an operator).
fn stopping_signal(signal: i32) -> bool {
    matches!(signal, 1 | 2 | 15)
}
