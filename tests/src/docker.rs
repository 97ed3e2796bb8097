//! Real containers for the tests, with Debian's docker.
//!
//! - The daemon: the host's own when one answers, else a `dockerd` started here with no bridge
//!   of its own, no firewall rules, no masquerading and IP forwarding left as it is; it ends with
//!   the test process.
//! - The image: imported (`docker import`) from a root file system of empty folders, `/etc/passwd`
//!   and the usual links into `/usr`; containers get the host's `/usr` and the tests' binaries
//!   bind-mounted read-only (no registry is reachable).
//! - A user-defined bridge network, `tracer-test-net` (10.213.77.0/24): the host reaches its
//!   containers' addresses directly, as a proxy on the host does.

use std::{
    net::IpAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

pub const IMAGE: &str = "tracer-test-base:1";
pub const NETWORK: &str = "tracer-test-net";
pub const SUBNET: &str = "10.213.77.0/24";
/// The host's address on the network (its gateway).
pub const GATEWAY: &str = "10.213.77.1";

/// Runs `docker ARGS`.
pub fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("running docker (cargo xtask setup installs docker.io)")
}

/// Runs `docker ARGS` and returns its stdout, failing the test when it fails.
#[track_caller]
pub fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn answers() -> bool {
    docker(&["info", "--format", "{{.ServerVersion}}"])
        .status
        .success()
}

/// The daemon, the image and the network, set up once per test process.
pub fn setup() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        if !answers() {
            start_daemon();
        }
        if !docker(&["image", "inspect", IMAGE]).status.success() {
            import_image();
        }
        if !docker(&["network", "inspect", NETWORK]).status.success() {
            docker_ok(&["network", "create", "--subnet", SUBNET, NETWORK]);
        }
    });
}

/// Starts dockerd from a thread that lives as long as the process: dockerd gets SIGTERM when
/// the thread that started it ends (PR_SET_PDEATHSIG), so only at the process's end.
fn start_daemon() {
    let log = std::env::temp_dir().join("tracer-test-dockerd.log");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut command = Command::new("dockerd");
        command
            .args([
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                "--ip-forward=false",
                "--ip-masq=false",
            ])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("dockerd's log"))
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&log)
                    .expect("dockerd's log"),
            ));
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = command.spawn();
        let _ = tx.send(child.is_ok());
        let mut child = child.expect("starting dockerd (cargo xtask setup installs docker.io)");
        // Park for good: this thread's end would stop dockerd.
        let _ = child.wait();
    });
    assert!(rx.recv().unwrap_or(false), "dockerd did not start");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !answers() {
        assert!(
            Instant::now() < deadline,
            "dockerd did not answer within 60 s: {}",
            std::fs::read_to_string(std::env::temp_dir().join("tracer-test-dockerd.log"))
                .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn import_image() {
    let archive = base_image_archive("docker");
    let imported = Command::new("docker")
        .args(["import"])
        .arg(&archive)
        .arg(IMAGE)
        .output()
        .expect("docker import");
    let _ = std::fs::remove_file(&archive);
    assert!(
        imported.status.success(),
        "docker import: {}",
        String::from_utf8_lossy(&imported.stderr)
    );
}

/// The test image's root file system as a tar archive (`tag` tells callers' files apart): empty
/// folders, `/etc/passwd` and `/etc/group`, and the usual links into `/usr`, which containers
/// get from the host, read-only. The caller removes the archive.
pub fn base_image_archive(tag: &str) -> PathBuf {
    let root =
        std::env::temp_dir().join(format!("tracer-test-rootfs-{tag}-{}", std::process::id()));
    base_rootfs(&root);
    let archive = root.with_extension("tar");
    let packed = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&archive)
        .arg(".")
        .status()
        .expect("tar");
    assert!(packed.success(), "tar of the test image's root");
    let _ = std::fs::remove_dir_all(&root);
    archive
}

/// Makes the test image's root file system at `root` (see [`base_image_archive`]).
pub fn base_rootfs(root: &Path) {
    let _ = std::fs::remove_dir_all(root);
    for dir in ["usr", "etc", "tmp", "proc", "sys", "dev", "run", "var/log"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    for dir in ["bin", "sbin", "lib", "lib64"] {
        std::os::unix::fs::symlink(format!("usr/{dir}"), root.join(dir)).unwrap();
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
}

/// A container on the test network, removed (with `docker rm -f`) when dropped.
pub struct Container {
    pub name: String,
}

impl Container {
    /// `docker run -d --name NAME --network tracer-test-net OPTIONS IMAGE COMMAND…`, with the
    /// host's /usr and `binaries` mounted read-only.
    pub fn run(name: &str, options: &[&str], binaries: &Path, command: &[&str]) -> Container {
        setup();
        let _ = docker(&["rm", "--force", name]);
        let usr = "/usr:/usr:ro".to_string();
        let bins = format!("{0}:{0}:ro", binaries.display());
        let mut args = vec![
            "run",
            "--detach",
            "--name",
            name,
            "--network",
            NETWORK,
            "--volume",
            &usr,
            "--volume",
            &bins,
        ];
        args.extend_from_slice(options);
        args.push(IMAGE);
        args.extend_from_slice(command);
        let container = Container { name: name.into() };
        docker_ok(&args);
        container
    }

    /// `docker inspect --format FORMAT`.
    pub fn inspect(&self, format: &str) -> String {
        docker_ok(&["inspect", "--format", format, &self.name])
    }

    /// Its address on the test network.
    pub fn ip(&self) -> IpAddr {
        self.inspect(&format!(
            "{{{{(index .NetworkSettings.Networks \"{NETWORK}\").IPAddress}}}}"
        ))
        .parse()
        .expect("the container's address")
    }

    /// Waits until `format` gives `want` (for up to `within`).
    pub fn wait_for(&self, format: &str, want: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let got = self.inspect(format);
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {format} is {got}, not {want}; its log: {}",
                self.name,
                String::from_utf8_lossy(&docker(&["logs", &self.name]).stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "--force", &self.name]);
    }
}

/// The folder holding the tests crate's binaries (`upstream-process`), to mount in containers.
pub fn binaries() -> PathBuf {
    crate::process::upstream_process_bin()
        .parent()
        .expect("a folder")
        .to_path_buf()
}
