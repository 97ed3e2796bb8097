//! The live view's model driven key by key, from made-up snapshots and failures (and the
//! helpers the view's tests share).

use super::*;

pub fn route(upstream: &str, outcomes: &[(Outcome, u64)]) -> RouteSnapshot {
    RouteSnapshot {
        proxy: "nginx".into(),
        cgroup_id: 1,
        upstream: upstream.into(),
        outcomes: outcomes
            .iter()
            .map(|(o, n)| (o.name().to_string(), *n))
            .collect(),
        connect_buckets: vec![0; CONNECT_BUCKETS_NS.len() + 1],
        connect_seconds: 0.0,
    }
}

pub fn snapshot(at_s: u64, routes: Vec<RouteSnapshot>) -> Snapshot {
    Snapshot {
        time_ms: 1_763_769_600_000 + at_s * 1000,
        routes,
        overflow: BTreeMap::new(),
        health: Health {
            probes_attached: 6,
            probes_total: 6,
            ..Health::default()
        },
    }
}

pub fn event(upstream: &str, cause: &str, pid: u32) -> EventRecord {
    EventRecord {
        kind: "failure".into(),
        time: "2025-11-22T00:00:10.000Z".into(),
        pid,
        tid: pid,
        comm: "nginx".into(),
        cgroup_id: 1,
        upstream: upstream.into(),
        local: None,
        cause: cause.into(),
        errno: 111,
        errno_name: Some("ECONNREFUSED".into()),
        connect_ms: None,
        syn_retransmits: 0,
        retransmits: 0,
        requests: 0,
        bytes_sent: 0,
        bytes_received: 0,
        waited_ms: 0.1,
        ended_by: "upstream_reset".into(),
        reset_received: true,
        seen_at: "socket_closed".into(),
        explanation: String::new(),
        root_cause: None,
        root_cause_pid: None,
        root_cause_comm: None,
        root_cause_detail: None,
        proxy_container: None,
        upstream_container: None,
        tls_reason: None,
        tls_alert: None,
        first_bytes_sent: None,
        first_bytes_received: None,
    }
}

/// A container named `name` (image shop:1.4), for a failure's `proxy_container` or
/// `upstream_container`.
pub fn container(name: &str) -> crate::classify::containers::ContainerId {
    crate::classify::containers::ContainerId {
        id: "16daf7440aa0".into(),
        name: name.into(),
        image: "shop:1.4".into(),
        pod: None,
    }
}

/// nginx → 10.0.0.5 refused 10/s; → 10.0.0.6 healthy at 50/s.
pub fn busy_app() -> App {
    let mut app = App::new("local");
    for t in 0..=10u64 {
        app.on_snapshot(snapshot(
            t,
            vec![
                route("10.0.0.6:8000", &[(Outcome::Connected, 50 * t)]),
                route(
                    "10.0.0.5:8000",
                    &[(Outcome::Refused, 10 * t), (Outcome::Connected, 5)],
                ),
            ],
        ));
    }
    app.on_event(event("10.0.0.5:8000", "refused", 812));
    app
}

#[test]
fn rates_windows_and_trends_come_from_successive_snapshots() {
    let app = busy_app();
    let rows = app.visible_rows();
    assert_eq!(rows.len(), 2);
    let failing = rows[0];
    assert_eq!(
        failing.id.upstream, "10.0.0.5:8000",
        "the failing upstream sorts first"
    );
    assert_eq!(failing.failures_per_s, 10.0);
    assert_eq!(failing.window[&Outcome::Refused], 100);
    assert_eq!(failing.total[&Outcome::Refused], 100);
    assert_eq!(failing.leading_cause, Some(Outcome::Refused));
    assert_eq!(failing.trend, vec![10; 10]);
    assert_eq!(failing.pid, Some(812));
    assert!(failing.last_failure.is_some());
    let healthy = rows[1];
    assert_eq!(healthy.attempts_per_s, 50.0);
    assert!(!healthy.failing());
    assert_eq!(healthy.failure_ratio(), Some(0.0));
}

#[test]
fn a_burst_shows_in_the_rates_for_ten_seconds() {
    let mut app = App::new("local");
    app.on_snapshot(snapshot(
        0,
        vec![route("10.0.0.5:8000", &[(Outcome::Refused, 0)])],
    ));
    app.on_snapshot(snapshot(
        1,
        vec![route("10.0.0.5:8000", &[(Outcome::Refused, 50)])],
    ));
    for t in 2..=5 {
        app.on_snapshot(snapshot(
            t,
            vec![route("10.0.0.5:8000", &[(Outcome::Refused, 50)])],
        ));
    }
    assert_eq!(
        app.visible_rows()[0].failures_per_s,
        10.0,
        "50 over the 5 s seen so far"
    );
    for t in 6..=11 {
        app.on_snapshot(snapshot(
            t,
            vec![route("10.0.0.5:8000", &[(Outcome::Refused, 50)])],
        ));
    }
    assert_eq!(
        app.visible_rows()[0].failures_per_s,
        0.0,
        "10 s later the burst is over"
    );
}

