//! The Prometheus exporter: the kernel's exact counts as metric families, built at each scrape.
//!
//! The counters are read from the kernel's per-CPU maps when Prometheus scrapes, never counted in
//! user space, so a scrape never under-counts, even when failure events were lost. Upstream
//! series are capped (`--max-upstreams`): upstreams past the cap are folded into
//! `upstream="other"` and counted in `tracer_upstreams_folded`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::Ordering},
};

use prometheus::{
    Encoder as _, TextEncoder,
    proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType},
};
use tracer_common::{Outcome, Stat, counts::CONNECT_BUCKETS_NS};

use crate::{
    agent::Shared,
    aggregate::{LATENCY_BUCKETS, RouteTotals},
    decode::cgroup::CgroupPaths,
};

/// The label value for upstreams (and proxies) past the caps.
pub const OTHER: &str = "other";

/// The default `--max-upstreams`.
pub const DEFAULT_MAX_UPSTREAMS: usize = 1000;

/// The failure causes every route exports (zero when none happened), so rates and ratios work
/// from the route's first scrape on.
const FAILURE_CAUSES: [Outcome; 9] = [
    Outcome::Refused,
    Outcome::ConnectTimeout,
    Outcome::Unreachable,
    Outcome::NoEphemeralPort,
    Outcome::ConnectError,
    Outcome::ResetBeforeResponse,
    Outcome::ResetMidResponse,
    Outcome::ClosedBeforeResponse,
    Outcome::ResponseTimeout,
];

pub struct Exporter {
    shared: Arc<Shared>,
    max_upstreams: usize,
    kernel: String,
    state: Mutex<State>,
}

/// What must stay the same from one scrape to the next.
struct State {
    /// Upstreams that have their own series, in the order they came.
    admitted: BTreeSet<SocketAddr>,
    /// Upstreams folded into `other`.
    folded: BTreeSet<SocketAddr>,
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

impl Exporter {
    pub fn new(shared: Arc<Shared>, max_upstreams: usize) -> Exporter {
        Exporter {
            shared,
            max_upstreams,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|r| r.trim().to_string())
                .unwrap_or_default(),
            state: Mutex::new(State {
                admitted: BTreeSet::new(),
                folded: BTreeSet::new(),
                cgroups: CgroupPaths::new(),
                evicted: 0,
            }),
        }
    }

    /// The metrics in Prometheus's text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let families = self.families();
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::warn!("encoding metrics: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    pub fn families(&self) -> Vec<MetricFamily> {
        let totals = self.shared.totals();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());

