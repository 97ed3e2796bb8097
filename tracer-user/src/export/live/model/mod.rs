//! The live view's state: the rows it shows, computed from successive snapshots of the kernel's
//! cumulative counts and from the failure stream, and what each key does. No terminal here: the
//! view renders this, the tests drive it.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::{Duration, SystemTime},
};

use tracer_common::{Outcome, counts::CONNECT_BUCKETS_NS};

use crate::export::{
    api::{Health, RouteSnapshot, Snapshot},
    events::EventRecord,
};

/// The window the view's counts, causes and trends cover.
pub const WINDOW: Duration = Duration::from_secs(60);
/// The window attempts/s and failures/s are averaged over (steadier than per refresh).
pub const RATE_WINDOW: Duration = Duration::from_secs(10);
/// How many recent failures are kept.
pub const RECENT_MAX: usize = 500;

/// The failure causes, in the order `c` cycles through them.
pub const CAUSES: [Outcome; 9] = [
    Outcome::Refused,
    Outcome::ConnectTimeout,
    Outcome::Unreachable,
    Outcome::ResetBeforeResponse,
    Outcome::ResetMidResponse,
    Outcome::ClosedBeforeResponse,
    Outcome::ResponseTimeout,
    Outcome::NoEphemeralPort,
    Outcome::ConnectError,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    FailureRate,
    FailureRatio,
    AttemptRate,
    Upstream,
}

impl SortKey {
    pub fn next(self) -> SortKey {
        match self {
            SortKey::FailureRate => SortKey::FailureRatio,
            SortKey::FailureRatio => SortKey::AttemptRate,
            SortKey::AttemptRate => SortKey::Upstream,
            SortKey::Upstream => SortKey::FailureRate,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SortKey::FailureRate => "failures/s",
            SortKey::FailureRatio => "failure %",
            SortKey::AttemptRate => "attempts/s",
            SortKey::Upstream => "upstream",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Typing a filter; the text so far.
    Filter(String),
    Help,
}

/// A key press, as the view understands it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    Up,
    Down,
    Enter,
    Esc,
    Backspace,
    Char(char),
    CtrlC,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Continue,
    Quit,
}

/// A route: who connects to what.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteId {
    pub proxy: String,
    pub cgroup_id: u64,
    pub upstream: String,
}

impl RouteId {
    fn of(route: &RouteSnapshot) -> RouteId {
        RouteId {
            proxy: route.proxy.clone(),
            cgroup_id: route.cgroup_id,
            upstream: route.upstream.clone(),
        }
    }
}

/// One row of the table, and the detail pane's content for it.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteRow {
    pub id: RouteId,
    /// The process id of the last failure's proxy, when one was seen.
    pub pid: Option<u32>,
    pub attempts_per_s: f64,
    pub failures_per_s: f64,
    /// Per outcome, in the window and since tracer started.
    pub window: BTreeMap<Outcome, u64>,
    pub total: BTreeMap<Outcome, u64>,
    /// The failure cause with the most failures in the window.
    pub leading_cause: Option<Outcome>,
    pub last_failure: Option<SystemTime>,
    /// Failures per refresh over the window, oldest first.
    pub trend: Vec<u64>,
    pub connect_p50: Option<Duration>,
    pub connect_p99: Option<Duration>,
    /// The root cause of the last failure that had one, in one sentence.
    pub root_cause: Option<String>,
    /// The container that held the upstream's address at the last failure, when one did.
    pub upstream_container: Option<String>,
    /// The container the proxy ran in at the last failure, when it ran in one.
    pub proxy_container: Option<String>,
}

impl RouteRow {
    pub fn window_attempts(&self) -> u64 {
        self.window
            .iter()
            .filter(|(o, _)| o.is_connect_outcome())
            .map(|(_, n)| n)
            .sum()
    }

    pub fn window_failures(&self) -> u64 {
        self.window
            .iter()
            .filter(|(o, _)| o.is_failure())
            .map(|(_, n)| n)
            .sum()
    }

    /// Failures over attempts in the window.
    pub fn failure_ratio(&self) -> Option<f64> {
        let attempts = self.window_attempts();
        (attempts > 0).then(|| self.window_failures() as f64 / attempts as f64)
    }

    pub fn failing(&self) -> bool {
        self.window_failures() > 0
    }
}

