//! `cargo xtask test --kernel 5.10|6.1|6.12|7.x|all`: the kernel tests on the kernels that
//! production hosts run, each booted in QEMU with this machine's root file system shared.
//!
//! - Debian's own kernel packages come from the machine's Debian archive, through a temporary
//!   apt configuration under `target/kernels/apt` (the machine's own apt state is not touched),
//!   and are unpacked under `target/kernels/VERSION` (the guests see the host's files, except
//!   `/var/tmp`, `/var/log`, `/var/cache` and `/var/lib/apt`, which are empty there).
//! - virtme-ng (`vng`, from PyPI) boots each kernel under QEMU's TCG emulation (stock kernels do
//!   not boot under KVM on these nested VMs), with `target/kernels/run/KERNEL` writable, where the
//!   guest leaves each test binary's output and exit code.
//! - The guest loads the modules the tests need (veth, nftables) from the unpacked package.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::setup;

/// One kernel of the matrix: a Debian suite and how its kernel packages are named.
pub struct Kernel {
    /// What `--kernel` takes.
    pub name: &'static str,
    suite: &'static str,
    /// The image package's name is `PREFIX<version>SUFFIX`; the newest version is taken.
    image_prefix: &'static str,
    image_suffix: &'static str,
    /// Whether the modules come in a package of their own, `linux-modules-RELEASE` (Debian's
    /// 7.x backports).
    modules_apart: bool,
    /// Whether the kernel may preempt a running program (7.x: lazy preemption, no `none` or
    /// `voluntary` mode left), and then skips that program's next run on the CPU.
    preempts_programs: bool,
}

impl Kernel {
    /// Whether test binary `name` runs in this kernel's guest.
    fn runs(&self, name: &str) -> bool {
        !(self.preempts_programs && CONCURRENT_ATTEMPTS.contains(&name))
    }
}

/// The matrix: Debian 11, 12 and 13's kernels, and the newest from trixie-backports.
pub const MATRIX: [Kernel; 4] = [
    Kernel {
        name: "5.10",
        suite: "bullseye",
        image_prefix: "linux-image-5.10.",
        image_suffix: "-amd64-unsigned",
        modules_apart: false,
        preempts_programs: false,
    },
    Kernel {
        name: "6.1",
        suite: "bookworm",
        image_prefix: "linux-image-6.1.",
        image_suffix: "-amd64-unsigned",
        modules_apart: false,
        preempts_programs: false,
    },
    Kernel {
        name: "6.12",
        suite: "trixie",
        image_prefix: "linux-image-6.12.",
        image_suffix: "+deb13-amd64-unsigned",
        modules_apart: false,
        preempts_programs: false,
    },
    Kernel {
        name: "7.x",
        suite: "trixie-backports",
        image_prefix: "linux-binary-unsigned-7.",
        image_suffix: "+deb13-amd64",
        modules_apart: true,
        preempts_programs: true,
    },
];

/// The test binaries (tests/tests/NAME.rs) that run in every guest: the kernel tests.
pub const GUEST_TESTS: [&str; 9] = [
    "kernel_counts",
    "tcp_failures",
    "unix_sockets",
    "root_cause",
    "proxy_limits",
    "agent",
    "reclaim",
    "lab",
    "tls",
];

/// Test binaries that count exactly what several threads attempt at once, which a kernel that
/// preempts programs cannot give under emulation: a program runs about 100 times longer there,
/// is preempted often, and the kernel then skips the next run of it on that CPU by another
/// thread (`recursion_misses`; in a 7.3.4 guest 377 of 12,000 refusals from four threads went
/// uncounted, 3–15% of the lab's failures, and 1 of root_cause's 4 concurrent connect timeouts).
/// On real hosts tracer reports such skips (`tracer_program_misses_total`); this machine's own
/// 6.18 runs these tests on the same programs.
const CONCURRENT_ATTEMPTS: [&str; 3] = ["tcp_failures", "lab", "root_cause"];

/// Modules the tests need that virtme-ng does not load: veth pairs between namespaces, and
/// nftables rules that drop or reject.
const GUEST_MODULES: &str =
    "veth nf_tables nft_reject_inet nft_reject nf_reject_ipv4 nf_reject_ipv6";

