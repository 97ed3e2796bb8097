//! What every proxy of the lab gives the report: its failed upstream attempts and its requests,
//! as its own logs tell them. Each proxy's module reads its own log formats into these.

use std::{
    ffi::OsStr,
    net::SocketAddr,
    os::unix::net::UnixStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::{LabAddr, Route};
use crate::{
    netns::Netns,
    process::{MemoryCgroup, stop_gracefully},
};

/// One failed upstream attempt, as the proxy's log tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedFailure {
    /// As tracer writes upstreams: `ip:port`, `unix:PATH`, `none`.
    pub upstream: String,
    /// What the proxy's log says happened, in the proxy's own classes (see
    /// [`super::Software::class_of`]): for nginx and Apache a tracer cause, for HAProxy the
    /// first two letters of the termination state (`SC`, `sH`…). `None` when nothing maps.
    pub cause: Option<&'static str>,
    pub message: String,
}

/// One request in the proxy's access log.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedRequest {
    /// When the request ended (seconds since the epoch) and how long it took.
    pub end: f64,
    pub duration: f64,
    pub status: u16,
    /// The port the proxy received it on: which route it took.
    pub port: u16,
    /// Every upstream tried, in order, as tracer writes them (`ip:port`, `unix:PATH`).
    pub upstreams: Vec<String>,
}

/// A proxy the lab runs: stopped, then read.
pub trait LabProxy {
    /// Stops it gracefully (it closes its idle upstream connections) and waits for it.
    fn stop(&mut self);
    /// The failed upstream attempts its logs record.
    fn failures(&self) -> Vec<LoggedFailure>;
    /// The requests its access log records.
    fn requests(&self) -> Vec<LoggedRequest>;
}

/// A list of upstreams tried as proxies log it, separated by ", " (and by " : " across
/// nginx's internal redirects); `-` when none was.
pub fn parse_upstream_list(text: &str) -> Vec<String> {
    text.split(", ")
        .flat_map(|s| s.split(" : "))
        .map(str::trim)
        .filter(|s| s.starts_with("unix:") || s.parse::<SocketAddr>().is_ok())
        .map(str::to_string)
        .collect()
}

/// The errno of a message that carries one as `(111)…` (Apache) or `(111: …)` (nginx).
pub fn errno_in(text: &str) -> Option<i32> {
    let (_, rest) = text.split_once('(')?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// A server of the lab (a proxy, an application server), started with `ip netns exec` (which
/// execs it in place, so that the child is the server's own main process), its output in a file
/// of the lab directory. Stopped gracefully when dropped.
pub struct Daemon {
    child: Child,
    name: &'static str,
    /// Its graceful stop, and how long it may take before the server is killed.
    stop_signal: i32,
    grace: Duration,
    /// Its output file, and where it listens (for what it says if it dies).
    output: std::path::PathBuf,
    listening: Vec<LabAddr>,
    /// Stopped by the lab (not died on its own).
    stopped: bool,
    /// The memory-limited cgroup it runs in, removed after it stops (fields drop after
    /// `drop`).
    cgroup: Option<MemoryCgroup>,
}

impl Daemon {
    /// Starts `argv` in namespace `netns`, its stdout and stderr into `output`, and waits until
    /// every address of `listening` accepts a connection (TCP ones from inside `netns`).
    pub fn start(
        name: &'static str,
        netns: &Netns,
        argv: &[&OsStr],
        output: &Path,
        listening: &[LabAddr],
        stop_signal: i32,
        grace: Duration,
    ) -> Daemon {
        let log = std::fs::File::create(output).expect("the server's output file");
        let child = Command::new("ip")
            .args(["netns", "exec", &netns.name])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("output file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({e}); cargo xtask setup installs it"));
        let mut daemon = Daemon {
            child,
            name,
            stop_signal,
            grace,
            output: output.to_path_buf(),
            listening: listening.to_vec(),
            stopped: false,
            cgroup: None,
        };
        // (Slow under emulation: the kernel matrix's guests.)
        let deadline = Instant::now() + Duration::from_secs(60);
        let accepting = |addr: &LabAddr| match addr {
            LabAddr::Tcp(a) => netns
                .run(|| std::net::TcpStream::connect_timeout(a, Duration::from_millis(200)))
                .is_ok(),
            LabAddr::Unix(path) => UnixStream::connect(path).is_ok(),
        };
        for addr in listening {
            while !accepting(addr) {
                if Instant::now() > deadline || !matches!(daemon.child.try_wait(), Ok(None)) {
                    daemon.stop();
                    panic!(
                        "{name} did not start at {addr}: {}",
                        std::fs::read_to_string(output).unwrap_or_default()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        daemon
    }

    /// Moves it into `cgroup`: its main process (whose later workers are born there) and the
    /// workers it has already.
    pub fn confine(&mut self, cgroup: MemoryCgroup) {
        let pid = self.child.id();
        cgroup.add(pid);
        for child in tracer_user::capture::procfs::children(pid) {
            cgroup.add(child);
        }
        self.cgroup = Some(cgroup);
    }

    /// If it exited on its own (the lab did not stop it), what happened, with the end of its
    /// output: a lab whose upstream server is gone does not test what it says.
    pub fn died(&mut self) -> Option<String> {
        if self.stopped {
            return None;
        }
        let status = self.child.try_wait().ok()??;
        let output = std::fs::read_to_string(&self.output).unwrap_or_default();
        let tail: Vec<&str> = output.lines().rev().take(5).collect();
        let at: Vec<String> = self.listening.iter().map(ToString::to_string).collect();
        Some(format!(
            "{} at {} exited during the lab ({status}); its last output: {}",
            self.name,
            at.join(", "),
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ))
    }

    /// Stops it gracefully and waits, killing it if it takes longer than its grace.
    pub fn stop(&mut self) {
        self.stopped = true;
        if !stop_gracefully(&mut self.child, self.stop_signal, self.grace) {
            eprintln!(
                "lab: {} did not stop within {} s; killed",
                self.name,
                self.grace.as_secs()
            );
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The addresses a route list's clients connect to.
pub fn listen_addrs(routes: &[Route]) -> Vec<LabAddr> {
    routes.iter().map(|r| LabAddr::Tcp(r.listen())).collect()
}