/// The live view's whole state.
pub struct App {
    history: VecDeque<Snapshot>,
    rows: Vec<RouteRow>,
    recent: VecDeque<EventRecord>,
    /// Events that came while paused, shown on resume.
    held: VecDeque<EventRecord>,
    last_failure: HashMap<RouteId, (SystemTime, u32)>,
    root_causes: HashMap<RouteId, String>,
    upstream_containers: HashMap<RouteId, String>,
    proxy_containers: HashMap<RouteId, String>,
    pub health: Health,
    pub now: SystemTime,
    pub selected: usize,
    pub sort: SortKey,
    pub filter: String,
    pub cause_filter: Option<Outcome>,
    pub paused: bool,
    pub mode: Mode,
    /// Where the data comes from: "local" or the agent's URL.
    pub source: String,
    /// Failure events the view had to drop to keep up.
    pub events_dropped: u64,
    /// What went wrong getting data (an agent that stopped answering), shown in the header.
    pub problem: Option<String>,
}

impl App {
    pub fn new(source: &str) -> App {
        App {
            history: VecDeque::new(),
            rows: Vec::new(),
            recent: VecDeque::new(),
            held: VecDeque::new(),
            last_failure: HashMap::new(),
            root_causes: HashMap::new(),
            upstream_containers: HashMap::new(),
            proxy_containers: HashMap::new(),
            health: Health::default(),
            now: SystemTime::now(),
            selected: 0,
            sort: SortKey::FailureRate,
            filter: String::new(),
            cause_filter: None,
            paused: false,
            mode: Mode::Normal,
            source: source.to_string(),
            events_dropped: 0,
            problem: None,
        }
    }

    /// A new snapshot of the cumulative counts.
    pub fn on_snapshot(&mut self, snapshot: Snapshot) {
        let time = |s: &Snapshot| Duration::from_millis(s.time_ms);
        let newest = time(&snapshot);
        // Keep one snapshot older than the window, so the window is covered whole.
        while self.history.len() >= 2 && newest.saturating_sub(time(&self.history[1])) >= WINDOW {
            self.history.pop_front();
        }
        self.history.push_back(snapshot);
        if !self.paused {
            self.refresh();
        }
    }

    /// A failure from the stream.
    pub fn on_event(&mut self, event: EventRecord) {
        if self.paused {
            self.held.push_front(event);
            self.held.truncate(RECENT_MAX);
            return;
        }
        self.record(event);
    }

    fn record(&mut self, event: EventRecord) {
        let id = RouteId {
            proxy: event.comm.clone(),
            cgroup_id: event.cgroup_id,
            upstream: event.upstream.clone(),
        };
        if let Ok(time) = humantime::parse_rfc3339(&event.time) {
            if let Some(row) = self.rows.iter_mut().find(|r| r.id == id) {
                row.last_failure = Some(time);
                row.pid = Some(event.pid);
                if event.root_cause_detail.is_some() {
                    row.root_cause = event.root_cause_detail.clone();
                }
            }
            if let Some(detail) = &event.root_cause_detail {
                self.root_causes.insert(id.clone(), detail.clone());
            }
            if let Some(container) = &event.upstream_container {
                if let Some(row) = self.rows.iter_mut().find(|r| r.id == id) {
                    row.upstream_container = Some(container.name.clone());
                }
                self.upstream_containers
                    .insert(id.clone(), container.name.clone());
            }
            if let Some(container) = &event.proxy_container {
                if let Some(row) = self.rows.iter_mut().find(|r| r.id == id) {
                    row.proxy_container = Some(container.name.clone());
                }
                self.proxy_containers
                    .insert(id.clone(), container.name.clone());
            }
            self.last_failure.insert(id, (time, event.pid));
        }
        self.recent.push_front(event);
        self.recent.truncate(RECENT_MAX);
    }

