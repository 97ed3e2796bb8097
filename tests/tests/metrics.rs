//! `tracer run` as a Prometheus exporter: scraped by a real Prometheus server, checked by
//! promtool, capped in cardinality, and refusing a bad --listen before attaching anything.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tracer_tests::{
    client::refuse,
    http::{encode, free_port, get},
    kernel_tests_enabled,
    netns::Netns,
    sample,
    tracer_process::{Tracer, tracer_bin},
    upstream::{Behaviour, Upstream},
};

/// `tracer run` on a loopback port.
fn agent(extra: &[&str]) -> (Tracer, SocketAddr) {
    Tracer::agent(extra)
}

/// A Prometheus server scraping `target` every second; killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("tracer-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: tracer\n    \
                 static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (cargo xtask setup installs it)");
        let prometheus = Prometheus { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(get(addr, "/-/ready"), Ok((200, _))) {
            assert!(Instant::now() < deadline, "prometheus did not get ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        prometheus
    }

    /// The value of an instant query with a single result, if it has one.
    fn query(&self, promql: &str) -> Option<f64> {
        let (status, body) = get(
            self.addr,
            &format!("/api/v1/query?query={}", encode(promql)),
        )
        .ok()?;
        assert_eq!(status, 200, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        let result = json["data"]["result"].as_array()?;
        assert!(
            result.len() <= 1,
            "expected one series for {promql}: {body}"
        );
        result.first()?["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn prometheus_sees_exactly_the_refusals_that_happened() {
    if !kernel_tests_enabled("prometheus_sees_exactly_the_refusals_that_happened") {
        return;
    }
    let (tracer, agent_addr) = agent(&[]);
    let prometheus = Prometheus::start(agent_addr);
    let ns = Netns::new("prom");
    let upstream: SocketAddr = "127.77.40.1:8040".parse().unwrap();
    let n = 25;
    refuse(&ns, upstream, n);
    let failures =
        format!("sum(tracer_upstream_failures_total{{cause=\"refused\",upstream=\"{upstream}\"}})");
    let attempts = format!("sum(tracer_upstream_connects_total{{upstream=\"{upstream}\"}})");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = prometheus.query(&failures);
        if seen == Some(n as f64) {
            break;
        }
        assert!(seen.is_none_or(|v| v < n as f64), "over-counted: {seen:?}");
        assert!(
            Instant::now() < deadline,
            "Prometheus saw {seen:?} refusals, expected {n}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(prometheus.query(&attempts), Some(n as f64));
    assert_eq!(prometheus.query("up{job=\"tracer\"}"), Some(1.0));
    tracer.stop();
}

#[test]
fn a_real_scrape_passes_promtool_check_metrics() {
    if !kernel_tests_enabled("a_real_scrape_passes_promtool_check_metrics") {
        return;
    }
    let (tracer, agent_addr) = agent(&[]);
    // Failures and successes, so every family, the histogram included, has series.
    let ns = Netns::new("promtool");
    let healthy = Upstream::start(
        &ns,
        "127.77.41.1:8041".parse().unwrap(),
        Behaviour::Answer {
            idle_close: Duration::from_millis(50),
        },
    );
    refuse(&ns, "127.77.41.1:8042".parse().unwrap(), 3);
    ns.run(|| {
        for _ in 0..3 {
            tracer_tests::client::request(healthy.addr).expect("answered");
        }
    });
    let (status, scrape) = get(agent_addr, "/metrics").expect("scrape");
    assert_eq!(status, 200);
    let comm = tracer_tests::own_comm();
    let connect = format!(
        "tracer_upstream_connect_duration_seconds_count{{proxy=\"{comm}\",cgroup=\"/\",upstream=\"127.77.41.1:8041\"}}"
    );
    assert_eq!(sample(&scrape, &connect), Some(3.0), "{scrape}");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    std::io::Write::write_all(promtool.stdin.as_mut().unwrap(), scrape.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && complaints.trim().is_empty(),
        "promtool: {complaints}"
    );
    // What the kernel skipped: one series per attached program, adding up to what bpftool
    // shows for the programs tracer holds (names are compared only in sum: the kernel keeps 15
    // characters of a name, so sys_exit_accept and sys_exit_accept4 look alike there).
    let exported: Vec<f64> = scrape
        .lines()
        .filter(|l| l.starts_with("tracer_program_misses_total{program=\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert_eq!(
        exported.len(),
        tracer_user::capture::PROBES_IN_USE,
        "{scrape}"
    );
    let in_kernel: u64 = tracer_tests::bpf::program_misses(tracer.pid())
        .values()
        .sum();
    assert_eq!(exported.iter().sum::<f64>(), in_kernel as f64, "{scrape}");
    let (status, health) = get(agent_addr, "/healthz").unwrap();
    assert_eq!((status, health.as_str()), (200, "ok\n"));
    tracer.stop();
}

#[test]
fn upstreams_past_the_cap_are_folded_into_other_and_still_counted() {
    if !kernel_tests_enabled("upstreams_past_the_cap_are_folded_into_other_and_still_counted") {
        return;
    }
    let (tracer, agent_addr) = agent(&["--max-upstreams", "3"]);
    let ns = Netns::new("cap");
    let per_upstream = 4;
    // From a process of its own name: the other tests of this binary refuse too.
    let comm = "cap-client";
    for port in 8050..8056 {
        let out = ns.run(|| {
            Command::new(tracer_tests::process::test_bin("hostile-client"))
                .args([
                    comm,
                    "tcp",
                    &format!("127.77.42.1:{port}"),
                    &per_upstream.to_string(),
                ])
                .output()
                .expect("hostile-client")
        });
        let refused = format!("{}\n", libc::ECONNREFUSED).repeat(per_upstream);
        assert_eq!(String::from_utf8_lossy(&out.stdout), refused, "{out:?}");
    }
    let (_, scrape) = get(agent_addr, "/metrics").unwrap();
    let mine: Vec<&str> = scrape
        .lines()
        .filter(|l| {
            l.starts_with("tracer_upstream_failures_total{")
                && l.contains(&format!("proxy=\"{comm}\""))
        })
        .filter(|l| l.contains("cause=\"refused\""))
        .collect();
    let total: f64 = mine
        .iter()
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(
        total,
        (6 * per_upstream) as f64,
        "nothing lost by folding:\n{}",
        mine.join("\n")
    );
    let own = mine
        .iter()
        .filter(|l| l.contains("upstream=\"127.77.42.1:"))
        .count();
    assert!(
        own <= 3,
        "at most 3 upstreams of their own:\n{}",
        mine.join("\n")
    );
    assert!(
        mine.iter().any(|l| l.contains("upstream=\"other\"")),
        "{}",
        mine.join("\n")
    );
    assert!(
        sample(&scrape, "tracer_upstreams_folded").is_some_and(|v| v >= 3.0),
        "{scrape}"
    );
    // The live view's snapshot folds the same upstreams: as small as a scrape, nothing lost.
    let (status, body) = get(agent_addr, "/api/snapshot").unwrap();
    assert_eq!(status, 200);
    let snapshot: serde_json::Value = serde_json::from_str(&body).expect("snapshot JSON");
    let routes: Vec<&serde_json::Value> = snapshot["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .filter(|r| r["proxy"] == comm)
        .collect();
    let refused: u64 = routes
        .iter()
        .filter_map(|r| r["outcomes"]["refused"].as_u64())
        .sum();
    assert_eq!(refused, 6 * per_upstream as u64, "{body}");
    let listed = |upstream: &str| routes.iter().any(|r| r["upstream"] == upstream);
    for port in 8050..8056 {
        let upstream = format!("127.77.42.1:{port}");
        let in_scrape = mine
            .iter()
            .any(|l| l.contains(&format!("upstream=\"{upstream}\"")));
        assert_eq!(listed(&upstream), in_scrape, "{upstream}: {body}");
    }
    assert!(listed("other"), "{body}");
    tracer.stop();
}

/// Pins the calling thread to one CPU (the event budget is per CPU).
fn pin_to_one_cpu() {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_setaffinity(0) is this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0,
            "pinning to CPU 0"
        );
    }
}

#[test]
fn a_storm_is_counted_exactly_and_sampled_to_the_event_rate() {
    if !kernel_tests_enabled("a_storm_is_counted_exactly_and_sampled_to_the_event_rate") {
        return;
    }
    let (tracer, agent_addr) = agent(&["--event-rate", "5"]);
    let upstream = "127.77.43.1:8060";
    let events = Tracer::events(&["--upstream", upstream, "--event-rate", "5"]);
    let ns = Netns::new("storm");
    let n = 300;
    let started = Instant::now();
    ns.run(|| {
        pin_to_one_cpu();
        for _ in 0..n {
            TcpStream::connect(upstream).expect_err("nothing listens");
        }
    });
    let took = started.elapsed();
    // The budget is 5 per second per upstream, cause and CPU: the storm spans at most two
    // one-second windows of one CPU (twice that if the kernel handled some RSTs elsewhere).
    let windows = took.as_secs() + 2;
    let bound = 5 * windows as usize * 2;
    let shown = events.collect(n, Duration::from_secs(3), Duration::from_millis(500));
    let shown = shown
        .iter()
        .filter(|e| e["upstream"] == upstream && e["cause"] == "refused")
        .count();
    assert!(
        (5..=bound).contains(&shown),
        "{shown} refusals shown one by one, expected 5 to {bound} (storm took {took:?})"
    );
    // The counts are exact all the same, and the agent says how many it did not show.
    let comm = tracer_tests::own_comm();
    let series = format!(
        "tracer_upstream_failures_total{{proxy=\"{comm}\",cgroup=\"/\",upstream=\"{upstream}\",cause=\"refused\"}}"
    );
    let (_, scrape) = get(agent_addr, "/metrics").unwrap();
    assert_eq!(sample(&scrape, &series), Some(n as f64), "{scrape}");
    let sampled_out = sample(&scrape, "tracer_events_sampled_out_total").unwrap_or(0.0);
    assert!(
        sampled_out >= (n - bound) as f64,
        "{sampled_out} events sampled out, expected at least {}",
        n - bound
    );
    events.stop();
    let stderr = tracer.stop();
    assert!(stderr.contains("over --event-rate"), "{stderr}");
}

#[test]
fn a_bad_listen_address_fails_before_any_probe_is_attached() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(tracer_bin())
        .args(["run", "--listen", &addr])
        .output()
        .expect("tracer");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
    assert!(stderr.contains("pick one with --listen"), "{stderr}");
    assert!(
        !stderr.contains("probes attached"),
        "nothing may be attached first: {stderr}"
    );

    let out = Command::new(tracer_bin())
        .args(["run", "--listen", "localhost-ish"])
        .output()
        .expect("tracer");
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));
}

/// User plus system CPU time of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // After the command name in parentheses: state is field 3; utime and stime 14 and 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat format")
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn out_of_descriptors_the_agent_backs_off_and_does_not_count_itself() {
    if !kernel_tests_enabled("out_of_descriptors_the_agent_backs_off_and_does_not_count_itself") {
        return;
    }
    let (tracer, addr) = agent(&[]);
    // Few descriptors, the soft limit at the hard one, so that raising it cannot help.
    let limited = Command::new("prlimit")
        .args(["--pid", &tracer.pid().to_string(), "--nofile=128:128"])
        .status()
        .expect("prlimit (util-linux)");
    assert!(limited.success());
    // More idle clients than it has descriptors left: the listener stays readable and
    // accept() fails with EMFILE.
    let idle: Vec<TcpStream> = (0..300)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok())
        .collect();
    assert!(idle.len() > 200, "{} idle clients", idle.len());
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_ticks(tracer.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(tracer.pid()) - before;
    // A loop on a failing accept() burns the whole 2 s (200 ticks at 100 Hz); backing off
    // costs next to nothing.
    assert!(
        used < 50,
        "the agent used {used} ticks of CPU in 2 s while out of descriptors"
    );
    drop(idle);
    // Once the clients left, it serves again, and its own failed accepts are not a proxy's.
    let deadline = Instant::now() + Duration::from_secs(15);
    let scrape = loop {
        match get(addr, "/metrics") {
            Ok((200, body)) => break body,
            other => {
                assert!(Instant::now() < deadline, "no scrape: {other:?}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    assert!(
        !scrape.lines().any(|l| l.contains("proxy=\"tracer\"")),
        "the agent counted itself:\n{}",
        scrape
            .lines()
            .filter(|l| l.contains("proxy=\"tracer\""))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let stderr = tracer.stop();
    assert!(stderr.contains("cannot accept HTTP clients"), "{stderr}");
}
