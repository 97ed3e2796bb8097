//! Root causes on the real kernel: an upstream process OOM-killed in a memory-limited cgroup,
//! crashed with SIGSEGV, killed with SIGKILL, restarting after 2 s; and refusals with no death
//! behind them (wrong interface, wrong port, another network namespace). tracer must name the
//! process and what happened to it on the refusals that follow. Behind the worker: a pre-fork
//! server's worker killed while the client waits (its master still listening), a request no
//! worker accepted, and one a worker accepted and never answered.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use serde_json::Value;
use tracer_tests::{
    client::{refuse, request_with_timeout},
    kernel_tests_enabled,
    netns::Netns,
    process::{MemoryCgroup, UpstreamProcess},
    tracer_process::Tracer,
};
use tracer_user::classify::root_cause::QUEUES_FRESH;

const WAIT: Duration = Duration::from_secs(10);
const SETTLE: Duration = Duration::from_millis(500);
/// How upstream-process shows in the kernel (comm is 15 bytes at most).
const COMM: &str = "upstream-proces";

fn failures<'a>(events: &'a [Value], upstream: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["type"] == "failure" && e["upstream"] == upstream)
        .collect()
}

fn notices<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

/// `n` refusals toward `upstream`, each with `root_cause` naming process `pid`.
#[track_caller]
fn assert_root_cause(events: &[Value], upstream: &str, root_cause: &str, pid: u32, n: usize) {
    let refused = failures(events, upstream);
    assert_eq!(refused.len(), n, "{events:#?}");
    for (i, event) in refused.iter().enumerate() {
        assert_eq!(event["cause"], "refused", "{event}");
        assert_eq!(event["root_cause"], root_cause, "{event}");
        assert_eq!(event["root_cause_pid"], pid, "{event}");
        assert_eq!(event["root_cause_comm"], COMM, "{event}");
        let detail = event["root_cause_detail"].as_str().unwrap();
        let count = if i == 0 {
            "1 connection".to_string()
        } else {
            format!("{} connections", i + 1)
        };
        assert!(
            detail.contains(&format!("since then {count} from")),
            "{detail}"
        );
        assert!(
            detail.contains(&format!("(pid {pid}, listening on {upstream})")),
            "{detail}"
        );
    }
}

#[test]
fn oom_killed_upstream_is_the_root_cause_of_the_refusals() {
    if !kernel_tests_enabled("oom_killed_upstream_is_the_root_cause_of_the_refusals") {
        return;
    }
    let ns = Netns::new("oom");
    let addr: SocketAddr = "127.77.60.1:8060".parse().unwrap();
    let tracer = Tracer::events(&["--upstream", "127.77.60.1:8060"]);
    let cgroup = MemoryCgroup::new("oom", 64 << 20);
    let mut upstream =
        UpstreamProcess::start_with(&ns, "127.77.60.1:8060", "oom", 300, |pid| cgroup.add(pid));
    let pid = upstream.pid();
    let status = upstream.wait();
    use std::os::unix::process::ExitStatusExt as _;
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the kernel OOM-killed it: {status:?}"
    );
    refuse(&ns, addr, 3);
    let events = tracer.collect(4, WAIT, SETTLE);
    let gone = notices(&events, "listener_gone");
    assert_eq!(gone.len(), 1, "{events:#?}");
    assert_eq!(gone[0]["reason"], "oom_killed");
    assert_eq!(gone[0]["pid"], pid);
    // The victim's memory is evidence only where oom:mark_victim has it (Linux 6.0+).
    let rss_known = oom_tracepoint_has_rss();
    let gone_text = gone[0]["explanation"].as_str().unwrap();
    assert!(gone_text.contains("was OOM-killed"), "{gone_text}");
    assert_eq!(gone_text.contains("anon-rss"), rss_known, "{gone_text}");
    assert_root_cause(&events, "127.77.60.1:8060", "upstream_oom_killed", pid, 3);
    let detail = failures(&events, "127.77.60.1:8060")[0]["root_cause_detail"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(detail.contains("was OOM-killed at"), "{detail}");
    assert_eq!(detail.contains("anon-rss"), rss_known, "{detail}");
    tracer.stop();
}

/// Whether this kernel's `oom:mark_victim` records the victim's memory (`anon_rss`).
fn oom_tracepoint_has_rss() -> bool {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .find_map(|dir| {
            std::fs::read_to_string(format!("{dir}/events/oom/mark_victim/format")).ok()
        })
        .expect("tracer mounts tracefs; the mark_victim format is readable")
        .contains("anon_rss")
}

