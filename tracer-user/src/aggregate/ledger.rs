//! What the agent keeps so that the kernel's tables never fill for good, and which upstreams
//! have series of their own.
//!
//! The kernel counts per route in a map of fixed size (`COUNTS`). A host
//! that talks to ever new upstreams (autoscaling, pod IPs, a storm of distinct addresses)
//! would fill them, and from then on new routes would only be counted under `other`. So a
//! kernel entry that has not changed for `idle_after` is *retired*: its value is added to the
//! ledger and the entry freed. A route's totals are its retired value plus its kernel entries,
//! so they stay exact and never go down.
//!
//! At most `max_upstreams` upstreams have series of their own (the first seen are admitted).
//! The others are *folded* into `other` per proxy and cgroup, and so is what is retired of
//! them, so the ledger stays small however many upstreams come and go. While upstreams are
//! folded, an admitted upstream with nothing left in the kernel (all of it retired) gives its
//! place up: its totals join `other` (which only grows), and the place goes to the next new
//! upstream.
//!
//! One limit: an attempt that lands on a route idle for `idle_after`, in the microseconds
//! between the agent reading an entry and freeing it, is not counted.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::{Duration, Instant},
};

use tracer_common::counts::CountKey;

use super::{Route, RouteTotals};
use crate::decode::Upstream;

/// The default `--max-upstreams`.
pub const DEFAULT_MAX_UPSTREAMS: usize = 1000;
/// The default `--idle-after`.
pub const DEFAULT_IDLE_AFTER: Duration = Duration::from_secs(300);

/// A kernel entry the ledger follows: a `COUNTS` key (for connects, one connect-time bucket).
pub type EntryKey = CountKey;

/// Admission, retired totals, and how long kernel entries have been idle.
#[derive(Debug)]
pub struct Ledger {
    pub max_upstreams: usize,
    pub idle_after: Duration,
    /// Upstreams with series of their own.
    admitted: BTreeSet<String>,
    /// Upstreams folded into `other` that have kernel entries now.
    folded: BTreeSet<String>,
    /// Times an upstream was folded into `other` (again, after it had been retired).
    pub folded_total: u64,
    /// Upstreams that gave their place up.
    pub released_total: u64,
    /// Retired totals: admitted upstreams' under their route, the others' under `other`.
    retired: BTreeMap<Route, RouteTotals>,
    /// Per kernel entry: its last value and since when it has had it.
    seen: HashMap<EntryKey, (u64, Instant)>,
}

impl Ledger {
    pub fn new(max_upstreams: usize, idle_after: Duration) -> Ledger {
        Ledger {
            max_upstreams,
            idle_after,
            admitted: BTreeSet::new(),
            folded: BTreeSet::new(),
            folded_total: 0,
            released_total: 0,
            retired: BTreeMap::new(),
            seen: HashMap::new(),
        }
    }

    /// Whether `upstream` has series of its own: it has, or there is room and it gets them
    /// now. Otherwise it is folded into `other`. An upstream counted under `other` stays there
    /// while it has kernel entries (moving them out would make `other` go down).
    pub fn admit(&mut self, upstream: &Upstream) -> bool {
        if *upstream == Upstream::Other {
            return false;
        }
        let name = upstream.to_string();
        if self.admitted.contains(&name) {
            return true;
        }
        if self.admitted.len() < self.max_upstreams && !self.folded.contains(&name) {
            self.admitted.insert(name);
            return true;
        }
        if self.folded.insert(name) {
            self.folded_total += 1;
        }
        false
    }

    /// Upstreams folded into `other` now.
    pub fn folded_now(&self) -> usize {
        self.folded.len()
    }

    /// Routes' retired totals.
    pub fn retired(&self) -> &BTreeMap<Route, RouteTotals> {
        &self.retired
    }

    /// Notes the value of kernel entry `key` at `now`: true when it has not changed for
    /// `idle_after` (time to retire it).
    pub fn idle(&mut self, key: EntryKey, value: u64, now: Instant) -> bool {
        match self.seen.get_mut(&key) {
            Some((seen, since)) if *seen == value => now.duration_since(*since) >= self.idle_after,
            Some(entry) => {
                *entry = (value, now);
                false
            }
            None => {
                self.seen.insert(key, (value, now));
                false
            }
        }
    }

    /// Forgets entries no longer in the kernel (retired, or never seen again).
    pub fn keep_only(&mut self, live: &std::collections::HashSet<EntryKey>) {
        self.seen.retain(|key, _| live.contains(key));
    }

    /// Adds a retired kernel entry's totals to the ledger.
    pub fn retire(&mut self, route: Route, totals: &RouteTotals) {
        let route = if self.admitted.contains(&route.upstream.to_string()) {
            route
        } else {
            Route {
                upstream: Upstream::Other,
                ..route
            }
        };
        self.retired.entry(route).or_default().add(totals);
    }

