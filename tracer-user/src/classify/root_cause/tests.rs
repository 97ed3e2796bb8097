//! The registry's root causes, from lifecycle events and failures made up in the test.

use std::time::Duration;

use super::{queues::QUEUES_FRESH, *};
use crate::capture::procfs::AcceptQueues;
use crate::decode::Evidence;

pub(super) const NS: u32 = 4026531840;
const OTHER_NS: u32 = 4026532999;

pub(super) fn at(s: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_763_769_600 + s)
}

pub(super) fn process(comm: &str, pid: u32, netns: u32) -> Task {
    Task {
        comm: comm.into(),
        pid,
        tid: pid,
        cgroup_id: 1,
        netns,
    }
}

pub(super) fn change(
    opened: bool,
    t: u64,
    local: &str,
    task: Task,
    dying: Option<Ending>,
) -> Lifecycle {
    Lifecycle::Listener(ListenerChange {
        opened,
        time: at(t),
        local: local.parse().unwrap(),
        task,
        dying,
        max_backlog: 1,
    })
}

pub(super) fn failure(t: u64, upstream: &str, cause: Outcome) -> Failure {
    Failure {
        time: at(t),
        proxy: process("nginx", 812, NS),
        upstream: upstream.parse().unwrap(),
        local: None,
        cause,
        evidence: Evidence {
            errno: 111,
            waited: Duration::ZERO,
            ..crate::classify::tests::evidence()
        },
    }
}

fn gunicorn() -> Task {
    process("gunicorn", 1234, NS)
}

#[test]
fn refusals_after_an_oom_kill_name_the_victim_and_count() {
    let mut registry = Listeners::new(at(0));
    registry.on_lifecycle(&change(true, 1, "127.0.0.1:8000", gunicorn(), None));
    registry.on_lifecycle(&Lifecycle::Oom(OomKill {
        time: at(183),
        pid: 1234,
        comm: "gunicorn".into(),
        anon_rss_kb: 1_992_294,
        total_vm_kb: 0,
    }));
    let gone = registry.on_lifecycle(&change(
        false,
        183,
        "127.0.0.1:8000",
        gunicorn(),
        Some(Ending::Signal(9)),
    ));
    let Some(Notice::ListenerGone {
        death: Some(Death::OomKilled { .. }),
        ..
    }) = gone
    else {
        panic!("{gone:?}");
    };
    registry.root_cause(&failure(184, "127.0.0.1:8000", Outcome::Refused));
    let f = failure(185, "127.0.0.1:8000", Outcome::Refused);
    let cause = registry.root_cause(&f).unwrap();
    assert_eq!(cause.name(), "upstream_oom_killed");
    assert_eq!(
        cause.explain(&f),
        "gunicorn (pid 1234, listening on 127.0.0.1:8000) was OOM-killed at 00:03:03 \
         (anon-rss 1.9 GiB); since then 2 connections from nginx to 127.0.0.1:8000 were refused"
    );
}

#[test]
fn connect_timeouts_toward_a_listener_with_a_full_queue_are_backlog_overflow() {
    use std::sync::{Arc, Mutex};
    // What /proc says, step by step: a queue holding more than the backlog (1), then an
    // empty one.
    let reads = Arc::new(Mutex::new(vec![(3u32, 17u64), (0, 17)]));
    let source = reads.clone();
    let mut registry = Listeners::with_queue_reader(
        at(0),
        Box::new(move |netns| {
            assert_eq!(netns, NS);
            let (queued, overflows) = source.lock().unwrap().remove(0);
            Some(AcceptQueues {
                queued: [("0.0.0.0:8000".parse().unwrap(), queued)].into(),
                backlogs: HashMap::new(),
                overflows,
            })
        }),
    );
    registry.on_lifecycle(&change(true, 1, "0.0.0.0:8000", gunicorn(), None));
    let f = failure(5, "127.0.0.1:8000", Outcome::ConnectTimeout);
    let cause = registry.root_cause(&f).expect("a full queue");
    assert_eq!(cause.name(), "backlog_overflow");
    assert_eq!(cause.process(), Some(&gunicorn()));
    assert!(
        cause.explain(&f).contains("3 wait in its accept queue"),
        "{}",
        cause.explain(&f)
    );
    // Within a second the same reading answers; a timeout elsewhere has no such cause.
    assert!(registry.root_cause(&f).is_some());
    assert_eq!(
        registry.root_cause(&failure(5, "127.0.0.1:9999", Outcome::ConnectTimeout)),
        None
    );
    assert_eq!(reads.lock().unwrap().len(), 1, "read once in that second");
    // A second later: an empty queue, no root cause.
    registry.queues.get_mut(&NS).unwrap().at -= QUEUES_FRESH;
    assert_eq!(registry.root_cause(&f), None);
}

