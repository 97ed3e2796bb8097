//! The Prometheus exporter: the kernel's exact counts as metric families, built at each scrape.
//!
//! The counters are read from the kernel's per-CPU maps when Prometheus scrapes, never counted in
//! user space, so a scrape never under-counts, even when failure events were lost. Upstream
//! series are capped (`--max-upstreams`): upstreams past the cap are folded into
//! `upstream="other"` and counted in `tracer_upstreams_folded`.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    fmt::{Display, Write as _},
    sync::{Arc, Mutex, atomic::Ordering},
    time::SystemTime,
};

use tracer_common::{Outcome, Stat, counts::CONNECT_BUCKETS_NS};

use crate::{
    agent::Shared,
    aggregate::{LATENCY_BUCKETS, RouteTotals, Totals, ledger::Ledger},
    decode::cgroup::CgroupPaths,
    export::api::{Health, RouteSnapshot, Snapshot},
};

/// The label value for upstreams (and proxies) past the caps.
pub const OTHER: &str = "other";

pub use crate::aggregate::ledger::DEFAULT_MAX_UPSTREAMS;

/// The failure causes every route exports (zero when none happened), so rates and ratios work
/// from the route's first scrape on.
const FAILURE_CAUSES: [Outcome; 11] = [
    Outcome::Refused,
    Outcome::ConnectTimeout,
    Outcome::Unreachable,
    Outcome::NoEphemeralPort,
    Outcome::ConnectError,
    Outcome::ResetBeforeResponse,
    Outcome::ResetMidResponse,
    Outcome::ClosedBeforeResponse,
    Outcome::ResponseTimeout,
    Outcome::TlsHandshakeFailed,
    Outcome::PlaintextToTls,
];

/// The same for Unix-socket upstreams: what connect() can tell.
const UNIX_FAILURE_CAUSES: [Outcome; 5] = [
    Outcome::UnixMissing,
    Outcome::UnixRefused,
    Outcome::UnixBacklogFull,
    Outcome::UnixPermission,
    Outcome::ConnectError,
];

pub struct Exporter {
    shared: Arc<Shared>,
    kernel: String,
    state: Mutex<State>,
    /// Whether to export which container each upstream and proxy is (`--container-metrics`).
    container_info: bool,
}

/// What must stay the same from one scrape to the next (which upstreams have series of their
/// own is the agent's ledger's).
struct State {
    cgroups: CgroupPaths,
    /// Evictions seen so far (the estimate can dip; the counter must not).
    evicted: u64,
}

/// Label values of one route series.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Labels {
    proxy: String,
    cgroup: String,
    upstream: String,
}

impl Labels {
    fn pairs(&self) -> [(&'static str, &str); 3] {
        [
            ("proxy", &self.proxy),
            ("cgroup", &self.cgroup),
            ("upstream", &self.upstream),
        ]
    }
}

impl Exporter {
    pub fn new(shared: Arc<Shared>) -> Exporter {
        Exporter {
            shared,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|r| r.trim().to_string())
                .unwrap_or_default(),
            state: Mutex::new(State {
                cgroups: CgroupPaths::new(),
                evicted: 0,
            }),
            container_info: false,
        }
    }

    /// Adds the container info families (see [`Exporter::write_containers`]).
    pub fn with_container_info(mut self, on: bool) -> Exporter {
        self.container_info = on;
        self
    }

    /// The live view's snapshot, with the same upstreams folded into `other` as in the metrics,
    /// so it stays as small as a scrape (folded before any route's snapshot is built).
    pub fn snapshot(&self) -> Snapshot {
        let totals = self.shared.totals();
        let health = Health::of(&self.shared);
        let mut ledger = self.shared.ledger();
        let mut routes = Vec::new();
        let mut other: BTreeMap<(&str, u64), RouteTotals> = BTreeMap::new();
        for (route, t) in &totals.routes {
            let upstream = route.upstream.to_string();
            if ledger.admit(&route.upstream) {
                routes.push(RouteSnapshot::new(
                    &route.proxy,
                    route.cgroup_id,
                    upstream,
                    t,
                ));
            } else {
                other
                    .entry((&route.proxy, route.cgroup_id))
                    .or_default()
                    .add(t);
            }
        }
        drop(ledger);
        for ((proxy, cgroup_id), t) in &other {
            routes.push(RouteSnapshot::new(proxy, *cgroup_id, OTHER.to_string(), t));
        }
        Snapshot::with_routes(routes, &totals, health, SystemTime::now())
    }

