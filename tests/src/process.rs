//! Upstreams that are processes of their own (the `upstream-process` binary), run inside a test
//! namespace and, for OOM tests, inside a memory-limited cgroup.

use std::{
    fs::File,
    io::{BufRead as _, BufReader},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::netns::Netns;

/// The `upstream-process` binary, built with this crate: next to the running executable (a bin)
/// or one directory up (a test, in `deps/`).
pub fn upstream_process_bin() -> PathBuf {
    test_bin("upstream-process")
}

/// One of the tests crate's binaries (`upstream-process`, `fd-hog`), next to this executable.
pub fn test_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("this executable");
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .find(|path| path.exists())
        .unwrap_or_else(|| {
            panic!(
                "no {name} binary near {} (cargo builds it with the tests)",
                exe.display()
            )
        })
}

/// A running upstream process; killed on drop.
pub struct UpstreamProcess {
    pub child: Child,
}

impl UpstreamProcess {
    /// Starts `upstream-process ADDR ACTION AFTER_MS` inside `ns` and waits until it listens.
    pub fn start(ns: &Netns, addr: &str, action: &str, after_ms: u64) -> UpstreamProcess {
        Self::start_with(ns, addr, action, after_ms, |_| {})
    }

    /// Like [`UpstreamProcess::start`], calling `placed(pid)` before it starts its action (to
    /// put it in a cgroup).
    pub fn start_with(
        ns: &Netns,
        addr: &str,
        action: &str,
        after_ms: u64,
        placed: impl FnOnce(u32),
    ) -> UpstreamProcess {
        let netns = File::open(ns.path()).expect("the namespace");
        let fd = netns.as_raw_fd();
        let mut command = Command::new(upstream_process_bin());
        command
            .args([addr, action, &after_ms.to_string()])
            .stdout(Stdio::piped());
        // SAFETY: setns and prctl are async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command.spawn().expect("starting upstream-process");
        drop(netns);
        placed(child.id());
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("reading upstream-process");
        assert_eq!(line.trim(), "listening", "upstream-process did not start");
        UpstreamProcess { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for it to end; its raw wait status.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().expect("waiting for upstream-process")
    }
}

impl Drop for UpstreamProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A memory cgroup with a limit, removed on drop (cgroup v1's memory controller, or v2).
pub struct MemoryCgroup {
    dir: PathBuf,
}

impl MemoryCgroup {
    pub fn new(tag: &str, limit_bytes: u64) -> MemoryCgroup {
        let name = format!("tracer-test-{tag}-{}", std::process::id());
        let v1 = PathBuf::from("/sys/fs/cgroup/memory");
        let (dir, limit_file) = if v1.join("memory.limit_in_bytes").exists() {
            (v1.join(&name), "memory.limit_in_bytes")
        } else {
            // cgroup v2: the memory controller must be on for the root's children (systemd
            // does that; a bare init such as a test kernel guest's does not).
            let root = PathBuf::from("/sys/fs/cgroup");
            let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory");
            (root.join(&name), "memory.max")
        };
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        std::fs::write(dir.join(limit_file), limit_bytes.to_string())
            .unwrap_or_else(|e| panic!("limiting {}: {e}", dir.display()));
        // No swap to spill into (on a host that has some), so the limit means an OOM kill.
        let swap = if limit_file == "memory.max" {
            ("memory.swap.max", "0".to_string())
        } else {
            ("memory.memsw.limit_in_bytes", limit_bytes.to_string())
        };
        if dir.join(swap.0).exists() {
            let _ = std::fs::write(dir.join(swap.0), swap.1);
        }
        MemoryCgroup { dir }
    }

    pub fn add(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("moving {pid} into {}: {e}", self.dir.display()));
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Stops child `child` (a server started with `ip netns exec`, which execs it in place) with
/// `signal`, its graceful stop, and waits up to `within` before killing it. Whether it stopped
/// by itself.
pub fn stop_gracefully(child: &mut std::process::Child, signal: i32, within: Duration) -> bool {
    if !matches!(child.try_wait(), Ok(None)) {
        return true;
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, signal) };
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}