/// A whole guest run may take this long before it is stopped.
const GUEST_TIMEOUT: Duration = Duration::from_secs(25 * 60);

/// What the guests need on the host: QEMU, depmod, a static busybox for virtme-ng's init.
const GUEST_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("depmod", "kmod"),
    ("busybox", "busybox-static"),
    ("pip3", "python3-pip"),
];

/// The kernels `--kernel` names.
pub fn select(which: &str) -> anyhow::Result<Vec<&'static Kernel>> {
    if which == "all" {
        return Ok(MATRIX.iter().collect());
    }
    let mut kernels = Vec::new();
    for name in which.split(',') {
        let kernel = MATRIX.iter().find(|k| k.name == name).with_context(|| {
            let names: Vec<&str> = MATRIX.iter().map(|k| k.name).collect();
            format!(
                "no kernel {name} in the matrix; --kernel takes {} or all",
                names.join(", ")
            )
        })?;
        kernels.push(kernel);
    }
    Ok(kernels)
}

/// A kernel unpacked and ready to boot.
struct Unpacked {
    /// The kernel's release (`uname -r`), e.g. `6.1.0-50-amd64`.
    release: String,
    /// Holds `boot/vmlinuz-RELEASE` and `lib/modules/RELEASE`.
    root: PathBuf,
}

impl Unpacked {
    fn vmlinuz(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }
}

/// What one guest run gave, per test binary.
pub struct GuestResult {
    pub kernel: &'static str,
    pub release: String,
    /// Test binary → (passed, failed, exit code); `None` when the binary left no result.
    pub tests: BTreeMap<String, Option<(u32, u32, i32)>>,
    /// Test binaries this kernel does not run (see `CONCURRENT_ATTEMPTS`).
    pub not_run: Vec<String>,
    pub seconds: u64,
}

impl GuestResult {
    pub fn passed(&self) -> bool {
        self.tests.values().all(|r| matches!(r, Some((_, 0, 0))))
    }
}

/// Fetches, boots and tests every kernel in `kernels`; prints a table and fails when any test
/// failed in any guest. `tracer` and the test binaries are already built.
pub fn run(
    workspace: &Path,
    kernels: &[&'static Kernel],
    tracer: &Path,
    static_tracer: &Path,
    test_binaries: &BTreeMap<String, PathBuf>,
) -> anyhow::Result<()> {
    setup::packages(GUEST_PACKAGES)?;
    let vng = virtme_ng()?;
    let base = workspace.join("target").join("kernels");
    let mut queue = std::collections::VecDeque::new();
    for kernel in kernels {
        let unpacked = fetch(&base, kernel)
            .with_context(|| format!("fetching Debian's {} kernel", kernel.name))?;
        queue.push_back((*kernel, unpacked));
    }
    // Each guest is one emulated CPU, a single host thread: on a host with two CPUs or more, two
    // guests run side by side (the matrix takes half as long; in `kernels`' order, the slowest
    // first). `TRACER_GUEST_LANES=1` runs them one after the other.
    let lanes = guest_lanes().min(queue.len()).max(1);
    let queue = Mutex::new(queue);
    let results = Mutex::new(Vec::new());
    let outcome: anyhow::Result<()> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..lanes)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    loop {
                        let Some((kernel, unpacked)) =
                            queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front()
                        else {
                            return Ok(());
                        };
                        println!(
                            "xtask: booting {} ({}) in QEMU (TCG) to run the kernel tests",
                            kernel.name, unpacked.release
                        );
                        let result = boot_and_test(
                            &base,
                            vng.as_path(),
                            kernel,
                            &unpacked,
                            tracer,
                            static_tracer,
                            test_binaries,
                        )?;
                        println!("{}", table(std::slice::from_ref(&result)));
                        results
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(result);
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("a guest lane panicked"))
    });
    outcome?;
    let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    results.sort_by_key(|r| kernels.iter().position(|k| k.name == r.kernel));
    println!("{}", table(&results));
    let (passed, failed) =
        results
            .iter()
            .flat_map(|r| r.tests.values())
            .fold((0, 0), |(p, f), r| match r {
                Some((pass, fail, _)) => (p + pass, f + fail),
                None => (p, f + 1),
            });
    println!("matrix: {passed} passed, {failed} failed");
    if results.iter().any(|r| !r.passed()) {
        bail!("kernel tests failed on some kernels; see the table above and target/kernels/run/");
    }
    Ok(())
}

