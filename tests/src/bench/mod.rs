//! `cargo xtask bench`: what tracer costs at line rate, measured side by side.
//!
//! Four workloads run in a private namespace: (a) a storm of connects to a closed port, (b) a
//! storm of connects to a listening server, (c) HTTP through real nginx to an upstream without
//! keep-alive (wrk), (d) a mix with 1% refusals. Each runs under three conditions, in rotating
//! order within every round: nothing traced, `tracer run`, and a bpftrace script counting the
//! same tracepoints (what people would use instead). The result is a throughput ratio against
//! the untraced run of the same round. Under tracer, the counts tracer reports must equal what
//! the generator did.

pub mod workload;

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde::Deserialize;

use crate::tracer_process::Tracer;

/// What runs besides the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Condition {
    Untraced,
    Tracer,
    /// tracer on the path older kernels take: without `tcp_sendmsg_locked` (Linux 6.16+),
    /// requests are inferred from the segments that arrive (`tcp_probe`), as on 5.10–6.12.
    TracerOlderKernels,
    Bpftrace,
}

impl Condition {
    /// The conditions of the throughput pass.
    pub const ALL: [Condition; 3] = [Condition::Untraced, Condition::Tracer, Condition::Bpftrace];

    /// The conditions of the kernel-time pass.
    pub const TRACED: [Condition; 3] = [
        Condition::Tracer,
        Condition::TracerOlderKernels,
        Condition::Bpftrace,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Condition::Untraced => "untraced",
            Condition::Tracer => "tracer",
            Condition::TracerOlderKernels => "tracer, older kernels' path",
            Condition::Bpftrace => "bpftrace",
        }
    }

    /// The `tracer run` arguments that put tracer on this condition's path.
    fn tracer_args(self) -> &'static [&'static str] {
        match self {
            Condition::TracerOlderKernels => &["--skip-probe", "tcp_sendmsg_locked"],
            _ => &[],
        }
    }
}

/// The bpftrace script of the bpftrace baseline: the same tracepoints tracer uses, counted.
pub const BPFTRACE_SCRIPT: &str = r#"
tracepoint:sock:inet_sock_set_state { @states[comm, ntop(args->daddr), args->dport, args->newstate] = count(); }
tracepoint:tcp:tcp_receive_reset { @resets[ntop(args->daddr), args->dport] = count(); }
tracepoint:tcp:tcp_retransmit_skb { @retransmits[ntop(args->daddr), args->dport] = count(); }
tracepoint:syscalls:sys_enter_connect { @connects[comm] = count(); }
tracepoint:syscalls:sys_exit_connect /args->ret < 0/ { @connect_errors[comm, args->ret] = count(); }
tracepoint:syscalls:sys_exit_socket /args->ret < 0/ { @socket_errors[comm, args->ret] = count(); }
tracepoint:syscalls:sys_exit_accept4 /args->ret < 0/ { @accept_errors[comm, args->ret] = count(); }
tracepoint:syscalls:sys_exit_accept /args->ret < 0/ { @accept_errors[comm, args->ret] = count(); }
"#;

/// A condition while it runs.
pub enum Running {
    Untraced,
    Tracer { tracer: Tracer, api: SocketAddr },
    Bpftrace(Child),
}

impl Running {
    /// Starts `condition`; `tracer_args` go to `tracer run` (e.g. `--skip-probe`).
    pub fn start(condition: Condition, api_port: u16, tracer_args: &[String]) -> Running {
        match condition {
            Condition::Untraced => Running::Untraced,
            Condition::Tracer | Condition::TracerOlderKernels => {
                let api: SocketAddr = format!("127.0.0.1:{api_port}").parse().expect("address");
                let listen = api.to_string();
                let mut args = vec!["run", "--listen", &listen];
                args.extend(tracer_args.iter().map(String::as_str));
                args.extend(condition.tracer_args());
                let tracer = Tracer::start(&args);
                Running::Tracer { tracer, api }
            }
            Condition::Bpftrace => {
                let mut child = Command::new("bpftrace")
                    .args(["-e", BPFTRACE_SCRIPT])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("bpftrace (cargo xtask bench installs it)");
                let mut line = String::new();
                let mut out = BufReader::new(child.stdout.take().expect("stdout"));
                while !line.contains("Attaching") {
                    line.clear();
                    if out.read_line(&mut line).unwrap_or(0) == 0 {
                        panic!("bpftrace exited before attaching");
                    }
                }
                // Keep reading its output so it never blocks on a full pipe.
                std::thread::spawn(move || {
                    let mut sink = String::new();
                    while out.read_line(&mut sink).unwrap_or(0) > 0 {
                        sink.clear();
                    }
                });
                Running::Bpftrace(child)
            }
        }
    }

