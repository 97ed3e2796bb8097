//! The worker behind a failure, from server ends, signals and OOM kills made up in the test.

use std::time::{Duration, SystemTime};

use tracer_common::Outcome;

use super::{
    Listeners, RootCause,
    tests::{NS, at, change, failure, process},
};
use crate::decode::{
    Ending, Failure, Lifecycle, OomKill, ServerEnd, ServerEndHow, SignalSent, Task,
};

const UPSTREAM: &str = "10.0.0.2:8000";
const PROXY_SIDE: &str = "10.0.0.1:40000";

fn master() -> Task {
    process("gunicorn", 4200, NS)
}

fn worker() -> Task {
    process("gunicorn", 4242, NS)
}

/// A failure at `t` s (plus `ms`) of a request sent `waited` before.
fn failed(t: u64, cause: Outcome, waited: Duration) -> Failure {
    let mut f = failure(t, UPSTREAM, cause);
    f.local = Some(PROXY_SIDE.parse().unwrap());
    f.evidence.waited = waited;
    f
}

fn end(time: SystemTime, how: ServerEndHow, closer: Option<Task>) -> ServerEnd {
    ServerEnd {
        time,
        how,
        local: UPSTREAM.parse().unwrap(),
        remote: PROXY_SIDE.parse().unwrap(),
        closer,
        dying: None,
        signal: None,
        accepted: true,
        inode: 77,
        bytes_received: 120,
        bytes_sent: 0,
    }
}

fn signal(time: SystemTime, signal: i32, sender: &Task, code: i32) -> SignalSent {
    SignalSent {
        time,
        signal,
        code,
        sender_pid: sender.pid,
        sender_comm: sender.comm.clone(),
        target_parent: master().pid,
    }
}

fn registry() -> Listeners {
    let mut registry = Listeners::new(at(0)).with_holder_finder(Box::new(|inode, near| {
        (inode == 77 && near == [4200]).then(|| (4242, "gunicorn".to_string()))
    }));
    registry.on_lifecycle(&change(true, 0, "0.0.0.0:8000", master(), None));
    registry
}

#[test]
fn a_worker_its_master_signalled_is_killed_and_the_master_named() {
    let mut registry = registry();
    // gunicorn's worker catches SIGABRT and closes the connection itself, alive.
    let mut closed = end(at(30), ServerEndHow::Closed, Some(worker()));
    closed.signal = Some(signal(at(30), 6, &master(), 0));
    registry.on_server_end(closed);
    let f = failed(30, Outcome::ClosedBeforeResponse, Duration::from_secs(30));
    let root = registry.root_cause(&f).expect("a root cause");
    assert_eq!(root.name(), "worker_killed");
    assert_eq!(root.process().map(|p| p.pid), Some(4242));
    assert_eq!(
        root.explain(&f),
        "the worker gunicorn (pid 4242) that had this connection was sent SIGABRT by its master \
         gunicorn (pid 4200) 30.00 s into this request (a worker timeout?); nginx saw the \
         connection closed before any response"
    );
    // Taken: a second failure on the same connection gets nothing from it.
    assert_eq!(registry.root_cause(&f), None);
}

#[test]
fn a_signal_from_before_the_request_does_not_count() {
    let mut registry = registry();
    let mut closed = end(at(100), ServerEndHow::Closed, Some(worker()));
    closed.signal = Some(signal(at(10), 15, &master(), 0));
    registry.on_server_end(closed);
    let f = failed(100, Outcome::ClosedBeforeResponse, Duration::from_secs(2));
    // Alive and not signalled during the request: it closed on purpose; nothing to say.
    assert_eq!(registry.root_cause(&f), None);
}

#[test]
fn a_dying_worker_crashed_exited_or_was_oom_killed() {
    let cases: [(Option<Ending>, Option<i32>, bool, &str); 4] = [
        (Some(Ending::Signal(11)), Some(11), false, "worker_crashed"),
        (Some(Ending::Exited(3)), None, false, "worker_exited"),
        (Some(Ending::Signal(9)), Some(9), true, "worker_oom_killed"),
        (Some(Ending::Signal(9)), None, false, "worker_killed"),
    ];
    for (dying, raised, oom, name) in cases {
        let mut registry = registry();
        if oom {
            registry.on_lifecycle(&Lifecycle::Oom(OomKill {
                time: at(5),
                pid: 4242,
                comm: "gunicorn".into(),
                anon_rss_kb: 70_000,
                total_vm_kb: 0,
            }));
        }
        let mut aborted = end(at(5), ServerEndHow::Aborted, Some(worker()));
        aborted.dying = dying;
        // A fault the kernel raised (code > 0), or the OOM killer's SIGKILL.
        aborted.signal = raised.map(|s| signal(at(5), s, &worker(), 1));
        registry.on_server_end(aborted);
        let f = failed(5, Outcome::ResetBeforeResponse, Duration::from_secs(1));
        let root = registry.root_cause(&f).expect("a root cause");
        assert_eq!(root.name(), name, "{dying:?}");
        let text = root.explain(&f);
        assert!(text.contains("the worker gunicorn (pid 4242)"), "{text}");
        assert!(
            text.ends_with("nginx saw the connection reset before any response"),
            "{text}"
        );
    }
}