    /// After a retiring pass: `live` are the upstreams that still have kernel entries. Folded
    /// upstreams without any are forgotten; while some remain folded (the places are short),
    /// admitted ones without any give their place up (their retired totals join `other`).
    pub fn settle(&mut self, live: &BTreeSet<String>) {
        let before = self.folded.len();
        self.folded.retain(|u| live.contains(u));
        if before == 0 {
            return;
        }
        let idle: Vec<String> = self
            .admitted
            .iter()
            .filter(|u| !live.contains(*u))
            .take(before)
            .cloned()
            .collect();
        if idle.is_empty() {
            return;
        }
        for upstream in &idle {
            self.admitted.remove(upstream);
        }
        self.released_total += idle.len() as u64;
        let released: Vec<Route> = self
            .retired
            .keys()
            .filter(|r| idle.contains(&r.upstream.to_string()))
            .cloned()
            .collect();
        for route in released {
            if let Some(totals) = self.retired.remove(&route) {
                let other = Route {
                    upstream: Upstream::Other,
                    ..route
                };
                self.retired.entry(other).or_default().add(&totals);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::Outcome;

    use super::*;

    fn route(upstream: &str) -> Route {
        Route {
            proxy: "nginx".into(),
            cgroup_id: 1,
            upstream: upstream.parse().unwrap(),
        }
    }

    fn refused(n: u64) -> RouteTotals {
        let mut t = RouteTotals::default();
        t.outcomes.insert(Outcome::Refused, (n, Duration::ZERO));
        t
    }

    #[test]
    fn the_first_upstreams_are_admitted_and_the_rest_folded_once_each() {
        let mut ledger = Ledger::new(2, Duration::from_secs(60));
        let up = |s: &str| s.parse::<Upstream>().unwrap();
        assert!(ledger.admit(&up("10.0.0.1:80")));
        assert!(ledger.admit(&up("10.0.0.2:80")));
        assert!(ledger.admit(&up("10.0.0.1:80")));
        assert!(!ledger.admit(&up("10.0.0.3:80")));
        assert!(!ledger.admit(&up("10.0.0.3:80")));
        assert!(!ledger.admit(&Upstream::Other));
        assert_eq!((ledger.folded_total, ledger.folded_now()), (1, 1));
    }

    #[test]
    fn an_entry_is_idle_once_unchanged_for_idle_after() {
        let mut ledger = Ledger::new(10, Duration::from_secs(60));
        let t0 = Instant::now();
        let k = CountKey::default();
        assert!(!ledger.idle(k, 5, t0));
        assert!(!ledger.idle(k, 5, t0 + Duration::from_secs(59)));
        assert!(!ledger.idle(k, 6, t0 + Duration::from_secs(61)), "it moved");
        assert!(!ledger.idle(k, 6, t0 + Duration::from_secs(100)));
        assert!(ledger.idle(k, 6, t0 + Duration::from_secs(121)));
        ledger.keep_only(&Default::default());
        assert!(
            !ledger.idle(k, 6, t0 + Duration::from_secs(122)),
            "forgotten"
        );
    }

    #[test]
    fn retired_totals_keep_their_route_while_admitted_and_join_other_otherwise() {
        let mut ledger = Ledger::new(1, Duration::from_secs(60));
        assert!(ledger.admit(&route("10.0.0.1:80").upstream));
        assert!(!ledger.admit(&route("10.0.0.2:80").upstream));
        ledger.retire(route("10.0.0.1:80"), &refused(3));
        ledger.retire(route("10.0.0.1:80"), &refused(2));
        ledger.retire(route("10.0.0.2:80"), &refused(7));
        let retired = ledger.retired();
        assert_eq!(retired[&route("10.0.0.1:80")].count(Outcome::Refused), 5);
        assert_eq!(retired[&route("other")].count(Outcome::Refused), 7);
        assert_eq!(retired.len(), 2);
    }

    #[test]
    fn an_idle_admitted_upstream_gives_its_place_to_one_waiting() {
        let mut ledger = Ledger::new(1, Duration::from_secs(60));
        let (old, new) = (route("10.0.0.1:80"), route("10.0.0.2:80"));
        assert!(ledger.admit(&old.upstream));
        ledger.retire(old.clone(), &refused(4));
        assert!(!ledger.admit(&new.upstream), "no place yet");
        // The old one still has kernel entries: it keeps its place.
        let live: BTreeSet<String> = [old.upstream.to_string(), new.upstream.to_string()].into();
        ledger.settle(&live);
        assert!(!ledger.admit(&new.upstream));
        // All of it retired: its totals join `other` (never lost) and its place is free. The
        // folded one stays under `other` while its kernel entries are counted there.
        ledger.settle(&[new.upstream.to_string()].into());
        assert_eq!(ledger.released_total, 1);
        assert!(!ledger.admit(&new.upstream));
        assert_eq!(ledger.retired()[&route("other")].count(Outcome::Refused), 4);
        assert!(!ledger.retired().contains_key(&old));
        // The next new upstream gets the place.
        let newer = route("10.0.0.3:80");
        assert!(ledger.admit(&newer.upstream));
        // Nothing folded: an idle admitted upstream keeps its place and its series.
        ledger.settle(&[newer.upstream.to_string()].into());
        ledger.settle(&BTreeSet::new());
        assert!(ledger.admit(&newer.upstream));
        assert_eq!(ledger.released_total, 1);
    }

    #[test]
    fn folded_upstreams_without_kernel_entries_are_forgotten() {
        let mut ledger = Ledger::new(0, Duration::from_secs(60));
        for i in 0..100 {
            assert!(!ledger.admit(&route(&format!("10.0.1.{i}:80")).upstream));
        }
        assert_eq!(ledger.folded_now(), 100);
        ledger.settle(&BTreeSet::new());
        assert_eq!((ledger.folded_now(), ledger.folded_total), (0, 100));
        // Seen again later: folded (and counted) again.
        assert!(!ledger.admit(&route("10.0.1.1:80").upstream));
        assert_eq!(ledger.folded_total, 101);
    }
}