/// The per-kernel table, as Markdown.
fn table(results: &[GuestResult]) -> String {
    let mut text = String::from("| kernel | release | test | passed | failed | result |\n");
    text.push_str("|---|---|---|---|---|---|\n");
    for r in results {
        for (test, outcome) in &r.tests {
            let (passed, failed, verdict) = match outcome {
                Some((p, 0, 0)) => (p.to_string(), "0".to_string(), "ok"),
                Some((p, f, _)) => (p.to_string(), f.to_string(), "FAILED"),
                None => ("-".into(), "-".into(), "NO RESULT"),
            };
            let _ = writeln!(
                text,
                "| {} | {} | {test} | {passed} | {failed} | {verdict} |",
                r.kernel, r.release
            );
        }
        for test in &r.not_run {
            let _ = writeln!(
                text,
                "| {} | {} | {test} | - | - | not run: the kernel preempts programs |",
                r.kernel, r.release
            );
        }
        let _ = writeln!(
            text,
            "| {} | {} | (guest run) | | | {} s |",
            r.kernel, r.release, r.seconds
        );
    }
    text
}

/// The `vng` command, installed from PyPI when missing.
fn virtme_ng() -> anyhow::Result<PathBuf> {
    let find = || {
        if let Ok(scripts) = setup::output(
            "python3",
            &[
                "-c",
                "import sysconfig; print(sysconfig.get_path('scripts'))",
            ],
        ) {
            let path = Path::new(scripts.trim()).join("vng");
            if path.is_file() {
                return Some(path);
            }
        }
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("vng"))
                .find(|p| p.is_file())
        })
    };
    if let Some(vng) = find() {
        return Ok(vng);
    }
    println!("xtask: installing virtme-ng from PyPI (boots the test kernels)");
    setup::run(Command::new("python3").args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--break-system-packages",
        "virtme-ng",
    ]))
    .context("installing virtme-ng with pip")?;
    find().context("virtme-ng was installed but its vng command is not found")
}

/// apt-get or apt-cache with a configuration of our own under `dir`: the suites of the matrix
/// from the machine's own Debian archive.
fn apt(dir: &Path, program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.arg(format!(
        "-o=Dir::Etc::SourceList={}",
        dir.join("sources.list").display()
    ))
    .arg("-o=Dir::Etc::SourceParts=/dev/null")
    .arg(format!(
        "-o=Dir::State::Lists={}",
        dir.join("lists").display()
    ))
    .arg(format!("-o=Dir::Cache={}", dir.join("cache").display()))
    .arg("-o=Debug::NoLocking=1")
    .env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// The machine's Debian archive (the first `URIs:` of its deb822 sources, or the first `deb`
/// line of sources.list).
fn debian_archive() -> anyhow::Result<String> {
    let deb822 =
        std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    if let Some(uri) = deb822
        .lines()
        .filter_map(|l| l.strip_prefix("URIs:"))
        .flat_map(str::split_whitespace)
        .find(|u| u.ends_with("/debian") || u.ends_with("/debian/"))
    {
        return Ok(uri.trim_end_matches('/').to_string());
    }
    let list = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    list.lines()
        .filter(|l| l.starts_with("deb "))
        .flat_map(str::split_whitespace)
        .find(|w| w.starts_with("http") && w.trim_end_matches('/').ends_with("/debian"))
        .map(|u| u.trim_end_matches('/').to_string())
        .context(
            "no Debian archive in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list",
        )
}

/// Makes the temporary apt configuration and reads the suites' package lists (once a run).
fn apt_update(dir: &Path) -> anyhow::Result<()> {
    let archive = debian_archive()?;
    std::fs::create_dir_all(dir.join("lists").join("partial"))?;
    std::fs::create_dir_all(dir.join("cache").join("archives").join("partial"))?;
    let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
    let mut sources = String::new();
    for kernel in &MATRIX {
        let _ = writeln!(
            sources,
            "deb [signed-by={keyring}] {archive} {} main",
            kernel.suite
        );
    }
    std::fs::write(dir.join("sources.list"), sources)?;
    let mut cmd = apt(dir, "apt-get");
    cmd.arg("update").stdout(Stdio::null());
    setup::run(&mut cmd).context("apt-get update with the kernel suites")
}

/// The newest version of `prefix*suffix` among the package names apt knows.
fn newest_package(apt_dir: &Path, prefix: &str, suffix: &str) -> anyhow::Result<String> {
    let pattern = format!("^{}[0-9].*{}$", regex_escape(prefix), regex_escape(suffix));
    let out = apt(apt_dir, "apt-cache")
        .args(["search", "--names-only", &pattern])
        .output()
        .context("running apt-cache search")?;
    let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        // The generic flavour only: not -cloud- (no 9p to see the host's files) nor -rt-.
        .filter(|n| {
            n.strip_prefix(prefix)
                .and_then(|rest| rest.strip_suffix(suffix))
                .is_some_and(|version| {
                    version
                        .chars()
                        .all(|c| c.is_ascii_digit() || c == '.' || c == '-')
                })
        })
        .map(str::to_string)
        .collect();
    names
        .into_iter()
        .max_by(|a, b| version_key(a).cmp(&version_key(b)))
        .with_context(|| format!("no package {prefix}*{suffix} in the archive"))
}

fn regex_escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            if ".+*?()[]{}|^$\\".contains(c) {
                vec!['\\', c]
            } else {
                vec![c]
            }
        })
        .collect()
}

