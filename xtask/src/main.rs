//! `cargo xtask`: set-up, build, run and test tracer.
//!
//! - `cargo xtask run [-- ARGS]`: installs what is missing, builds, runs `tracer run ARGS`.
//! - `cargo xtask test`: installs what the tests need, builds, runs every test.
//! - `cargo xtask test --kernel 5.10|6.1|6.12|7.x|all`: the kernel tests inside QEMU guests
//!   booted with Debian's kernels (see `kernels.rs`).
//! - `cargo xtask lab [--proxy P]`: the fault lab, tracer against nginx's, HAProxy's and Apache's
//!   own logs.
//! - `cargo xtask bench [-- --rounds N --seconds S --out FILE]`: overhead against running nothing
//!   and against bpftrace, exactness and footprint (see BENCHMARKS.md).
//! - `cargo xtask dist`: the release artifacts in `target/dist/`: a static binary, an OCI image
//!   and a Debian package (see `dist.rs` and RELEASING.md).
//! - `cargo xtask setup [--test-deps]`, `cargo xtask build [--debug]`.

mod dist;
mod kernels;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "tracer's set-up, build, run and test tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building (and, with --test-deps, testing) needs, if missing.
    Setup {
        #[arg(long)]
        test_deps: bool,
    },
    /// Build tracer (release unless --debug).
    Build {
        #[arg(long)]
        debug: bool,
    },
    /// Set up, build and run the agent on this host: `tracer run ARGS` (`tracer ARGS` when ARGS
    /// starts with another subcommand, e.g. `cargo xtask run -- events --json`).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the fault lab behind nginx, HAProxy and Apache httpd and print, per proxy, tracer's
    /// agreement with the proxy's own logs.
    Lab {
        /// Only behind this proxy: nginx, haproxy or apache (repeatable).
        #[arg(long, value_name = "PROXY")]
        proxy: Vec<String>,
    },
    /// Measure tracer's overhead (against nothing and against bpftrace), exactness and footprint;
    /// prints a Markdown report and fails when a target is missed.
    Bench {
        /// Arguments for the bench: --rounds N, --seconds S, --out FILE.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the agent for a long time under a changing fault mix (not in CI): its memory and
    /// CPU over time, its counts against what happened, programs left behind.
    Soak {
        /// Arguments for the soak: --minutes N (30), --restart-every M (10), --out FILE.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build what a release ships into target/dist/: the static binary `tracer`, the image
    /// (`tracer-image.tar`, from `docker save`) and the Debian package.
    Dist,
    /// Set up, build and run every test (kernel tests need root; with CI=true they must run).
    Test {
        /// Instead, run the kernel tests in QEMU guests booted with Debian's kernels: 5.10, 6.1,
        /// 6.12, 7.x (several separated by commas) or all.
        #[arg(long, value_name = "KERNEL")]
        kernel: Option<String>,
        /// Extra arguments for `cargo test` (e.g. a test name filter); with --kernel, the test
        /// binaries to run (e.g. lab), all when none is named.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

const SUBCOMMANDS: &[&str] = &[
    "run",
    "events",
    "top",
    "check",
    "help",
    "--help",
    "-h",
    "--version",
    "-V",
];

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup { test_deps } => {
            setup::toolchain()?;
            if test_deps {
                setup::packages(setup::TEST_PACKAGES)?;
            }
            Ok(())
        }
        Task::Build { debug } => build(!debug).map(drop),
        Task::Dist => {
            setup::toolchain()?;
            dist::dist(&workspace_root(), dist::Artifacts::All)
        }
        Task::Run { args } => {
            setup::toolchain()?;
            let tracer = build(true)?;
            run_tracer(&tracer, &tracer_args(args))
        }
        Task::Test {
            kernel: Some(which),
            args,
        } => test_kernels(&which, &args),
        Task::Test { kernel: None, args } => test(&args),
        Task::Lab { proxy } => {
            let args: Vec<String> = proxy.iter().map(|p| format!("--proxy={p}")).collect();
            tests_program("the lab", "tracer-lab", &[], &args)
        }
        Task::Soak { args } => tests_program("the soak", "tracer-soak", &[], &args),
        Task::Bench { args } => {
            tests_program("the bench", "tracer-bench", setup::BENCH_PACKAGES, &args)
        }
    }
}

/// `cargo xtask run -- ARGS`: a tracer command, or `tracer run` with ARGS as its flags.
fn tracer_args(mut args: Vec<String>) -> Vec<String> {
    if !args
        .first()
        .is_some_and(|a| SUBCOMMANDS.contains(&a.as_str()))
    {
        args.insert(0, "run".into());
    }
    args
}

fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root: it makes network namespaces and loads eBPF programs");
    }
    Ok(())
}

