//! The proxy's own limits, for real: out of local ports toward an upstream (a narrow
//! `ip_local_port_range` in its own namespace) and out of file descriptors (a low
//! RLIMIT_NOFILE). What the real `tracer events --json` reports.

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    time::Duration,
};

use tracer_tests::{
    assert_failures, kernel_tests_enabled, netns::Netns, process::test_bin, tracer_process::Tracer,
};

const WAIT: Duration = Duration::from_secs(10);
const SETTLE: Duration = Duration::from_millis(500);

#[test]
fn proxy_out_of_local_ports_is_no_ephemeral_port() {
    if !kernel_tests_enabled("proxy_out_of_local_ports_is_no_ephemeral_port") {
        return;
    }
    let ns = Netns::new("ports");
    // Two local ports in all: two connections use them up.
    ns.sysctl("net.ipv4.ip_local_port_range", "40000 40001");
    let upstream: SocketAddr = "127.77.60.1:8060".parse().unwrap();
    let tracer = Tracer::events(&["--upstream", "127.77.60.1:8060"]);
    let n = 5;
    ns.run(|| {
        let listener = TcpListener::bind(upstream).expect("bind");
        let held: Vec<TcpStream> = (0..2)
            .map(|_| TcpStream::connect(upstream).expect("a port is left"))
            .collect();
        for _ in 0..n {
            let error = TcpStream::connect(upstream).expect_err("no port left");
            assert_eq!(error.kind(), ErrorKind::AddrNotAvailable, "{error}");
        }
        drop(held);
        drop(listener);
    });
    let events = tracer.collect(n, WAIT, SETTLE);
    for event in assert_failures(&events, "127.77.60.1:8060", "no_ephemeral_port", n) {
        assert_eq!(event["errno_name"], "EADDRNOTAVAIL", "{event}");
    }
    tracer.stop();
}

#[test]
fn proxy_out_of_file_descriptors_is_fd_exhausted() {
    if !kernel_tests_enabled("proxy_out_of_file_descriptors_is_fd_exhausted") {
        return;
    }
    out_of_descriptors(None, "socket_call", "socket() failed");
}

#[test]
fn proxy_out_of_file_descriptors_for_its_clients_is_fd_exhausted() {
    if !kernel_tests_enabled("proxy_out_of_file_descriptors_for_its_clients_is_fd_exhausted") {
        return;
    }
    out_of_descriptors(Some("accept"), "accept_call", "accept() failed");
}

/// `fd-hog` out of descriptors, making `mode`'s call fail 7 times: 7 `fd_exhausted` events
/// with no upstream, seen at `source`, explained with `says`.
fn out_of_descriptors(mode: Option<&str>, source: &str, says: &str) {
    let tracer = Tracer::events(&["--comm", "fd-hog"]);
    let n = 7;
    let hog = Command::new(test_bin("fd-hog"))
        .arg(n.to_string())
        .args(mode)
        .stdout(Stdio::piped())
        .spawn()
        .expect("fd-hog");
    let pid = hog.id();
    let out = hog.wait_with_output().expect("fd-hog");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), n.to_string());
    let events = tracer.collect(n, WAIT, SETTLE);
    // The other test's fd-hog may run meanwhile.
    let mine: Vec<_> = events
        .iter()
        .filter(|e| e["type"] == "failure" && e["pid"] == pid)
        .collect();
    assert_eq!(mine.len(), n, "{events:?}");
    for event in mine {
        assert_eq!(event["cause"], "fd_exhausted", "{event}");
        assert_eq!(event["upstream"], "none", "{event}");
        assert_eq!(event["errno_name"], "EMFILE", "{event}");
        assert_eq!(event["seen_at"], source, "{event}");
        assert!(
            event["explanation"]
                .as_str()
                .is_some_and(|e| e.contains(says) && e.contains("out of file descriptors")),
            "{event}"
        );
    }
    tracer.stop();
}
