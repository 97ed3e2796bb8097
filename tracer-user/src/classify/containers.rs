//! Containers: who the proxy and the upstream are in container words, and what happened to the
//! upstream's container, from what the container runtime reports (`capture::runtime`).
//!
//! The model keeps, per container, its name, image, addresses, memory limit, starts and last
//! end, and per address the *leases*: which container held it from when until when. A failure
//! toward an address is then put in container words:
//! - the address is held now by a container that keeps restarting: `container_crash_loop`;
//! - it was held until recently, and the container (by name) now runs at another address (it
//!   was recreated, the proxy still uses the old one): `stale_address`;
//! - it was held by a container that died since: `container_oom_killed` (at its memory limit),
//!   `container_crash_loop` (the runtime restarts it again and again), `container_stopped`
//!   (stopped, exited or removed).
//!
//! When a container dies or is recreated, its old address has no owner and the proxy's SYNs go
//! nowhere: these are the root causes of those connect timeouts and unreachables too.

mod homes;

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    net::{IpAddr, SocketAddr},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

pub use self::homes::ListenerHomes;
use super::root_cause::{bytes, clock};
use crate::{
    capture::procfs,
    decode::{Failure, Upstream},
};

/// A container as users name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerId {
    /// The first 12 hex digits of the runtime's id, as `docker ps` shows it.
    pub id: String,
    pub name: String,
    pub image: String,
    /// `namespace/pod` for a Kubernetes pod's container (from the runtime's labels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "container {} (image {}", self.name, self.image)?;
        if let Some(pod) = &self.pod {
            write!(f, ", pod {pod}")?;
        }
        f.write_str(")")
    }
}

/// What the runtime says of one container (its inspect), already escaped.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// The runtime's full id (64 hex digits).
    pub full_id: String,
    pub who: ContainerId,
    pub running: bool,
    /// The runtime is about to start it again (a restart policy).
    pub restarting: bool,
    pub oom_killed: bool,
    pub exit_code: i64,
    pub started_at: Option<SystemTime>,
    pub finished_at: Option<SystemTime>,
    pub restart_count: u32,
    /// The memory limit in bytes, when it has one.
    pub memory_limit: Option<u64>,
    pub addresses: Vec<IpAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct End {
    at: SystemTime,
    oom: bool,
    exit_code: i64,
}

#[derive(Debug)]
struct Known {
    who: ContainerId,
    running: bool,
    restarting: bool,
    restart_count: u32,
    memory_limit: Option<u64>,
    addresses: Vec<IpAddr>,
    /// Recent starts, oldest first.
    starts: VecDeque<SystemTime>,
    last_end: Option<End>,
    /// An OOM kill the runtime announced, before the death that follows it.
    oom_at: Option<SystemTime>,
    removed: Option<SystemTime>,
}

#[derive(Debug, Clone)]
struct Lease {
    ip: IpAddr,
    full_id: String,
    from: SystemTime,
    until: Option<SystemTime>,
}

/// How many containers and address leases are remembered (the oldest ended ones go first).
const MAX_CONTAINERS: usize = 4096;
const MAX_LEASES: usize = 8192;
/// How many starts are kept per container.
const STARTS: usize = 16;
/// Starts this close together, three or more, are a crash loop.
const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(300);
const CRASH_LOOP_STARTS: usize = 3;
/// A death this recent still explains failures toward a container that runs again.
const DEATH_ECHO: Duration = Duration::from_secs(10);
/// Runtimes report times in whole seconds here and there: an address given up this long after
/// a failure still counts as given up before it.
const SLACK: Duration = Duration::from_secs(2);

/// The upstream's container behind a failure, in container words.
#[derive(Debug, Clone, PartialEq)]
pub enum ContainerCause {
    /// The address belonged to a container that now runs at another address.
    StaleAddress {
        address: IpAddr,
        who: ContainerId,
        until: SystemTime,
        now_at: Vec<IpAddr>,
        /// A new container of the same name (recreated), not the same one moved.
        recreated: bool,
    },
    OomKilled {
        who: ContainerId,
        at: SystemTime,
        limit: Option<u64>,
        /// When the runtime started it again, if it did.
        restarted: Option<SystemTime>,
    },
    CrashLoop {
        who: ContainerId,
        restarts: u32,
        /// The average time between its recent starts.
        every: Duration,
        last_exit: Option<(SystemTime, i64)>,
    },
    Stopped {
        who: ContainerId,
        at: SystemTime,
        exit_code: Option<i64>,
        removed: bool,
    },
}