/// The numbers in a package name, for comparing versions (`6.1.0-50` < `6.1.0-57`).
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Downloads and unpacks `kernel` under `base`, once; later runs reuse it.
fn fetch(base: &Path, kernel: &Kernel) -> anyhow::Result<Unpacked> {
    let marker = base.join(format!("{}.release", kernel.name));
    if let Ok(release) = std::fs::read_to_string(&marker) {
        let unpacked = Unpacked {
            release: release.trim().to_string(),
            root: base.join(release.trim()),
        };
        if unpacked.vmlinuz().is_file() {
            return Ok(unpacked);
        }
    }
    let apt_dir = base.join("apt");
    if !apt_dir.join("updated").exists() {
        println!("xtask: reading the package lists of Debian's kernel suites");
        apt_update(&apt_dir)?;
        std::fs::write(apt_dir.join("updated"), "")?;
    }
    let image = newest_package(&apt_dir, kernel.image_prefix, kernel.image_suffix)?;
    let mut packages = vec![image.clone()];
    // linux-image-6.1.0-50-amd64-unsigned → 6.1.0-50-amd64;
    // linux-binary-unsigned-7.3.4+deb13-amd64 → 7.3.4+deb13-amd64.
    let release = image
        .trim_start_matches("linux-image-")
        .trim_start_matches("linux-binary-unsigned-")
        .trim_end_matches("-unsigned")
        .to_string();
    if kernel.modules_apart {
        packages.push(format!("linux-modules-{release}"));
    }
    println!("xtask: downloading {}", packages.join(", "));
    let download = base.join("download");
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download)?;
    let mut cmd = apt(&apt_dir, "apt-get");
    cmd.arg("download")
        .args(&packages)
        .current_dir(&download)
        .stdout(Stdio::null());
    setup::run(&mut cmd).context("apt-get download")?;
    let root = base.join(&release);
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    for entry in std::fs::read_dir(&download)? {
        let deb = entry?.path();
        setup::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))
            .with_context(|| format!("unpacking {}", deb.display()))?;
    }
    let _ = std::fs::remove_dir_all(&download);
    // Newer packages keep modules under usr/lib (merged /usr); virtme-ng looks in lib/.
    if !root.join("lib").exists() && root.join("usr/lib/modules").is_dir() {
        std::os::unix::fs::symlink("usr/lib", root.join("lib"))?;
    }
    let modules = root.join("lib/modules").join(&release);
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        // The 7.x packages keep the image beside the modules.
        let image = std::fs::read_dir(&modules)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz"))
            })
            .with_context(|| {
                format!(
                    "no vmlinuz in {} or {}",
                    vmlinuz.display(),
                    modules.display()
                )
            })?;
        std::fs::create_dir_all(root.join("boot"))?;
        std::fs::copy(&image, &vmlinuz)?;
    }
    // The guest's modprobe needs the dependency files of the unpacked modules.
    setup::run(
        Command::new("depmod")
            .arg("-b")
            .arg(&root)
            .arg(&release)
            .stderr(Stdio::null()),
    )
    .context("depmod over the unpacked modules")?;
    std::fs::write(&marker, &release)?;
    Ok(Unpacked { release, root })
}

