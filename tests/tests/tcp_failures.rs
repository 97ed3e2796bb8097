//! Every TCP failure cause, produced for real in a private network namespace with plain sockets,
//! and what the real `tracer events --json` reports about it: exactly one failure per failed
//! attempt, with the right cause, upstream and process, and nothing for healthy traffic.
//!
//! Each test uses its own namespace and its own upstream address (127.77.<n>.1 and the like), and
//! its own tracer filtered to that upstream, so the tests can run side by side.

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use tracer_tests::{
    assert_failures,
    client::{
        Polling, attempts_on_one_socket, connect_polled, connect_with_syn_count,
        connect_with_timeout, exchange, refuse, request, request_with_timeout,
    },
    kernel_tests_enabled,
    netns::Netns,
    tracer_process::Tracer,
    upstream::{Behaviour, PARTIAL, Upstream},
};

const N: usize = 20;
const WAIT: Duration = Duration::from_secs(10);
const SETTLE: Duration = Duration::from_millis(500);

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// Runs `n` copies of `f` at once inside `ns`.
fn in_parallel(ns: &Netns, n: usize, f: impl Fn() + Sync) {
    ns.run(|| {
        std::thread::scope(|scope| {
            for _ in 0..n {
                scope.spawn(&f);
            }
        })
    });
}

#[test]
fn proxy_is_refused_when_nothing_listens_on_the_upstream() {
    if !kernel_tests_enabled("proxy_is_refused_when_nothing_listens_on_the_upstream") {
        return;
    }
    let ns = Netns::new("refused");
    let upstream = addr("127.77.1.1:8001");
    let tracer = Tracer::events(&["--upstream", "127.77.1.1:8001"]);
    refuse(&ns, upstream, N);
    let events = tracer.collect(N, WAIT, SETTLE);
    for event in assert_failures(&events, "127.77.1.1:8001", "refused", N) {
        assert_eq!(event["errno_name"], "ECONNREFUSED");
        assert_eq!(event["reset_received"], true);
        assert_eq!(event["ended_by"], "upstream_reset");
        let local = event["local"].as_str().expect("local address");
        assert!(
            local.starts_with("127.0.0.1:") && !local.ends_with(":0"),
            "{local}"
        );
    }
    tracer.stop();
}

#[test]
fn proxy_is_refused_by_an_ipv6_upstream() {
    if !kernel_tests_enabled("proxy_is_refused_by_an_ipv6_upstream") {
        return;
    }
    let ns = Netns::new("refused6");
    ns.ip(&["addr", "add", "fd00:77::1/128", "dev", "lo", "nodad"]);
    let upstream = addr("[fd00:77::1]:8001");
    let tracer = Tracer::events(&["--upstream", "[fd00:77::1]:8001"]);
    refuse(&ns, upstream, N);
    let events = tracer.collect(N, WAIT, SETTLE);
    assert_failures(&events, "[fd00:77::1]:8001", "refused", N);
    tracer.stop();
}

#[test]
fn each_refused_attempt_is_one_failure_however_the_proxy_learns_of_it() {
    if !kernel_tests_enabled("each_refused_attempt_is_one_failure_however_the_proxy_learns_of_it") {
        return;
    }
    let ns = Netns::new("polling");
    // One closed port and one listening port per way of polling, so that each way's count is
    // its own. The listener shows that a successful poll reports nothing either.
    let ways: Vec<(Polling, SocketAddr, SocketAddr)> = Polling::ALL
        .iter()
        .enumerate()
        .map(|(i, how)| {
            let port = 8030 + 2 * i as u16;
            (
                *how,
                addr(&format!("127.77.3.1:{port}")),
                addr(&format!("127.77.3.1:{}", port + 1)),
            )
        })
        .collect();
    let listeners: Vec<Upstream> = ways
        .iter()
        .map(|(_, _, open)| {
            Upstream::start(
                &ns,
                *open,
                Behaviour::Answer {
                    idle_close: Duration::from_millis(100),
                },
            )
        })
        .collect();
    let tracer = Tracer::events(&["--upstream", "127.77.3.1"]);
    ns.run(|| {
        for (how, closed, open) in &ways {
            for _ in 0..N {
                let error = connect_polled(*closed, *how).expect_err("nothing listens");
                assert_eq!(error.raw_os_error(), Some(libc::ECONNREFUSED), "{how:?}");
                let stream = connect_polled(*open, *how).expect("it listens");
                drop(stream);
            }
        }
        // Attempts one after the other on one socket, each learnt by connect() again: after
        // its error is collected, the next connect() is an attempt of its own.
        let errors = attempts_on_one_socket(addr("127.77.3.1:8029"), 3).expect("attempts");
        assert_eq!(errors, vec![libc::ECONNREFUSED; 3]);
    });
    let want = N * ways.len() + 3;
    let events = tracer.collect(want, WAIT, SETTLE);
    for (how, closed, open) in &ways {
        for event in assert_failures(&events, &closed.to_string(), "refused", N) {
            assert_eq!(event["seen_at"], "socket_closed", "{how:?}: {event}");
            assert_eq!(event["ended_by"], "upstream_reset", "{how:?}: {event}");
        }
        assert_failures(&events, &open.to_string(), "", 0);
    }
    assert_failures(&events, "127.77.3.1:8029", "refused", 3);
    assert_eq!(events.len(), want, "{events:?}");
    drop(listeners);
    tracer.stop();
}