impl ContainerCause {
    pub fn name(&self) -> &'static str {
        match self {
            ContainerCause::StaleAddress { .. } => "stale_address",
            ContainerCause::OomKilled { .. } => "container_oom_killed",
            ContainerCause::CrashLoop { .. } => "container_crash_loop",
            ContainerCause::Stopped { .. } => "container_stopped",
        }
    }

    pub fn container(&self) -> &ContainerId {
        match self {
            ContainerCause::StaleAddress { who, .. }
            | ContainerCause::OomKilled { who, .. }
            | ContainerCause::CrashLoop { who, .. }
            | ContainerCause::Stopped { who, .. } => who,
        }
    }

    /// One sentence with the evidence.
    pub fn explain(&self) -> String {
        match self {
            ContainerCause::StaleAddress {
                address,
                who,
                until,
                now_at,
                recreated,
            } => {
                let now: Vec<String> = now_at.iter().map(IpAddr::to_string).collect();
                format!(
                    "{address} belonged to {who} until {}; {} now runs at {}{}",
                    clock(*until),
                    who.name,
                    now.join(", "),
                    if *recreated {
                        " (recreated with a new address: the proxy still uses the old one)"
                    } else {
                        " (the proxy still uses its old address)"
                    }
                )
            }
            ContainerCause::OomKilled {
                who,
                at,
                limit,
                restarted,
            } => {
                let limit = match limit {
                    Some(limit) => format!(" at its memory limit ({})", bytes(*limit)),
                    None => String::new(),
                };
                let after = match restarted {
                    Some(t) => format!("; it was started again at {}", clock(*t)),
                    None => "; it has not run since".to_string(),
                };
                format!("{who} was OOM-killed{limit} at {}{after}", clock(*at))
            }
            ContainerCause::CrashLoop {
                who,
                restarts,
                every,
                last_exit,
            } => {
                let last = match last_exit {
                    Some((at, code)) => {
                        format!(", last exiting with code {code} at {}", clock(*at))
                    }
                    None => String::new(),
                };
                format!(
                    "{who} is in a crash loop: restarted {restarts} times, one start every {:.1} s{last}",
                    every.as_secs_f64()
                )
            }
            ContainerCause::Stopped {
                who,
                at,
                exit_code,
                removed,
            } => {
                let how = if *removed { "was removed" } else { "stopped" };
                let code = match exit_code {
                    Some(code) if !*removed => format!(" (exit code {code})"),
                    _ => String::new(),
                };
                format!(
                    "{who} {how} at {}{code}; its address has had no owner since",
                    clock(*at)
                )
            }
        }
    }
}

/// The containers on this host, as the runtime reported them.
#[derive(Debug, Default)]
pub struct Containers {
    known: HashMap<String, Known>,
    leases: VecDeque<Lease>,
    /// Bumped when a container is first seen: a process found in none is looked up again.
    generation: u64,
    /// Which container listens behind a local address (host network, pods without leases).
    pub homes: ListenerHomes,
}

/// The agent's side: the model the runtime follower fills, and which container each proxy
/// process is in (its /proc/PID/cgroup, read once per process and container generation).
pub struct ContainerView {
    pub model: std::sync::Arc<std::sync::Mutex<Containers>>,
    proxies: HashMap<(u32, u64), (u64, Option<ContainerId>)>,
    /// Kubernetes containers no runtime API names (containerd, CRI-O), from their bundles;
    /// none with `--container-runtime none`.
    bundles: Option<std::sync::Arc<std::sync::Mutex<crate::capture::bundles::Bundles>>>,
    /// To the runtime follower: containers met before the runtime told of them.
    sightings: Option<tokio::sync::mpsc::Sender<String>>,
    /// Containers sighted already (each is asked about once).
    sighted: std::collections::HashSet<String>,
}