/// Sets up and runs one of the tests crate's programs (the lab, the bench) against a release
/// tracer, passing its exit code on.
fn tests_program(
    what: &str,
    bin: &str,
    extra_packages: &[(&str, &str)],
    args: &[String],
) -> anyhow::Result<()> {
    require_root(what)?;
    setup::toolchain()?;
    setup::packages(setup::TEST_PACKAGES)?;
    setup::packages(extra_packages)?;
    let tracer = build(true)?;
    // Every program of the tests crate: the lab and the bench run the others
    // (`upstream-process`, `fd-hog`), which `cargo run --bin` alone would not build.
    let built = Command::new("cargo")
        .current_dir(workspace_root())
        .args([
            "build",
            "--quiet",
            "--release",
            "--package",
            "tracer-tests",
            "--bins",
        ])
        .status()
        .context("building the tests crate's programs")?;
    if !built.success() {
        bail!("building the tests crate's programs failed");
    }
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .args([
            "run",
            "--quiet",
            "--release",
            "--package",
            "tracer-tests",
            "--bin",
            bin,
            "--",
        ])
        .args(args)
        .env("TRACER_BIN", &tracer);
    // Ctrl-C reaches the program directly; it cleans up and exits.
    // SAFETY: ignoring SIGINT in this process only.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Builds the tracer binary and returns its path.
fn build(release: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root()).args([
        "build",
        "--package",
        "tracer-user",
        "--bin",
        "tracer",
    ]);
    if release {
        cmd.arg("--release");
    }
    setup::run(&mut cmd).context("building tracer")?;
    let profile = if release { "release" } else { "debug" };
    Ok(workspace_root().join("target").join(profile).join("tracer"))
}

/// Runs tracer in the foreground, as root (through sudo when needed), passing Ctrl-C to it.
fn run_tracer(tracer: &Path, args: &[String]) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut cmd = if root {
        Command::new(tracer)
    } else if setup::has_command("sudo") {
        eprintln!("xtask: tracer needs root; running it through sudo");
        let mut cmd = Command::new("sudo");
        cmd.arg(tracer);
        cmd
    } else {
        bail!(
            "tracer needs root (or CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN) and sudo is missing: run {} {} as root",
            tracer.display(),
            args.join(" ")
        );
    };
    cmd.args(args);
    // Ctrl-C reaches tracer directly (same process group); xtask waits for it to finish.
    // SAFETY: ignoring SIGINT in this process only.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let status = cmd
        .status()
        .with_context(|| format!("running {}", tracer.display()))?;
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

/// Builds the kernel tests and runs them in a guest of each kernel in `which`: all of them, or
/// the test binaries named in `extra` (e.g. `lab`).
fn test_kernels(which: &str, extra: &[String]) -> anyhow::Result<()> {
    if let Some(unknown) = extra
        .iter()
        .find(|name| !kernels::GUEST_TESTS.contains(&name.as_str()))
    {
        bail!(
            "--kernel runs whole test binaries, and `{unknown}` is none of them: name some of {}, or none for all",
            kernels::GUEST_TESTS.join(", ")
        );
    }
    let kernels = kernels::select(which)?;
    require_root("the kernel matrix")?;
    setup::toolchain()?;
    setup::packages(setup::TEST_PACKAGES)?;
    // The release build: under emulation a debug tracer takes many seconds to read the BTF.
    let tracer = build(true)?;
    let names: Vec<&str> = if extra.is_empty() {
        kernels::GUEST_TESTS.to_vec()
    } else {
        extra.iter().map(String::as_str).collect()
    };
    let binaries = test_binaries(&names)?;
    // The static binary of `cargo xtask dist`: each guest also runs its `tracer check`.
    let workspace = workspace_root();
    let static_tracer = dist::static_binary(&workspace, &dist::dist_dir(&workspace))?;
    kernels::run(&workspace, &kernels, &tracer, &static_tracer, &binaries)
}

/// Builds the tests crate's test binaries `names` (and the programs they run) and returns
/// where each one is.
fn test_binaries(names: &[&str]) -> anyhow::Result<std::collections::BTreeMap<String, PathBuf>> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root()).args([
        "test",
        "--no-run",
        "--message-format=json",
        "--package",
        "tracer-tests",
    ]);
    for name in names {
        cmd.args(["--test", name]);
    }
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("building the kernel tests")?;
    if !out.status.success() {
        bail!("building the kernel tests failed");
    }
    let mut binaries = std::collections::BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let target = &message["target"];
        let is_test = target["kind"]
            .as_array()
            .is_some_and(|kinds| kinds.iter().any(|k| k == "test"));
        if let (true, Some(name), Some(exe)) = (
            is_test,
            target["name"].as_str(),
            message["executable"].as_str(),
        ) && names.contains(&name)
        {
            binaries.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    for name in names {
        if !binaries.contains_key(*name) {
            bail!("cargo built no test binary {name}");
        }
    }
    Ok(binaries)
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    setup::toolchain()?;
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        setup::packages(setup::TEST_PACKAGES)?;
    } else if ci {
        bail!("CI=true: the kernel tests must run, and they need root");
    } else {
        eprintln!("xtask: not root: kernel tests will be skipped (each says so)");
    }
    // The release artifacts, which tests/tests/dist.rs installs and runs: all three as root,
    // the binary and the package otherwise (the image needs a docker daemon).
    dist::dist(
        &workspace_root(),
        if root {
            dist::Artifacts::All
        } else {
            dist::Artifacts::BinaryAndPackage
        },
    )?;
    let tracer = build(false)?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .args(["test", "--no-fail-fast"])
        .args(extra)
        .env("TRACER_BIN", &tracer)
        .env("TRACER_DIST", dist::dist_dir(&workspace_root()));
    setup::run(&mut cmd).context("the tests failed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_passes_a_tracer_command_on_and_runs_the_agent_otherwise() {
        let args = |a: &[&str]| tracer_args(a.iter().map(|s| s.to_string()).collect());
        assert_eq!(args(&[]), ["run"]);
        assert_eq!(args(&["--listen", ":9600"]), ["run", "--listen", ":9600"]);
        for command in ["run", "events", "top", "check"] {
            assert_eq!(args(&[command, "--help"]), [command, "--help"]);
        }
    }
}