    /// The metrics in Prometheus's text exposition format, written straight from the counts:
    /// with a thousand upstreams that is ten thousand series, too many to build objects for.
    pub fn render(&self) -> String {
        // Read before the ledger is locked here: reading takes the ledger's lock itself.
        let totals = self.shared.totals();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut ledger = self.shared.ledger();
        let series = series(totals, &mut state, &mut ledger);
        // About 1 kB per series label set; one allocation for the whole scrape.
        let mut text = Text::with_capacity(4096 + series.len() * 1100);
        write_routes(&mut text, &series);
        if self.container_info {
            self.write_containers(&mut text, &series);
        }
        drop(series);
        self.write_agent(&mut text, &mut state);
        self.write_listeners(&mut text);
        self.write_kernel(&mut text);
        write_series_cap(&mut text, &ledger);
        self.write_build_info(&mut text);
        text.out
    }

    /// The agent's own health: events read, lost, sampled out; connections followed.
    fn write_agent(&self, text: &mut Text, state: &mut State) {
        let shared = &self.shared;
        let tracked = shared.stat(Stat::ConnsTracked);
        let live = shared.counters.live_connections();
        // Records dropped as stale lost their outcome to a skipped run (tracer_program_misses_total
        // counts those), not to a full table.
        let ended = shared.stat(Stat::ConnsClosed) + shared.stat(Stat::ConnsStale);
        let estimate = tracked.saturating_sub(ended + live);
        state.evicted = state.evicted.max(estimate);
        text.single(
            "tracer_events_received_total",
            "Failure events read from the kernel.",
            COUNTER,
            shared.events_received.load(Ordering::Relaxed),
        );
        text.single(
            "tracer_events_lost_total",
            "Failure events the kernel dropped because the ring buffer was full (the counts still have them).",
            COUNTER,
            shared.stat(Stat::EventsLost),
        );
        text.single(
            "tracer_events_sampled_out_total",
            "Failure events not sent one by one because their upstream and cause were over the --event-rate budget (the counts still have them).",
            COUNTER,
            shared.stat(Stat::EventsSampledOut),
        );
        text.single(
            "tracer_server_ends_dropped_total",
            "Server-side ends of local upstreams' connections (the evidence of worker root causes) the kernel did not send: over the --event-rate budget or the ring buffer full.",
            COUNTER,
            shared.stat(Stat::ServerEndsDropped),
        );
        text.single(
            "tracer_events_undecodable_total",
            "Failure events the agent could not decode.",
            COUNTER,
            shared.events_undecodable.load(Ordering::Relaxed),
        );
        text.single(
            "tracer_connections_tracked_total",
            "Outbound TCP connections the kernel started following.",
            COUNTER,
            tracked,
        );
        text.single(
            "tracer_connections_live",
            "Outbound TCP connections the kernel is following now.",
            GAUGE,
            live,
        );
        text.single(
            "tracer_map_entries_evicted_total",
            "Connections dropped from the kernel's full connection table before they ended (their outcome is lost).",
            COUNTER,
            state.evicted,
        );
    }

