//! Root cause: what happened to the upstream's process, behind the refusals and resets the proxy
//! sees, when the upstream runs on the same host.
//!
//! The registry follows every listener: those found in /proc at start-up and every socket that
//! starts listening after. When a listener goes away, the registry notes how. Its process died
//! (OOM-killed, crashed with a signal, exited), or it closed the listener and lives on
//! (restarting). A failure toward that address then gets a root cause. So does a refusal toward
//! an address nothing ever listened on, or whose listener is bound to another interface or sits in
//! another network namespace.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant, SystemTime},
};

use tracer_common::Outcome;

use crate::{
    capture::procfs::{AcceptQueues, accept_queues},
    classify::human_duration,
    decode::{
        Ending, ExistingListenerInfo, Failure, Lifecycle, ListenerChange, OomKill, ProcessExit,
        ProxyProcess,
    },
};

/// How a listener's process died.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Death {
    /// The kernel's OOM killer chose it.
    OomKilled { anon_rss_kb: u64 },
    /// A fatal signal it did not ask for: SIGKILL, SIGSEGV, SIGABRT, SIGBUS…
    Crashed { signal: i32 },
    /// It stopped: exit(code), or a stopping signal (SIGTERM, SIGINT, SIGHUP).
    Exited(Ending),
}

impl Death {
    pub fn reason(&self) -> &'static str {
        match self {
            Death::OomKilled { .. } => "oom_killed",
            Death::Crashed { .. } => "crashed",
            Death::Exited(_) => "exited",
        }
    }
}

/// Why failures toward an upstream happen, beyond the failure's own cause.
#[derive(Debug, Clone, PartialEq)]
pub enum RootCause {
    /// The process that listened there died.
    Died {
        listener: SocketAddr,
        process: ProxyProcess,
        at: SystemTime,
        death: Death,
        /// Failures of this proxy and cause toward it since (this one included).
        since: u64,
    },
    /// The process closed its listener and lives on: restarting or reloading.
    Restarting {
        listener: SocketAddr,
        process: ProxyProcess,
        at: SystemTime,
        since: u64,
    },
    /// Nothing has listened on that address since tracer started: a wrong port or address.
    NothingListened { since: SystemTime },
    /// Something listens on that port, bound to another address.
    WrongAddress {
        listener: SocketAddr,
        process: ProxyProcess,
    },
    /// Something listens there, but in another network namespace.
    OtherNetns {
        listener: SocketAddr,
        process: ProxyProcess,
    },
    /// The listener's accept queue is full: its process does not accept connections as fast
    /// as they come, and the kernel drops the SYNs it has no room for.
    BacklogFull {
        listener: SocketAddr,
        process: ProxyProcess,
        /// Connections waiting in its accept queue.
        queued: u32,
        /// The namespace's `ListenOverflows` so far.
        overflows: u64,
    },
}