#[test]
fn upstream_crashing_with_sigsegv_is_the_root_cause() {
    if !kernel_tests_enabled("upstream_crashing_with_sigsegv_is_the_root_cause") {
        return;
    }
    let ns = Netns::new("segv");
    let addr: SocketAddr = "127.77.61.1:8061".parse().unwrap();
    let tracer = Tracer::events(&["--upstream", "127.77.61.1:8061"]);
    let mut upstream = UpstreamProcess::start(&ns, "127.77.61.1:8061", "segv", 200);
    let pid = upstream.pid();
    upstream.wait();
    refuse(&ns, addr, 2);
    let events = tracer.collect(3, WAIT, SETTLE);
    assert_eq!(notices(&events, "listener_gone")[0]["reason"], "crashed");
    assert_root_cause(&events, "127.77.61.1:8061", "upstream_crashed", pid, 2);
    let detail = failures(&events, "127.77.61.1:8061")[0]["root_cause_detail"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(detail.contains("(SIGSEGV)"), "{detail}");
    tracer.stop();
}

#[test]
fn upstream_killed_with_sigkill_is_the_root_cause() {
    if !kernel_tests_enabled("upstream_killed_with_sigkill_is_the_root_cause") {
        return;
    }
    let ns = Netns::new("kill");
    let addr: SocketAddr = "127.77.62.1:8062".parse().unwrap();
    let tracer = Tracer::events(&["--upstream", "127.77.62.1:8062"]);
    let mut upstream = UpstreamProcess::start(&ns, "127.77.62.1:8062", "", 0);
    let pid = upstream.pid();
    // SAFETY: killing our own child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    upstream.wait();
    refuse(&ns, addr, 2);
    let events = tracer.collect(3, WAIT, SETTLE);
    assert_root_cause(&events, "127.77.62.1:8062", "upstream_crashed", pid, 2);
    let detail = failures(&events, "127.77.62.1:8062")[0]["root_cause_detail"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(detail.contains("(SIGKILL)"), "{detail}");
    tracer.stop();
}

#[test]
fn upstream_restarting_after_two_seconds_has_its_gap_measured() {
    if !kernel_tests_enabled("upstream_restarting_after_two_seconds_has_its_gap_measured") {
        return;
    }
    let ns = Netns::new("restart");
    let addr: SocketAddr = "127.77.63.1:8063".parse().unwrap();
    let tracer = Tracer::events(&["--upstream", "127.77.63.1:8063"]);
    let first_started = Instant::now();
    let mut first = UpstreamProcess::start(&ns, "127.77.63.1:8063", "exit", 200);
    let pid = first.pid();
    // Reaped: its listener was closed as it exited.
    first.wait();
    let gone_at = Instant::now();
    refuse(&ns, addr, 4);
    // The new instance comes up 2 s after the old one went.
    std::thread::sleep(Duration::from_secs(2).saturating_sub(gone_at.elapsed()));
    let second_called = Instant::now();
    let second = UpstreamProcess::start(&ns, "127.77.63.1:8063", "", 0);
    // The listener closed between the first start and its reaping, and the new one listened
    // while its start ran: the gap lies between these, however slow the machine.
    let shortest = second_called.duration_since(gone_at).as_secs_f64() * 1000.0;
    let longest = first_started.elapsed().as_secs_f64() * 1000.0;
    let events = tracer.collect(6, WAIT, SETTLE);
    assert_root_cause(&events, "127.77.63.1:8063", "upstream_exited", pid, 4);
    let back = notices(&events, "listener_back");
    assert_eq!(back.len(), 1, "{events:#?}");
    assert_eq!(back[0]["pid"], second.pid());
    assert_eq!(back[0]["failed_meanwhile"], 4);
    let gap = back[0]["gap_ms"].as_f64().unwrap();
    assert!(
        (shortest - 10.0..=longest + 10.0).contains(&gap),
        "gap {gap} ms, not within {shortest:.0}..{longest:.0} ms"
    );
    tracer.stop();
}

#[test]
fn upstream_listening_on_the_wrong_interface_is_explained() {
    if !kernel_tests_enabled("upstream_listening_on_the_wrong_interface_is_explained") {
        return;
    }
    let ns = Netns::new("wrongif");
    let tracer = Tracer::events(&["--upstream", ":8064"]);
    // The upstream binds 127.0.0.1, the proxy connects to another address of the host.
    let _listener = ns.run(|| TcpListener::bind("127.0.0.1:8064").unwrap());
    refuse(&ns, "127.77.64.1:8064".parse().unwrap(), 2);
    let events = tracer.collect(2, WAIT, SETTLE);
    let refused = failures(&events, "127.77.64.1:8064");
    assert_eq!(refused.len(), 2, "{events:#?}");
    for event in refused {
        assert_eq!(event["root_cause"], "listener_wrong_address", "{event}");
        let detail = event["root_cause_detail"].as_str().unwrap();
        assert!(
            detail.contains("listens on 127.0.0.1:8064, bound to 127.0.0.1 but"),
            "{detail}"
        );
        assert!(detail.contains("connects to 127.77.64.1"), "{detail}");
    }
    tracer.stop();
}

#[test]
fn upstream_on_a_port_nothing_listens_on_is_explained() {
    if !kernel_tests_enabled("upstream_on_a_port_nothing_listens_on_is_explained") {
        return;
    }
    let ns = Netns::new("wrongport");
    let tracer = Tracer::events(&["--upstream", "127.77.65.1"]);
    let _listener = ns.run(|| TcpListener::bind("127.77.65.1:8065").unwrap());
    refuse(&ns, "127.77.65.1:8066".parse().unwrap(), 2);
    let events = tracer.collect(2, WAIT, SETTLE);
    let refused = failures(&events, "127.77.65.1:8066");
    assert_eq!(refused.len(), 2, "{events:#?}");
    for event in refused {
        assert_eq!(event["root_cause"], "nothing_listened", "{event}");
        let detail = event["root_cause_detail"].as_str().unwrap();
        assert!(
            detail.starts_with("nothing has listened on 127.77.65.1:8066 since tracer started"),
            "{detail}"
        );
    }
    tracer.stop();
}

#[test]
fn upstream_listening_only_in_another_namespace_is_explained() {
    if !kernel_tests_enabled("upstream_listening_only_in_another_namespace_is_explained") {
        return;
    }
    let proxy_host = Netns::new("otherns-a");
    let upstream_host = Netns::new("otherns-b");
    let tracer = Tracer::events(&["--upstream", "127.0.0.1:8067"]);
    let _listener = upstream_host.run(|| TcpListener::bind("127.0.0.1:8067").unwrap());
    refuse(&proxy_host, "127.0.0.1:8067".parse().unwrap(), 2);
    let events = tracer.collect(2, WAIT, SETTLE);
    let refused = failures(&events, "127.0.0.1:8067");
    assert_eq!(refused.len(), 2, "{events:#?}");
    for event in refused {
        assert_eq!(event["root_cause"], "listener_other_netns", "{event}");
        let detail = event["root_cause_detail"].as_str().unwrap();
        assert!(
            detail.contains("listens on 127.0.0.1:8067 only in another network namespace"),
            "{detail}"
        );
    }
    tracer.stop();
}

#[test]
fn listener_with_a_full_accept_queue_is_the_root_cause_of_connect_timeouts() {
    if !kernel_tests_enabled(
        "listener_with_a_full_accept_queue_is_the_root_cause_of_connect_timeouts",
    ) {
        return;
    }
    let ns = Netns::new("backlog");
    let tracer = Tracer::events(&["--upstream", "127.77.66.1:8066"]);
    let addr: SocketAddr = "127.77.66.1:8066".parse().unwrap();
    let busy = tracer_tests::upstream::Upstream::start(
        &ns,
        addr,
        tracer_tests::upstream::Behaviour::NeverAccept,
    );
    // Two connections fill the queue of one; every SYN after them is dropped.
    let attempts = 4;
    let held: Vec<TcpStream> = ns.run(|| {
        let held = (0..2)
            .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("queued"))
            .collect();
        // Two waves, further apart than the agent keeps a reading of the accept queues: the
        // queue is read again for the second.
        for wave in 0..2 {
            if wave > 0 {
                std::thread::sleep(QUEUES_FRESH + Duration::from_millis(200));
            }
            std::thread::scope(|scope| {
                for _ in 0..attempts / 2 {
                    scope.spawn(|| {
                        let pending = tracer_tests::client::connect_with_timeout(
                            addr,
                            Duration::from_millis(300),
                        )
                        .expect("connect");
                        assert!(pending, "the SYN should have been dropped");
                    });
                }
            });
        }
        held
    });
    let events = tracer.collect(attempts, WAIT, SETTLE);
    let timeouts = failures(&events, "127.77.66.1:8066");
    assert_eq!(timeouts.len(), attempts, "{events:#?}");
    let me = std::process::id();
    for event in timeouts {
        assert_eq!(event["cause"], "connect_timeout", "{event}");
        assert_eq!(event["root_cause"], "backlog_overflow", "{event}");
        assert_eq!(event["root_cause_pid"], me, "{event}");
        let detail = event["root_cause_detail"].as_str().unwrap();
        assert!(
            detail.contains("listening on 127.77.66.1:8066) does not accept connections")
                && detail.contains("wait in its accept queue"),
            "{detail}"
        );
    }
    drop(held);
    drop(busy);
    tracer.stop();
}

/// The children of process `pid`, once it has some.
fn children_of(pid: u32) -> Vec<u32> {
    let deadline = Instant::now() + WAIT;
    loop {
        let children = tracer_user::capture::procfs::children(pid);
        if !children.is_empty() || Instant::now() > deadline {
            return children;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_worker_killed_while_the_client_waits_is_named_with_who_killed_it() {
    if !kernel_tests_enabled("a_worker_killed_while_the_client_waits_is_named_with_who_killed_it") {
        return;
    }
    let ns = Netns::new("worker");
    let upstream = "127.77.67.1:8067";
    let tracer = Tracer::events(&["--upstream", upstream]);
    // The master keeps listening while its worker dies: no listener root cause applies.
    let master = UpstreamProcess::start(&ns, upstream, "prefork", 0);
    let workers = children_of(master.pid());
    assert_eq!(workers.len(), 1, "upstream-process prefork has one worker");
    let worker = workers[0];
    let addr: SocketAddr = upstream.parse().unwrap();
    ns.run(|| {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: lab\r\n\r\n")
            .expect("request");
        // The worker reads it; then this test kills the worker, as a person's kill would.
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: plain kill of our grandchild.
        assert_eq!(unsafe { libc::kill(worker as i32, libc::SIGKILL) }, 0);
        let mut answer = [0u8; 64];
        assert_eq!(stream.read(&mut answer).unwrap_or(0), 0, "no answer");
    });
    let events = tracer.collect(1, WAIT, SETTLE);
    let failed = failures(&events, upstream);
    assert_eq!(failed.len(), 1, "{events:#?}");
    let event = failed[0];
    assert_eq!(event["cause"], "closed_before_response", "{event}");
    assert_eq!(event["root_cause"], "worker_killed", "{event}");
    assert_eq!(event["root_cause_pid"], worker, "{event}");
    let detail = event["root_cause_detail"].as_str().unwrap();
    let me = std::process::id();
    assert!(
        detail.contains(&format!(
            "(pid {worker}) that had this connection was sent SIGKILL by"
        )) && detail.contains(&format!("(pid {me})")),
        "{detail}"
    );
    // The sender is not the worker's parent: no "its master".
    assert!(!detail.contains("its master"), "{detail}");
    drop(master);
    tracer.stop();
}

#[test]
fn a_request_no_worker_took_is_told_from_one_a_worker_never_answered() {
    if !kernel_tests_enabled("a_request_no_worker_took_is_told_from_one_a_worker_never_answered") {
        return;
    }
    let ns = Netns::new("waiting");
    let queued = "127.77.68.1:8068";
    let stuck = "127.77.68.2:8068";
    let tracer = Tracer::events(&["--upstream", queued, "--upstream", stuck]);
    let never_accepts = tracer_tests::upstream::Upstream::start(
        &ns,
        queued.parse().unwrap(),
        tracer_tests::upstream::Behaviour::NeverAccept,
    );
    let never_answers = tracer_tests::upstream::Upstream::start(
        &ns,
        stuck.parse().unwrap(),
        tracer_tests::upstream::Behaviour::NeverAnswer,
    );
    let patience = Duration::from_millis(300);
    ns.run(|| {
        for upstream in [never_accepts.addr, never_answers.addr] {
            let gave_up = request_with_timeout(upstream, patience).expect("request");
            assert!(gave_up, "{upstream} should not have answered");
        }
    });
    let events = tracer.collect(2, WAIT, SETTLE);
    let me = std::process::id();
    let waiting = failures(&events, queued);
    assert_eq!(waiting.len(), 1, "{events:#?}");
    let event = waiting[0];
    assert_eq!(event["cause"], "response_timeout", "{event}");
    assert_eq!(event["root_cause"], "never_accepted", "{event}");
    assert_eq!(event["root_cause_pid"], me, "{event}");
    let detail = event["root_cause_detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("listening on {queued}) took this connection"))
            && detail.contains("in the accept queue (1 queued now, backlog 1)"),
        "{detail}"
    );
    let stuck_events = failures(&events, stuck);
    assert_eq!(stuck_events.len(), 1, "{events:#?}");
    let event = stuck_events[0];
    assert_eq!(event["cause"], "response_timeout", "{event}");
    assert_eq!(event["root_cause"], "slow_upstream", "{event}");
    // The process that held the connection: this test's own server thread.
    assert_eq!(event["root_cause_pid"], me, "{event}");
    let detail = event["root_cause_detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("(pid {me}) on {stuck} had accepted this request")),
        "{detail}"
    );
    tracer.stop();
}