    /// Listeners gone and back.
    fn write_listeners(&self, text: &mut Text) {
        let shared = &self.shared;
        let listeners = shared.listener_totals();
        let mut deaths = text.family(
            "tracer_listener_deaths_total",
            "Listeners gone, by how: their process oom_killed, crashed, exited, or closed (it lived on).",
            COUNTER,
        );
        for ((upstream, comm, reason), n) in &listeners.deaths {
            deaths.sample(
                &[("upstream", upstream), ("comm", comm), ("reason", reason)],
                *n,
            );
        }
        let mut restarts = text.family(
            "tracer_listener_restarts_total",
            "Listeners that listened again after a gap.",
            COUNTER,
        );
        for ((upstream, comm), n) in &listeners.restarts {
            restarts.sample(&[("upstream", upstream), ("comm", comm)], *n);
        }
        let mut roots = text.family(
            "tracer_root_causes_total",
            "Failure events tracer found a root cause for, by root cause (counted from the events that reach the agent: a sample under a storm).",
            COUNTER,
        );
        for ((proxy, upstream, cause, root), n) in &shared.root_cause_totals().counts {
            roots.sample(
                &[
                    ("proxy", proxy),
                    ("upstream", upstream),
                    ("cause", cause),
                    ("root_cause", root),
                ],
                *n,
            );
        }
        text.single(
            "tracer_lifecycle_events_lost_total",
            "Listener and process-death records the kernel dropped (their ring buffer was full).",
            COUNTER,
            shared.stat(Stat::LifecycleLost),
        );
    }

    /// The kernel side's health: full maps, skipped programs, probes attached.
    fn write_kernel(&self, text: &mut Text) {
        let shared = &self.shared;
        let mut full = text.family(
            "tracer_map_full_total",
            "Kernel map inserts that failed because the map was full.",
            COUNTER,
        );
        for (map, stat) in [
            ("connections", Stat::ConnsUntracked),
            ("counts", Stat::CountsOverflowed),
            ("connects_in_flight", Stat::ConnectsUntracked),
        ] {
            full.sample(&[("map", map)], shared.stat(stat));
        }
        let mut misses = text.family(
            "tracer_program_misses_total",
            "Times the kernel did not run a program of tracer's because it was already running on that CPU (preempted or interrupted): what it saw then is not counted.",
            COUNTER,
        );
        for (program, n) in shared.counters.program_misses() {
            misses.sample(&[("program", program)], n);
        }
        let mut errors = text.family(
            "tracer_program_errors_total",
            "Runs of a program of tracer's that stopped before finishing because a read failed: from the kernel (a layout tracer did not expect) or from the calling process (a bad address or descriptor given to connect()). What such a run saw is not counted.",
            COUNTER,
        );
        for (program, n) in shared.counters.program_errors() {
            errors.sample(&[("program", program)], n);
        }
        let mut probes = text.family(
            "tracer_probe_attached",
            "1 when the probe is attached, 0 when this kernel lacks it (see tracer check).",
            GAUGE,
        );
        for status in &shared.probes {
            let name = status.probe.tracepoint();
            probes.sample(&[("probe", &name)], u64::from(status.attached()));
        }
    }

