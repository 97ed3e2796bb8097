//! Aggregate: the kernel's exact counts, per proxy × upstream, by outcome.
//!
//! The kernel counts every attempt where it is decided, so these totals stay exact whatever
//! happens to events on the way (a full ring buffer, a slow reader).

use std::{collections::BTreeMap, time::Duration};

use tracer_common::{Outcome, counts::CONNECT_BUCKETS_NS, peek::TlsReason};

pub mod ledger;

pub use crate::decode::Route;
use crate::{
    classify::Notice,
    decode::{Count, LatencyCount},
};

/// How many connect-latency buckets there are, the last one unbounded.
pub const LATENCY_BUCKETS: usize = CONNECT_BUCKETS_NS.len() + 1;

/// The totals for one route.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTotals {
    /// Count and summed duration per outcome.
    pub outcomes: BTreeMap<Outcome, (u64, Duration)>,
    /// Successful connects per connect-time bucket (not cumulative).
    pub connect_buckets: [u64; LATENCY_BUCKETS],
    /// `tls_handshake_failed` by its reason.
    pub tls_reasons: BTreeMap<TlsReason, u64>,
}

impl RouteTotals {
    /// Connection attempts: every attempt ends in exactly one connect-phase outcome.
    pub fn attempts(&self) -> u64 {
        self.outcomes
            .iter()
            .filter(|(o, _)| o.is_connect_outcome())
            .map(|(_, (n, _))| n)
            .sum()
    }

    pub fn failures(&self) -> u64 {
        self.outcomes
            .iter()
            .filter(|(o, _)| o.is_failure())
            .map(|(_, (n, _))| n)
            .sum()
    }

    pub fn count(&self, outcome: Outcome) -> u64 {
        self.outcomes.get(&outcome).map_or(0, |(n, _)| *n)
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &RouteTotals) {
        for (outcome, (n, d)) in &other.outcomes {
            let entry = self.outcomes.entry(*outcome).or_default();
            entry.0 += n;
            entry.1 += *d;
        }
        for (slot, n) in self.connect_buckets.iter_mut().zip(other.connect_buckets) {
            *slot += n;
        }
        for (reason, n) in &other.tls_reasons {
            *self.tls_reasons.entry(*reason).or_default() += n;
        }
    }

    /// The failure cause with the most failures.
    pub fn leading_cause(&self) -> Option<Outcome> {
        self.outcomes
            .iter()
            .filter(|(o, (n, _))| o.is_failure() && *n > 0)
            .max_by_key(|(_, (n, _))| *n)
            .map(|(o, _)| *o)
    }
}

/// All routes' totals at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub routes: BTreeMap<Route, RouteTotals>,
    /// Counts that did not fit in the kernel's table, per outcome.
    pub overflow: BTreeMap<Outcome, u64>,
}

impl Totals {
    pub fn from_counts(
        counts: impl IntoIterator<Item = Count>,
        latency: impl IntoIterator<Item = LatencyCount>,
    ) -> Totals {
        let mut totals = Totals::default();
        for l in latency {
            if let Some(slot) = totals
                .routes
                .entry(l.route)
                .or_default()
                .connect_buckets
                .get_mut(l.bucket)
            {
                *slot += l.count;
            }
        }
        for c in counts {
            let route = totals.routes.entry(c.route).or_default();
            if let Some(reason) = c.tls_reason {
                *route.tls_reasons.entry(reason).or_default() += c.count;
            }
            let entry = route
                .outcomes
                .entry(c.outcome)
                .or_insert((0, Duration::ZERO));
            entry.0 += c.count;
            entry.1 += c.total_time;
        }
        totals
    }

    /// Routes with at least one failure, most failures first.
    pub fn failing(&self) -> Vec<(&Route, &RouteTotals)> {
        let mut failing: Vec<_> = self
            .routes
            .iter()
            .filter(|(_, t)| t.failures() > 0)
            .collect();
        failing.sort_by(|a, b| b.1.failures().cmp(&a.1.failures()).then(a.0.cmp(b.0)));
        failing
    }
}