    /// Recomputes the rows from the snapshots.
    fn refresh(&mut self) {
        let Some(latest) = self.history.back() else {
            return;
        };
        self.now = SystemTime::UNIX_EPOCH + Duration::from_millis(latest.time_ms);
        self.health = latest.health.clone();
        let by_id: Vec<HashMap<RouteId, &RouteSnapshot>> = self
            .history
            .iter()
            .map(|s| s.routes.iter().map(|r| (RouteId::of(r), r)).collect())
            .collect();
        // The rates compare with the newest snapshot at least RATE_WINDOW old (or the oldest).
        let rate_base = self
            .history
            .iter()
            .rposition(|s| {
                latest.time_ms.saturating_sub(s.time_ms) >= RATE_WINDOW.as_millis() as u64
            })
            .unwrap_or(0);
        let previous =
            (self.history.len() > 1).then(|| (&self.history[rate_base], &by_id[rate_base]));
        let oldest = (&self.history[0], &by_id[0]);
        let mut rows = Vec::with_capacity(latest.routes.len());
        for route in &latest.routes {
            let id = RouteId::of(route);
            let (attempts_per_s, failures_per_s) = match previous {
                Some((snapshot, routes)) => {
                    let seconds = latest.time_ms.saturating_sub(snapshot.time_ms) as f64 / 1000.0;
                    let before = routes.get(&id);
                    let attempts =
                        route.attempts() - before.map_or(0, |b| b.attempts().min(route.attempts()));
                    let failures =
                        route.failures() - before.map_or(0, |b| b.failures().min(route.failures()));
                    if seconds > 0.0 {
                        (attempts as f64 / seconds, failures as f64 / seconds)
                    } else {
                        (0.0, 0.0)
                    }
                }
                None => (0.0, 0.0),
            };
            let base = if self.history.len() > 1 {
                oldest.1.get(&id).copied()
            } else {
                None
            };
            let window: BTreeMap<Outcome, u64> = Outcome::ALL
                .iter()
                .map(|o| {
                    (
                        *o,
                        route
                            .count(*o)
                            .saturating_sub(base.map_or(0, |b| b.count(*o))),
                    )
                })
                .filter(|(_, n)| *n > 0)
                .collect();
            let total: BTreeMap<Outcome, u64> = Outcome::ALL
                .iter()
                .map(|o| (*o, route.count(*o)))
                .filter(|(_, n)| *n > 0)
                .collect();
            let leading_cause = window
                .iter()
                .filter(|(o, _)| o.is_failure())
                .max_by_key(|(_, n)| **n)
                .map(|(o, _)| *o);
            let trend = by_id
                .windows(2)
                .map(|pair| {
                    let after = pair[1].get(&id).map_or(0, |r| r.failures());
                    let before = pair[0].get(&id).map_or(0, |r| r.failures());
                    after.saturating_sub(before)
                })
                .collect();
            let mut buckets = route.connect_buckets.clone();
            if let Some(base) = base {
                for (slot, before) in buckets.iter_mut().zip(&base.connect_buckets) {
                    *slot = slot.saturating_sub(*before);
                }
            }
            if buckets.iter().all(|n| *n == 0) {
                buckets = route.connect_buckets.clone();
            }
            let last = self.last_failure.get(&id);
            let root_cause = self.root_causes.get(&id).cloned();
            let upstream_container = self.upstream_containers.get(&id).cloned();
            let proxy_container = self.proxy_containers.get(&id).cloned();
            rows.push(RouteRow {
                root_cause,
                upstream_container,
                proxy_container,
                pid: last.map(|(_, pid)| *pid),
                last_failure: last.map(|(time, _)| *time),
                id,
                attempts_per_s,
                failures_per_s,
                window,
                total,
                leading_cause,
                trend,
                connect_p50: percentile(&buckets, 0.5),
                connect_p99: percentile(&buckets, 0.99),
            });
        }
        self.rows = rows;
        self.sort_rows();
        self.clamp_selection();
    }

    fn sort_rows(&mut self) {
        let key = self.sort;
        self.rows.sort_by(|a, b| {
            let by = match key {
                SortKey::FailureRate => b.failures_per_s.total_cmp(&a.failures_per_s),
                SortKey::FailureRatio => b
                    .failure_ratio()
                    .unwrap_or(0.0)
                    .total_cmp(&a.failure_ratio().unwrap_or(0.0)),
                SortKey::AttemptRate => b.attempts_per_s.total_cmp(&a.attempts_per_s),
                SortKey::Upstream => a.id.upstream.cmp(&b.id.upstream),
            };
            // Ties: failing first, then by failures in the window, then by name.
            by.then(b.window_failures().cmp(&a.window_failures()))
                .then(a.id.cmp(&b.id))
        });
    }