/// How many guests run at once: `TRACER_GUEST_LANES`, else 2 where the host has two CPUs or
/// more.
fn guest_lanes() -> usize {
    if let Some(lanes) = std::env::var("TRACER_GUEST_LANES")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        return lanes;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get().min(2))
}

/// Boots `unpacked` and runs every test binary in it, one after the other.
fn boot_and_test(
    base: &Path,
    vng: &Path,
    kernel: &'static Kernel,
    unpacked: &Unpacked,
    tracer: &Path,
    static_tracer: &Path,
    test_binaries: &BTreeMap<String, PathBuf>,
) -> anyhow::Result<GuestResult> {
    let out = base.join("run").join(kernel.name);
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let mut script =
        String::from("#!/bin/sh\n# Written by cargo xtask test --kernel; runs inside the guest.\n");
    let _ = writeln!(script, "exec > {}/guest.log 2>&1", out.display());
    let _ = writeln!(script, "uname -r");
    let _ = writeln!(
        script,
        "modprobe -a -d {} {GUEST_MODULES} || echo 'some modules did not load'",
        unpacked.root.display()
    );
    let _ = writeln!(
        script,
        "export CI=true TRACER_BIN={} RUST_BACKTRACE=1",
        tracer.display()
    );
    let _ = writeln!(script, "export TRACER_TEST_GUEST={}", kernel.name);
    let _ = writeln!(script, "mkdir -p /tmp/tracer-guest && cd /tmp/tracer-guest");
    // The release's static binary (cargo xtask dist) checks this kernel first.
    let _ = writeln!(script, "echo \"== {STATIC_CHECK} $(date +%T)\"");
    let _ = writeln!(
        script,
        "{} check > {} 2>&1; echo $? > {}",
        static_tracer.display(),
        out.join(format!("{STATIC_CHECK}.log")).display(),
        out.join(format!("{STATIC_CHECK}.rc")).display()
    );
    // One test at a time, and one CPU (below): with two, QEMU's emulation ran code the kernel
    // had just patched (a tracepoint switched on) and a 7.3.4 guest died of it ("Oops: int3 in
    // trace_syscall_exit"); a 5.10 guest hung with two tests at once. Everything the tests
    // print is kept (the lab's agreement table among it).
    for (name, binary) in test_binaries.iter().filter(|(name, _)| kernel.runs(name)) {
        let log = out.join(format!("{name}.log"));
        let _ = writeln!(script, "echo \"== {name} $(date +%T)\"");
        let _ = writeln!(
            script,
            "{} --test-threads=1 --nocapture > {} 2>&1; echo $? > {}",
            binary.display(),
            log.display(),
            out.join(format!("{name}.rc")).display()
        );
    }
    let _ = writeln!(script, "echo \"== done $(date +%T)\"");
    let script_path = out.join("guest.sh");
    std::fs::write(&script_path, script)?;

    let started = Instant::now();
    let mut child = Command::new(vng)
        .args(["-v", "--disable-kvm", "-m", "4G", "-p", "1"])
        .arg(format!("--rwdir={}", out.display()))
        .arg("-r")
        .arg(unpacked.vmlinuz())
        .arg("-e")
        .arg(format!("sh {}", script_path.display()))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(out.join("vng.log"))?)
        .stderr(Stdio::from(std::fs::File::create(out.join("vng.stderr"))?))
        .spawn()
        .context("starting vng")?;
    // vng's exit code says little (255 even when the guest's command succeeded): the results
    // are the files the guest wrote.
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if started.elapsed() > GUEST_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            println!(
                "xtask: the {} guest ran out of time ({} s)",
                kernel.name,
                GUEST_TIMEOUT.as_secs()
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let seconds = started.elapsed().as_secs();
    let mut tests = BTreeMap::new();
    let check_log =
        std::fs::read_to_string(out.join(format!("{STATIC_CHECK}.log"))).unwrap_or_default();
    let check_rc = std::fs::read_to_string(out.join(format!("{STATIC_CHECK}.rc")))
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok());
    let check = static_check_result(check_rc, &check_log);
    if !matches!(check, Some((_, 0, 0))) {
        println!(
            "---- the static tracer's check on {} ({}):\n{check_log}",
            kernel.name, unpacked.release
        );
    }
    tests.insert(STATIC_CHECK.to_string(), check);
    for name in test_binaries.keys().filter(|name| kernel.runs(name)) {
        let rc = std::fs::read_to_string(out.join(format!("{name}.rc")))
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok());
        let log = std::fs::read_to_string(out.join(format!("{name}.log"))).unwrap_or_default();
        let counts = log
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("test result: "))
            .and_then(parse_result);
        let result = match (rc, counts) {
            (Some(rc), Some((passed, failed))) => Some((passed, failed, rc)),
            (Some(rc), None) if rc != 0 => Some((0, 1, rc)),
            _ => None,
        };
        if !matches!(result, Some((_, 0, 0))) {
            println!("---- {name} on {} ({}):", kernel.name, unpacked.release);
            for line in failure_excerpt(&log) {
                println!("    {line}");
            }
        }
        tests.insert(name.clone(), result);
    }
    Ok(GuestResult {
        kernel: kernel.name,
        release: unpacked.release.clone(),
        tests,
        not_run: test_binaries
            .keys()
            .filter(|name| !kernel.runs(name))
            .cloned()
            .collect(),
        seconds,
    })
}

