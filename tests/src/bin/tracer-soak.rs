//! `cargo xtask soak [-- --minutes N --restart-every M --out FILE]`: the agent under a changing
//! fault mix for a long time. Every second: 20 refused connects to upstreams never seen before,
//! refusals, resets and connect timeouts toward fixed upstreams, healthy requests; every two
//! minutes an upstream OOM-killed in a memory cgroup; stalled `/api/events` readers; the agent
//! restarted every M minutes. Reports the agent's RSS and CPU over time, what it counted against
//! what the generator did (before each restart and at the end), events lost, and programs left
//! loaded after each stop. Exits non-zero when a count is off or a program leaked.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Write as _,
    net::{SocketAddr, TcpStream},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tracer_tests::{
    bpf::{program_loaded, programs_held_by},
    client::{connect_with_timeout, request},
    http::get,
    kernel_tests_enabled,
    netns::Netns,
    own_comm,
    process::{MemoryCgroup, UpstreamProcess},
    tracer_process::Tracer,
    upstream::{Behaviour, Upstream},
};

struct Options {
    minutes: u64,
    restart_every: u64,
    out: Option<String>,
}

fn options() -> Options {
    let mut options = Options {
        minutes: 30,
        restart_every: 10,
        out: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next();
        match (arg.as_str(), value) {
            ("--minutes", Some(v)) => options.minutes = v.parse().expect("--minutes N"),
            ("--restart-every", Some(v)) => {
                options.restart_every = v.parse().expect("--restart-every M")
            }
            ("--out", Some(v)) => options.out = Some(v),
            _ => panic!("usage: tracer-soak [--minutes N] [--restart-every M] [--out FILE]"),
        }
    }
    options
}

/// What the generator did since the agent last started, per cause.
#[derive(Default)]
struct Done {
    refused: AtomicU64,
    reset: AtomicU64,
    timeout: AtomicU64,
    healthy: AtomicU64,
    oom: AtomicU64,
}

impl Done {
    fn take(&self) -> BTreeMap<&'static str, u64> {
        [
            ("refused", self.refused.swap(0, Ordering::SeqCst)),
            (
                "reset_before_response",
                self.reset.swap(0, Ordering::SeqCst),
            ),
            ("connect_timeout", self.timeout.swap(0, Ordering::SeqCst)),
            ("healthy requests", self.healthy.swap(0, Ordering::SeqCst)),
            ("OOM kills", self.oom.swap(0, Ordering::SeqCst)),
        ]
        .into()
    }
}

const REFUSED: &str = "127.81.0.1:9001";
const RESETS: &str = "127.81.0.1:9002";
const DROPPED: &str = "127.81.0.1:9003";
const HEALTHY: &str = "127.81.0.1:9004";
const OOM: &str = "127.81.0.1:9010";
/// The agent's --idle-after: short, so that retiring idle routes runs all the time.
const IDLE_AFTER: &str = "1m";

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

/// Runs `f` `per_second` times a second until `stop`, unless `paused`.
fn paced(stop: &AtomicBool, paused: &AtomicBool, per_second: u32, mut f: impl FnMut()) {
    let period = Duration::from_secs(1) / per_second;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if !paused.load(Ordering::Relaxed) {
            f();
        }
        next += period;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        } else {
            next = Instant::now();
        }
    }
}