#[test]
fn proxy_gives_up_connecting_when_a_firewall_drops_syns() {
    if !kernel_tests_enabled("proxy_gives_up_connecting_when_a_firewall_drops_syns") {
        return;
    }
    let ns = Netns::new("syndrop");
    ns.firewall("tcp dport 8002 drop");
    let upstream = addr("127.77.2.1:8002");
    let tracer = Tracer::events(&["--upstream", "127.77.2.1:8002"]);
    let attempts = 5;
    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    in_parallel(&ns, attempts, || {
        let pending = connect_with_timeout(upstream, timeout).expect("connect");
        assert!(pending, "the SYN should have gone unanswered");
    });
    let waited_at_most = started.elapsed();
    let events = tracer.collect(attempts, WAIT, SETTLE);
    for event in assert_failures(&events, "127.77.2.1:8002", "connect_timeout", attempts) {
        assert_eq!(
            event["errno"], 0,
            "the proxy gave up, not the kernel: {event}"
        );
        assert_eq!(event["ended_by"], "proxy_close");
        assert_waited(event, timeout, waited_at_most);
    }
    tracer.stop();
}

#[test]
fn kernel_gives_up_on_syns_nobody_answers() {
    if !kernel_tests_enabled("kernel_gives_up_on_syns_nobody_answers") {
        return;
    }
    let ns = Netns::new("syntimeout");
    ns.firewall("tcp dport 8003 drop");
    let upstream = addr("127.77.3.1:8003");
    let tracer = Tracer::events(&["--upstream", "127.77.3.1:8003"]);
    let attempts = 3;
    in_parallel(&ns, attempts, || {
        // One retransmit: the kernel gives up after about 1 s + 2 s.
        let error = connect_with_syn_count(upstream, 1).expect_err("no SYN-ACK ever comes");
        assert_eq!(error.raw_os_error(), Some(libc::ETIMEDOUT));
    });
    let events = tracer.collect(attempts, WAIT, SETTLE);
    for event in assert_failures(&events, "127.77.3.1:8003", "connect_timeout", attempts) {
        assert_eq!(event["errno_name"], "ETIMEDOUT");
        // The kernel may retransmit once more than TCP_SYNCNT asks before its give-up time.
        assert!(event["syn_retransmits"].as_u64() >= Some(1), "{event}");
        assert_eq!(event["ended_by"], "kernel_error");
    }
    tracer.stop();
}

#[test]
fn upstream_without_a_route_is_unreachable() {
    if !kernel_tests_enabled("upstream_without_a_route_is_unreachable") {
        return;
    }
    let ns = Netns::new("noroute");
    // An explicit unreachable route (EHOSTUNREACH), and a network with no route at all
    // (ENETUNREACH). Both fail inside connect(), before any SYN.
    ns.ip(&["route", "add", "unreachable", "10.250.4.0/24"]);
    let host = addr("10.250.4.1:8004");
    let net = addr("10.251.4.1:8004");
    let tracer = Tracer::events(&["--upstream", ":8004"]);
    ns.run(|| {
        for _ in 0..N / 2 {
            let error = TcpStream::connect(host).expect_err("no route");
            assert_eq!(error.raw_os_error(), Some(libc::EHOSTUNREACH));
            let error = TcpStream::connect(net).expect_err("no route");
            assert_eq!(error.raw_os_error(), Some(libc::ENETUNREACH));
        }
    });
    let events = tracer.collect(N, WAIT, SETTLE);
    for event in assert_failures(&events, "10.250.4.1:8004", "unreachable", N / 2) {
        assert_eq!(event["errno_name"], "EHOSTUNREACH");
        assert_eq!(event["seen_at"], "connect_call");
    }
    for event in assert_failures(&events, "10.251.4.1:8004", "unreachable", N / 2) {
        assert_eq!(event["errno_name"], "ENETUNREACH");
    }
    tracer.stop();
}

