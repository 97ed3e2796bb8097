//! `cargo xtask setup`: everything a fresh machine needs to build and test tracer, installed
//! only when missing or broken, so it is cheap to run every time.
//!
//! - the nightly toolchain's `rust-src` (the eBPF crate is built with `-Z build-std=core`);
//! - `bpf-linker`, built from crates.io against nightly's own libLLVM (Debian has no LLVM that
//!   matches nightly's);
//! - the Debian packages the tests drive (`ip`, `nft`, `bpftool`, …), when asked for.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// The bpf-linker release known to work with the pinned aya family.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the tests need, by the command each provides.
pub const TEST_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("bpftool", "bpftool"),
    ("setpriv", "util-linux"),
    ("nginx", "nginx"),
    // The lab's other proxies.
    ("haproxy", "haproxy"),
    ("apache2", "apache2"),
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
    ("tmux", "tmux"),
    // Debian's default PHP's FastCGI server (php8.2-fpm on bookworm): its binary carries the
    // version, hence the pattern.
    ("php-fpm*", "php-fpm"),
    // The lab's Python application server.
    ("gunicorn", "gunicorn"),
    // The runtime that tests/tests/dist.rs runs the image with (podman's default, crun, does
    // not run containers on hosts with hybrid cgroups).
    ("runc", "runc"),
    // Real containers (tests/tests/containers.rs): Debian's docker, whose daemon the tests
    // start themselves, leaving the firewall and IP forwarding alone.
    ("dockerd", "docker.io"),
    // A Kubernetes node's runtime without kubelet (tests/tests/containers.rs): containerd and
    // its `ctr`, started by the test.
    ("ctr", "containerd"),
    // Podman's API service naming containers (tests/tests/containers.rs); the image test
    // (tests/tests/dist.rs) runs with it too.
    ("podman", "podman"),
    // TLS between proxy and upstream (tests/tests/tls.rs): certificates made by the test, and
    // a TLS server that answers plaintext with an alert.
    ("openssl", "openssl"),
    ("gnutls-serv", "gnutls-bin"),
];

/// What the benchmarks add: the load generator and the baseline tracer.
pub const BENCH_PACKAGES: &[(&str, &str)] = &[("wrk", "wrk"), ("bpftrace", "bpftrace")];

pub fn toolchain() -> anyhow::Result<()> {
    nightly_rust_src()?;
    bpf_linker()
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let toolchains = output("rustup", &["toolchain", "list"])?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        println!("xtask: installing the nightly toolchain (needed to build the eBPF programs)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("xtask: adding rust-src to the nightly toolchain");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

/// Where bpf-linker finds nightly's libLLVM: symlinks in a prefix of our own.
fn llvm_prefix() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    cache.join("tracer").join("llvm-prefix")
}

fn bpf_linker() -> anyhow::Result<()> {
    let works = Command::new("bpf-linker")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if works {
        return Ok(());
    }
    let sysroot = output("rustc", &["+nightly", "--print", "sysroot"])?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let libllvm = std::fs::read_dir(&lib)
        .with_context(|| format!("listing {}", lib.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .with_context(|| format!("no libLLVM.so.*-rust-* in {}", lib.display()))?;
    let name = libllvm
        .file_name()
        .and_then(|n| n.to_str())
        .context("libLLVM file name")?
        .to_string();
    // libLLVM.so.22.1-rust-1.97.0-nightly → 22
    let major = name
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .context("LLVM version in the libLLVM file name")?
        .to_string();
    let prefix = llvm_prefix();
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    for link in [prefix_lib.join("libLLVM.so"), prefix_lib.join(&name)] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("linking {} to {}", link.display(), libllvm.display()))?;
    }
    println!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {major} \
         (about 2 minutes, once)"
    );
    run(Command::new("cargo")
        .args([
            "+nightly",
            "install",
            "bpf-linker",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix))
    .context("installing bpf-linker")?;
    Ok(())
}

/// Installs the Debian packages whose commands are missing.
pub fn packages(needed: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut missing: Vec<&str> = needed
        .iter()
        .filter(|(command, _)| !has_command(command))
        .map(|(_, package)| *package)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the tests and benchmarks need these Debian packages: {}; install them (sudo apt-get install -y {}) \
             or run as root",
            missing.join(", "),
            missing.join(" ")
        );
    }
    println!("xtask: installing {}", missing.join(", "));
    // No service starts during the install: the tests start what they use, their way, and
    // some packages' own start would change the host (docker.io's dockerd switches IP
    // forwarding on and rewrites the firewall).
    let _no_starts = NoServiceStarts::new();
    let install = |quiet: bool| {
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive");
        if quiet {
            cmd.stdout(Stdio::null());
        }
        cmd.status().is_ok_and(|s| s.success())
    };
    if install(true) {
        return Ok(());
    }
    // The package lists may be missing or stale on a fresh machine.
    run(Command::new("apt-get").arg("update").stdout(Stdio::null()))?;
    if !install(false) {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

/// `/usr/sbin/policy-rc.d` answering "denied" (101) to every service start by maintainer
/// scripts, for as long as it lives; one already there is left alone.
struct NoServiceStarts(bool);

impl NoServiceStarts {
    const PATH: &str = "/usr/sbin/policy-rc.d";

    fn new() -> NoServiceStarts {
        use std::os::unix::fs::PermissionsExt as _;
        let path = Path::new(Self::PATH);
        if path.exists() {
            return NoServiceStarts(false);
        }
        let written = std::fs::write(
            path,
            "#!/bin/sh\n# cargo xtask: no service starts while it installs packages\nexit 101\n",
        )
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)));
        NoServiceStarts(written.is_ok())
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if self.0 {
            let _ = std::fs::remove_file(Self::PATH);
        }
    }
}

/// Whether `command` is installed; `name*` matches any command whose name starts so.
pub fn has_command(command: &str) -> bool {
    let in_dir = |dir: &Path| match command.strip_suffix('*') {
        Some(prefix) => std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().starts_with(prefix))
        }),
        None => dir.join(command).is_file(),
    };
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| in_dir(&dir)))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|dir| in_dir(Path::new(dir)))
}

pub fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