/// Processes whose container is remembered.
const PROXIES: usize = 4096;

impl ContainerView {
    pub fn new(
        model: std::sync::Arc<std::sync::Mutex<Containers>>,
        bundles: Option<std::sync::Arc<std::sync::Mutex<crate::capture::bundles::Bundles>>>,
    ) -> ContainerView {
        ContainerView {
            model,
            proxies: HashMap::new(),
            bundles,
            sightings: None,
            sighted: std::collections::HashSet::new(),
        }
    }

    /// Tells the runtime follower of containers it has not reported yet.
    pub fn with_sightings(mut self, sightings: tokio::sync::mpsc::Sender<String>) -> ContainerView {
        self.sightings = Some(sightings);
        self
    }

    /// A process in container `full_id`, which the runtime has not told of yet, was met: the
    /// follower inspects it now (once; a full channel drops it).
    fn sight(&mut self, full_id: &str) {
        let Some(sightings) = &self.sightings else {
            return;
        };
        if self.sighted.contains(full_id) {
            return;
        }
        if self.sighted.len() >= PROXIES {
            self.sighted.clear();
        }
        if sightings.try_send(full_id.to_string()).is_ok() {
            self.sighted.insert(full_id.to_string());
        }
    }

    /// The failure's root cause in container words, the proxy's container and the upstream's.
    pub fn describe(
        &mut self,
        failure: &Failure,
    ) -> (
        Option<ContainerCause>,
        Option<ContainerId>,
        Option<ContainerId>,
    ) {
        let model = self.model.clone();
        let model = model.lock().unwrap_or_else(|p| p.into_inner());
        if model.known.is_empty() && self.bundles.is_none() {
            return (None, None, None);
        }
        let cause = model.root_cause(failure);
        let upstream = match (&cause, &failure.upstream) {
            (Some(cause), _) => Some(cause.container().clone()),
            (None, Upstream::Ip(addr)) => {
                model.held_by(addr.ip(), failure.time).cloned().or_else(|| {
                    model.listening_at(*addr, failure.proxy.netns, |id| self.in_bundle(id))
                })
            }
            _ => None,
        };
        let key = (failure.proxy.pid, failure.proxy.cgroup_id);
        let proxy = match self.proxies.get(&key) {
            Some((generation, found)) if found.is_some() || *generation == model.generation => {
                found.clone()
            }
            _ => {
                let ids = container_ids_of_pid(failure.proxy.pid);
                let found = ids
                    .iter()
                    .find_map(|id| model.of_full_id(id))
                    .cloned()
                    .or_else(|| self.in_bundle(ids.first()?));
                if found.is_none()
                    && let Some(id) = ids.first()
                {
                    self.sight(id);
                }
                if self.proxies.len() >= PROXIES {
                    self.proxies.clear();
                }
                self.proxies.insert(key, (model.generation, found.clone()));
                found
            }
        };
        (cause, proxy, upstream)
    }
}

impl ContainerView {
    /// A socket started listening on `local` (namespace `netns`, process `pid`), or was
    /// listening when tracer started: notes which container, if any, it is in. Read while the
    /// process lives, so that failures after its death still name its container.
    pub fn listener_opened(&mut self, local: SocketAddr, netns: u32, pid: u32, at: SystemTime) {
        if self.bundles.is_none() && self.sightings.is_none() {
            // `--container-runtime none`: nothing names containers.
            return;
        }
        let full_id = container_ids_of_pid(pid).into_iter().next();
        let local_ips = match &full_id {
            Some(_) if local.ip().is_unspecified() => procfs::local_addresses(pid),
            _ => Vec::new(),
        };
        let model = self.model.clone();
        let mut model = model.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(id) = &full_id
            && !model.known.contains_key(id)
        {
            // Its bundle goes with its task: read it now. A runtime that has not told of it
            // yet is asked: the proxy's first failures may follow its first listen() closely.
            if self.in_bundle(id).is_none() {
                self.sight(id);
            }
        }
        model.homes.opened(local, netns, full_id, local_ips, at);
    }