/// The sum over series of `family{…cause="cause"…}` samples for processes named `comm`.
fn counted(scrape: &str, comm: &str, cause: &str) -> u64 {
    scrape
        .lines()
        .filter(|l| {
            l.starts_with("tracer_upstream_failures_total{")
                && l.contains(&format!("proxy=\"{comm}\""))
                && l.contains(&format!("cause=\"{cause}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn sample(scrape: &str, series: &str) -> u64 {
    scrape
        .lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let fields: Vec<u64> = s
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|f| f.parse().ok())
                .collect();
            Some(fields.iter().sum())
        })
        .unwrap_or(0)
}

/// A running agent and the readers that stall on its event stream.
struct Agent {
    tracer: Tracer,
    addr: SocketAddr,
    _stalled: Vec<TcpStream>,
}

impl Agent {
    fn start() -> Agent {
        let (tracer, addr) = Tracer::agent(&["--idle-after", IDLE_AFTER, "--summary-every", "60s"]);
        // Readers that ask for the event stream and never read it.
        let stalled = (0..5)
            .filter_map(|_| {
                let mut s = TcpStream::connect(addr).ok()?;
                s.write_all(b"GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n")
                    .ok()?;
                Some(s)
            })
            .collect();
        Agent {
            tracer,
            addr,
            _stalled: stalled,
        }
    }

    /// Stops it; the ids of its programs still loaded 5 s later.
    fn stop(self) -> Vec<u32> {
        let held = programs_held_by(self.tracer.pid());
        self.tracer.stop();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left: Vec<u32> = held
                .iter()
                .copied()
                .filter(|id| program_loaded(*id))
                .collect();
            if left.is_empty() || Instant::now() > deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn main() -> ExitCode {
    if !kernel_tests_enabled("the soak") {
        return ExitCode::SUCCESS;
    }
    let options = options();
    let comm = own_comm();
    let ns = Netns::new("soak");
    ns.firewall(&format!(
        "ip daddr 127.81.0.1 tcp dport {} drop",
        addr(DROPPED).port()
    ));
    let _resets = Upstream::start(&ns, addr(RESETS), Behaviour::ResetBeforeAnswer);
    let _healthy = Upstream::start(
        &ns,
        addr(HEALTHY),
        Behaviour::Answer {
            idle_close: Duration::from_secs(5),
        },
    );
    let done = Arc::new(Done::default());
    let stop = Arc::new(AtomicBool::new(false));
    let paused = Arc::new(AtomicBool::new(false));
    let mut agent = Some(Agent::start());
    let started = Instant::now();

    // The generators: each runs `f` so many times a second, in the namespace, until stopped.
    let mut threads = Vec::new();
    let mut generate = |per_second: u32, mut f: Box<dyn FnMut(&Done) + Send>| {
        let (stop, paused, done) = (stop.clone(), paused.clone(), done.clone());
        let name = ns.name.clone();
        threads.push(std::thread::spawn(move || {
            tracer_tests::netns::enter(&name);
            paced(&stop, &paused, per_second, || f(&done))
        }));
    };
    // 20 upstreams never seen before, each second.
    let mut i: u32 = 0;
    generate(
        20,
        Box::new(move |done| {
            let target = SocketAddr::from((
                [127, 82, ((i >> 8) & 0xff) as u8, (i & 0xff) as u8],
                9000 + (i >> 16) as u16,
            ));
            i += 1;
            if TcpStream::connect(target).is_err() {
                done.refused.fetch_add(1, Ordering::SeqCst);
            }
        }),
    );
    generate(
        10,
        Box::new(|done| {
            if TcpStream::connect(addr(REFUSED)).is_err() {
                done.refused.fetch_add(1, Ordering::SeqCst);
            }
        }),
    );
    generate(
        5,
        Box::new(|done| {
            if request(addr(RESETS)).is_err() {
                done.reset.fetch_add(1, Ordering::SeqCst);
            }
        }),
    );
    generate(
        2,
        Box::new(|done| {
            if matches!(
                connect_with_timeout(addr(DROPPED), Duration::from_millis(100)),
                Ok(true)
            ) {
                done.timeout.fetch_add(1, Ordering::SeqCst);
            }
        }),
    );
    generate(
        20,
        Box::new(|done| {
            if request(addr(HEALTHY)).is_ok() {
                done.healthy.fetch_add(1, Ordering::SeqCst);
            }
        }),
    );

    let mut report = String::new();
    let _ = writeln!(
        report,
        "## Soak: {} minutes, agent restarted every {} minutes (`--idle-after {IDLE_AFTER}`)\n",
        options.minutes, options.restart_every
    );
    let _ = writeln!(
        report,
        "| minute | agent RSS | agent CPU | upstreams released so far |"
    );
    let _ = writeln!(report, "|---|---|---|---|");
    let mut checks = String::new();
    let mut failed = false;
    let current = |agent: &Option<Agent>| -> (u32, SocketAddr) {
        let agent = agent.as_ref().expect("an agent runs");
        (agent.tracer.pid(), agent.addr)
    };
    let mut last_cpu = (cpu_ticks(current(&agent).0), Instant::now());
    let mut rss_by_minute = Vec::new();
    let memory = MemoryCgroup::new("soak", 64 << 20);
    let mut minute = 0;
    while minute < options.minutes {
        std::thread::sleep(
            Duration::from_secs(60).saturating_sub(
                started
                    .elapsed()
                    .saturating_sub(Duration::from_secs(60 * minute)),
            ),
        );
        minute += 1;
        // Every two minutes an upstream is OOM-killed (its listener dies with it).
        if minute % 2 == 0 {
            let mut victim =
                UpstreamProcess::start_with(&ns, OOM, "oom", 100, |pid| memory.add(pid));
            victim.wait();
            done.oom.fetch_add(1, Ordering::SeqCst);
        }
        let (pid, agent_addr) = current(&agent);
        let (cpu, at) = (cpu_ticks(pid), Instant::now());
        let cpu_percent = (cpu - last_cpu.0) as f64 / at.duration_since(last_cpu.1).as_secs_f64();
        last_cpu = (cpu, at);
        let rss = rss_kb(pid);
        rss_by_minute.push(rss);
        let released = get(agent_addr, "/metrics")
            .map(|(_, s)| sample(&s, "tracer_upstreams_released_total"))
            .unwrap_or(0);
        let _ = writeln!(
            report,
            "| {minute} | {:.1} MB | {cpu_percent:.1}% | {released} |",
            rss as f64 / 1024.0
        );
        eprintln!("soak: minute {minute}: RSS {rss} kB, CPU {cpu_percent:.1}%");
        if minute % options.restart_every == 0 || minute == options.minutes {
            // Quiet, let the last attempts end and be counted, then compare.
            paused.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_secs(2));
            let (_, scrape) = get(agent_addr, "/metrics").expect("a scrape");
            let generated = done.take();
            let _ = writeln!(checks, "\nAt minute {minute}, for this agent's run:\n");
            let _ = writeln!(checks, "| what | generated | counted | off |");
            let _ = writeln!(checks, "|---|---|---|---|");
            for cause in ["refused", "reset_before_response", "connect_timeout"] {
                let want = generated[cause];
                let got = counted(&scrape, &comm, cause);
                let off = got as i64 - want as i64;
                failed |= off != 0;
                let _ = writeln!(checks, "| {cause} | {want} | {got} | {off} |");
            }
            let oom_counted = sample(
                &scrape,
                "tracer_listener_deaths_total{upstream=\"127.81.0.1:9010\",comm=\"upstream-proces\",reason=\"oom_killed\"}",
            );
            let _ = writeln!(
                checks,
                "| OOM kills (listener deaths) | {} | {oom_counted} | {} |",
                generated["OOM kills"],
                oom_counted as i64 - generated["OOM kills"] as i64
            );
            failed |= oom_counted != generated["OOM kills"];
            let lost = sample(&scrape, "tracer_events_lost_total");
            let lost_lifecycle = sample(&scrape, "tracer_lifecycle_events_lost_total");
            let overflow = scrape
                .lines()
                .filter(|l| l.contains("proxy=\"other\""))
                .count();
            let _ = writeln!(
                checks,
                "\nhealthy requests {}; failure events lost {lost}, lifecycle records lost {lost_lifecycle}; \
                 series counted under proxy=\"other\" (kernel table full) {overflow}",
                generated["healthy requests"]
            );
            failed |= overflow > 0;
            let leaked = agent.take().expect("an agent runs").stop();
            let _ = writeln!(
                checks,
                "programs still loaded 5 s after the agent stopped: {leaked:?}"
            );
            failed |= !leaked.is_empty();
            if minute < options.minutes {
                agent = Some(Agent::start());
                last_cpu = (cpu_ticks(current(&agent).0), Instant::now());
                done.take();
                paused.store(false, Ordering::SeqCst);
            } else {
                stop.store(true, Ordering::SeqCst);
            }
        }
    }
    for thread in threads {
        let _ = thread.join();
    }
    let first = rss_by_minute.first().copied().unwrap_or(0);
    let peak = rss_by_minute.iter().copied().max().unwrap_or(0);
    let _ = writeln!(
        report,
        "\nRSS: {:.1} MB after the first minute, {:.1} MB at most.\n{checks}",
        first as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    println!("{report}");
    if let Some(out) = &options.out {
        std::fs::write(out, &report).expect("writing the report");
    }
    if failed {
        eprintln!("soak: FAILED (a count is off, the kernel table filled, or a program leaked)");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