#[test]
fn for_a_listener_older_than_tracer_a_queue_and_rising_overflows_tell() {
    use std::sync::{Arc, Mutex};
    // Backlog not known: a non-empty queue counts while the overflow count goes up, and
    // after that as long as it does not shrink.
    let reads = Arc::new(Mutex::new(vec![
        (1u32, 5u64),
        (1, 5),
        (0, 5),
        (1, 5),
        (1, 9),
    ]));
    let source = reads.clone();
    let mut registry = Listeners::with_queue_reader(
        at(0),
        Box::new(move |_| {
            let (queued, overflows) = source.lock().unwrap().remove(0);
            Some(AcceptQueues {
                queued: [("127.0.0.1:8000".parse().unwrap(), queued)].into(),
                backlogs: HashMap::new(),
                overflows,
            })
        }),
    );
    registry.seed([ExistingListenerInfo {
        local: "127.0.0.1:8000".parse().unwrap(),
        netns: NS,
        owner: gunicorn(),
    }]);
    let f = failure(5, "127.0.0.1:8000", Outcome::ConnectTimeout);
    let next = |r: &mut Listeners| {
        if let Some(read) = r.queues.get_mut(&NS) {
            read.at -= QUEUES_FRESH;
        }
        r.root_cause(&f).map(|c| c.name())
    };
    assert_eq!(
        next(&mut registry),
        Some("backlog_overflow"),
        "overflows so far"
    );
    let full = Some("backlog_overflow");
    assert_eq!(next(&mut registry), full, "still as full");
    assert_eq!(next(&mut registry), None, "drained");
    assert_eq!(next(&mut registry), None, "queued again, no new overflow");
    assert_eq!(next(&mut registry), full, "new overflows");
}

#[test]
fn a_backlog_from_the_socket_diagnostics_decides_for_a_listener_older_than_tracer() {
    // Another listener of the namespace overflows all along; this one is busy, not full.
    let mut queued = vec![2u32, 129];
    let mut overflows = 10u64;
    let mut registry = Listeners::with_queue_reader(
        at(0),
        Box::new(move |_| {
            overflows += 5;
            let addr: SocketAddr = "127.0.0.1:8000".parse().unwrap();
            Some(AcceptQueues {
                queued: [(addr, queued.remove(0))].into(),
                backlogs: [(addr, 128)].into(),
                overflows,
            })
        }),
    );
    registry.seed([ExistingListenerInfo {
        local: "127.0.0.1:8000".parse().unwrap(),
        netns: NS,
        owner: gunicorn(),
    }]);
    let f = failure(5, "127.0.0.1:8000", Outcome::ConnectTimeout);
    assert_eq!(registry.root_cause(&f), None, "2 of 128: busy, not full");
    registry.queues.get_mut(&NS).unwrap().at -= QUEUES_FRESH;
    assert_eq!(
        registry.root_cause(&f).map(|c| c.name()),
        Some("backlog_overflow"),
        "129 of 128"
    );
}

#[test]
fn crashes_and_exits_are_told_apart_by_signal() {
    let mut registry = Listeners::new(at(0));
    for (port, ending) in [
        (8001, Ending::Signal(11)),
        (8002, Ending::Signal(9)),
        (8003, Ending::Signal(15)),
        (8004, Ending::Exited(3)),
    ] {
        let addr = format!("0.0.0.0:{port}");
        let owner = process("app", port as u32, NS);
        registry.on_lifecycle(&change(true, 1, &addr, owner.clone(), None));
        registry.on_lifecycle(&change(false, 10, &addr, owner, Some(ending)));
    }
    let name = |r: &mut Listeners, port| {
        r.root_cause(&failure(11, &format!("10.0.0.5:{port}"), Outcome::Refused))
            .map(|c| c.name())
    };
    assert_eq!(name(&mut registry, 8001), Some("upstream_crashed"));
    assert_eq!(
        name(&mut registry, 8002),
        Some("upstream_crashed"),
        "SIGKILL without OOM"
    );
    assert_eq!(
        name(&mut registry, 8003),
        Some("upstream_exited"),
        "SIGTERM is a stop"
    );
    assert_eq!(name(&mut registry, 8004), Some("upstream_exited"));
    let f = failure(11, "127.0.0.1:8001", Outcome::Refused);
    let text = registry.root_cause(&f).unwrap().explain(&f);
    assert!(text.contains("crashed at 00:00:10 (SIGSEGV)"), "{text}");
}

#[test]
fn a_listener_closed_by_a_living_process_is_restarting_and_its_return_measures_the_gap() {
    let mut registry = Listeners::new(at(0));
    registry.on_lifecycle(&change(true, 1, "127.0.0.1:8000", gunicorn(), None));
    registry.on_lifecycle(&change(false, 10, "127.0.0.1:8000", gunicorn(), None));
    let cause = registry
        .root_cause(&failure(11, "127.0.0.1:8000", Outcome::Refused))
        .unwrap();
    assert_eq!(cause.name(), "upstream_restarting");
    let back = registry.on_lifecycle(&change(
        true,
        12,
        "127.0.0.1:8000",
        process("gunicorn", 1300, NS),
        None,
    ));
    let Some(Notice::ListenerBack {
        gap,
        failed_meanwhile,
        ..
    }) = back.clone()
    else {
        panic!("{back:?}");
    };
    assert_eq!(gap, Duration::from_secs(2));
    assert_eq!(failed_meanwhile, 1);
    assert!(
        back.unwrap()
            .explain()
            .contains("after a gap of 2.00 s; 1 connection(s)")
    );
    assert_eq!(
        registry.root_cause(&failure(13, "127.0.0.1:8000", Outcome::Refused)),
        None
    );
}