    /// The Kubernetes container with this full id, from its bundle (cached).
    fn in_bundle(&self, full_id: &str) -> Option<ContainerId> {
        self.bundles
            .as_ref()?
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .of_container(full_id)
    }
}

impl Containers {
    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// The running container that holds `ip` at `now`.
    pub fn held_now(&self, ip: IpAddr, now: SystemTime) -> Option<&ContainerId> {
        self.lease_at(ip, now)
            .filter(|l| l.until.is_none())
            .and_then(|l| self.known.get(&l.full_id))
            .map(|k| &k.who)
    }

    /// Takes in what the runtime says of a container now (`now` when it said so).
    pub fn observe(&mut self, o: Observed, now: SystemTime) {
        if !self.known.contains_key(&o.full_id) {
            self.generation += 1;
        }
        let known = self
            .known
            .entry(o.full_id.clone())
            .or_insert_with(|| Known {
                who: o.who.clone(),
                running: false,
                restarting: false,
                restart_count: 0,
                memory_limit: None,
                addresses: Vec::new(),
                starts: VecDeque::new(),
                last_end: None,
                oom_at: None,
                removed: None,
            });
        known.who = o.who.clone();
        known.running = o.running;
        known.restarting = o.restarting;
        known.restart_count = o.restart_count;
        known.memory_limit = o.memory_limit;
        if let Some(started) = o.started_at
            && (o.running || o.finished_at.is_some_and(|f| f >= started))
            && known.starts.back().is_none_or(|last| started > *last)
        {
            known.starts.push_back(started);
            if known.starts.len() > STARTS {
                known.starts.pop_front();
            }
        }
        if o.running {
            known.addresses = o.addresses.clone();
            let from = o.started_at.unwrap_or(now);
            for ip in &o.addresses {
                self.take_address(*ip, &o.full_id, from, now);
            }
            // Addresses it no longer has.
            for lease in self.leases.iter_mut().filter(|l| {
                l.full_id == o.full_id && l.until.is_none() && !o.addresses.contains(&l.ip)
            }) {
                lease.until = Some(now);
            }
        } else {
            let at = o.finished_at.unwrap_or(now);
            if o.finished_at.is_some() {
                let end = End {
                    at,
                    oom: o.oom_killed,
                    exit_code: o.exit_code,
                };
                if known.last_end.is_none_or(|e| e.at < at) {
                    known.last_end = Some(end);
                }
            }
            self.end_leases(&o.full_id, at);
        }
        self.bound();
    }

    /// The runtime announced an OOM kill in the container (its death follows).
    pub fn oom(&mut self, full_id: &str, at: SystemTime) {
        if let Some(known) = self.known.get_mut(full_id) {
            known.oom_at = Some(at);
        }
    }

    /// The container's process ended (`die`), with its exit code.
    pub fn died(&mut self, full_id: &str, at: SystemTime, exit_code: i64) {
        if let Some(known) = self.known.get_mut(full_id) {
            let near = |t: SystemTime| {
                let apart = at.duration_since(t).or_else(|e| Ok::<_, ()>(e.duration()));
                apart.is_ok_and(|d| d < SLACK * 5)
            };
            // The runtime's `oom` event, or its inspect (`State.OOMKilled`) of this same end.
            let oom = known.oom_at.is_some_and(near)
                || known.last_end.is_some_and(|e| e.oom && near(e.at));
            known.last_end = Some(End { at, oom, exit_code });
            known.running = false;
        }
        self.end_leases(full_id, at);
    }

    /// The container was removed.
    pub fn removed(&mut self, full_id: &str, at: SystemTime) {
        if let Some(known) = self.known.get_mut(full_id) {
            known.removed = Some(at);
            known.running = false;
        }
        self.end_leases(full_id, at);
    }

