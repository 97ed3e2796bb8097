//! The agent's loop: capture → decode → classify (root causes) → the caller's handler (which
//! aggregates and exports), until SIGINT or SIGTERM. Dropping the agent detaches every probe.
//!
//! What other tasks (the metrics endpoint, the live view) need is in [`Shared`].

use std::{
    collections::{BTreeSet, HashSet},
    ops::ControlFlow,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracer_common::{Endpoint, Outcome, Stat};

use crate::{
    aggregate::{ListenerTotals, RootCauseTotals, Totals, ledger::Ledger},
    capture::{
        Capture, CaptureError, ContainerRuntime, Counters, Events, Options, ProbeStatus,
        bundles::Bundles, procfs,
    },
    classify::{
        Classified, Listeners, Notice, RootCause,
        containers::{ContainerView, Containers},
        is_not_an_upstream,
        self_probe::SelfProbes,
    },
    decode::{
        self, Clock, Count, ExistingListenerInfo, Failure, LatencyCount, Lifecycle, Record,
        ServerEnd,
    },
};

/// What a handler is given.
pub enum Happening {
    /// A failed upstream attempt, with its root cause when one is known (boxed: it is ten
    /// times the size of the others).
    Failure(Box<Classified>),
    /// A listener went away or came back.
    Notice(Notice),
    /// The periodic tick asked for.
    Tick,
}

/// The agent's state that other tasks read: the kernel's counters and the agent's health.
pub struct Shared {
    pub counters: Arc<Counters>,
    pub probes: Vec<ProbeStatus>,
    pub started: SystemTime,
    /// Failure records read from the ring buffer, and those that could not be decoded.
    pub events_received: AtomicU64,
    pub events_undecodable: AtomicU64,
    /// What became of listeners so far.
    pub listeners: Mutex<ListenerTotals>,
    /// Failure events with a root cause, by root cause.
    pub root_causes: Mutex<RootCauseTotals>,
    /// Retired counts and admitted upstreams (see `aggregate::ledger`).
    pub ledger: Mutex<Ledger>,
    /// The containers the runtime reported (see `classify::containers`).
    pub containers: Arc<Mutex<Containers>>,
    /// Kubernetes containers named from their bundles (containerd, CRI-O), one cache for the
    /// events and the metrics; none with `--container-runtime none`.
    pub bundles: Option<Arc<Mutex<Bundles>>>,
}

impl Shared {
    /// The kernel's exact counts, aggregated per route, with what was retired of them.
    pub fn totals(&self) -> Totals {
        // Held while the kernel is read: a retiring pass moves counts from the kernel to the
        // ledger under it, so no read sees them twice or not at all.
        let ledger = self.ledger();
        let kernel = self.counters.counts();
        let counts = kernel
            .iter()
            .filter_map(|(key, tally)| {
                Count::from_kernel(key, tally.count, tally.sum_ns, &*self.counters).ok()
            })
            .filter(|c| !is_not_an_upstream(&c.route.upstream));
        // A connect's count is kept under its connect-time bucket: the same entries are the
        // histogram.
        let latency = kernel
            .iter()
            .filter(|(key, _)| key.outcome == Outcome::Connected as u8)
            .filter_map(|(key, tally)| {
                LatencyCount::from_kernel(key, tally.count, &*self.counters).ok()
            })
            .filter(|c| !is_not_an_upstream(&c.route.upstream));
        let mut totals = Totals::from_counts(counts, latency);
        for (code, tally) in self.counters.overflow_counts() {
            if let Some(outcome) = Outcome::from_u8(code) {
                *totals.overflow.entry(outcome).or_default() += tally.count;
            }
        }
        for (route, retired) in ledger.retired() {
            totals.routes.entry(route.clone()).or_default().add(retired);
        }
        totals
    }

    pub fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves kernel entries that have not changed for `idle_after` into the ledger and frees
    /// them; lets idle upstreams give their places up; forgets the first-bytes watches of
    /// processes that exited.
    pub fn reclaim(&self) {
        let forgotten = self.counters.forget_watches_of_exited();
        if forgotten > 0 {
            tracing::debug!("forgot {forgotten} first-bytes watches of processes that exited");
        }
        let now = Instant::now();
        let mut ledger = self.ledger();
        let mut live_keys = HashSet::new();
        let mut live_upstreams = BTreeSet::new();
        // The freed entries' last values, aggregated per route as the totals are.
        let (mut counts, mut latency) = (Vec::new(), Vec::new());
        for (key, tally) in self.counters.counts() {
            let Ok(count) = Count::from_kernel(&key, tally.count, tally.sum_ns, &*self.counters)
            else {
                continue;
            };
            if ledger.idle(key, tally.count, now)
                && let Some(last) = self.counters.take_count(&key)
            {
                if count.outcome == Outcome::Connected {
                    latency.push(LatencyCount {
                        route: count.route.clone(),
                        bucket: usize::from(key.bucket),
                        count: last.count,
                    });
                }
                counts.push(Count {
                    count: last.count,
                    total_time: Duration::from_nanos(last.sum_ns),
                    ..count
                });
                continue;
            }
            live_keys.insert(key);
            live_upstreams.insert(count.route.upstream.to_string());
        }
        let retired = Totals::from_counts(
            counts
                .into_iter()
                .filter(|c| !is_not_an_upstream(&c.route.upstream)),
            latency
                .into_iter()
                .filter(|l| !is_not_an_upstream(&l.route.upstream)),
        );
        for (route, totals) in retired.routes {
            ledger.retire(route, &totals);
        }
        ledger.keep_only(&live_keys);
        ledger.settle(&live_upstreams);
    }

    pub fn root_cause_totals(&self) -> RootCauseTotals {
        self.root_causes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn listener_totals(&self) -> ListenerTotals {
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn stat(&self, which: Stat) -> u64 {
        self.counters.stat(which)
    }

    pub fn attached(&self) -> usize {
        self.probes.iter().filter(|p| p.attached()).count()
    }
}

/// Returns the heap's free memory to the system, after work that needed much of it for a
/// moment (start-up, a scrape of thousands of series): freed memory otherwise stays in
/// malloc's per-thread arenas and counts as the agent's RSS. (musl's malloc, in the static
/// build, has no arenas to trim: it returns freed pages itself.)
pub fn give_memory_back() {
    // SAFETY: malloc_trim has no preconditions.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0)
    };
}

/// How often the agent collects failure records that did not wake it (at most this late).
pub const COLLECT_EVERY: Duration = Duration::from_millis(100);

pub struct Agent {
    capture: Capture,
    /// SIGINT and SIGTERM, caught from before the probes are announced as attached.
    interrupt: Signal,
    terminate: Signal,
    failures: Events,
    lifecycle: Events,
    clock: Clock,
    listeners: Listeners,
    self_probes: SelfProbes,
    /// Containers, from the runtime at `runtime_socket` (followed while `run` runs).
    containers: ContainerView,
    runtime_socket: Option<std::path::PathBuf>,
    /// What `containers` sighted, for the runtime follower (taken when `run` starts it).
    sightings: Option<crate::capture::runtime::Sightings>,
    pub shared: Arc<Shared>,
}

impl Agent {
    /// Loads and attaches the probes, takes stock of the listeners already there, and says so
    /// on stderr.
    pub fn start(options: &Options) -> Result<Agent, CaptureError> {
        // Caught first: a Ctrl-C as soon as tracer says it is attached must stop it cleanly.
        let interrupt = signal(SignalKind::interrupt())?;
        let terminate = signal(SignalKind::terminate())?;
        // Before the probes: tracer's own connect() tries are not the kernel programs' business.
        let runtime_socket = options.container_runtime.socket();
        let mut capture = Capture::start(options)?;
        let (failures, lifecycle) = capture.take_events()?;
        let started = SystemTime::now();
        // Listeners that were there before the probes: their owners' exits are reported too.
        let existing = procfs::listeners();
        capture.watch_listener_owners(existing.iter().flat_map(|l| l.pids.iter().copied()));
        let mut listeners = Listeners::new(started);
        listeners.seed(existing.iter().map(ExistingListenerInfo::from));
        if let Some(tracefs) = capture.tracefs.as_ref().filter(|t| t.mounted_now) {
            eprintln!(
                "tracer: tracefs was not mounted; mounted it at {}",
                tracefs.path.display()
            );
        }
        eprintln!(
            "tracer: {}/{} probes attached; watching outbound TCP and Unix-socket connections and {} \
             listeners (Ctrl-C to stop)",
            capture.attached(),
            capture.probes.len(),
            existing.len()
        );
        let shared = Arc::new(Shared {
            counters: capture.counters.clone(),
            probes: capture.probes.clone(),
            started,
            events_received: AtomicU64::new(0),
            events_undecodable: AtomicU64::new(0),
            listeners: Mutex::new(ListenerTotals::default()),
            root_causes: Mutex::new(RootCauseTotals::default()),
            ledger: Mutex::new(Ledger::new(options.max_upstreams, options.idle_after)),
            containers: Arc::default(),
            bundles: (options.container_runtime != ContainerRuntime::None)
                .then(|| Arc::new(Mutex::new(Bundles::new()))),
        });
        if let Some(socket) = &runtime_socket {
            eprintln!(
                "tracer: naming containers from the runtime at {}",
                socket.display()
            );
        }
        let containers = ContainerView::new(shared.containers.clone(), shared.bundles.clone());
        let (sightings, mut containers) = match &runtime_socket {
            Some(_) => {
                let (tell, sightings) =
                    tokio::sync::mpsc::channel(crate::capture::runtime::SIGHTINGS);
                (Some(sightings), containers.with_sightings(tell))
            }
            None => (None, containers),
        };
        for l in &existing {
            if let Some(&pid) = l.pids.first() {
                containers.listener_opened(l.local, l.netns, pid, started);
            }
        }
        // Start-up read the kernel's BTF and /proc.
        give_memory_back();
        Ok(Agent {
            capture,
            interrupt,
            terminate,
            failures,
            lifecycle,
            clock: Clock::new(),
            listeners,
            self_probes: SelfProbes::default(),
            containers,
            runtime_socket,
            sightings,
            shared,
        })
    }

    /// The kernel's exact counts, aggregated per route.
    pub fn totals(&self) -> Totals {
        self.shared.totals()
    }

    /// Whether the programs load the syscall tracepoints' fields directly.
    pub fn syscall_fields_direct(&self) -> bool {
        self.capture.syscall_fields_direct
    }

    /// Runs until a signal (or the handler says stop), handing every failure, every notice and
    /// every tick to `handle`.
    pub async fn run(
        &mut self,
        tick_every: Option<Duration>,
        mut handle: impl FnMut(&Shared, Happening) -> ControlFlow<()>,
    ) -> anyhow::Result<()> {
        let mut ticker = tokio::time::interval(tick_every.unwrap_or(Duration::from_secs(3600)));
        ticker.tick().await;
        // The kernel wakes the agent only when the failure ring fills up (a wakeup per event
        // costs more than the event); between those, this timer collects what is there.
        let mut collect = tokio::time::interval(COLLECT_EVERY);
        collect.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Idle kernel entries are looked for a few times per idle period (and at least once a
        // minute): an entry is freed between idle_after and about 1.25 × idle_after.
        let idle_after = self.shared.ledger().idle_after;
        let mut reclaim = tokio::time::interval(
            (idle_after / 4).clamp(Duration::from_millis(250), Duration::from_secs(60)),
        );
        reclaim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut records = Vec::new();
        // Aborted when `run` returns, however it returns.
        let _runtime =
            self.runtime_socket
                .clone()
                .zip(self.sightings.take())
                .map(|(socket, sightings)| {
                    AbortOnDrop(tokio::spawn(crate::capture::runtime::follow(
                        socket,
                        self.containers.model.clone(),
                        sightings,
                    )))
                });
        loop {
            tokio::select! {
                ready = self.failures.ready() => ready.context("reading the event ring buffer")?,
                ready = self.lifecycle.ready() => ready.context("reading the lifecycle ring buffer")?,
                _ = collect.tick() => {}
                _ = reclaim.tick() => self.shared.reclaim(),
                _ = self.interrupt.recv() => break,
                _ = self.terminate.recv() => break,
                _ = ticker.tick(), if tick_every.is_some() => {
                    if handle(&self.shared, Happening::Tick).is_break() {
                        break;
                    }
                }
            }
            if self.drain(&mut records, &mut handle).is_break() {
                return Ok(());
            }
            for failure in self.self_probes.due(Instant::now()) {
                if handle(&self.shared, Happening::Failure(Box::new(failure))).is_break() {
                    return Ok(());
                }
            }
        }
        // Stopped by a signal: what the kernel recorded before it is still told.
        if self.drain(&mut records, &mut handle).is_break() {
            return Ok(());
        }
        for failure in self.self_probes.flush() {
            if handle(&self.shared, Happening::Failure(Box::new(failure))).is_break() {
                break;
            }
        }
        Ok(())
    }

    /// Reads both ring buffers and hands every record on, lifecycle first: a death is known
    /// before the refusals it causes are classified. `records` is reused from call to call.
    fn drain(
        &mut self,
        records: &mut Vec<Result<Record, decode::DecodeError>>,
        handle: &mut impl FnMut(&Shared, Happening) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        self.lifecycle
            .drain(|bytes| records.push(decode::record(bytes)));
        self.failures
            .drain(|bytes| records.push(decode::record(bytes)));
        for record in records.drain(..) {
            self.handle_record(record, handle)?;
        }
        ControlFlow::Continue(())
    }

    fn handle_record(
        &mut self,
        record: Result<Record, decode::DecodeError>,
        handle: &mut impl FnMut(&Shared, Happening) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        let happening = match record {
            Ok(Record::Failure(event)) => {
                self.shared.events_received.fetch_add(1, Ordering::Relaxed);
                Failure::from_event(&event, &self.clock, &*self.shared.counters).map(|failure| {
                    if is_not_an_upstream(&failure.upstream) {
                        return None;
                    }
                    let (container_cause, proxy_container, upstream_container) =
                        self.containers.describe(&failure);
                    // The listener registry is still told of the failure (it counts what
                    // follows a death); the container's story, when there is one, is the one
                    // told.
                    let root_cause = self.listeners.root_cause(&failure);
                    let root_cause = container_cause.map(RootCause::Container).or(root_cause);
                    if let Some(root) = &root_cause {
                        self.shared
                            .root_causes
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .add(
                                &failure.proxy.comm,
                                &failure.upstream.to_string(),
                                failure.cause,
                                root.name(),
                            );
                    }
                    let classified = Classified {
                        failure,
                        root_cause,
                        proxy_container,
                        upstream_container,
                    };
                    self.self_probes
                        .on_failure(classified, Instant::now())
                        .map(|failure| Happening::Failure(Box::new(failure)))
                })
            }
            Ok(Record::SelfProbe(probe)) => {
                decode::upstream(&Endpoint::unix(probe.path_key), &*self.shared.counters).map(
                    |path| {
                        tracing::debug!(
                            "pid {} connected to {path}, then bound it: it was probing its own \
                             socket, not counted",
                            probe.tgid
                        );
                        self.self_probes
                            .on_self_probe(probe.tgid, path, Instant::now());
                        None
                    },
                )
            }
            Ok(Record::ServerEnd(event)) => ServerEnd::from_event(&event, &self.clock).map(|end| {
                self.listeners.on_server_end(end);
                None
            }),
            Ok(record) => Lifecycle::from_record(&record, &self.clock).map(|lifecycle| {
                if let Some(Lifecycle::Listener(change)) = &lifecycle
                    && change.opened
                {
                    self.containers.listener_opened(
                        change.local,
                        change.task.netns,
                        change.task.pid,
                        change.time,
                    );
                }
                let notice = lifecycle.and_then(|l| self.listeners.on_lifecycle(&l))?;
                self.shared
                    .listeners
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(&notice);
                Some(Happening::Notice(notice))
            }),
            Err(e) => Err(e),
        };
        match happening {
            Ok(Some(happening)) => handle(&self.shared, happening),
            Ok(None) => ControlFlow::Continue(()),
            Err(e) => {
                let before = self
                    .shared
                    .events_undecodable
                    .fetch_add(1, Ordering::Relaxed);
                if before == 0 {
                    tracing::warn!("undecodable record: {e}");
                }
                ControlFlow::Continue(())
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let lost = self.shared.stat(Stat::EventsLost);
        let lost = if lost > 0 {
            format!("; {lost} failure events were lost (ring buffer full; the counts have them)")
        } else {
            String::new()
        };
        let sampled = self.shared.stat(Stat::EventsSampledOut);
        let sampled = if sampled > 0 {
            format!(
                "; {sampled} failure events were over --event-rate and not shown one by one \
                 (the counts have them)"
            )
        } else {
            String::new()
        };
        eprintln!(
            "tracer: stopping; {} probes detached{lost}{sampled}",
            self.capture.attached()
        );
    }
}