        // Series per label set: routes past the upstream cap share `other`.
        let mut series: BTreeMap<Labels, RouteTotals> = BTreeMap::new();
        for (route, t) in &totals.routes {
            let upstream = if state.admitted.contains(&route.upstream) {
                route.upstream.to_string()
            } else if state.admitted.len() < self.max_upstreams {
                state.admitted.insert(route.upstream);
                route.upstream.to_string()
            } else {
                state.folded.insert(route.upstream);
                OTHER.to_string()
            };
            let cgroup = state
                .cgroups
                .path(route.cgroup_id)
                .unwrap_or_else(|| format!("id:{}", route.cgroup_id));
            let labels = Labels {
                proxy: route.proxy.clone(),
                cgroup,
                upstream,
            };
            merge(series.entry(labels).or_default(), t);
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

        let mut connects = family(
            "tracer_upstream_connects_total",
            "Connection attempts from a proxy to an upstream (every one ends connected or failed).",
            MetricType::COUNTER,
        );
        let mut failures = family(
            "tracer_upstream_failures_total",
            "Failed upstream attempts, by cause (see docs/causes.md).",
            MetricType::COUNTER,
        );
        let mut abandoned = family(
            "tracer_upstream_abandoned_total",
            "Attempts the proxy gave up on sooner than --min-wait (its client left): not failures.",
            MetricType::COUNTER,
        );
        let mut latency = family(
            "tracer_upstream_connect_duration_seconds",
            "How long successful connects to the upstream took.",
            MetricType::HISTOGRAM,
        );
        for (labels, t) in &series {
            let base = [
                ("proxy", labels.proxy.as_str()),
                ("cgroup", labels.cgroup.as_str()),
                ("upstream", labels.upstream.as_str()),
            ];
            connects
                .mut_metric()
                .push(counter(&base, t.attempts() as f64));
            for cause in FAILURE_CAUSES {
                let mut with_cause = base.to_vec();
                with_cause.push(("cause", cause.name()));
                failures
                    .mut_metric()
                    .push(counter(&with_cause, t.count(cause) as f64));
            }
            for (outcome, phase) in [
                (Outcome::ConnectAbandoned, "connect"),
                (Outcome::RequestAbandoned, "request"),
            ] {
                let n = t.count(outcome);
                if n > 0 {
                    let mut with_phase = base.to_vec();
                    with_phase.push(("phase", phase));
                    abandoned.mut_metric().push(counter(&with_phase, n as f64));
                }
            }
            if t.count(Outcome::Connected) > 0 {
                let sum = t
                    .outcomes
                    .get(&Outcome::Connected)
                    .map_or(0.0, |(_, d)| d.as_secs_f64());
                latency
                    .mut_metric()
                    .push(histogram(&base, &t.connect_buckets, sum));
            }
        }

        let shared = &self.shared;
        let tracked = shared.stat(Stat::ConnsTracked);
        let live = shared.counters.live_connections();
        let estimate = tracked.saturating_sub(shared.stat(Stat::ConnsClosed) + live);
        state.evicted = state.evicted.max(estimate);
        let mut families = vec![connects, failures, abandoned, latency];
        families.push(single(
            "tracer_events_received_total",
            "Failure events read from the kernel.",
            MetricType::COUNTER,
            shared.events_received.load(Ordering::Relaxed) as f64,
        ));
        families.push(single(
            "tracer_events_lost_total",
            "Failure events the kernel dropped because the ring buffer was full (the counts still have them).",
            MetricType::COUNTER,
            shared.stat(Stat::EventsLost) as f64,
        ));
        families.push(single(
            "tracer_events_undecodable_total",
            "Failure events the agent could not decode.",
            MetricType::COUNTER,
            shared.events_undecodable.load(Ordering::Relaxed) as f64,
        ));
        families.push(single(
            "tracer_connections_tracked_total",
            "Outbound TCP connections the kernel started following.",
            MetricType::COUNTER,
            tracked as f64,
        ));
        families.push(single(
            "tracer_connections_live",
            "Outbound TCP connections the kernel is following now.",
            MetricType::GAUGE,
            live as f64,
        ));
        families.push(single(
            "tracer_map_entries_evicted_total",
            "Connections dropped from the kernel's full connection table before they ended (their outcome is lost).",
            MetricType::COUNTER,
            state.evicted as f64,
        ));
        let listeners = shared.listener_totals();
        let mut deaths = family(
            "tracer_listener_deaths_total",
            "Listeners gone, by how: their process oom_killed, crashed, exited, or closed (it lived on).",
            MetricType::COUNTER,
        );
        for ((upstream, comm, reason), n) in &listeners.deaths {
            deaths.mut_metric().push(counter(
                &[("upstream", upstream), ("comm", comm), ("reason", reason)],
                *n as f64,
            ));
        }
        families.push(deaths);
        let mut restarts = family(
            "tracer_listener_restarts_total",
            "Listeners that listened again after a gap.",
            MetricType::COUNTER,
        );
        for ((upstream, comm), n) in &listeners.restarts {
            restarts.mut_metric().push(counter(
                &[("upstream", upstream), ("comm", comm)],
                *n as f64,
            ));
        }
        families.push(restarts);
        families.push(single(
            "tracer_lifecycle_events_lost_total",
            "Listener and process-death records the kernel dropped (their ring buffer was full).",
            MetricType::COUNTER,
            shared.stat(Stat::LifecycleLost) as f64,
        ));
        let mut full = family(
            "tracer_map_full_total",
            "Kernel map inserts that failed because the map was full.",
            MetricType::COUNTER,
        );
        for (map, stat) in [
            ("connections", Stat::ConnsUntracked),
            ("counts", Stat::CountsOverflowed),
            ("connect_latency", Stat::LatencyOverflowed),
            ("connects_in_flight", Stat::ConnectsUntracked),
        ] {
            full.mut_metric()
                .push(counter(&[("map", map)], shared.stat(stat) as f64));
        }
        families.push(full);
        let mut probes = family(
            "tracer_probe_attached",
            "1 when the probe is attached, 0 when this kernel lacks it (see tracer check).",
            MetricType::GAUGE,
        );
        for status in &shared.probes {
            let name = status.probe.tracepoint();
            probes.mut_metric().push(gauge(
                &[("probe", &name)],
                f64::from(u8::from(status.attached())),
            ));
        }
        families.push(probes);
        families.push(single(
            "tracer_upstreams_folded",
            "Distinct upstreams counted under upstream=\"other\" because of --max-upstreams.",
            MetricType::GAUGE,
            state.folded.len() as f64,
        ));
        families.push(single(
            "tracer_upstream_series_limit",
            "The --max-upstreams cap on upstream series.",
            MetricType::GAUGE,
            self.max_upstreams as f64,
        ));
        let mut build = family(
            "tracer_build_info",
            "tracer's version and the kernel it runs on.",
            MetricType::GAUGE,
        );
        build.mut_metric().push(gauge(
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("kernel", &self.kernel),
            ],
            1.0,
        ));
        families.push(build);
        families.retain(|f| !f.get_metric().is_empty());
        families
    }
}

