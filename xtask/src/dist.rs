//! `cargo xtask dist`: what a release ships, built into `target/dist/`.
//!
//! - `tracer`: the agent for `x86_64-unknown-linux-musl`, fully static (the eBPF object is
//!   embedded as in every build), so one file runs on any x86_64 Linux host of the matrix.
//! - `tracer-image.tar`: an image `FROM scratch` holding only that binary
//!   (`deploy/container/Containerfile`), built with podman (Debian's, installed when missing)
//!   and saved in `docker save`'s format; `docker load -i` and `podman load -i` take it.
//! - `tracer_VERSION_amd64.deb`: the binary, the systemd unit, the alert rules and the dashboard,
//!   packed by `dpkg-deb` (why not `cargo deb`: see RELEASING.md).

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::setup;

pub const TARGET: &str = "x86_64-unknown-linux-musl";
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What each step needs on the machine.
const IMAGE_PACKAGES: &[(&str, &str)] = &[("podman", "podman")];

/// Which artifacts to make.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Artifacts {
    /// The static binary and the package (no root needed).
    BinaryAndPackage,
    /// All three, the image too (needs root: podman keeps root's images for the tests).
    All,
}

pub fn dist_dir(workspace: &Path) -> PathBuf {
    workspace.join("target").join("dist")
}

/// Builds the artifacts into `target/dist/` and prints what was made.
pub fn dist(workspace: &Path, which: Artifacts) -> anyhow::Result<()> {
    let dir = dist_dir(workspace);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let binary = static_binary(workspace, &dir)?;
    let mut made = vec![binary.clone()];
    made.push(debian_package(workspace, &dir, &binary)?);
    if which == Artifacts::All {
        made.push(image(workspace, &dir, &binary)?);
    }
    println!("xtask: dist artifacts in {}:", dir.display());
    for path in made {
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        println!(
            "  {:<28} {:>6.1} MiB",
            path.file_name().unwrap_or_default().to_string_lossy(),
            size as f64 / (1024.0 * 1024.0)
        );
    }
    Ok(())
}

/// Builds the static binary, checks that it is one and that it runs, and copies it to
/// `dir/tracer`.
pub fn static_binary(workspace: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let installed = setup::output("rustup", &["target", "list", "--installed"])?;
    if !installed.lines().any(|l| l.trim() == TARGET) {
        println!("xtask: adding the {TARGET} target (the static build)");
        setup::run(
            Command::new("rustup")
                .current_dir(workspace)
                .args(["target", "add", TARGET]),
        )?;
    }
    setup::run(Command::new("cargo").current_dir(workspace).args([
        "build",
        "--release",
        "--target",
        TARGET,
        "--package",
        "tracer-user",
        "--bin",
        "tracer",
    ]))
    .context("building the static tracer")?;
    let built = workspace
        .join("target")
        .join(TARGET)
        .join("release")
        .join("tracer");
    // `ldd` says "not a dynamic executable" (static) or "statically linked" (static-pie).
    let ldd = Command::new("ldd")
        .arg(&built)
        .output()
        .context("running ldd")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&ldd.stdout),
        String::from_utf8_lossy(&ldd.stderr)
    );
    if !(said.contains("not a dynamic executable") || said.contains("statically linked")) {
        bail!("{} is not static; ldd says:\n{said}", built.display());
    }
    let version = setup::output(&built.to_string_lossy(), &["--version"])?;
    if !version.contains(VERSION) {
        bail!("the static tracer says {version:?}, not version {VERSION}");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let out = dir.join("tracer");
    copy_atomically(&built, &out)?;
    Ok(out)
}

fn copy_atomically(from: &Path, to: &Path) -> anyhow::Result<()> {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    std::fs::rename(&tmp, to).with_context(|| format!("renaming to {}", to.display()))?;
    Ok(())
}