/// What to show of a failed test binary's log (run with `--nocapture`, so each test's output
/// lies between its `test NAME ... ` line and its `ok` or `FAILED`): every failed test's own
/// output without the backtrace's frames, at most [`EXCERPT_LINES`] lines of each; the last
/// lines of a test that never finished; the summary.
fn failure_excerpt(log: &str) -> Vec<&str> {
    let lines: Vec<&str> = log.lines().collect();
    let mut excerpt = Vec::new();
    let mut start = None;
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with("test ") && line.contains(" ... ") {
            start = Some(i);
        }
        let outcome = line.rsplit(" ... ").next().unwrap_or_default().trim_end();
        if matches!(outcome, "ok" | "ignored") {
            start = None;
        }
        if let Some(from) = start.filter(|_| outcome == "FAILED") {
            start = None;
            let mut in_backtrace = false;
            let own: Vec<&str> = lines[from..=i]
                .iter()
                .copied()
                .filter(|l| {
                    if l.starts_with("stack backtrace:") {
                        in_backtrace = true;
                    } else if l.starts_with("note: Some details are omitted") {
                        in_backtrace = false;
                    }
                    !in_backtrace
                })
                .collect();
            if own.len() > EXCERPT_LINES {
                let half = EXCERPT_LINES / 2;
                excerpt.extend(&own[..half]);
                excerpt.push("[...]");
                excerpt.extend(&own[own.len() - half..]);
            } else {
                excerpt.extend(&own);
            }
            excerpt.push("");
        }
    }
    // A test that never ended (the binary died, or the guest ran out of time), or a binary
    // that ran none: where it stopped.
    let from = start.unwrap_or(if excerpt.is_empty() { 0 } else { lines.len() });
    excerpt.extend(&lines[from.max(lines.len().saturating_sub(60))..]);
    excerpt.extend(lines.iter().filter(|l| l.starts_with("test result: ")));
    excerpt
}

/// At most this many lines of one failed test's output.
const EXCERPT_LINES: usize = 160;

/// The table's row for the static binary's `tracer check` in the guest.
const STATIC_CHECK: &str = "static-tracer-check";

/// `tracer check` passed when it exited 0 having loaded and attached the programs.
fn static_check_result(rc: Option<i32>, log: &str) -> Option<(u32, u32, i32)> {
    let attached = log
        .lines()
        .any(|l| l.split_whitespace().take(2).eq(["ok", "probes"]) && l.contains(" attached"));
    match rc? {
        0 if attached => Some((1, 0, 0)),
        0 => Some((0, 1, 1)),
        rc => Some((0, 1, rc)),
    }
}

