//! The agent's JSON API, what the live view needs from a running `tracer run`:
//! `/api/snapshot` (the kernel's cumulative counts per route and the agent's health) and
//! `/api/events` (the failure stream, one JSON object per line, as `tracer events --json`).

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tracer_common::{Outcome, Stat};

use crate::{
    agent::Shared,
    aggregate::{RouteTotals, Totals},
};

/// Everything cumulative the agent knows at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// When it was taken, in milliseconds since the epoch.
    pub time_ms: u64,
    pub routes: Vec<RouteSnapshot>,
    /// Counts per outcome name that the kernel could not key by route (its table was full).
    #[serde(default)]
    pub overflow: BTreeMap<String, u64>,
    pub health: Health,
}

/// One route's cumulative counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteSnapshot {
    pub proxy: String,
    pub cgroup_id: u64,
    pub upstream: String,
    /// Count per outcome name (`connected`, `refused`, …).
    pub outcomes: BTreeMap<String, u64>,
    /// Successful connects per connect-time bucket (not cumulative), the last one unbounded.
    pub connect_buckets: Vec<u64>,
    /// Total time of the successful connects.
    pub connect_seconds: f64,
}

impl RouteSnapshot {
    pub fn new(proxy: &str, cgroup_id: u64, upstream: String, t: &RouteTotals) -> RouteSnapshot {
        RouteSnapshot {
            proxy: proxy.to_string(),
            cgroup_id,
            upstream,
            outcomes: t
                .outcomes
                .iter()
                .map(|(o, (n, _))| (o.name().to_string(), *n))
                .collect(),
            connect_buckets: t.connect_buckets.to_vec(),
            connect_seconds: t
                .outcomes
                .get(&Outcome::Connected)
                .map_or(0.0, |(_, d)| d.as_secs_f64()),
        }
    }

    pub fn count(&self, outcome: Outcome) -> u64 {
        self.outcomes.get(outcome.name()).copied().unwrap_or(0)
    }

    pub fn attempts(&self) -> u64 {
        Outcome::ALL
            .iter()
            .filter(|o| o.is_connect_outcome())
            .map(|o| self.count(*o))
            .sum()
    }

    pub fn failures(&self) -> u64 {
        Outcome::ALL
            .iter()
            .filter(|o| o.is_failure())
            .map(|o| self.count(*o))
            .sum()
    }
}

/// The agent's own health.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub probes_attached: usize,
    pub probes_total: usize,
    /// The probes this kernel lacks.
    pub probes_missing: Vec<String>,
    pub events_received: u64,
    /// Dropped in the kernel because the ring buffer was full (counts stay exact).
    pub events_lost: u64,
    /// Over the --event-rate budget, so not sent one by one (counts stay exact).
    #[serde(default)]
    pub events_sampled_out: u64,
}

impl Snapshot {
    /// The agent's state now.
    pub fn capture(shared: &Shared) -> Snapshot {
        Snapshot::from_totals(&shared.totals(), Health::of(shared), SystemTime::now())
    }

    pub fn from_totals(totals: &Totals, health: Health, at: SystemTime) -> Snapshot {
        let routes = totals
            .routes
            .iter()
            .map(|(route, t)| {
                RouteSnapshot::new(&route.proxy, route.cgroup_id, route.upstream.to_string(), t)
            })
            .collect();
        Snapshot::with_routes(routes, totals, health, at)
    }

    /// A snapshot of `routes`, with `totals`' overflow counts.
    pub fn with_routes(
        routes: Vec<RouteSnapshot>,
        totals: &Totals,
        health: Health,
        at: SystemTime,
    ) -> Snapshot {
        Snapshot {
            time_ms: at
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_millis() as u64,
            routes,
            overflow: totals
                .overflow
                .iter()
                .map(|(o, n)| (o.name().to_string(), *n))
                .collect(),
            health,
        }
    }
}

impl Health {
    pub fn of(shared: &Shared) -> Health {
        Health {
            probes_attached: shared.attached(),
            probes_total: shared.probes.len(),
            probes_missing: shared
                .probes
                .iter()
                .filter(|p| !p.attached())
                .map(|p| p.probe.tracepoint())
                .collect(),
            events_received: shared
                .events_received
                .load(std::sync::atomic::Ordering::Relaxed),
            events_lost: shared.stat(Stat::EventsLost),
            events_sampled_out: shared.stat(Stat::EventsSampledOut),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        aggregate::Totals,
        decode::{Count, Route},
    };

    #[test]
    fn snapshots_round_trip_through_json_with_outcome_names() {
        let route = Route {
            proxy: "nginx".into(),
            cgroup_id: 7,
            upstream: "10.0.0.5:8000".parse().unwrap(),
        };
        let totals = Totals::from_counts(
            [
                Count {
                    route: route.clone(),
                    outcome: Outcome::Refused,
                    tls_reason: None,
                    count: 12,
                    total_time: Duration::ZERO,
                },
                Count {
                    route,
                    outcome: Outcome::Connected,
                    tls_reason: None,
                    count: 30,
                    total_time: Duration::from_millis(15),
                },
            ],
            [],
        );
        let snapshot = Snapshot::from_totals(&totals, Health::default(), SystemTime::UNIX_EPOCH);
        let json = serde_json::to_string(&snapshot).unwrap();
        assert!(json.contains("\"refused\":12"), "{json}");
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snapshot);
        let route = &back.routes[0];
        assert_eq!((route.attempts(), route.failures()), (42, 12));
        assert!((route.connect_seconds - 0.015).abs() < 1e-9);
    }
}
