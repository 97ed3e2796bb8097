//! podman for the tests: the image that `cargo xtask dist` builds (tests/tests/dist.rs), and
//! Podman's Docker-compatible API service naming containers (tests/tests/containers.rs).
//!
//! Always with runc as the runtime: podman's own choice, crun, refuses hosts whose cgroups are
//! in hybrid mode (v1 controllers beside a v2 hierarchy, as on CI's machines).

use std::process::{Command, Output};

/// `podman --runtime runc ARGS`.
pub fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(["--runtime", "runc"])
        .args(args)
        .output()
        .expect("running podman (cargo xtask setup installs it)")
}

/// A command's stdout then stderr.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `podman ARGS`, which must succeed; its stdout.
#[track_caller]
pub fn podman_ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(
        out.status.success(),
        "podman {} failed: {}",
        args.join(" "),
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A process's effective capabilities.
pub fn effective_caps(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    u64::from_str_radix(hex, 16).unwrap()
}

/// Resource limits: a pod's container gets its runtime's own, which no pod field sets. podman
/// instead gives containers 1,048,576 descriptors and 4,194,304 processes, limits only
/// CAP_SYS_RESOURCE may raise to; without it (CI's sandbox) it fails to start any container.
/// So where this process lacks that capability it asks for this process's descriptor limit (at
/// most the systemd unit's 65,536) and 4,096 processes, both far more than tracer or nginx use.
pub fn runtime_limits() -> Vec<String> {
    const CAP_SYS_RESOURCE: u32 = 24;
    if effective_caps(std::process::id()) & (1 << CAP_SYS_RESOURCE) != 0 {
        return Vec::new();
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    let files = limit.rlim_max.min(65_536);
    vec![
        format!("--ulimit=nofile={files}:{files}"),
        "--ulimit=nproc=4096:4096".into(),
    ]
}

/// Removes the container of this name when dropped, however the test ends.
pub struct Container(pub String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "--force", "--time", "5", &self.0]);
    }
}