#[test]
fn a_process_that_closed_its_listener_then_exited_died() {
    let mut registry = Listeners::new(at(0));
    registry.on_lifecycle(&change(true, 1, "127.0.0.1:8000", gunicorn(), None));
    registry.on_lifecycle(&change(false, 10, "127.0.0.1:8000", gunicorn(), None));
    registry.on_lifecycle(&Lifecycle::Exit(ProcessExit {
        time: at(11),
        process: gunicorn(),
        ending: Ending::Exited(0),
    }));
    let cause = registry
        .root_cause(&failure(12, "127.0.0.1:8000", Outcome::Refused))
        .unwrap();
    assert_eq!(cause.name(), "upstream_exited");
}

#[test]
fn resets_right_after_a_death_are_put_down_to_it() {
    let mut registry = Listeners::new(at(0));
    registry.on_lifecycle(&change(true, 1, "127.0.0.1:8000", gunicorn(), None));
    registry.on_lifecycle(&change(
        false,
        10,
        "127.0.0.1:8000",
        gunicorn(),
        Some(Ending::Signal(9)),
    ));
    let f = failure(10, "127.0.0.1:8000", Outcome::ResetBeforeResponse);
    let cause = registry.root_cause(&f).unwrap();
    assert_eq!(cause.name(), "upstream_crashed");
    assert!(
        cause
            .explain(&f)
            .ends_with("since then 1 connection from nginx to 127.0.0.1:8000 was reset")
    );
    assert_eq!(
        registry.root_cause(&failure(30, "127.0.0.1:8000", Outcome::ResetBeforeResponse)),
        None,
        "too late"
    );
}

#[test]
fn refusals_with_no_death_are_explained_too() {
    let mut registry = Listeners::new(at(0));
    registry.seed([ExistingListenerInfo {
        local: "127.0.0.1:8000".parse().unwrap(),
        netns: NS,
        owner: gunicorn(),
    }]);
    registry.on_lifecycle(&change(
        true,
        1,
        "0.0.0.0:9000",
        process("api", 2000, OTHER_NS),
        None,
    ));
    registry.on_lifecycle(&change(
        true,
        1,
        "10.0.0.7:7000",
        process("db", 3000, NS),
        None,
    ));

    let f = failure(5, "10.0.0.5:8000", Outcome::Refused);
    let cause = registry.root_cause(&f).unwrap();
    assert_eq!(cause.name(), "listener_wrong_address");
    assert!(
        cause
            .explain(&f)
            .contains("bound to 127.0.0.1 but nginx connects to 10.0.0.5"),
        "{}",
        cause.explain(&f)
    );

    let f = failure(5, "127.0.0.1:9000", Outcome::Refused);
    let cause = registry.root_cause(&f).unwrap();
    assert_eq!(cause.name(), "listener_other_netns");
    assert!(
        cause
            .explain(&f)
            .contains("only in another network namespace"),
        "{}",
        cause.explain(&f)
    );

    let f = failure(5, "10.0.0.7:7001", Outcome::Refused);
    let cause = registry.root_cause(&f).unwrap();
    assert_eq!(cause.name(), "nothing_listened");
    assert!(
        cause
            .explain(&f)
            .starts_with("nothing has listened on 10.0.0.7:7001 since tracer started")
    );

    // A host tracer knows nothing of: no guess.
    assert_eq!(
        registry.root_cause(&failure(5, "192.0.2.9:80", Outcome::Refused)),
        None
    );
    // Refused while something listens: no guess either.
    assert_eq!(
        registry.root_cause(&failure(5, "127.0.0.1:8000", Outcome::Refused)),
        None
    );
    // Other causes have no root cause here.
    assert_eq!(
        registry.root_cause(&failure(5, "10.0.0.7:7001", Outcome::ConnectTimeout)),
        None
    );
}

#[test]
fn wildcard_and_dual_stack_listeners_cover_their_addresses() {
    assert!(covers(
        "0.0.0.0".parse().unwrap(),
        "10.0.0.5".parse().unwrap()
    ));
    assert!(covers("::".parse().unwrap(), "10.0.0.5".parse().unwrap()));
    assert!(covers(
        "::".parse().unwrap(),
        "2001:db8::1".parse().unwrap()
    ));
    assert!(!covers(
        "0.0.0.0".parse().unwrap(),
        "2001:db8::1".parse().unwrap()
    ));
    assert!(covers(
        "::ffff:10.0.0.5".parse().unwrap(),
        "10.0.0.5".parse().unwrap()
    ));
    assert!(!covers(
        "127.0.0.1".parse().unwrap(),
        "10.0.0.5".parse().unwrap()
    ));
}