#[test]
fn a_request_the_proxy_gave_up_on_was_never_accepted_or_slow() {
    let mut registry = registry();
    let mut queued = end(at(60), ServerEndHow::PeerFirst, None);
    queued.accepted = false;
    registry.on_server_end(queued);
    let f = failed(60, Outcome::ResponseTimeout, Duration::from_secs(60));
    let root = registry.root_cause(&f).expect("a root cause");
    assert_eq!(root.name(), "never_accepted");
    let RootCause::NeverAccepted {
        listener, owner, ..
    } = &root
    else {
        panic!("{root:?}");
    };
    assert_eq!(listener.to_string(), "0.0.0.0:8000");
    assert_eq!(owner.as_ref().map(|o| o.pid), Some(4200));
    let text = root.explain(&f);
    assert!(
        text.starts_with(
            "no worker of gunicorn (pid 4200, listening on 0.0.0.0:8000) took this connection: \
             it waited 60.00 s in the accept queue"
        ),
        "{text}"
    );

    // Accepted, by the worker the finder names.
    registry.on_server_end(end(at(61), ServerEndHow::PeerFirst, None));
    let f = failed(61, Outcome::ResponseTimeout, Duration::from_secs(60));
    let root = registry.root_cause(&f).expect("a root cause");
    assert_eq!(root.name(), "slow_upstream");
    assert_eq!(
        root.explain(&f),
        "gunicorn (pid 4242) on 0.0.0.0:8000 had accepted this request and had not answered \
         when nginx gave up after 60.00 s (a slow upstream)"
    );
}

#[test]
fn the_proxy_s_own_end_is_not_taken_for_the_worker_s_close_and_the_other_way() {
    let mut registry = registry();
    // The proxy gave up (CLOSE_WAIT), then the worker closed its side.
    registry.on_server_end(end(at(9), ServerEndHow::PeerFirst, None));
    let mut closed = end(at(9), ServerEndHow::Closed, Some(worker()));
    closed.dying = Some(Ending::Exited(0));
    registry.on_server_end(closed);
    let f = failed(9, Outcome::ResponseTimeout, Duration::from_secs(1));
    assert_eq!(
        registry.root_cause(&f).map(|r| r.name()),
        Some("slow_upstream")
    );
    // A refusal has no server end.
    registry.on_server_end(end(at(9), ServerEndHow::PeerFirst, None));
    let mut refused = failed(9, Outcome::Refused, Duration::ZERO);
    refused.upstream = "10.0.0.2:8001".parse().unwrap();
    assert_eq!(registry.root_cause(&refused).map(|r| r.name()), None);
}

#[test]
fn a_stale_end_of_an_earlier_connection_is_not_used() {
    let mut registry = registry();
    let mut killed = end(at(0), ServerEndHow::Aborted, Some(worker()));
    killed.dying = Some(Ending::Signal(11));
    registry.on_server_end(killed);
    // The same two addresses, a minute later.
    let f = failed(60, Outcome::ResetBeforeResponse, Duration::from_secs(1));
    assert_eq!(registry.root_cause(&f), None);
}

#[test]
fn waiting_ends_are_bounded() {
    let mut registry = registry();
    for port in 0..super::workers::WAITING_MAX as u16 + 10 {
        let mut e = end(at(1), ServerEndHow::Closed, Some(worker()));
        e.remote = std::net::SocketAddr::new(e.remote.ip(), 10_000 + port);
        registry.on_server_end(e);
    }
    assert!(registry.server_ends.len() <= super::workers::WAITING_MAX);
}

#[test]
fn a_full_unix_listener_names_its_process_queue_and_backlog() {
    use crate::capture::sock_diag::UnixListener;
    let reads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = reads.clone();
    let queues = super::unix_queues::UnixQueues::with(
        Box::new(move |pid| {
            assert_eq!(pid, 812, "read in the proxy's namespace");
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Some(vec![
                UnixListener {
                    name: b"/run/other.sock\0".to_vec(),
                    inode: 8,
                    queued: 0,
                    backlog: 128,
                },
                UnixListener {
                    name: b"/run/php/php8.2-fpm.sock\0".to_vec(),
                    inode: 9,
                    queued: 2,
                    backlog: 1,
                },
            ])
        }),
        Box::new(|inode| (inode == 9).then(|| (700, "php-fpm8.2".to_string()))),
    );
    let mut registry = Listeners::new(at(0)).with_unix_queues(queues);
    let f = failure(3, "unix:/run/php/php8.2-fpm.sock", Outcome::UnixBacklogFull);
    let root = registry.root_cause(&f).expect("a root cause");
    assert_eq!(root.name(), "never_accepted");
    assert_eq!(root.process().map(|p| p.pid), Some(700));
    assert_eq!(
        root.explain(&f),
        "every worker of php-fpm8.2 (pid 700, listening on unix:/run/php/php8.2-fpm.sock) is \
         busy: its queue is full (2 queued now, backlog 1), so connect() failed at once (too few \
         workers, or a backlog too short?)"
    );
    // A second failure within the second reads nothing again.
    assert!(registry.root_cause(&f).is_some());
    assert_eq!(reads.load(std::sync::atomic::Ordering::Relaxed), 1);
    // A socket the diagnostics do not list: no root cause.
    let gone = failure(3, "unix:/run/gone.sock", Outcome::UnixBacklogFull);
    assert_eq!(registry.root_cause(&gone), None);
}