fn merge(into: &mut RouteTotals, from: &RouteTotals) {
    for (outcome, (n, d)) in &from.outcomes {
        let entry = into.outcomes.entry(*outcome).or_default();
        entry.0 += n;
        entry.1 += *d;
    }
    for (slot, n) in into.connect_buckets.iter_mut().zip(from.connect_buckets) {
        *slot += n;
    }
}

fn family(name: &str, help: &str, kind: MetricType) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(name.to_string());
    family.set_help(help.to_string());
    family.set_field_type(kind);
    family
}

fn single(name: &str, help: &str, kind: MetricType, value: f64) -> MetricFamily {
    let mut f = family(name, help, kind);
    f.mut_metric().push(match kind {
        MetricType::GAUGE => gauge(&[], value),
        _ => counter(&[], value),
    });
    f
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(name, value)| {
            let mut pair = LabelPair::default();
            pair.set_name((*name).to_string());
            pair.set_value((*value).to_string());
            pair
        })
        .collect()
}

fn counter(pairs: &[(&str, &str)], value: f64) -> Metric {
    let mut c = Counter::default();
    c.set_value(value);
    let mut m = Metric::from_label(labels(pairs));
    m.set_counter(c);
    m
}

fn gauge(pairs: &[(&str, &str)], value: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(value);
    let mut m = Metric::from_label(labels(pairs));
    m.set_gauge(g);
    m
}

fn histogram(pairs: &[(&str, &str)], buckets: &[u64; LATENCY_BUCKETS], sum_seconds: f64) -> Metric {
    let mut cumulative = 0;
    let mut out = Vec::with_capacity(CONNECT_BUCKETS_NS.len());
    for (bound, n) in CONNECT_BUCKETS_NS.iter().zip(buckets) {
        cumulative += n;
        let mut b = Bucket::default();
        b.set_upper_bound(*bound as f64 / 1e9);
        b.set_cumulative_count(cumulative);
        out.push(b);
    }
    let mut h = Histogram::default();
    h.set_sample_count(buckets.iter().sum());
    h.set_sample_sum(sum_seconds);
    h.set_bucket(out);
    let mut m = Metric::from_label(labels(pairs));
    m.set_histogram(h);
    m
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
        let mut f = family("h", "help", MetricType::HISTOGRAM);
        f.mut_metric()
            .push(histogram(&[("upstream", "10.0.0.5:80")], &buckets, 1.5));
        let mut out = Vec::new();
        TextEncoder::new().encode(&[f], &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
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
    }
}