impl RootCause {
    /// The snake_case name in events (`root_cause`).
    pub fn name(&self) -> &'static str {
        match self {
            RootCause::Died {
                death: Death::OomKilled { .. },
                ..
            } => "upstream_oom_killed",
            RootCause::Died {
                death: Death::Crashed { .. },
                ..
            } => "upstream_crashed",
            RootCause::Died {
                death: Death::Exited(_),
                ..
            } => "upstream_exited",
            RootCause::Restarting { .. } => "upstream_restarting",
            RootCause::NothingListened { .. } => "nothing_listened",
            RootCause::WrongAddress { .. } => "listener_wrong_address",
            RootCause::OtherNetns { .. } => "listener_other_netns",
            RootCause::BacklogFull { .. } => "backlog_overflow",
        }
    }

    /// The process behind it, when there is one.
    pub fn process(&self) -> Option<&ProxyProcess> {
        match self {
            RootCause::Died { process, .. }
            | RootCause::Restarting { process, .. }
            | RootCause::WrongAddress { process, .. }
            | RootCause::OtherNetns { process, .. }
            | RootCause::BacklogFull { process, .. } => Some(process),
            RootCause::NothingListened { .. } => None,
        }
    }

    /// One sentence with the evidence, e.g. "gunicorn (pid 1234, listening on 127.0.0.1:8000)
    /// was OOM-killed at 12:03:03 (anon-rss 1.9 GiB); since then 312 connections from nginx to
    /// 127.0.0.1:8000 were refused".
    pub fn explain(&self, failure: &Failure) -> String {
        let upstream = &failure.upstream;
        let proxy = &failure.proxy.comm;
        let what = match failure.cause {
            Outcome::Refused => "were refused",
            Outcome::ResetBeforeResponse | Outcome::ResetMidResponse => "were reset",
            Outcome::ClosedBeforeResponse => "were closed without a response",
            _ => "failed",
        };
        let since = |n: u64| {
            let connections = if n == 1 { "connection" } else { "connections" };
            let what = if n == 1 {
                what.replacen("were", "was", 1)
            } else {
                what.to_string()
            };
            format!("since then {n} {connections} from {proxy} to {upstream} {what}")
        };
        match self {
            RootCause::Died {
                listener,
                process,
                at,
                death,
                since: n,
            } => {
                let how = match death {
                    Death::OomKilled { anon_rss_kb } if *anon_rss_kb > 0 => format!(
                        "was OOM-killed at {} (anon-rss {})",
                        clock(*at),
                        bytes(anon_rss_kb * 1024)
                    ),
                    Death::OomKilled { .. } => format!("was OOM-killed at {}", clock(*at)),
                    Death::Crashed { signal } => {
                        format!("crashed at {} ({})", clock(*at), signal_name(*signal))
                    }
                    Death::Exited(Ending::Exited(code)) => {
                        format!("exited at {} (code {code})", clock(*at))
                    }
                    Death::Exited(Ending::Signal(signal)) => {
                        format!("was stopped at {} ({})", clock(*at), signal_name(*signal))
                    }
                };
                format!(
                    "{} (pid {}, listening on {listener}) {how}; {}",
                    process.comm,
                    process.pid,
                    since(*n)
                )
            }
            RootCause::Restarting {
                listener,
                process,
                at,
                since: n,
            } => format!(
                "{} (pid {}) closed its listener {listener} at {} and still runs (restarting or \
                 reloading); {}",
                process.comm,
                process.pid,
                clock(*at),
                since(*n)
            ),
            RootCause::NothingListened { since } => format!(
                "nothing has listened on {upstream} since tracer started at {} (a wrong port or \
                 address?)",
                clock(*since)
            ),
            RootCause::WrongAddress { listener, process } => format!(
                "{} (pid {}) listens on {listener}, bound to {} but {proxy} connects to {}: the \
                 upstream is bound to the wrong interface",
                process.comm,
                process.pid,
                listener.ip(),
                upstream
                    .socket_addr()
                    .map_or_else(|| upstream.to_string(), |a| a.ip().to_string())
            ),
            RootCause::OtherNetns { listener, process } => format!(
                "{} (pid {}) listens on {listener} only in another network namespace \
                 (net:[{}]), not in {proxy}'s (net:[{}])",
                process.comm, process.pid, process.netns, failure.proxy.netns
            ),
            RootCause::BacklogFull {
                listener,
                process,
                queued,
                overflows,
            } => format!(
                "{} (pid {}, listening on {listener}) does not accept connections as fast as they \
                 come: {queued} wait in its accept queue, and the kernel dropped the SYNs it had \
                 no room for ({overflows} listen overflows in its network namespace so far)",
                process.comm, process.pid
            ),
        }
    }
}

/// What the registry tells the user about a listener's life.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// A listener went away: its process died, or closed it.
    ListenerGone {
        listener: SocketAddr,
        process: ProxyProcess,
        at: SystemTime,
        death: Option<Death>,
    },
    /// A listener came back after a gap.
    ListenerBack {
        listener: SocketAddr,
        process: ProxyProcess,
        at: SystemTime,
        gap: Duration,
        /// Failures toward it during the gap, all proxies and causes.
        failed_meanwhile: u64,
    },
}