    /// tracer's process id, when tracer runs.
    pub fn tracer_pid(&self) -> Option<u32> {
        match self {
            Running::Tracer { tracer, .. } => Some(tracer.pid()),
            _ => None,
        }
    }

    /// The process holding the programs (tracer or bpftrace), if any.
    pub fn pid(&self) -> Option<u32> {
        match self {
            Running::Untraced => None,
            Running::Tracer { tracer, .. } => Some(tracer.pid()),
            Running::Bpftrace(child) => Some(child.id()),
        }
    }

    /// tracer's view of the counts, when tracer runs.
    pub fn snapshot(&self) -> Option<Snapshot> {
        match self {
            Running::Tracer { api, .. } => {
                let (status, body) = crate::http::get(*api, "/api/snapshot").ok()?;
                (status == 200).then(|| serde_json::from_str(&body).ok())?
            }
            _ => None,
        }
    }

    pub fn stop(self) {
        match self {
            Running::Untraced => {}
            Running::Tracer { tracer, .. } => {
                tracer.stop();
            }
            Running::Bpftrace(mut child) => {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = child.try_wait() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The parts of `/api/snapshot` the bench reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Snapshot {
    pub routes: Vec<Route>,
    #[serde(default)]
    pub overflow: BTreeMap<String, u64>,
    pub health: Health,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Route {
    pub proxy: String,
    pub upstream: String,
    pub outcomes: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Health {
    pub events_received: u64,
    pub events_lost: u64,
}

impl Snapshot {
    /// The count of `outcome` over routes whose upstream starts with `prefix`, plus what the
    /// kernel could not key by route.
    pub fn count(&self, prefix: &str, outcome: &str) -> u64 {
        self.routes
            .iter()
            .filter(|r| r.upstream.starts_with(prefix))
            .map(|r| r.outcomes.get(outcome).copied().unwrap_or(0))
            .sum::<u64>()
            + self.overflow.get(outcome).copied().unwrap_or(0)
    }

    /// Every failure (of any cause) toward upstreams starting with `prefix`.
    pub fn failures(&self, prefix: &str) -> u64 {
        const FAILURES: [&str; 9] = [
            "refused",
            "connect_timeout",
            "unreachable",
            "no_ephemeral_port",
            "connect_error",
            "reset_before_response",
            "reset_mid_response",
            "closed_before_response",
            "response_timeout",
        ];
        FAILURES.iter().map(|o| self.count(prefix, o)).sum()
    }
}

/// CPU time (user + system) a process has used so far.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the command.
    let ticks: u64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / per_second)
}

/// A process's resident memory now and at its peak, in kB.
pub fn memory_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The median and the spread (min, max) of some ratios.
pub fn median_spread(values: &[f64]) -> (f64, f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    (median, sorted[0], sorted[n - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_spreads() {
        assert_eq!(median_spread(&[0.9, 1.0, 0.95]), (0.95, 0.9, 1.0));
        let (median, low, high) = median_spread(&[1.0, 0.9, 0.8, 0.7]);
        assert!((median - 0.85).abs() < 1e-12, "{median}");
        assert_eq!((low, high), (0.7, 1.0));
    }

    #[test]
    fn reads_this_process_cpu_and_memory() {
        let pid = std::process::id();
        let start = cpu_time(pid);
        // Spin until the process has used at least 50 ms more CPU: a cpu_time that never moved
        // would never get there (the spin gives up after 10 s of wall time and fails).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut x = 0u64;
        while cpu_time(pid) < start + Duration::from_millis(50) {
            for i in 0..1_000_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
            assert!(
                std::time::Instant::now() < deadline,
                "cpu_time did not move: {:?}",
                cpu_time(pid)
            );
        }
        let (rss, peak) = memory_kb(pid);
        assert!(rss > 0 && peak >= rss);
    }
}