    /// Which container each route's upstream address and proxy cgroup is now, as info series
    /// (value 1) to join on `upstream` or `cgroup`: labels on the counters themselves would
    /// start new series whenever a container is recreated. At most one series per route.
    fn write_containers(&self, text: &mut Text, series: &BTreeMap<Labels, RouteTotals>) {
        let containers = self
            .shared
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Kubernetes containers from their bundles (the agent's cache: read once for both).
        let mut bundles = self
            .shared
            .bundles
            .as_ref()
            .map(|b| b.lock().unwrap_or_else(|p| p.into_inner()));
        if containers.is_empty() && bundles.is_none() {
            return;
        }
        let now = SystemTime::now();
        let mut upstreams = text.family(
            "tracer_upstream_container_info",
            "The container that holds an upstream's address now (from the container runtime), or whose process listens or last listened there.",
            GAUGE,
        );
        let mut seen = std::collections::BTreeSet::new();
        for labels in series.keys() {
            let Ok(addr) = labels.upstream.parse::<std::net::SocketAddr>() else {
                continue;
            };
            if !seen.insert(&labels.upstream) {
                continue;
            }
            // Else the container listening there (a pod's address, by its network namespace's
            // addresses; a loopback address needs the proxy's namespace, which series lack).
            let held = containers.held_now(addr.ip(), now).cloned().or_else(|| {
                containers.listening_at(addr, 0, |id| bundles.as_mut()?.of_container(id))
            });
            if let Some(c) = &held {
                upstreams.sample(&container_labels(&[("upstream", &labels.upstream)], c), 1);
            }
        }
        let mut proxies = text.family(
            "tracer_proxy_container_info",
            "The container a proxy's cgroup belongs to (from the container runtime).",
            GAUGE,
        );
        let mut seen = std::collections::BTreeSet::new();
        for labels in series.keys() {
            if !seen.insert((&labels.proxy, &labels.cgroup)) {
                continue;
            }
            let found = containers
                .of_cgroup_path(&labels.cgroup)
                .cloned()
                .or_else(|| {
                    bundles
                        .as_mut()
                        .and_then(|b| b.of_cgroup_path(&labels.cgroup))
                });
            if let Some(c) = found {
                let route = [("proxy", labels.proxy.as_str()), ("cgroup", &labels.cgroup)];
                proxies.sample(&container_labels(&route, &c), 1);
            }
        }
    }

    fn write_build_info(&self, text: &mut Text) {
        text.family(
            "tracer_build_info",
            "tracer's version and the kernel it runs on.",
            GAUGE,
        )
        .sample(
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("kernel", &self.kernel),
            ],
            1,
        );
    }
}

/// `first`, then a container info series' own labels.
fn container_labels<'a>(
    first: &[(&'a str, &'a str)],
    c: &'a crate::classify::containers::ContainerId,
) -> Vec<(&'a str, &'a str)> {
    let mut labels = first.to_vec();
    labels.extend([
        ("container", c.name.as_str()),
        ("image", &c.image),
        ("container_id", &c.id),
        ("pod", c.pod.as_deref().unwrap_or("")),
    ]);
    labels
}

/// The counts per label set (proxy, cgroup, upstream): routes past the upstream cap share
/// `other`, and so do the counts the kernel could not key by route.
fn series(totals: Totals, state: &mut State, ledger: &mut Ledger) -> BTreeMap<Labels, RouteTotals> {
    let mut series: BTreeMap<Labels, RouteTotals> = BTreeMap::new();
    for (route, t) in &totals.routes {
        let mut upstream = route.upstream.to_string();
        if !ledger.admit(&route.upstream) {
            upstream = OTHER.to_string();
        }
        let cgroup = state
            .cgroups
            .path(route.cgroup_id)
            .unwrap_or_else(|| format!("id:{}", route.cgroup_id));
        let labels = Labels {
            proxy: route.proxy.clone(),
            cgroup,
            upstream,
        };
        series.entry(labels).or_default().add(t);
    }
    // Counts the kernel could not key by route (its table was full).
    if !totals.overflow.is_empty() {
        let other = series
            .entry(Labels {
                proxy: OTHER.into(),
                cgroup: String::new(),
                upstream: OTHER.into(),
            })
            .or_default();
        for (outcome, n) in &totals.overflow {
            other.outcomes.entry(*outcome).or_default().0 += n;
        }
    }
    series
}