/// The package's files: (path in the package, source in the repo, mode).
const PACKAGE_FILES: &[(&str, &str, u32)] = &[
    (
        "lib/systemd/system/tracer.service",
        "deploy/systemd/tracer.service",
        0o644,
    ),
    (
        "usr/share/tracer/prometheus/tracer-alerts.yml",
        "deploy/prometheus/tracer-alerts.yml",
        0o644,
    ),
    (
        "usr/share/tracer/grafana/tracer-dashboard.json",
        "deploy/grafana/tracer-dashboard.json",
        0o644,
    ),
    ("usr/share/doc/tracer/README.md", "README.md", 0o644),
    ("usr/share/doc/tracer/causes.md", "docs/causes.md", 0o644),
];

/// Where the package puts the binary; the unit's ExecStart is pointed there.
pub const PACKAGE_BINARY: &str = "usr/bin/tracer";

/// The maintainer scripts: enable and start the service where systemd runs (as debhelper's
/// do), stop and disable it on removal.
const POSTINST: &str = "#!/bin/sh
set -e
if [ \"$1\" = configure ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
    systemctl enable tracer.service || true
    systemctl restart tracer.service || true
fi
";
const PRERM: &str = "#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl stop tracer.service || true
    if [ \"$1\" = remove ]; then systemctl disable tracer.service || true; fi
fi
";
const POSTRM: &str = "#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
";

/// Packs the binary and the deploy files into `dir/tracer_VERSION_amd64.deb`.
pub fn debian_package(workspace: &Path, dir: &Path, binary: &Path) -> anyhow::Result<PathBuf> {
    let root = dir.join("deb-root");
    let _ = std::fs::remove_dir_all(&root);
    let mut sums = String::new();
    let mut installed_bytes = 0u64;
    let mut put = |path: &str, bytes: &[u8], mode: u32| -> anyhow::Result<()> {
        let dest = root.join(path);
        std::fs::create_dir_all(dest.parent().expect("files sit in folders"))?;
        std::fs::write(&dest, bytes).with_context(|| format!("writing {}", dest.display()))?;
        set_mode(&dest, mode)?;
        let _ = writeln!(sums, "{}  {path}", md5_hex(bytes)?);
        installed_bytes += bytes.len() as u64;
        Ok(())
    };
    let program = std::fs::read(binary)?;
    put(PACKAGE_BINARY, &program, 0o755)?;
    for (path, source, mode) in PACKAGE_FILES {
        let mut bytes =
            std::fs::read(workspace.join(source)).with_context(|| format!("reading {source}"))?;
        if source.ends_with("tracer.service") {
            bytes = unit_for_package(&String::from_utf8(bytes)?)?.into_bytes();
        }
        put(path, &bytes, *mode)?;
    }
    put(
        "usr/share/doc/tracer/copyright",
        copyright().as_bytes(),
        0o644,
    )?;
    let control_dir = root.join("DEBIAN");
    std::fs::create_dir_all(&control_dir)?;
    std::fs::write(control_dir.join("md5sums"), sums)?;
    std::fs::write(
        control_dir.join("control"),
        control(installed_bytes.div_ceil(1024)),
    )?;
    for (name, script) in [("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)] {
        let path = control_dir.join(name);
        std::fs::write(&path, script)?;
        set_mode(&path, 0o755)?;
    }
    let deb = dir.join(format!("tracer_{VERSION}_amd64.deb"));
    setup::run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&root)
            .arg(&deb)
            .stdout(Stdio::null()),
    )
    .context("packing the Debian package")?;
    let _ = std::fs::remove_dir_all(&root);
    Ok(deb)
}

/// The systemd unit as the package installs it: ExecStart runs the package's binary.
pub fn unit_for_package(unit: &str) -> anyhow::Result<String> {
    let from = "ExecStart=/usr/local/bin/tracer ";
    if !unit.contains(from) {
        bail!("deploy/systemd/tracer.service no longer starts {from:?}: update dist.rs");
    }
    Ok(unit
        .replace(from, &format!("ExecStart=/{PACKAGE_BINARY} "))
        .replace(
            "# Install: cp target/release/tracer /usr/local/bin/ && cp deploy/systemd/tracer.service /etc/systemd/system/\n#          systemctl daemon-reload && systemctl enable --now tracer\n",
            "# Installed by the tracer package, which enables and starts it.\n",
        ))
}

fn control(installed_kib: u64) -> String {
    format!(
        "Package: tracer
Version: {VERSION}
Architecture: amd64
Maintainer: tracer developers <tracer@localhost>
Installed-Size: {installed_kib}
Section: net
Priority: optional
Description: why the reverse proxy answers 502, per upstream, from the kernel
 An eBPF agent that names, for every failed connection from a reverse proxy
 (nginx, HAProxy, Apache, Envoy...) to its upstream, the upstream and the cause:
 refused, timed out, unreachable, reset, closed early, slow, backlog full, out of
 ports or descriptors, and the root cause behind it (a worker killed or crashed,
 an OOM kill). Exports Prometheus metrics, an event stream and a live view.
 .
 The binary is static; the service runs as a dynamic user with CAP_BPF,
 CAP_PERFMON and CAP_DAC_READ_SEARCH. Alert rules and a Grafana dashboard are in
 /usr/share/tracer.
"
    )
}

fn copyright() -> String {
    format!(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: tracer
Files: *
Copyright: tracer developers
License: {}
",
        env!("CARGO_PKG_LICENSE")
    )
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// md5sums wants MD5; `md5sum` (coreutils) computes it rather than a crate for one file list.
fn md5_hex(bytes: &[u8]) -> anyhow::Result<String> {
    use std::io::Write as _;
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running md5sum")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(bytes)
        .context("feeding md5sum")?;
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .next()
        .map(str::to_string)
        .context("md5sum printed nothing")
}

/// The image's name as Kubernetes and docker spell it in full: the DaemonSet's `tracer:VERSION`
/// is short for it, so `docker load` and `podman load` of the saved archive give that name.
pub fn image_name() -> String {
    format!("docker.io/library/tracer:{VERSION}")
}

/// Builds the image from `deploy/container/Containerfile` with the static binary as its only
/// file, and saves it to `dir/tracer-image.tar` in `docker save`'s format.
///
/// With podman (Debian's, installed when missing): it needs no daemon and touches no network
/// configuration, and Debian 12's docker.io (20.10) could build the image but not run it as the
/// DaemonSet does, since it rejects `--cap-add BPF` and `PERFMON` ("unknown capability").
pub fn image(workspace: &Path, dir: &Path, binary: &Path) -> anyhow::Result<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "building the image needs root (podman stores root's images; the tests run it as root)"
        );
    }
    setup::packages(IMAGE_PACKAGES)?;
    let context = dir.join("image-context");
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context)?;
    std::fs::copy(binary, context.join("tracer"))?;
    let containerfile = workspace.join("deploy/container/Containerfile");
    let name = image_name();
    let previous = Command::new("podman")
        .args(["image", "inspect", "--format", "{{.Id}}", &name])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string());
    quiet(
        Command::new("podman")
            .args(["build", "--layers=false", "--format", "docker", "--file"])
            .arg(&containerfile)
            .args(["--build-arg", &format!("VERSION={VERSION}")])
            .args(["--tag", &name])
            .arg(&context),
    )
    .context("building the image")?;
    let _ = std::fs::remove_dir_all(&context);
    // The previous build, now nameless, is not kept.
    if let Some(id) = previous {
        let _ = Command::new("podman")
            .args(["rmi", &id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let tar = dir.join("tracer-image.tar");
    let _ = std::fs::remove_file(&tar);
    quiet(
        Command::new("podman")
            .args(["save", "--format", "docker-archive", "--output"])
            .arg(&tar)
            .arg(&name),
    )
    .context("saving the image")?;
    Ok(tar)
}

/// Runs `cmd`, showing what it printed only when it fails.
fn quiet(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_unit_starts_the_packaged_binary() {
        let unit = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/tracer.service"),
        )
        .unwrap();
        let packaged = unit_for_package(&unit).unwrap();
        assert!(packaged.contains("ExecStart=/usr/bin/tracer run "));
        assert!(!packaged.contains("/usr/local/bin"), "{packaged}");
    }
}
