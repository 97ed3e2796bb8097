//! The kernel's count tables never fill for good: after a storm of distinct upstreams, idle
//! routes are retired into the agent (exactly, monotonically), folded upstreams are forgotten,
//! idle admitted ones give their places up, and new upstreams get series of their own.
//! (A test binary of its own: the agent sees the whole host, and other tests' upstreams would
//! take the places this one frees.)

use std::{
    process::Command,
    time::{Duration, Instant},
};

use tracer_tests::{http::get, kernel_tests_enabled, netns::Netns, sample, tracer_process::Tracer};

/// The refusals of processes named `comm` in a scrape: (upstream label, count) per series.
fn refusals_of(comm: &str, scrape: &str) -> Vec<(String, f64)> {
    scrape
        .lines()
        .filter(|l| {
            l.starts_with("tracer_upstream_failures_total{")
                && l.contains(&format!("proxy=\"{comm}\""))
                && l.contains("cause=\"refused\"")
        })
        .filter_map(|l| {
            let upstream = l
                .split("upstream=\"")
                .nth(1)?
                .split('"')
                .next()?
                .to_string();
            Some((upstream, l.rsplit(' ').next()?.parse().ok()?))
        })
        .filter(|(_, n)| *n > 0.0)
        .collect()
}

#[test]
fn after_a_storm_of_upstreams_idle_routes_are_retired_and_new_upstreams_get_series() {
    if !kernel_tests_enabled(
        "after_a_storm_of_upstreams_idle_routes_are_retired_and_new_upstreams_get_series",
    ) {
        return;
    }
    // Long enough for the storm below to end within it, even under emulation beside another
    // guest (3 s was not: a storm that outlasts it retires its first pass's routes early).
    let idle_after = Duration::from_secs(10);
    let (tracer, agent_addr) = Tracer::agent(&[
        "--max-upstreams",
        "6",
        "--idle-after",
        &format!("{}s", idle_after.as_secs()),
    ]);
    // The scrapes' own connections are a route of this process: it takes the first place.
    get(agent_addr, "/metrics").unwrap();
    let ns = Netns::new("storm");
    // The storm comes from a process of its own, so that the other tests' refusals (this
    // process's) stay apart.
    let storm = "storm-client";
    let refuse = |target: &str, kind: &str, n: usize, attempts: usize| {
        let out = ns.run(|| {
            Command::new(tracer_tests::process::test_bin("hostile-client"))
                .args([storm, kind, target, &n.to_string()])
                .output()
                .expect("hostile-client")
        });
        let refused = format!("{}\n", libc::ECONNREFUSED).repeat(attempts);
        assert_eq!(String::from_utf8_lossy(&out.stdout), refused, "{out:?}");
    };
    let my_refusals = |scrape: &str| refusals_of(storm, scrape);
    // A storm of 60 distinct upstreams from one process, quicker than --idle-after: 5 get
    // series, 55 are folded into `other`.
    let storm_began = Instant::now();
    refuse("127.77.43.1:9100-9159", "tcp-range", 2, 120);
    let storm_took = storm_began.elapsed();
    assert!(
        storm_took < idle_after,
        "the storm took {storm_took:?}: too slow a host for --idle-after {idle_after:?}"
    );
    let (_, scrape) = get(agent_addr, "/metrics").unwrap();
    let refusals = my_refusals(&scrape);
    assert_eq!(
        refusals.iter().map(|(_, n)| n).sum::<f64>(),
        120.0,
        "{refusals:?}"
    );
    assert_eq!(
        sample(&scrape, "tracer_upstreams_folded"),
        Some(55.0),
        "{scrape}"
    );
    // Idle for --idle-after: the kernel entries are freed, the counts move to the agent (all
    // under `other` now: the admitted upstreams gave their places up, as upstreams were
    // waiting), and nothing is lost.
    let deadline = Instant::now() + idle_after + Duration::from_secs(40);
    let scrape = loop {
        let (_, scrape) = get(agent_addr, "/metrics").unwrap();
        if sample(&scrape, "tracer_upstreams_released_total") == Some(5.0)
            && sample(&scrape, "tracer_upstreams_folded") == Some(0.0)
        {
            break scrape;
        }
        assert!(Instant::now() < deadline, "nothing retired:\n{scrape}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        my_refusals(&scrape),
        vec![("other".to_string(), 120.0)],
        "every refusal under other, exactly"
    );
    assert_eq!(sample(&scrape, "tracer_upstreams_folded_total"), Some(55.0));
    // A new upstream after the storm gets a series of its own, and the totals still add up.
    refuse("127.77.43.2:9200", "tcp", 3, 3);
    let (_, scrape) = get(agent_addr, "/metrics").unwrap();
    let mut refusals = my_refusals(&scrape);
    refusals.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        refusals,
        vec![
            ("127.77.43.2:9200".to_string(), 3.0),
            ("other".to_string(), 120.0)
        ]
    );
    let stderr = tracer.stop();
    assert!(
        stderr
            .lines()
            .filter(|l| l.contains("new failure(s)"))
            .count()
            <= 11,
        "the summary is capped:\n{stderr}"
    );
}