#[test]
fn the_window_forgets_what_is_older_than_a_minute() {
    let mut app = App::new("local");
    app.on_snapshot(snapshot(
        0,
        vec![route("10.0.0.5:8000", &[(Outcome::Refused, 0)])],
    ));
    app.on_snapshot(snapshot(
        10,
        vec![route("10.0.0.5:8000", &[(Outcome::Refused, 30)])],
    ));
    for t in (20..=130).step_by(10) {
        app.on_snapshot(snapshot(
            t,
            vec![route("10.0.0.5:8000", &[(Outcome::Refused, 30)])],
        ));
    }
    let row = &app.visible_rows()[0];
    assert!(
        row.window.is_empty(),
        "old refusals left the window: {:?}",
        row.window
    );
    assert_eq!(row.total[&Outcome::Refused], 30);
    assert_eq!(row.leading_cause, None);
    assert!(!row.failing());
}

#[test]
fn keys_select_sort_filter_pause_and_quit() {
    let mut app = busy_app();
    assert_eq!(app.selected_row().unwrap().id.upstream, "10.0.0.5:8000");
    app.on_key(Key::Down);
    app.on_key(Key::Down);
    assert_eq!(app.selected, 1, "selection stops at the last row");
    app.on_key(Key::Char('s'));
    assert_eq!(app.sort, SortKey::FailureRatio);
    app.on_key(Key::Char('s'));
    assert_eq!(app.sort, SortKey::AttemptRate);
    assert_eq!(app.visible_rows()[0].id.upstream, "10.0.0.6:8000");

    app.on_key(Key::Char('/'));
    for c in "0.0.6".chars() {
        app.on_key(Key::Char(c));
    }
    assert_eq!(app.mode, Mode::Filter("0.0.6".into()));
    assert_eq!(
        app.on_key(Key::Char('q')),
        Action::Continue,
        "q is text while filtering"
    );
    app.on_key(Key::Backspace);
    app.on_key(Key::Enter);
    assert_eq!(app.filter, "0.0.6");
    assert_eq!(app.visible_rows().len(), 1);
    app.on_key(Key::Char('/'));
    app.on_key(Key::Backspace);
    app.on_key(Key::Esc);
    assert_eq!(app.filter, "0.0.6", "Esc leaves the filter as it was");

    app.filter.clear();
    app.on_key(Key::Char('c'));
    assert_eq!(app.cause_filter, Some(Outcome::Refused));
    assert_eq!(app.visible_rows().len(), 1);
    assert_eq!(app.visible_recent().count(), 1);
    app.on_key(Key::Char('c'));
    assert_eq!(app.cause_filter, Some(Outcome::ConnectTimeout));
    assert_eq!(app.visible_rows().len(), 0);
    assert_eq!(app.visible_recent().count(), 0);
    for _ in 0..CAUSES.len() - 1 {
        app.on_key(Key::Char('c'));
    }
    assert_eq!(app.cause_filter, None, "c cycles back to every cause");

    app.on_key(Key::Char('p'));
    app.on_event(event("10.0.0.7:8000", "refused", 900));
    assert_eq!(
        app.visible_recent().count(),
        1,
        "nothing moves while paused"
    );
    app.on_key(Key::Char('p'));
    assert_eq!(
        app.visible_recent().count(),
        2,
        "held events show on resume"
    );

    app.on_key(Key::Char('?'));
    assert_eq!(app.mode, Mode::Help);
    assert_eq!(app.on_key(Key::Char('x')), Action::Continue);
    assert_eq!(app.mode, Mode::Normal);
    assert_eq!(app.on_key(Key::Char('q')), Action::Quit);
    assert_eq!(app.on_key(Key::Esc), Action::Quit);
    assert_eq!(app.on_key(Key::CtrlC), Action::Quit);
}

#[test]
fn percentiles_come_from_bucket_bounds() {
    let mut buckets = vec![0u64; CONNECT_BUCKETS_NS.len() + 1];
    assert_eq!(percentile(&buckets, 0.5), None);
    buckets[0] = 98;
    buckets[3] = 1;
    buckets[CONNECT_BUCKETS_NS.len()] = 1;
    assert_eq!(percentile(&buckets, 0.5), Some(Duration::from_micros(100)));
    assert_eq!(percentile(&buckets, 0.99), Some(Duration::from_millis(1)));
    assert_eq!(percentile(&buckets, 1.0), Some(Duration::from_secs(5)));
}

#[test]
fn the_filter_finds_routes_and_failures_by_container_name() {
    let mut app = busy_app();
    let mut failure = event("10.0.0.5:8000", "refused", 812);
    failure.proxy_container = Some(container("edge-proxy"));
    failure.upstream_container = Some(container("web-1"));
    app.on_event(failure);
    for (text, rows, recent) in [("web-1", 1, 1), ("EDGE", 1, 1), ("db-2", 0, 0)] {
        app.filter = text.into();
        let visible: Vec<_> = app.visible_rows().iter().map(|r| &r.id.upstream).collect();
        assert_eq!(visible.len(), rows, "{text}: {visible:?}");
        if rows == 1 {
            assert_eq!(visible[0], "10.0.0.5:8000", "{text}");
        }
        // The failure without containers (from busy_app) is not among them.
        assert_eq!(app.visible_recent().count(), recent, "{text}");
    }
}