/// `ok. 16 passed; 0 failed; …` → (16, 0).
fn parse_result(text: &str) -> Option<(u32, u32)> {
    let number_before = |word: &str| {
        text.split(';')
            .find(|part| part.trim_end().ends_with(word))
            .and_then(|part| part.split_whitespace().rev().nth(1))
            .and_then(|n| n.parse().ok())
    };
    Some((number_before("passed")?, number_before("failed")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_tests_excerpt_is_its_own_output_without_the_backtrace() {
        let log = "running 3 tests\n\
            test a_passes ... out of a\n\
            ok\n\
            test b_fails ... ### table of b\n\
            | row |\n\
            thread 'b_fails' panicked at tests/tests/x.rs:1:1:\n\
            why b failed\n\
            stack backtrace:\n\
            \x20  0: frame\n\
            note: Some details are omitted, run with `RUST_BACKTRACE=full` for a verbose backtrace.\n\
            FAILED\n\
            test c_passes ... ok\n\
            \n\
            failures:\n\
            \x20   b_fails\n\
            \n\
            test result: FAILED. 2 passed; 1 failed; 0 ignored";
        let excerpt = failure_excerpt(log);
        let b = excerpt
            .iter()
            .position(|l| l.starts_with("test b_fails"))
            .unwrap();
        assert_eq!(
            excerpt[b..b + 6],
            [
                "test b_fails ... ### table of b",
                "| row |",
                "thread 'b_fails' panicked at tests/tests/x.rs:1:1:",
                "why b failed",
                "note: Some details are omitted, run with `RUST_BACKTRACE=full` for a verbose backtrace.",
                "FAILED",
            ]
        );
        assert!(
            !excerpt
                .iter()
                .any(|l| l.contains("out of a") || l.contains("frame") || l.contains("c_passes"))
        );
        assert_eq!(
            excerpt.last(),
            Some(&"test result: FAILED. 2 passed; 1 failed; 0 ignored")
        );
        // A binary that died without a summary shows where it stopped.
        let died = "test a ... started\nlast words";
        assert_eq!(failure_excerpt(died), ["test a ... started", "last words"]);
    }

    #[test]
    fn the_newest_kernel_package_wins_by_its_numbers() {
        let mut names = [
            "linux-image-6.1.0-50-amd64-unsigned",
            "linux-image-6.1.0-9-amd64-unsigned",
            "linux-image-6.1.0-57-amd64-unsigned",
        ];
        names.sort_by_key(|n| version_key(n));
        assert_eq!(names[2], "linux-image-6.1.0-57-amd64-unsigned");
        assert!(
            version_key("linux-binary-unsigned-7.3.4+deb13-amd64")
                > version_key("linux-binary-unsigned-7.2.12+deb13-amd64")
        );
    }

    #[test]
    fn a_test_summary_line_gives_its_counts() {
        assert_eq!(
            parse_result(
                "ok. 16 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 15.12s"
            ),
            Some((16, 0))
        );
        assert_eq!(
            parse_result("FAILED. 3 passed; 2 failed; 0 ignored"),
            Some((3, 2))
        );
        assert_eq!(parse_result("nonsense"), None);
    }

    #[test]
    fn the_static_check_passes_only_when_it_attached() {
        let ok = "ok   kernel  5.10.0-35-amd64\nok   probes  13/13 attached  and detached again\n";
        assert_eq!(static_check_result(Some(0), ok), Some((1, 0, 0)));
        assert_eq!(static_check_result(Some(1), ok), Some((0, 1, 1)));
        let no_probes = "ok   probe oom:mark_victim  attached\nFAIL load and attach  failed\n";
        assert_eq!(static_check_result(Some(0), no_probes), Some((0, 1, 1)));
        assert_eq!(static_check_result(None, ok), None);
    }

    #[test]
    fn kernels_are_chosen_by_name_or_all() {
        assert_eq!(select("all").unwrap().len(), MATRIX.len());
        let picked = select("6.1,7.x").unwrap();
        assert_eq!(
            picked.iter().map(|k| k.name).collect::<Vec<_>>(),
            ["6.1", "7.x"]
        );
        assert!(select("4.19").is_err());
    }
}