/// The route families: connects, failures by cause, abandoned attempts, connect latency.
fn write_routes(text: &mut Text, series: &BTreeMap<Labels, RouteTotals>) {
    let mut connects = text.family(
        "tracer_upstream_connects_total",
        "Connection attempts from a proxy to an upstream (every one ends connected or failed).",
        COUNTER,
    );
    for (labels, t) in series {
        connects.sample(&labels.pairs(), t.attempts());
    }
    let mut failures = text.family(
        "tracer_upstream_failures_total",
        "Failed upstream attempts, by cause (see docs/causes.md).",
        COUNTER,
    );
    for (labels, t) in series {
        // Its kind's causes always, so rates work from the first scrape; others that
        // happened (under `other`, Unix and TCP upstreams mix).
        let own = if labels.upstream.starts_with("unix:") {
            &UNIX_FAILURE_CAUSES[..]
        } else if labels.upstream == "none" {
            &[Outcome::FdExhausted][..]
        } else {
            &FAILURE_CAUSES[..]
        };
        for cause in Outcome::ALL.into_iter().filter(|o| o.is_failure()) {
            let n = t.count(cause);
            if n > 0 || own.contains(&cause) {
                failures.sample_with(&labels.pairs(), ("cause", cause.name()), n);
            }
        }
    }
    let mut tls = text.family(
        "tracer_upstream_tls_failures_total",
        "Failed TLS handshakes with upstreams (cause tls_handshake_failed), by reason: \
         plaintext_upstream, alert, proxy_rejected, closed (see docs/causes.md).",
        COUNTER,
    );
    for (labels, t) in series {
        for (reason, n) in &t.tls_reasons {
            tls.sample_with(&labels.pairs(), ("tls_reason", reason.name()), *n);
        }
    }
    let mut abandoned = text.family(
        "tracer_upstream_abandoned_total",
        "Attempts the proxy gave up on sooner than --min-wait (its client left): not failures.",
        COUNTER,
    );
    for (labels, t) in series {
        for (outcome, phase) in [
            (Outcome::ConnectAbandoned, "connect"),
            (Outcome::RequestAbandoned, "request"),
        ] {
            let n = t.count(outcome);
            if n > 0 {
                abandoned.sample_with(&labels.pairs(), ("phase", phase), n);
            }
        }
    }
    let mut latency = text.family(
        "tracer_upstream_connect_duration_seconds",
        "How long successful connects to the upstream took.",
        HISTOGRAM,
    );
    for (labels, t) in series {
        if t.count(Outcome::Connected) > 0 {
            let sum = t
                .outcomes
                .get(&Outcome::Connected)
                .map_or(0.0, |(_, d)| d.as_secs_f64());
            latency.histogram(&labels.pairs(), &t.connect_buckets, sum);
        }
    }
}

/// The upstream series cap (--max-upstreams) and what it folded.
fn write_series_cap(text: &mut Text, ledger: &Ledger) {
    text.single(
        "tracer_upstreams_folded",
        "Upstreams counted under upstream=\"other\" now because of --max-upstreams.",
        GAUGE,
        ledger.folded_now() as u64,
    );
    text.single(
        "tracer_upstreams_folded_total",
        "Times an upstream was counted under upstream=\"other\" because of --max-upstreams.",
        COUNTER,
        ledger.folded_total,
    );
    text.single(
            "tracer_upstreams_released_total",
            "Upstreams idle for --idle-after that gave their series up (their counts joined upstream=\"other\") so that new ones get series.",
            COUNTER,
            ledger.released_total,
        );
    text.single(
        "tracer_upstream_series_limit",
        "The --max-upstreams cap on upstream series.",
        GAUGE,
        ledger.max_upstreams as u64,
    );
}

const COUNTER: &str = "counter";
const GAUGE: &str = "gauge";
const HISTOGRAM: &str = "histogram";

/// Prometheus's text exposition format, written as it goes.
struct Text {
    out: String,
}

/// One metric family being written: its `# HELP` and `# TYPE` lines come with its first sample,
/// so a family without samples is left out.
struct Family<'t> {
    text: &'t mut Text,
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    started: bool,
}

impl Text {
    fn with_capacity(bytes: usize) -> Text {
        Text {
            out: String::with_capacity(bytes),
        }
    }

    fn family(&mut self, name: &'static str, help: &'static str, kind: &'static str) -> Family<'_> {
        Family {
            text: self,
            name,
            help,
            kind,
            started: false,
        }
    }

    /// A family of one sample without labels.
    fn single(&mut self, name: &'static str, help: &'static str, kind: &'static str, value: u64) {
        self.family(name, help, kind).sample(&[], value);
    }
}

impl Family<'_> {
    fn sample(&mut self, labels: &[(&str, &str)], value: impl Display) {
        self.line("", labels, None, value);
    }

    /// A sample with one more label after `labels`.
    fn sample_with(&mut self, labels: &[(&str, &str)], last: (&str, &str), value: u64) {
        self.line("", labels, Some(last), value);
    }