impl Notice {
    pub fn explain(&self) -> String {
        match self {
            Notice::ListenerGone {
                listener,
                process,
                at,
                death,
            } => {
                let how = match death {
                    Some(Death::OomKilled { anon_rss_kb }) if *anon_rss_kb > 0 => {
                        format!("was OOM-killed (anon-rss {})", bytes(anon_rss_kb * 1024))
                    }
                    // Kernels before 6.0 give oom:mark_victim no memory fields.
                    Some(Death::OomKilled { .. }) => "was OOM-killed".to_string(),
                    Some(Death::Crashed { signal }) => {
                        format!("crashed ({})", signal_name(*signal))
                    }
                    Some(Death::Exited(Ending::Exited(code))) => format!("exited (code {code})"),
                    Some(Death::Exited(Ending::Signal(s))) => {
                        format!("was stopped ({})", signal_name(*s))
                    }
                    None => "closed it".to_string(),
                };
                format!(
                    "{} (pid {}, listening on {listener}) {how} at {}",
                    process.comm,
                    process.pid,
                    clock(*at)
                )
            }
            Notice::ListenerBack {
                listener,
                process,
                gap,
                failed_meanwhile,
                ..
            } => format!(
                "{listener} listens again ({} pid {}) after a gap of {}; {failed_meanwhile} \
                 connection(s) to it failed meanwhile",
                process.comm,
                process.pid,
                human_duration(*gap)
            ),
        }
    }
}

struct Listener {
    addr: SocketAddr,
    netns: u32,
    owner: ProxyProcess,
    /// Its listen() backlog, when tracer saw it start listening.
    max_backlog: Option<u32>,
    closed: Option<Closed>,
}

