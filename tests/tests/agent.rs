//! The tracer binary as an operator meets it: `tracer check`, Ctrl-C and SIGTERM leaving no
//! programs behind, clear errors for bad input, and a program run that cannot finish counted.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use tracer_tests::{
    bpf::{program_loaded, programs_held_by},
    kernel_tests_enabled,
    tracer_process::{Tracer, tracer_bin},
};
use tracer_user::capture::{PEEK_PROBES, PROBES_IN_USE, REQUEST_PROBES};

/// The line of `tracer check`'s output about the probe on `tracepoint` (`category:name`).
#[track_caller]
fn probe_line<'a>(stdout: &'a str, tracepoint: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.contains(&format!("probe {tracepoint} ")))
        .unwrap_or_else(|| panic!("no line for {tracepoint}:\n{stdout}"))
}

#[test]
fn check_lists_every_probe_as_attached() {
    if !kernel_tests_enabled("check_lists_every_probe_as_attached") {
        return;
    }
    let out = Command::new(tracer_bin())
        .arg("check")
        .output()
        .expect("tracer check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tracer check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut standby = Vec::new();
    for probe in &tracer_user::capture::PROBES {
        let line = probe_line(&stdout, &probe.tracepoint());
        assert!(line.starts_with("ok"), "{line}");
        if line.contains("standby") {
            standby.push(probe.program);
        } else {
            assert!(line.contains("attached"), "{line}");
        }
    }
    // Of the two probes that see requests, this kernel uses one.
    assert_eq!(standby.len(), 1, "{stdout}");
    assert!(REQUEST_PROBES.contains(&standby[0]), "{stdout}");
    assert!(
        stdout.contains(&format!("{PROBES_IN_USE}/{PROBES_IN_USE} attached")),
        "{stdout}"
    );
}

#[test]
fn check_on_the_path_of_kernels_before_6_16_infers_requests_at_tcp_probe() {
    if !kernel_tests_enabled(
        "check_on_the_path_of_kernels_before_6_16_infers_requests_at_tcp_probe",
    ) {
        return;
    }
    // What every kernel before 6.16 does (it has no tcp_sendmsg_locked), forced here.
    let out = Command::new(tracer_bin())
        .args(["check", "--skip-probe", "tcp_sendmsg_locked"])
        .output()
        .expect("tracer check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let tcp_probe = probe_line(&stdout, "raw:tcp_probe");
    assert!(tcp_probe.starts_with("ok"), "{stdout}");
    assert!(tcp_probe.contains("attached"), "{stdout}");
    let sendmsg = probe_line(&stdout, "raw:tcp_sendmsg_locked");
    assert!(
        sendmsg.contains("standby") && sendmsg.contains("inferred at raw:tcp_probe"),
        "{sendmsg}"
    );
    assert!(
        stdout.contains(&format!("{PROBES_IN_USE}/{PROBES_IN_USE} attached")),
        "{stdout}"
    );
}

fn stops_and_leaves_nothing_loaded(signal: i32) {
    let tracer = Tracer::events(&[]);
    let pid = tracer.pid();
    let held = programs_held_by(pid);
    assert!(
        held.len() >= 6,
        "tracer should hold its 6 programs, holds {held:?}"
    );
    for id in &held {
        assert!(
            program_loaded(*id),
            "program {id} should be loaded while tracer runs"
        );
    }
    let stderr = tracer.stop_with(signal);
    assert!(stderr.contains("probes detached"), "{stderr}");
    // The kernel frees programs shortly after their last reference goes.
    let deadline = Instant::now() + Duration::from_secs(5);
    while held.iter().any(|id| program_loaded(*id)) {
        assert!(
            Instant::now() < deadline,
            "programs still loaded after exit: {held:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn ctrl_c_leaves_no_program_loaded() {
    if !kernel_tests_enabled("ctrl_c_leaves_no_program_loaded") {
        return;
    }
    stops_and_leaves_nothing_loaded(libc::SIGINT);
}

#[test]
fn sigterm_leaves_no_program_loaded() {
    if !kernel_tests_enabled("sigterm_leaves_no_program_loaded") {
        return;
    }
    stops_and_leaves_nothing_loaded(libc::SIGTERM);
}

/// `tracer COMMAND` as nobody with no capabilities, as an ordinary user would run it.
fn as_nobody(command: &str) -> std::process::Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(tracer_bin())
        .arg(command)
        .output()
        .expect("setpriv (util-linux)")
}

#[test]
fn without_privileges_tracer_says_what_to_do() {
    if !kernel_tests_enabled("without_privileges_tracer_says_what_to_do") {
        return;
    }
    let out = as_nobody("events");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not privileged enough"), "{stderr}");
    assert!(stderr.contains("run tracer as root"), "{stderr}");
    // `tracer check` as nobody: a tracefs that is mounted (root only) is not "not mounted".
    let tracefs_mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .any(|l| {
            l.split(" - ")
                .nth(1)
                .is_some_and(|r| r.starts_with("tracefs "))
        });
    let out = as_nobody("check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("tracefs"))
        .unwrap_or_else(|| panic!("no tracefs line:\n{stdout}"));
    if tracefs_mounted {
        assert!(!line.contains("not mounted"), "{line}");
    }
}

#[test]
fn a_bad_flag_is_a_clear_error() {
    let out = Command::new(tracer_bin())
        .args(["events", "--upstream", "nonsense"])
        .output()
        .expect("tracer");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`nonsense` is not an upstream"), "{stderr}");
    let out = Command::new(tracer_bin())
        .args(["events", "--min-wait", "soon"])
        .output()
        .expect("tracer");
    assert_eq!(out.status.code(), Some(2));
    for (probe, says) in [
        ("inet_sock_set_state", "is required"),
        ("tcp_nonsense", "these can be skipped: tcp_receive_reset"),
    ] {
        let out = Command::new(tracer_bin())
            .args(["run", "--skip-probe", probe])
            .output()
            .expect("tracer");
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{stderr}");
    }
    // Periods of zero (they panicked once they were used), and half a bracketed address.
    for args in [
        &["run", "--summary-every", "0s"][..],
        &["top", "--interval", "0s"],
        &["events", "--upstream", "[::1"],
    ] {
        let out = Command::new(tracer_bin())
            .args(args)
            .output()
            .expect("tracer");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("invalid value"), "{args:?}: {stderr}");
    }
}

#[test]
fn a_skipped_probe_is_reported_and_its_pair_skipped_too() {
    if !kernel_tests_enabled("a_skipped_probe_is_reported_and_its_pair_skipped_too") {
        return;
    }
    let out = Command::new(tracer_bin())
        .args(["check", "--skip-probe", "syscalls:sys_exit_connect"])
        .output()
        .expect("tracer");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    // The read and write probes go too: connect() starts their watch.
    for probe in ["sys_enter_connect", "sys_exit_connect"]
        .iter()
        .chain(&PEEK_PROBES)
    {
        let line = probe_line(&stdout, &format!("syscalls:{probe}"));
        assert!(
            line.starts_with("warn") && line.contains("skipped (--skip-probe)"),
            "{line}"
        );
    }
    let left = PROBES_IN_USE - 2 - PEEK_PROBES.len();
    assert!(
        stdout.contains(&format!("{left}/{PROBES_IN_USE} attached")),
        "{stdout}"
    );
}

#[test]
fn ctrl_c_as_soon_as_tracer_says_it_is_attached_stops_it_cleanly() {
    if !kernel_tests_enabled("ctrl_c_as_soon_as_tracer_says_it_is_attached_stops_it_cleanly") {
        return;
    }
    for _ in 0..3 {
        // stop() sends SIGINT at once and asserts a clean exit (not death by the signal).
        Tracer::start(&["run", "--listen", "127.0.0.1:0"]).stop();
    }
}

#[test]
fn a_program_run_that_cannot_finish_is_counted_per_program() {
    if !kernel_tests_enabled("a_program_run_that_cannot_finish_is_counted_per_program") {
        return;
    }
    let (tracer, addr) = Tracer::agent(&[]);
    let series = "tracer_program_errors_total{program=\"sys_exit_connect\"} ";
    let errors = || {
        let (_, scrape) = tracer_tests::http::get(addr, "/metrics").expect("a scrape");
        scrape
            .lines()
            .find_map(|l| l.strip_prefix(series)?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{scrape}"))
    };
    let before = errors();
    // connect() with an address nobody may read (EFAULT): the kernel's exit program cannot read
    // the caller's sockaddr, so its run stops there. Nothing else in these tests does that.
    let n = 3;
    for _ in 0..n {
        // SAFETY: a socket of our own; connect() is given a null address, which the kernel
        // rejects with EFAULT without reading through it in user space.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let ret = libc::connect(fd, std::ptr::null(), 16);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            assert_eq!(ret, -1);
            assert_eq!(err.raw_os_error(), Some(libc::EFAULT), "{err}");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = errors() - before;
        if seen == n as f64 {
            break;
        }
        assert!(seen < n as f64, "over-counted: {seen}");
        assert!(Instant::now() < deadline, "saw {seen} errors, expected {n}");
        std::thread::sleep(Duration::from_millis(100));
    }
    tracer.stop();
}
