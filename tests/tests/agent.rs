//! The tracer binary as an operator meets it: `tracer check`, Ctrl-C and SIGTERM leaving no
//! programs behind, and clear errors for bad input.

use std::{
    collections::BTreeSet,
    process::Command,
    time::{Duration, Instant},
};

use tracer_tests::{
    kernel_tests_enabled,
    tracer_process::{Tracer, tracer_bin},
};

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
    for probe in &tracer_user::capture::PROBES {
        let probe = probe.tracepoint();
        let line = stdout
            .lines()
            .find(|l| l.contains(&format!("probe {probe} ")))
            .unwrap_or_else(|| panic!("no line for {probe}:\n{stdout}"));
        assert!(
            line.starts_with("ok") && line.contains("attached"),
            "{line}"
        );
    }
    let all = tracer_user::capture::PROBES.len();
    assert!(
        stdout.contains(&format!("{all}/{all} attached")),
        "{stdout}"
    );
}

/// The ids of the BPF programs process `pid` holds (from its file descriptors' fdinfo).
fn programs_held_by(pid: u32) -> BTreeSet<u32> {
    let mut ids = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return ids;
    };
    for entry in entries.filter_map(Result::ok) {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        if let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix("prog_id:"))
            .and_then(|v| v.trim().parse().ok())
        {
            ids.insert(id);
        }
    }
    ids
}

/// Whether the kernel still has program `id` loaded.
fn program_loaded(id: u32) -> bool {
    let out = Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .expect("bpftool (cargo xtask setup installs it)");
    out.status.success()
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

#[test]
fn without_privileges_tracer_says_what_to_do() {
    if !kernel_tests_enabled("without_privileges_tracer_says_what_to_do") {
        return;
    }
    // Drop to nobody with no capabilities, as an ordinary user would run it.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(tracer_bin())
        .arg("events")
        .output()
        .expect("setpriv (util-linux)");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not privileged enough"), "{stderr}");
    assert!(stderr.contains("run tracer as root"), "{stderr}");
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
}