    fn take_address(&mut self, ip: IpAddr, full_id: &str, from: SystemTime, now: SystemTime) {
        let mut held = false;
        for lease in self
            .leases
            .iter_mut()
            .filter(|l| l.ip == ip && l.until.is_none())
        {
            if lease.full_id == full_id {
                held = true;
            } else {
                // Another container had it: it gave it up (its end may not have been seen).
                lease.until = Some(from.min(now));
            }
        }
        if !held {
            self.leases.push_back(Lease {
                ip,
                full_id: full_id.to_string(),
                from,
                until: None,
            });
        }
    }

    fn end_leases(&mut self, full_id: &str, at: SystemTime) {
        for lease in self
            .leases
            .iter_mut()
            .filter(|l| l.full_id == full_id && l.until.is_none())
        {
            lease.until = Some(at.max(lease.from));
        }
    }

    /// Forgets the oldest ended leases and removed containers past the bounds.
    fn bound(&mut self) {
        while self.leases.len() > MAX_LEASES {
            match self.leases.iter().position(|l| l.until.is_some()) {
                Some(i) => {
                    self.leases.remove(i);
                }
                None => {
                    self.leases.pop_front();
                }
            }
        }
        if self.known.len() > MAX_CONTAINERS {
            let mut gone: Vec<(SystemTime, String)> = self
                .known
                .iter()
                .filter(|(_, k)| !k.running)
                .map(|(id, k)| {
                    (
                        k.removed
                            .or(k.last_end.map(|e| e.at))
                            .unwrap_or(SystemTime::UNIX_EPOCH),
                        id.clone(),
                    )
                })
                .collect();
            gone.sort();
            let excess = self.known.len() - MAX_CONTAINERS;
            for (_, id) in gone.into_iter().take(excess) {
                self.known.remove(&id);
                self.leases.retain(|l| l.full_id != id);
            }
        }
    }

    /// The container with this full id (64 hex digits).
    pub fn of_full_id(&self, full_id: &str) -> Option<&ContainerId> {
        self.known.get(full_id).map(|k| &k.who)
    }

    /// The container whose process listens (or last listened) on `upstream`, as a proxy in
    /// namespace `proxy_netns` reaches it: the runtime's, else what `in_bundle` says of its id.
    pub fn listening_at(
        &self,
        upstream: SocketAddr,
        proxy_netns: u32,
        in_bundle: impl FnOnce(&str) -> Option<ContainerId>,
    ) -> Option<ContainerId> {
        let id = self.homes.of(upstream, proxy_netns)?;
        self.of_full_id(id).cloned().or_else(|| in_bundle(id))
    }

    /// The container with this full id, or whose cgroup path names it.
    pub fn of_cgroup_path(&self, path: &str) -> Option<&ContainerId> {
        let id = container_id_in(path)?;
        self.known.get(id).map(|k| &k.who)
    }

    /// The container that holds `ip` now.
    #[cfg(test)]
    fn holder(&self, ip: IpAddr) -> Option<&ContainerId> {
        self.leases
            .iter()
            .rev()
            .find(|l| l.ip == ip && l.until.is_none())
            .and_then(|l| self.known.get(&l.full_id))
            .map(|k| &k.who)
    }

    /// The container that held `ip` at `at`, or last held it before.
    pub fn held_by(&self, ip: IpAddr, at: SystemTime) -> Option<&ContainerId> {
        self.lease_at(ip, at)
            .and_then(|l| self.known.get(&l.full_id))
            .map(|k| &k.who)
    }

    fn lease_at(&self, ip: IpAddr, at: SystemTime) -> Option<&Lease> {
        let open = self
            .leases
            .iter()
            .rev()
            .find(|l| l.ip == ip && l.until.is_none() && l.from <= at + SLACK);
        open.or_else(|| {
            self.leases
                .iter()
                .filter(|l| l.ip == ip && l.from <= at + SLACK)
                .max_by_key(|l| l.until)
        })
    }

