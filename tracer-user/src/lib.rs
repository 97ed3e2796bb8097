//! tracer: why a reverse proxy answers 502, per upstream, from inside the kernel.
//!
//! The data path, one folder per stage:
//! kernel capture ([`capture`]) → [`decode`] → [`classify`] → [`aggregate`] → [`export`]
//! (events now; metrics and the live view build on the same stages). [`agent`] runs the loop and
//! [`cli`] is the `tracer` command.

pub mod agent;
pub mod aggregate;
pub mod capture;
pub mod classify;
pub mod cli;
pub mod decode;
pub mod export;

/// For unit tests that need the machine (root, the kernel's BTF, a cgroup2 mount): says why a
/// test does not run. With CI=true a test must run: it fails instead.
#[cfg(test)]
pub(crate) fn skip(why: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(!ci, "CI=true: this test must run, but {why}");
    eprintln!("skipped: {why}");
}