    /// Whether the filter's text is in one of `names` (the proxy, the upstream, their
    /// containers) and the cause filter allows.
    fn matches<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
        has_cause: impl Fn(Outcome) -> bool,
    ) -> bool {
        let text = self.filter.to_lowercase();
        (text.is_empty()
            || names
                .into_iter()
                .any(|name| name.to_lowercase().contains(&text)))
            && self.cause_filter.is_none_or(has_cause)
    }

    /// The rows shown, in order.
    pub fn visible_rows(&self) -> Vec<&RouteRow> {
        self.rows
            .iter()
            .filter(|r| {
                let names = [&r.id.proxy, &r.id.upstream]
                    .into_iter()
                    .chain(&r.upstream_container)
                    .chain(&r.proxy_container)
                    .map(String::as_str);
                self.matches(names, |c| {
                    r.window.contains_key(&c) || r.total.contains_key(&c)
                })
            })
            .collect()
    }

    /// Every row, visible or not.
    pub fn all_rows(&self) -> &[RouteRow] {
        &self.rows
    }

    pub fn selected_row(&self) -> Option<&RouteRow> {
        self.visible_rows().get(self.selected).copied()
    }

    /// The recent failures shown, newest first.
    pub fn visible_recent(&self) -> impl Iterator<Item = &EventRecord> {
        self.recent.iter().filter(|e| {
            let names = [e.comm.as_str(), e.upstream.as_str()]
                .into_iter()
                .chain(e.upstream_container.iter().map(|c| c.name.as_str()))
                .chain(e.proxy_container.iter().map(|c| c.name.as_str()));
            self.matches(names, |c| c.name() == e.cause)
        })
    }

    fn clamp_selection(&mut self) {
        let n = self.visible_rows().len();
        self.selected = self.selected.min(n.saturating_sub(1));
    }

    pub fn on_key(&mut self, key: Key) -> Action {
        match (&mut self.mode, key) {
            (_, Key::CtrlC) => return Action::Quit,
            (Mode::Filter(text), Key::Char(c)) => text.push(c),
            (Mode::Filter(text), Key::Backspace) => {
                text.pop();
            }
            (Mode::Filter(text), Key::Enter) => {
                self.filter = std::mem::take(text);
                self.mode = Mode::Normal;
                self.selected = 0;
            }
            (Mode::Filter(_), Key::Esc) => self.mode = Mode::Normal,
            (Mode::Filter(_), _) => {}
            (Mode::Help, Key::Char('q')) => return Action::Quit,
            (Mode::Help, _) => self.mode = Mode::Normal,
            (Mode::Normal, Key::Char('q') | Key::Esc) => return Action::Quit,
            (Mode::Normal, Key::Up | Key::Char('k')) => {
                self.selected = self.selected.saturating_sub(1)
            }
            (Mode::Normal, Key::Down | Key::Char('j')) => self.selected += 1,
            (Mode::Normal, Key::Char('s')) => {
                self.sort = self.sort.next();
                self.sort_rows();
            }
            (Mode::Normal, Key::Char('/')) => self.mode = Mode::Filter(self.filter.clone()),
            (Mode::Normal, Key::Char('c')) => {
                self.cause_filter = match self.cause_filter {
                    None => Some(CAUSES[0]),
                    Some(cause) => CAUSES
                        .iter()
                        .position(|c| *c == cause)
                        .and_then(|i| CAUSES.get(i + 1))
                        .copied(),
                };
                self.selected = 0;
            }
            (Mode::Normal, Key::Char('p')) => {
                self.paused = !self.paused;
                if !self.paused {
                    while let Some(event) = self.held.pop_back() {
                        self.record(event);
                    }
                    self.refresh();
                }
            }
            (Mode::Normal, Key::Char('?')) => self.mode = Mode::Help,
            (Mode::Normal, _) => {}
        }
        self.clamp_selection();
        Action::Continue
    }
}

/// A quantile of a connect-time histogram (per-bucket counts), as the bucket's upper bound.
pub fn percentile(buckets: &[u64], q: f64) -> Option<Duration> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            let bound = CONNECT_BUCKETS_NS
                .get(i)
                .or(CONNECT_BUCKETS_NS.last())
                .copied()
                .unwrap_or(0);
            return Some(Duration::from_nanos(bound));
        }
    }
    None
}

#[cfg(test)]
pub(crate) mod tests;
