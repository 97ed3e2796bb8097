//! What tracer says behind a failure: the root causes, the notices of listeners that come and
//! go, and the sentences that tell them.

use std::{
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use tracer_common::Outcome;

use crate::{
    classify::human_duration,
    decode::{Ending, Failure, Task},
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

/// How the worker on the server's side of a connection ended.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerEnd {
    /// Another process (or the kernel, for a stopping signal of unknown sender) sent it a
    /// signal that ends a process: its master past a worker timeout, a person's kill.
    Killed {
        signal: i32,
        /// Who sent it (pid, name), when the kernel saw the send.
        sender: Option<(u32, String)>,
        /// The sender is the worker's parent (its master).
        by_parent: bool,
    },
    /// The kernel's OOM killer chose it.
    OomKilled { anon_rss_kb: u64 },
    /// Its own fault or abort: SIGSEGV, SIGBUS, SIGABRT…
    Crashed { signal: i32 },
    /// It exited (code) without answering.
    Exited { code: i32 },
}

/// Why failures toward an upstream happen, beyond the failure's own cause.
#[derive(Debug, Clone, PartialEq)]
pub enum RootCause {
    /// The upstream's container, in container words (see `classify::containers`).
    Container(crate::classify::containers::ContainerCause),
    /// The process that listened there died.
    Died {
        listener: SocketAddr,
        process: Task,
        at: SystemTime,
        death: Death,
        /// Failures of this proxy and cause toward it since (this one included).
        since: u64,
    },
    /// The process closed its listener and lives on: restarting or reloading.
    Restarting {
        listener: SocketAddr,
        process: Task,
        at: SystemTime,
        since: u64,
    },
    /// Nothing has listened on that address since tracer started: a wrong port or address.
    NothingListened { since: SystemTime },
    /// Something listens on that port, bound to another address.
    WrongAddress { listener: SocketAddr, process: Task },
    /// Something listens there, but in another network namespace.
    OtherNetns { listener: SocketAddr, process: Task },
    /// The listener's accept queue is full: its process does not accept connections as fast
    /// as they come, and the kernel drops the SYNs it has no room for.
    BacklogFull {
        listener: SocketAddr,
        process: Task,
        /// Connections waiting in its accept queue.
        queued: u32,
        /// The namespace's `ListenOverflows` so far.
        overflows: u64,
    },
    /// The worker that had this connection was killed, crashed or exited while the proxy
    /// waited for its answer.
    WorkerEnded {
        worker: Task,
        how: WorkerEnd,
        /// How long after the proxy's request it happened.
        into_request: Duration,
    },
    /// The proxy gave up while the connection still waited in the listener's accept queue: no
    /// worker took it. Or (a Unix socket) the queue was full, so connect() failed at once.
    NeverAccepted {
        /// `ip:port`, or `unix:PATH`.
        listener: String,
        /// The listener's process, when tracer knows it.
        owner: Option<Task>,
        queued: Option<u32>,
        backlog: Option<u32>,
    },
    /// A worker had accepted the request and not answered when the proxy gave up.
    SlowUpstream {
        listener: Option<SocketAddr>,
        /// The process that held the connection, when tracer found it.
        worker: Option<Task>,
        owner: Option<Task>,
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
            RootCause::WorkerEnded { how, .. } => match how {
                WorkerEnd::Killed { .. } => "worker_killed",
                WorkerEnd::OomKilled { .. } => "worker_oom_killed",
                WorkerEnd::Crashed { .. } => "worker_crashed",
                WorkerEnd::Exited { .. } => "worker_exited",
            },
            RootCause::NeverAccepted { .. } => "never_accepted",
            RootCause::SlowUpstream { .. } => "slow_upstream",
            RootCause::Container(cause) => cause.name(),
        }
    }

    /// The process behind it, when there is one.
    pub fn process(&self) -> Option<&Task> {
        match self {
            RootCause::Died { process, .. }
            | RootCause::Restarting { process, .. }
            | RootCause::WrongAddress { process, .. }
            | RootCause::OtherNetns { process, .. }
            | RootCause::BacklogFull { process, .. }
            | RootCause::WorkerEnded {
                worker: process, ..
            } => Some(process),
            RootCause::NeverAccepted { owner, .. } => owner.as_ref(),
            RootCause::SlowUpstream { worker, owner, .. } => worker.as_ref().or(owner.as_ref()),
            RootCause::NothingListened { .. } | RootCause::Container(_) => None,
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
            RootCause::Container(cause) => cause.explain(),
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
            RootCause::WorkerEnded {
                worker,
                how,
                into_request,
            } => {
                // (Times from two records: a few ms either way.)
                let into = if *into_request < Duration::from_millis(1) {
                    "just after the request arrived".to_string()
                } else {
                    format!("{} into this request", human_duration(*into_request))
                };
                let what = match how {
                    WorkerEnd::Killed {
                        signal,
                        sender: Some((pid, comm)),
                        by_parent,
                    } => format!(
                        "was sent {} by {}{comm} (pid {pid}) {into}{}",
                        signal_name(*signal),
                        if *by_parent { "its master " } else { "" },
                        if *by_parent {
                            " (a worker timeout?)"
                        } else {
                            ""
                        }
                    ),
                    WorkerEnd::Killed {
                        signal,
                        sender: None,
                        ..
                    } => format!("was killed by {} {into}", signal_name(*signal)),
                    WorkerEnd::OomKilled { anon_rss_kb } if *anon_rss_kb > 0 => format!(
                        "was OOM-killed (anon-rss {}) {into}",
                        bytes(anon_rss_kb * 1024)
                    ),
                    WorkerEnd::OomKilled { .. } => {
                        format!("was OOM-killed {into}")
                    }
                    WorkerEnd::Crashed { signal } => {
                        format!("crashed ({}) {into}", signal_name(*signal))
                    }
                    WorkerEnd::Exited { code } => {
                        format!("exited (code {code}) {into}")
                    }
                };
                format!(
                    "the worker {} (pid {}) that had this connection {what}; {proxy} saw {}",
                    worker.comm,
                    worker.pid,
                    symptom(failure.cause)
                )
            }
            RootCause::NeverAccepted {
                listener,
                owner,
                queued,
                backlog,
            } => {
                let whose = owner.as_ref().map_or_else(
                    || format!("the server listening on {listener}"),
                    |o| format!("{} (pid {}, listening on {listener})", o.comm, o.pid),
                );
                let queue = match (queued, backlog) {
                    (Some(q), Some(b)) => format!(" ({q} queued now, backlog {b})"),
                    (Some(q), None) => format!(" ({q} queued now)"),
                    _ => String::new(),
                };
                if failure.cause == Outcome::UnixBacklogFull {
                    return format!(
                        "every worker of {whose} is busy: its queue is full{queue}, so \
                         connect() failed at once (too few workers, or a backlog too short?)"
                    );
                }
                format!(
                    "no worker of {whose} took this connection: it waited {} in the accept \
                     queue{queue} and was never picked up (every worker busy?)",
                    human_duration(failure.evidence.waited)
                )
            }
            RootCause::SlowUpstream {
                listener,
                worker,
                owner,
            } => {
                let who = match (worker, owner) {
                    (Some(w), _) => format!("{} (pid {})", w.comm, w.pid),
                    (None, Some(o)) => format!("a worker of {} (pid {})", o.comm, o.pid),
                    (None, None) => "a worker".to_string(),
                };
                let on = listener.map_or_else(String::new, |l| format!(" on {l}"));
                format!(
                    "{who}{on} had accepted this request and had not answered when {proxy} gave \
                     up after {} (a slow upstream)",
                    human_duration(failure.evidence.waited)
                )
            }
        }
    }
}

/// What the proxy saw, in a few words.
fn symptom(cause: Outcome) -> &'static str {
    match cause {
        Outcome::ClosedBeforeResponse => "the connection closed before any response",
        Outcome::ResetBeforeResponse => "the connection reset before any response",
        Outcome::ResetMidResponse => "the connection reset in the middle of the response",
        Outcome::ResponseTimeout => "no response before it gave up",
        _ => "the attempt fail",
    }
}

/// What the registry tells the user about a listener's life.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// A listener went away: its process died, or closed it.
    ListenerGone {
        listener: SocketAddr,
        process: Task,
        at: SystemTime,
        death: Option<Death>,
    },
    /// A listener came back after a gap.
    ListenerBack {
        listener: SocketAddr,
        process: Task,
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

/// A time of day, `12:03:10`.
pub(crate) fn clock(time: SystemTime) -> String {
    let text = humantime::format_rfc3339_seconds(time).to_string();
    text.get(11..19).unwrap_or(&text).to_string()
}

/// A size in MiB or GiB.
pub(crate) fn bytes(n: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let n = n as f64;
    if n >= GIB {
        format!("{:.1} GiB", n / GIB)
    } else {
        format!("{:.0} MiB", n / MIB)
    }
}
