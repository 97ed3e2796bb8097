//! Private test hosts: network namespaces made for one test and deleted after it.

use std::{
    fs::File,
    io::Write as _,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

/// A network namespace of this test run, deleted on drop.
pub struct Netns {
    pub name: String,
}

/// Every namespace this crate makes starts with this, so a crashed run's leftovers can be found.
pub const PREFIX: &str = "tracer-test-";

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Netns {
    /// A new namespace with its loopback up.
    pub fn new(tag: &str) -> Netns {
        let name = format!(
            "{PREFIX}{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Its file, `/run/netns/<ns>` (what `setns` and runtimes' `--with-ns` take).
    pub fn path(&self) -> PathBuf {
        path_of(&self.name)
    }

    /// `ip -n <ns> …`
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// Sets a sysctl of the namespace (`net.*` ones are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) {
        let status = Command::new("ip")
            .args(["netns", "exec", &self.name, "sysctl", "-q", "-w"])
            .arg(format!("{key}={value}"))
            .status()
            .expect("running sysctl");
        assert!(status.success(), "sysctl {key}={value} failed");
    }

    /// Adds a firewall rule for incoming packets (nftables syntax, e.g. `tcp dport 8002 drop`).
    pub fn firewall(&self, rule: &str) {
        self.nft(&format!(
            "table inet tracer_test {{\n chain input {{\n  type filter hook input priority 0;\n  {rule}\n }}\n}}\n"
        ));
    }

    /// Loads an nftables ruleset into the namespace.
    pub fn nft(&self, ruleset: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running nft: {e} (cargo xtask setup installs nftables)"));
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(ruleset.as_bytes())
            .expect("writing the ruleset to nft");
        let status = child.wait().expect("waiting for nft");
        assert!(status.success(), "nft rejected:\n{ruleset}");
    }

    /// Runs `f` on a thread inside the namespace: sockets it makes live there.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.enter();
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Moves the calling thread into the namespace (threads it spawns follow it).
    pub fn enter(&self) {
        enter(&self.name);
    }
}

/// Moves the calling thread into namespace `name` (threads it spawns follow it).
pub fn enter(name: &str) {
    let path = path_of(name);
    let file = File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    // SAFETY: a valid namespace file descriptor; affects only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns into {name}: {}",
        std::io::Error::last_os_error()
    );
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_processes_in(&self.name);
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// Deletes namespaces left behind by runs that were killed: ours (named
/// `{PREFIX}{tag}-{pid}-{n}`) whose process is gone. Processes still inside them are killed
/// first, so nothing keeps them alive.
pub fn delete_leftovers() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let owner = rest
            .rsplit('-')
            .nth(1)
            .and_then(|pid| pid.parse::<u32>().ok());
        if owner.is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists()) {
            continue;
        }
        kill_processes_in(name);
        let _ = Command::new("ip").args(["netns", "delete", name]).status();
    }
}

/// Deletes every namespace this crate made for process `pid` (and what runs in them).
pub fn delete_owned_by(pid: u32) {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let owner = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.rsplit('-').nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if owner == Some(pid) {
            kill_processes_in(name);
            let _ = Command::new("ip").args(["netns", "delete", name]).status();
        }
    }
}

/// Kills every process inside namespace `name`.
pub fn kill_processes_in(name: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<i32>() {
            // SAFETY: plain kill(2).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// `ip …` in this process's own (the host's) namespace; panics when it fails.
pub fn host_ip(args: &[&str]) {
    run("ip", args);
}

fn path_of(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}