    /// The failure's upstream container, in container words, when the runtime's story explains
    /// it.
    pub fn root_cause(&self, failure: &Failure) -> Option<ContainerCause> {
        let Upstream::Ip(upstream) = failure.upstream else {
            return None;
        };
        let at = failure.time;
        let ip = upstream.ip();
        let lease = self.lease_at(ip, at)?;
        let known = self.known.get(&lease.full_id)?;
        match lease.until {
            // It holds the address.
            None => {
                if let Some(cause) = self.crash_loop(known, at) {
                    return Some(cause);
                }
                let end = known.last_end?;
                let since = at.duration_since(end.at).ok()?;
                (end.oom && since < DEATH_ECHO).then(|| ContainerCause::OomKilled {
                    who: known.who.clone(),
                    at: end.at,
                    limit: known.memory_limit,
                    restarted: known.starts.back().copied().filter(|s| *s >= end.at),
                })
            }
            // It gave the address up before the failure.
            Some(until) if until <= at + SLACK => {
                if let Some((now_at, recreated)) = self.runs_elsewhere(&lease.full_id, known, ip) {
                    return Some(ContainerCause::StaleAddress {
                        address: ip,
                        who: known.who.clone(),
                        until,
                        now_at,
                        recreated,
                    });
                }
                if let Some(cause) = self.crash_loop(known, at) {
                    return Some(cause);
                }
                match known.last_end {
                    Some(end) if end.oom => Some(ContainerCause::OomKilled {
                        who: known.who.clone(),
                        at: end.at,
                        limit: known.memory_limit,
                        restarted: None,
                    }),
                    end => Some(ContainerCause::Stopped {
                        who: known.who.clone(),
                        at: known.removed.or(end.map(|e| e.at)).unwrap_or(until),
                        exit_code: end.map(|e| e.exit_code),
                        removed: known.removed.is_some() && end.is_none(),
                    }),
                }
            }
            Some(_) => None,
        }
    }

    /// A container of the same name (this one or its successor) running at other addresses.
    fn runs_elsewhere(
        &self,
        full_id: &str,
        known: &Known,
        old: IpAddr,
    ) -> Option<(Vec<IpAddr>, bool)> {
        self.known
            .iter()
            .filter(|(_, k)| k.running && k.who.name == known.who.name)
            .filter(|(_, k)| !k.addresses.is_empty() && !k.addresses.contains(&old))
            .max_by_key(|(_, k)| k.starts.back().copied())
            .map(|(id, k)| (k.addresses.clone(), id != full_id))
    }

    fn crash_loop(&self, known: &Known, at: SystemTime) -> Option<ContainerCause> {
        let recent: Vec<SystemTime> = known
            .starts
            .iter()
            .copied()
            .filter(|s| at.duration_since(*s).is_ok_and(|d| d < CRASH_LOOP_WINDOW))
            .collect();
        let looping = known.restarting || known.restart_count >= 2;
        if recent.len() < CRASH_LOOP_STARTS || !looping {
            return None;
        }
        let span = recent[recent.len() - 1]
            .duration_since(recent[0])
            .unwrap_or_default();
        Some(ContainerCause::CrashLoop {
            who: known.who.clone(),
            restarts: known.restart_count,
            every: span / (recent.len() as u32 - 1),
            last_exit: known.last_end.map(|e| (e.at, e.exit_code)),
        })
    }
}

/// The container ids in the cgroup paths of process `pid` (/proc/PID/cgroup: one path per
/// hierarchy), in their order; none when it is gone or in no container.
pub fn container_ids_of_pid(pid: u32) -> Vec<String> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    cgroups
        .lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .filter_map(container_id_in)
        .map(str::to_string)
        .collect()
}

/// The container id in a cgroup path: the last 64-hex-digit name in it, as Docker
/// (`/docker/ID`, `docker-ID.scope`), Podman (`libpod-ID.scope`), containerd
/// (`cri-containerd-ID.scope`) and CRI-O (`crio-ID.scope`) name their cgroups. Podman's
/// monitor (`libpod-conmon-ID`) is not the container.
pub fn container_id_in(path: &str) -> Option<&str> {
    path.rsplit('/').find_map(|part| {
        if part.contains("conmon") {
            return None;
        }
        let part = part.strip_suffix(".scope").unwrap_or(part);
        let id = part.rsplit(['-', ':']).next()?;
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
    })
}

#[cfg(test)]
mod tests;