    /// Cumulative buckets, `+Inf`, `_sum` and `_count`; the last slot of `buckets` holds
    /// connects slower than the largest bound, so it is only in `+Inf`.
    fn histogram(
        &mut self,
        labels: &[(&str, &str)],
        buckets: &[u64; LATENCY_BUCKETS],
        sum_seconds: f64,
    ) {
        let mut cumulative = 0;
        for (bound, n) in CONNECT_BUCKETS_NS.iter().zip(buckets) {
            cumulative += n;
            let le = (*bound as f64 / 1e9).to_string();
            self.line("_bucket", labels, Some(("le", &le)), cumulative);
        }
        let count: u64 = buckets.iter().sum();
        self.line("_bucket", labels, Some(("le", "+Inf")), count);
        self.line("_sum", labels, None, sum_seconds);
        self.line("_count", labels, None, count);
    }

    fn line(
        &mut self,
        suffix: &str,
        labels: &[(&str, &str)],
        last: Option<(&str, &str)>,
        value: impl Display,
    ) {
        let out = &mut self.text.out;
        if !std::mem::replace(&mut self.started, true) {
            let _ = writeln!(out, "# HELP {} {}", self.name, escape(self.help, false));
            let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind);
        }
        out.push_str(self.name);
        out.push_str(suffix);
        let mut pairs = labels.iter().copied().chain(last).peekable();
        if pairs.peek().is_some() {
            out.push('{');
            for (i, (name, value)) in pairs.enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{name}=\"{}\"", escape(value, true));
            }
            out.push('}');
        }
        let _ = writeln!(out, " {value}");
    }
}

/// Escapes a label value (backslash, double quote, newline) or a help text (backslash, newline).
fn escape(text: &str, quotes: bool) -> Cow<'_, str> {
    if !text.contains(['\\', '\n', '"']) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quotes => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_with_the_slowest_only_in_the_total() {
        let mut buckets = [0u64; LATENCY_BUCKETS];
        buckets[0] = 5;
        buckets[3] = 2;
        buckets[LATENCY_BUCKETS - 1] = 1;
        let mut text = Text::with_capacity(0);
        text.family("h", "help", HISTOGRAM).histogram(
            &[("upstream", "10.0.0.5:80")],
            &buckets,
            1.5,
        );
        let text = text.out;
        assert!(
            text.contains("h_bucket{upstream=\"10.0.0.5:80\",le=\"0.0001\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("h_bucket{upstream=\"10.0.0.5:80\",le=\"0.001\"} 7"),
            "{text}"
        );
        assert!(
            text.contains("h_bucket{upstream=\"10.0.0.5:80\",le=\"5\"} 7"),
            "{text}"
        );
        assert!(
            text.contains("h_bucket{upstream=\"10.0.0.5:80\",le=\"+Inf\"} 8"),
            "{text}"
        );
        assert!(
            text.contains("h_count{upstream=\"10.0.0.5:80\"} 8"),
            "{text}"
        );
        assert!(
            text.contains("h_sum{upstream=\"10.0.0.5:80\"} 1.5"),
            "{text}"
        );
        assert!(
            text.starts_with("# HELP h help\n# TYPE h histogram\n"),
            "{text}"
        );
    }

    #[test]
    fn label_values_and_help_are_escaped_and_empty_families_left_out() {
        let mut text = Text::with_capacity(0);
        text.family("empty_total", "never sampled", COUNTER);
        text.family("c_total", "a \\ and\na \"quote\"", COUNTER)
            .sample(&[("comm", "we\"ird\\\n")], 3);
        text.single("g", "plain", GAUGE, 1);
        assert_eq!(
            text.out,
            "# HELP c_total a \\\\ and\\na \"quote\"\n# TYPE c_total counter\n\
             c_total{comm=\"we\\\"ird\\\\\\n\"} 3\n\
             # HELP g plain\n# TYPE g gauge\ng 1\n"
        );
    }
}