/// What became of listeners: deaths by reason, and returns, per listener and process name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerTotals {
    /// (listener, process name, reason) → count; reason: oom_killed, crashed, exited, or
    /// closed (by a process that lived on).
    pub deaths: BTreeMap<(String, String, &'static str), u64>,
    /// (listener, process name) → times it listened again after a gap.
    pub restarts: BTreeMap<(String, String), u64>,
}

impl ListenerTotals {
    pub fn record(&mut self, notice: &Notice) {
        match notice {
            Notice::ListenerGone {
                listener,
                process,
                death,
                ..
            } => {
                let reason = death.as_ref().map_or("closed", |d| d.reason());
                *self
                    .deaths
                    .entry((listener.to_string(), process.comm.clone(), reason))
                    .or_default() += 1;
            }
            Notice::ListenerBack {
                listener, process, ..
            } => {
                *self
                    .restarts
                    .entry((listener.to_string(), process.comm.clone()))
                    .or_default() += 1;
            }
        }
    }
}

/// Failure events tracer gave a root cause, per proxy name, upstream, cause and root cause.
/// Counted from the events that reach the agent (under a storm above the events-per-second
/// budget, a sample of the failures, which the kernel counts exactly by cause).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootCauseTotals {
    pub counts: BTreeMap<(String, String, &'static str, &'static str), u64>,
}

impl RootCauseTotals {
    /// Label sets kept at most; past them, the upstream is `other`.
    pub const MAX_SERIES: usize = 2048;

    pub fn add(&mut self, proxy: &str, upstream: &str, cause: Outcome, root: &'static str) {
        let mut key = (proxy.to_string(), upstream.to_string(), cause.name(), root);
        if !self.counts.contains_key(&key) && self.counts.len() >= Self::MAX_SERIES {
            key.1 = "other".to_string();
        }
        *self.counts.entry(key).or_default() += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(upstream: &str) -> Route {
        Route {
            proxy: "nginx".into(),
            cgroup_id: 1,
            upstream: upstream.parse().unwrap(),
        }
    }

    fn count(upstream: &str, outcome: Outcome, n: u64) -> Count {
        Count {
            route: route(upstream),
            outcome,
            tls_reason: None,
            count: n,
            total_time: Duration::from_millis(n),
        }
    }

    #[test]
    fn attempts_are_connect_outcomes_and_failures_include_response_phase() {
        let latency = [
            LatencyCount {
                route: route("10.0.0.5:8000"),
                bucket: 0,
                count: 60,
            },
            LatencyCount {
                route: route("10.0.0.5:8000"),
                bucket: 3,
                count: 30,
            },
        ];
        let totals = Totals::from_counts(
            [
                count("10.0.0.5:8000", Outcome::Connected, 90),
                count("10.0.0.5:8000", Outcome::Refused, 10),
                count("10.0.0.5:8000", Outcome::ResetMidResponse, 3),
                count("10.0.0.5:8000", Outcome::RequestAbandoned, 2),
                count("10.0.0.6:8000", Outcome::Connected, 50),
            ],
            latency,
        );
        let failing = totals.failing();
        assert_eq!(failing.len(), 1);
        let (route, t) = failing[0];
        assert_eq!(route.upstream.to_string(), "10.0.0.5:8000");
        assert_eq!(t.attempts(), 100);
        assert_eq!(t.failures(), 13);
        assert_eq!(t.leading_cause(), Some(Outcome::Refused));
        assert_eq!(t.count(Outcome::Connected), 90);
        assert_eq!(t.connect_buckets[0], 60);
        assert_eq!(t.connect_buckets[3], 30);
        assert_eq!(t.connect_buckets.iter().sum::<u64>(), 90);
    }
}
