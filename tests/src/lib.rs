//! Helpers for tracer's end-to-end tests: private network namespaces ([`netns`]), upstreams
//! that fail on purpose ([`upstream`]), what a proxy does ([`client`]), the real tracer
//! binary ([`tracer_process`]) and the nginx fault lab ([`lab`]).

pub mod bench;
pub mod bpf;
pub mod client;
pub mod docker;
pub mod http;
pub mod lab;
pub mod netns;
pub mod podman;
pub mod privileges;
pub mod process;
pub mod tracer_process;
pub mod upstream;

use serde_json::Value;

/// Whether kernel tests can run: they need root. Without it they are skipped with a printed
/// reason, except under `CI=true`, where skipping is an error.
pub fn kernel_tests_enabled(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(!ci, "{test}: kernel tests must run as root when CI=true");
    eprintln!("skipped {test}: kernel tests need root (sudo -E cargo xtask test)");
    false
}

/// Waits until `done`, checking every 100 ms; fails the test after `within`.
#[track_caller]
pub fn wait_until(within: std::time::Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "waited {within:?} for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The value of the sample `series` (name and labels as printed) in a Prometheus scrape.
pub fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// This process's name, as tracer reports the proxy.
pub fn own_comm() -> String {
    std::fs::read_to_string("/proc/self/comm")
        .expect("reading /proc/self/comm")
        .trim()
        .to_string()
}

/// Asserts that `events` are exactly `n` failures toward `upstream` with `cause`, all made by
/// this process, and returns them.
#[track_caller]
pub fn assert_failures<'a>(
    events: &'a [Value],
    upstream: &str,
    cause: &str,
    n: usize,
) -> Vec<&'a Value> {
    let mine: Vec<&Value> = events
        .iter()
        .filter(|e| e["upstream"] == upstream)
        .collect();
    let summary: Vec<String> = mine
        .iter()
        .map(|e| format!("{} {}", e["cause"], e["explanation"]))
        .collect();
    assert_eq!(
        mine.len(),
        n,
        "expected {n} failures toward {upstream}, got {}:\n{}",
        mine.len(),
        summary.join("\n")
    );
    let comm = own_comm();
    for event in &mine {
        assert_eq!(event["cause"], cause, "{event}");
        assert_eq!(event["pid"], std::process::id(), "{event}");
        assert_eq!(event["comm"], comm.as_str(), "{event}");
    }
    mine
}