struct Closed {
    at: SystemTime,
    /// The task that closed it (the dying process itself, when it died).
    by: ProxyProcess,
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

/// Reads the accept queues of a network namespace's listeners (from /proc in the agent).
pub type QueueReader = Box<dyn FnMut(u32) -> Option<AcceptQueues> + Send>;

/// How long a namespace's accept queues, once read, answer for it.
const QUEUES_FRESH: Duration = Duration::from_secs(1);

/// A namespace's accept queues as last read, and the listeners that look full without their
/// backlog being known: a non-empty queue while the namespace's overflow count rose, and still
/// as long as that queue does not shrink.
struct QueuesRead {
    at: Instant,
    queues: AcceptQueues,
    full: HashSet<SocketAddr>,
}

/// Listeners on this host and what became of them.
pub struct Listeners {
    started: SystemTime,
    listeners: Vec<Listener>,
    ooms: VecDeque<OomKill>,
    exits: VecDeque<ProcessExit>,
    read_queues: QueueReader,
    queues: HashMap<u32, QueuesRead>,
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
        }
    }

    /// The listeners that were there before tracer started.
    pub fn seed(&mut self, existing: impl IntoIterator<Item = ExistingListenerInfo>) {
        for l in existing {
            self.listeners.push(Listener {
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
        let listener = Listener {
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
                self.listeners.push(Listener {
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
        let oom = self.ooms.iter().rev().find(|k| {
            k.pid == pid
                && at
                    .duration_since(k.time)
                    .is_ok_and(|d| d <= Duration::from_secs(30))
        });
        match (oom, ending) {
            (Some(kill), _) => Death::OomKilled {
                anon_rss_kb: kill.anon_rss_kb,
            },
            (None, Ending::Signal(signal)) if !stopping_signal(signal) => Death::Crashed { signal },
            (None, ending) => Death::Exited(ending),
        }
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
        match failure.cause {
            Outcome::Refused => self.behind_refusal(failure),
            Outcome::ResetBeforeResponse
            | Outcome::ResetMidResponse
            | Outcome::ClosedBeforeResponse => self.behind_reset(failure),
            Outcome::ConnectTimeout => self.behind_timeout(failure),
            _ => None,
        }
    }

    /// SYNs unanswered by a listener that is open: its accept queue may be full. It is when it
    /// holds more than the listen() backlog (seen when it started listening, or read from the
    /// socket diagnostics); when the backlog is not known, when it holds any while the
    /// namespace's overflow count goes up.
    fn behind_timeout(&mut self, failure: &Failure) -> Option<RootCause> {
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
    fn accept_queues(&mut self, netns: u32) -> Option<&QueuesRead> {
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
        let same_port = |l: &Listener| l.closed.is_none() && l.addr.port() == upstream.port();
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

pub fn signal_name(signal: i32) -> String {
    let name = match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        31 => "SIGSYS",
        _ => return format!("signal {signal}"),
    };
    name.to_string()
}

fn clock(time: SystemTime) -> String {
    let text = humantime::format_rfc3339_seconds(time).to_string();
    text.get(11..19).unwrap_or(&text).to_string()
}

fn bytes(n: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let n = n as f64;
    if n >= GIB {
        format!("{:.1} GiB", n / GIB)
    } else {
        format!("{:.0} MiB", n / MIB)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tracer_common::{Source, conn::EndKind};

    use super::*;
    use crate::decode::Evidence;

    const NS: u32 = 4026531840;
    const OTHER_NS: u32 = 4026532999;

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_763_769_600 + s)
    }

    fn process(comm: &str, pid: u32, netns: u32) -> ProxyProcess {
        ProxyProcess {
            comm: comm.into(),
            pid,
            tid: pid,
            cgroup_id: 1,
            netns,
        }
    }

    fn change(
        opened: bool,
        t: u64,
        local: &str,
        task: ProxyProcess,
        dying: Option<Ending>,
    ) -> Lifecycle {
        Lifecycle::Listener(ListenerChange {
            opened,
            time: at(t),
            local: local.parse().unwrap(),
            task,
            dying,
            max_backlog: 1,
        })
    }

    fn failure(t: u64, upstream: &str, cause: Outcome) -> Failure {
        Failure {
            time: at(t),
            proxy: process("nginx", 812, NS),
            upstream: upstream.parse().unwrap(),
            local: None,
            cause,
            evidence: Evidence {
                errno: 111,
                connect_time: None,
                syn_retransmits: 0,
                retransmits: 0,
                requests: 0,
                bytes_sent: 0,
                bytes_received: 0,
                waited: Duration::ZERO,
                ended_by: EndKind::PeerReset,
                reset_received: true,
                source: Source::SocketClosed,
            },
        }
    }

    fn gunicorn() -> ProxyProcess {
        process("gunicorn", 1234, NS)
    }

    #[test]
    fn refusals_after_an_oom_kill_name_the_victim_and_count() {
        let mut registry = Listeners::new(at(0));
        registry.on_lifecycle(&change(true, 1, "127.0.0.1:8000", gunicorn(), None));
        registry.on_lifecycle(&Lifecycle::Oom(OomKill {
            time: at(183),
            pid: 1234,
            comm: "gunicorn".into(),
            anon_rss_kb: 1_992_294,
            total_vm_kb: 0,
        }));
        let gone = registry.on_lifecycle(&change(
            false,
            183,
            "127.0.0.1:8000",
            gunicorn(),
            Some(Ending::Signal(9)),
        ));
        let Some(Notice::ListenerGone {
            death: Some(Death::OomKilled { .. }),
            ..
        }) = gone
        else {
            panic!("{gone:?}");
        };
        registry.root_cause(&failure(184, "127.0.0.1:8000", Outcome::Refused));
        let f = failure(185, "127.0.0.1:8000", Outcome::Refused);
        let cause = registry.root_cause(&f).unwrap();
        assert_eq!(cause.name(), "upstream_oom_killed");
        assert_eq!(
            cause.explain(&f),
            "gunicorn (pid 1234, listening on 127.0.0.1:8000) was OOM-killed at 00:03:03 \
             (anon-rss 1.9 GiB); since then 2 connections from nginx to 127.0.0.1:8000 were refused"
        );
    }

    #[test]
    fn connect_timeouts_toward_a_listener_with_a_full_queue_are_backlog_overflow() {
        use std::sync::{Arc, Mutex};
        // What /proc says, step by step: a queue holding more than the backlog (1), then an
        // empty one.
        let reads = Arc::new(Mutex::new(vec![(3u32, 17u64), (0, 17)]));
        let source = reads.clone();
        let mut registry = Listeners::with_queue_reader(
            at(0),
            Box::new(move |netns| {
                assert_eq!(netns, NS);
                let (queued, overflows) = source.lock().unwrap().remove(0);
                Some(AcceptQueues {
                    queued: [("0.0.0.0:8000".parse().unwrap(), queued)].into(),
                    backlogs: HashMap::new(),
                    overflows,
                })
            }),
        );
        registry.on_lifecycle(&change(true, 1, "0.0.0.0:8000", gunicorn(), None));
        let f = failure(5, "127.0.0.1:8000", Outcome::ConnectTimeout);
        let cause = registry.root_cause(&f).expect("a full queue");
        assert_eq!(cause.name(), "backlog_overflow");
        assert_eq!(cause.process(), Some(&gunicorn()));
        assert!(
            cause.explain(&f).contains("3 wait in its accept queue"),
            "{}",
            cause.explain(&f)
        );
        // Within a second the same reading answers; a timeout elsewhere has no such cause.
        assert!(registry.root_cause(&f).is_some());
        assert_eq!(
            registry.root_cause(&failure(5, "127.0.0.1:9999", Outcome::ConnectTimeout)),
            None
        );
        assert_eq!(reads.lock().unwrap().len(), 1, "read once in that second");
        // A second later: an empty queue, no root cause.
        registry.queues.get_mut(&NS).unwrap().at -= QUEUES_FRESH;
        assert_eq!(registry.root_cause(&f), None);
    }

    #[test]
    fn for_a_listener_older_than_tracer_a_queue_and_rising_overflows_tell() {
        use std::sync::{Arc, Mutex};
        // Backlog not known: a non-empty queue counts while the overflow count goes up, and
        // after that as long as it does not shrink.
        let reads = Arc::new(Mutex::new(vec![
            (1u32, 5u64),
            (1, 5),
            (0, 5),
            (1, 5),
            (1, 9),
        ]));
        let source = reads.clone();
        let mut registry = Listeners::with_queue_reader(
            at(0),
            Box::new(move |_| {
                let (queued, overflows) = source.lock().unwrap().remove(0);
                Some(AcceptQueues {
                    queued: [("127.0.0.1:8000".parse().unwrap(), queued)].into(),
                    backlogs: HashMap::new(),
                    overflows,
                })
            }),
        );
        registry.seed([ExistingListenerInfo {
            local: "127.0.0.1:8000".parse().unwrap(),
            netns: NS,
            owner: gunicorn(),
        }]);
        let f = failure(5, "127.0.0.1:8000", Outcome::ConnectTimeout);
        let next = |r: &mut Listeners| {
            if let Some(read) = r.queues.get_mut(&NS) {
                read.at -= QUEUES_FRESH;
            }
            r.root_cause(&f).map(|c| c.name())
        };
        assert_eq!(
            next(&mut registry),
            Some("backlog_overflow"),
            "overflows so far"
        );
        let full = Some("backlog_overflow");
        assert_eq!(next(&mut registry), full, "still as full");
        assert_eq!(next(&mut registry), None, "drained");
        assert_eq!(next(&mut registry), None, "queued again, no new overflow");
        assert_eq!(next(&mut registry), full, "new overflows");
    }

    #[test]
    fn a_backlog_from_the_socket_diagnostics_decides_for_a_listener_older_than_tracer() {
        // Another listener of the namespace overflows all along; this one is busy, not full.
        let mut queued = vec![2u32, 129];
        let mut overflows = 10u64;
        let mut registry = Listeners::with_queue_reader(
            at(0),
            Box::new(move |_| {
                overflows += 5;
                let addr: SocketAddr = "127.0.0.1:8000".parse().unwrap();
                Some(AcceptQueues {
                    queued: [(addr, queued.remove(0))].into(),
                    backlogs: [(addr, 128)].into(),
                    overflows,
                })
            }),
        );
        registry.seed([ExistingListenerInfo {
            local: "127.0.0.1:8000".parse().unwrap(),
            netns: NS,
            owner: gunicorn(),
        }]);
        let f = failure(5, "127.0.0.1:8000", Outcome::ConnectTimeout);
        assert_eq!(registry.root_cause(&f), None, "2 of 128: busy, not full");
        registry.queues.get_mut(&NS).unwrap().at -= QUEUES_FRESH;
        assert_eq!(
            registry.root_cause(&f).map(|c| c.name()),
            Some("backlog_overflow"),
            "129 of 128"
        );
    }

    #[test]
    fn crashes_and_exits_are_told_apart_by_signal() {
        let mut registry = Listeners::new(at(0));
        for (port, ending) in [
            (8001, Ending::Signal(11)),
            (8002, Ending::Signal(9)),
            (8003, Ending::Signal(15)),
            (8004, Ending::Exited(3)),
        ] {
            let addr = format!("0.0.0.0:{port}");
            let owner = process("app", port as u32, NS);
            registry.on_lifecycle(&change(true, 1, &addr, owner.clone(), None));
            registry.on_lifecycle(&change(false, 10, &addr, owner, Some(ending)));
        }
        let name = |r: &mut Listeners, port| {
            r.root_cause(&failure(11, &format!("10.0.0.5:{port}"), Outcome::Refused))
                .map(|c| c.name())
        };
        assert_eq!(name(&mut registry, 8001), Some("upstream_crashed"));
        assert_eq!(
            name(&mut registry, 8002),
            Some("upstream_crashed"),
            "SIGKILL without OOM"
        );
        assert_eq!(
            name(&mut registry, 8003),
            Some("upstream_exited"),
            "SIGTERM is a stop"
        );
        assert_eq!(name(&mut registry, 8004), Some("upstream_exited"));
        let f = failure(11, "127.0.0.1:8001", Outcome::Refused);
        let text = registry.root_cause(&f).unwrap().explain(&f);
        assert!(text.contains("crashed at 00:00:10 (SIGSEGV)"), "{text}");
    }

    #[test]
    fn a_listener_closed_by_a_living_process_is_restarting_and_its_return_measures_the_gap() {
        let mut registry = Listeners::new(at(0));
        registry.on_lifecycle(&change(true, 1, "127.0.0.1:8000", gunicorn(), None));
        registry.on_lifecycle(&change(false, 10, "127.0.0.1:8000", gunicorn(), None));
        let cause = registry
            .root_cause(&failure(11, "127.0.0.1:8000", Outcome::Refused))
            .unwrap();
        assert_eq!(cause.name(), "upstream_restarting");
        let back = registry.on_lifecycle(&change(
            true,
            12,
            "127.0.0.1:8000",
            process("gunicorn", 1300, NS),
            None,
        ));
        let Some(Notice::ListenerBack {
            gap,
            failed_meanwhile,
            ..
        }) = back.clone()
        else {
            panic!("{back:?}");
        };
        assert_eq!(gap, Duration::from_secs(2));
        assert_eq!(failed_meanwhile, 1);
        assert!(
            back.unwrap()
                .explain()
                .contains("after a gap of 2.00 s; 1 connection(s)")
        );
        assert_eq!(
            registry.root_cause(&failure(13, "127.0.0.1:8000", Outcome::Refused)),
            None
        );
    }

    #[test]
    fn a_process_that_closed_its_listener_then_exited_died() {
        let mut registry = Listeners::new(at(0));
        registry.on_lifecycle(&change(true, 1, "127.0.0.1:8000", gunicorn(), None));
        registry.on_lifecycle(&change(false, 10, "127.0.0.1:8000", gunicorn(), None));
        registry.on_lifecycle(&Lifecycle::Exit(ProcessExit {
            time: at(11),
            process: gunicorn(),
            ending: Ending::Exited(0),
        }));
        let cause = registry
            .root_cause(&failure(12, "127.0.0.1:8000", Outcome::Refused))
            .unwrap();
        assert_eq!(cause.name(), "upstream_exited");
    }

    #[test]
    fn resets_right_after_a_death_are_put_down_to_it() {
        let mut registry = Listeners::new(at(0));
        registry.on_lifecycle(&change(true, 1, "127.0.0.1:8000", gunicorn(), None));
        registry.on_lifecycle(&change(
            false,
            10,
            "127.0.0.1:8000",
            gunicorn(),
            Some(Ending::Signal(9)),
        ));
        let f = failure(10, "127.0.0.1:8000", Outcome::ResetBeforeResponse);
        let cause = registry.root_cause(&f).unwrap();
        assert_eq!(cause.name(), "upstream_crashed");
        assert!(
            cause
                .explain(&f)
                .ends_with("since then 1 connection from nginx to 127.0.0.1:8000 was reset")
        );
        assert_eq!(
            registry.root_cause(&failure(30, "127.0.0.1:8000", Outcome::ResetBeforeResponse)),
            None,
            "too late"
        );
    }

    #[test]
    fn refusals_with_no_death_are_explained_too() {
        let mut registry = Listeners::new(at(0));
        registry.seed([ExistingListenerInfo {
            local: "127.0.0.1:8000".parse().unwrap(),
            netns: NS,
            owner: gunicorn(),
        }]);
        registry.on_lifecycle(&change(
            true,
            1,
            "0.0.0.0:9000",
            process("api", 2000, OTHER_NS),
            None,
        ));
        registry.on_lifecycle(&change(
            true,
            1,
            "10.0.0.7:7000",
            process("db", 3000, NS),
            None,
        ));

        let f = failure(5, "10.0.0.5:8000", Outcome::Refused);
        let cause = registry.root_cause(&f).unwrap();
        assert_eq!(cause.name(), "listener_wrong_address");
        assert!(
            cause
                .explain(&f)
                .contains("bound to 127.0.0.1 but nginx connects to 10.0.0.5"),
            "{}",
            cause.explain(&f)
        );

        let f = failure(5, "127.0.0.1:9000", Outcome::Refused);
        let cause = registry.root_cause(&f).unwrap();
        assert_eq!(cause.name(), "listener_other_netns");
        assert!(
            cause
                .explain(&f)
                .contains("only in another network namespace"),
            "{}",
            cause.explain(&f)
        );

        let f = failure(5, "10.0.0.7:7001", Outcome::Refused);
        let cause = registry.root_cause(&f).unwrap();
        assert_eq!(cause.name(), "nothing_listened");
        assert!(
            cause
                .explain(&f)
                .starts_with("nothing has listened on 10.0.0.7:7001 since tracer started")
        );

        // A host tracer knows nothing of: no guess.
        assert_eq!(
            registry.root_cause(&failure(5, "192.0.2.9:80", Outcome::Refused)),
            None
        );
        // Refused while something listens: no guess either.
        assert_eq!(
            registry.root_cause(&failure(5, "127.0.0.1:8000", Outcome::Refused)),
            None
        );
        // Other causes have no root cause here.
        assert_eq!(
            registry.root_cause(&failure(5, "10.0.0.7:7001", Outcome::ConnectTimeout)),
            None
        );
    }

    #[test]
    fn wildcard_and_dual_stack_listeners_cover_their_addresses() {
        assert!(covers(
            "0.0.0.0".parse().unwrap(),
            "10.0.0.5".parse().unwrap()
        ));
        assert!(covers("::".parse().unwrap(), "10.0.0.5".parse().unwrap()));
        assert!(covers(
            "::".parse().unwrap(),
            "2001:db8::1".parse().unwrap()
        ));
        assert!(!covers(
            "0.0.0.0".parse().unwrap(),
            "2001:db8::1".parse().unwrap()
        ));
        assert!(covers(
            "::ffff:10.0.0.5".parse().unwrap(),
            "10.0.0.5".parse().unwrap()
        ));
        assert!(!covers(
            "127.0.0.1".parse().unwrap(),
            "10.0.0.5".parse().unwrap()
        ));
    }
}