#[test]
fn icmp_host_unreachable_from_the_network_is_unreachable() {
    if !kernel_tests_enabled("icmp_host_unreachable_from_the_network_is_unreachable") {
        return;
    }
    let ns = Netns::new("icmpunreach");
    ns.firewall("tcp dport 8005 reject with icmp type host-unreachable");
    let upstream = addr("127.77.5.1:8005");
    let tracer = Tracer::events(&["--upstream", "127.77.5.1:8005"]);
    let attempts = 5;
    in_parallel(&ns, attempts, || {
        let error = TcpStream::connect(upstream).expect_err("ICMP host unreachable");
        assert_eq!(error.raw_os_error(), Some(libc::EHOSTUNREACH));
    });
    let events = tracer.collect(attempts, WAIT, SETTLE);
    for event in assert_failures(&events, "127.77.5.1:8005", "unreachable", attempts) {
        assert_eq!(event["errno_name"], "EHOSTUNREACH");
        assert_eq!(
            event["seen_at"], "socket_closed",
            "the ICMP error ended the socket"
        );
    }
    tracer.stop();
}

#[test]
fn upstream_resetting_before_answering_is_reset_before_response() {
    if !kernel_tests_enabled("upstream_resetting_before_answering_is_reset_before_response") {
        return;
    }
    let ns = Netns::new("rstbefore");
    let upstream = Upstream::start(&ns, addr("127.77.6.1:8006"), Behaviour::ResetBeforeAnswer);
    let tracer = Tracer::events(&["--upstream", "127.77.6.1:8006"]);
    ns.run(|| {
        for _ in 0..N {
            let error = request(upstream.addr).expect_err("reset");
            assert_eq!(error.kind(), ErrorKind::ConnectionReset);
        }
    });
    let events = tracer.collect(N, WAIT, SETTLE);
    for event in assert_failures(&events, "127.77.6.1:8006", "reset_before_response", N) {
        assert_eq!(event["requests"], 1);
        assert_eq!(event["bytes_received"], 0);
        assert_eq!(event["errno_name"], "ECONNRESET");
        assert!(
            event["connect_ms"].as_f64().is_some(),
            "it was connected: {event}"
        );
    }
    tracer.stop();
}

#[test]
fn upstream_resetting_mid_response_is_reset_mid_response() {
    if !kernel_tests_enabled("upstream_resetting_mid_response_is_reset_mid_response") {
        return;
    }
    let ns = Netns::new("rstmid");
    let upstream = Upstream::start(&ns, addr("127.77.7.1:8007"), Behaviour::PartialThenReset);
    let tracer = Tracer::events(&["--upstream", "127.77.7.1:8007"]);
    ns.run(|| {
        for _ in 0..N {
            let error = request(upstream.addr).expect_err("reset mid-response");
            assert_eq!(error.kind(), ErrorKind::ConnectionReset);
        }
    });
    let events = tracer.collect(N, WAIT, SETTLE);
    for event in assert_failures(&events, "127.77.7.1:8007", "reset_mid_response", N) {
        assert_eq!(event["bytes_received"], PARTIAL.len());
    }
    tracer.stop();
}

#[test]
fn upstream_closing_without_answering_is_closed_before_response() {
    if !kernel_tests_enabled("upstream_closing_without_answering_is_closed_before_response") {
        return;
    }
    let ns = Netns::new("finbefore");
    let upstream = Upstream::start(&ns, addr("127.77.8.1:8008"), Behaviour::CloseAfterRequest);
    let tracer = Tracer::events(&["--upstream", "127.77.8.1:8008"]);
    ns.run(|| {
        for _ in 0..N {
            let error = request(upstream.addr).expect_err("closed without an answer");
            assert_eq!(error.kind(), ErrorKind::UnexpectedEof);
        }
    });
    let events = tracer.collect(N, WAIT, SETTLE);
    for event in assert_failures(&events, "127.77.8.1:8008", "closed_before_response", N) {
        assert_eq!(event["ended_by"], "upstream_fin");
        assert_eq!(event["bytes_received"], 0);
    }
    tracer.stop();
}

#[test]
fn proxy_giving_up_on_a_silent_upstream_is_response_timeout() {
    if !kernel_tests_enabled("proxy_giving_up_on_a_silent_upstream_is_response_timeout") {
        return;
    }
    let ns = Netns::new("readtimeout");
    let upstream = Upstream::start(&ns, addr("127.77.9.1:8009"), Behaviour::NeverAnswer);
    let tracer = Tracer::events(&["--upstream", "127.77.9.1:8009"]);
    let attempts = 5;
    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    in_parallel(&ns, attempts, || {
        let gave_up = request_with_timeout(upstream.addr, timeout).expect("request");
        assert!(gave_up, "the upstream should not have answered");
    });
    let waited_at_most = started.elapsed();
    let events = tracer.collect(attempts, WAIT, SETTLE);
    for event in assert_failures(&events, "127.77.9.1:8009", "response_timeout", attempts) {
        assert_eq!(event["ended_by"], "proxy_close");
        assert_waited(event, timeout, waited_at_most);
    }
    tracer.stop();
}

#[test]
fn healthy_upstream_with_keep_alive_and_idle_closes_has_no_failures() {
    if !kernel_tests_enabled("healthy_upstream_with_keep_alive_and_idle_closes_has_no_failures") {
        return;
    }
    let ns = Netns::new("healthy");
    let upstream = Upstream::start(
        &ns,
        addr("127.77.10.1:8010"),
        Behaviour::Answer {
            idle_close: Duration::from_millis(100),
        },
    );
    let tracer = Tracer::events(&["--upstream", "127.77.10.1"]);
    in_parallel(&ns, N / 2, || {
        // Keep-alive: five requests on one connection, then the upstream closes it when idle.
        let mut stream = TcpStream::connect(upstream.addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        for _ in 0..5 {
            exchange(&mut stream).expect("answered");
        }
        std::thread::sleep(Duration::from_millis(300));
        drop(stream);
        // One request per connection, closed by the proxy at once.
        request(upstream.addr).expect("answered");
    });
    // A real failure last, from the same tracer: it sees the traffic, and says nothing of the
    // healthy part (a tracer that reported nothing would fail here).
    refuse(&ns, addr("127.77.10.1:8019"), 1);
    let events = tracer.collect(1, WAIT, SETTLE);
    assert_failures(&events, "127.77.10.1:8019", "refused", 1);
    assert_failures(&events, "127.77.10.1:8010", "none", 0);
    // Accepting connections (the kernel clones the listener, LISTEN→SYN_RECV) is not the
    // listener going away.
    assert!(
        events.iter().all(|e| e["type"] != "listener_gone"),
        "{events:?}"
    );
    tracer.stop();
}

#[test]
fn proxy_hanging_up_at_once_is_not_a_failure() {
    if !kernel_tests_enabled("proxy_hanging_up_at_once_is_not_a_failure") {
        return;
    }
    // A proxy whose client went away closes its upstream connection at once: nginx logs no
    // upstream error for that, and neither does tracer (it counts it as abandoned).
    let ns = Netns::new("hangup");
    ns.firewall("tcp dport 8011 drop");
    let silent = Upstream::start(&ns, addr("127.77.11.1:8012"), Behaviour::NeverAnswer);
    let tracer = Tracer::events(&["--upstream", "127.77.11.1"]);
    ns.run(|| {
        for _ in 0..5 {
            connect_with_timeout(addr("127.77.11.1:8011"), Duration::from_millis(5))
                .expect("connect");
            request_with_timeout(silent.addr, Duration::from_millis(5)).expect("request");
        }
    });
    // A real failure last, from the same tracer: the only event (a tracer that reported
    // nothing would fail here).
    refuse(&ns, addr("127.77.11.1:8019"), 1);
    let events = tracer.collect(1, WAIT, SETTLE);
    assert_failures(&events, "127.77.11.1:8019", "refused", 1);
    assert_eq!(events.len(), 1, "no other failures expected: {events:?}");
    tracer.stop();
}

/// A namespace with IPv6 address `ip` on its loopback.
fn ns_with_v6(tag: &str, ip: &str) -> Netns {
    let ns = Netns::new(tag);
    ns.ip(&["addr", "add", &format!("{ip}/128"), "dev", "lo", "nodad"]);
    ns
}

#[test]
fn ipv6_upstream_resetting_before_answering_is_reset_before_response() {
    if !kernel_tests_enabled("ipv6_upstream_resetting_before_answering_is_reset_before_response") {
        return;
    }
    let ns = ns_with_v6("rst6", "fd00:77::6");
    let upstream = Upstream::start(&ns, addr("[fd00:77::6]:8006"), Behaviour::ResetBeforeAnswer);
    let tracer = Tracer::events(&["--upstream", "[fd00:77::6]:8006"]);
    ns.run(|| {
        for _ in 0..N {
            let error = request(upstream.addr).expect_err("reset");
            assert_eq!(error.kind(), ErrorKind::ConnectionReset);
        }
    });
    let events = tracer.collect(N, WAIT, SETTLE);
    for event in assert_failures(&events, "[fd00:77::6]:8006", "reset_before_response", N) {
        assert_eq!(event["requests"], 1);
        assert!(
            event["local"]
                .as_str()
                .is_some_and(|l| l.starts_with("[fd00:77::6]:")),
            "{event}"
        );
    }
    tracer.stop();
}

#[test]
fn ipv6_upstream_behind_a_firewall_is_connect_timeout() {
    if !kernel_tests_enabled("ipv6_upstream_behind_a_firewall_is_connect_timeout") {
        return;
    }
    let ns = ns_with_v6("syndrop6", "fd00:77::2");
    ns.firewall("tcp dport 8002 drop");
    let upstream = addr("[fd00:77::2]:8002");
    let tracer = Tracer::events(&["--upstream", "[fd00:77::2]:8002"]);
    let attempts = 5;
    in_parallel(&ns, attempts, || {
        let pending = connect_with_timeout(upstream, Duration::from_millis(300)).expect("connect");
        assert!(pending, "the SYN should have gone unanswered");
    });
    let events = tracer.collect(attempts, WAIT, SETTLE);
    assert_failures(&events, "[fd00:77::2]:8002", "connect_timeout", attempts);
    tracer.stop();
}

#[test]
fn ipv6_upstream_that_never_answers_is_response_timeout() {
    if !kernel_tests_enabled("ipv6_upstream_that_never_answers_is_response_timeout") {
        return;
    }
    let ns = ns_with_v6("readtimeout6", "fd00:77::9");
    let upstream = Upstream::start(&ns, addr("[fd00:77::9]:8009"), Behaviour::NeverAnswer);
    let tracer = Tracer::events(&["--upstream", "[fd00:77::9]:8009"]);
    let attempts = 5;
    in_parallel(&ns, attempts, || {
        let gave_up =
            request_with_timeout(upstream.addr, Duration::from_millis(300)).expect("request");
        assert!(gave_up, "the upstream should not have answered");
    });
    let events = tracer.collect(attempts, WAIT, SETTLE);
    assert_failures(&events, "[fd00:77::9]:8009", "response_timeout", attempts);
    tracer.stop();
}

#[test]
fn v4_mapped_upstream_from_an_ipv6_socket_is_refused_and_shown_as_ipv6() {
    if !kernel_tests_enabled("v4_mapped_upstream_from_an_ipv6_socket_is_refused_and_shown_as_ipv6")
    {
        return;
    }
    let ns = Netns::new("mapped");
    // A dual-stack proxy (Envoy, a JVM) reaching an IPv4 upstream through an IPv6 socket.
    let upstream = addr("[::ffff:127.77.20.1]:8020");
    let tracer = Tracer::events(&["--upstream", "[::ffff:127.77.20.1]:8020"]);
    refuse(&ns, upstream, N);
    let events = tracer.collect(N, WAIT, SETTLE);
    assert_failures(&events, "[::ffff:127.77.20.1]:8020", "refused", N);
    tracer.stop();
}

/// An attempt's `waited_ms` lies between the client's own timeout (less a little for the two
/// clocks) and the time all the attempts took together, however slow the machine.
fn assert_waited(event: &serde_json::Value, timeout: Duration, at_most: Duration) {
    let waited = event["waited_ms"].as_f64().expect("waited_ms");
    let low = timeout.as_secs_f64() * 1000.0 - 10.0;
    let high = at_most.as_secs_f64() * 1000.0 + 10.0;
    assert!(
        (low..=high).contains(&waited),
        "waited {waited} ms, not within {low:.0}..{high:.0} ms"
    );
}
