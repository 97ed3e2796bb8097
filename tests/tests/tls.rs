//! TLS between the proxy and its upstreams (`tracer_tests::lab::tls`): behind nginx, HAProxy
//! and Apache, every failed attempt of each TLS fault must get the proxy's log's cause and
//! `tls_reason`, one for one, and a healthy TLS upstream none; the agent's metrics count them
//! by reason.
use std::time::{Duration, Instant};

use tracer_tests::{
    bpf::program_misses,
    http::get,
    kernel_tests_enabled,
    lab::{
        Software,
        tls::{self, Lab, ONE_AT_A_TIME, statuses},
    },
    sample,
    tracer_process::Tracer,
};

#[track_caller]
fn agrees(software: Software) {
    let report = tls::run(software);
    println!("{}", report.markdown());
    for line in &report.explanations {
        println!("{line}");
    }
    assert!(
        report.passed(),
        "{}\nhealthy upstream's failures: {:#?}",
        report.markdown(),
        report.healthy_failures
    );
    if report.skipped_runs == 0 {
        // Every failure tracer reported is the log's, and every one the log has. (Where the
        // kernel skipped runs of its programs, a preempting kernel under emulation, `passed`
        // allows as many missing or misjudged as runs skipped, and no more.)
        for row in &report.rows {
            assert_eq!(row.reported, row.agreeing, "{row:?}");
            assert_eq!(row.agreeing, row.logged, "{row:?}");
        }
    }
}

#[test]
fn tls_failures_behind_nginx_agree_with_its_error_log() {
    if kernel_tests_enabled("tls_failures_behind_nginx_agree_with_its_error_log") {
        agrees(Software::Nginx);
    }
}

#[test]
fn tls_failures_behind_haproxy_agree_with_its_log() {
    if kernel_tests_enabled("tls_failures_behind_haproxy_agree_with_its_log") {
        agrees(Software::Haproxy);
    }
}

#[test]
fn tls_failures_behind_apache_agree_with_its_error_log() {
    if kernel_tests_enabled("tls_failures_behind_apache_agree_with_its_error_log") {
        agrees(Software::Apache);
    }
}

/// The agent counts TLS failures exactly, by cause and by reason, in its metrics.
#[test]
fn tls_failures_are_counted_by_reason_in_the_metrics() {
    if !kernel_tests_enabled("tls_failures_are_counted_by_reason_in_the_metrics") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let lab = Lab::start("metrics");
    let (tracer, addr) = Tracer::agent(&[]);
    let expected = [
        (0, "plaintext_upstream", 7),
        (1, "proxy_rejected", 4),
        (2, "alert", 3),
    ];
    for (cell, _, n) in expected {
        statuses(lab.proxy, lab.cells[cell].path, n);
    }
    statuses(lab.proxy, "/plaintext-to-tls", 2);
    statuses(lab.proxy, "/kept-alive", 5);
    let series = |upstream: u16, rest: &str| {
        format!("{{proxy=\"nginx\",cgroup=\"/\",upstream=\"127.0.0.1:{upstream}\"{rest}}}")
    };
    let mut scrape = String::new();
    let counted = |scrape: &str| {
        expected.iter().all(|(cell, reason, n)| {
            let upstream = lab.cells[*cell].upstream;
            sample(
                scrape,
                &format!(
                    "tracer_upstream_tls_failures_total{}",
                    series(upstream, &format!(",tls_reason=\"{reason}\""))
                ),
            ) == Some(*n as f64)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        scrape = get(addr, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default();
        if counted(&scrape) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let tls_lines: Vec<&str> = scrape.lines().filter(|l| l.contains("tls")).collect();
    // Where the kernel skipped runs of tracer's programs (a preempting kernel under emulation)
    // up to that many may be missing; never more, never one too many.
    let skipped: u64 = program_misses(tracer.pid()).values().sum();
    let mut missing = 0.0;
    let mut check = |series: String, n: f64| {
        let got = sample(&scrape, &series).unwrap_or(0.0);
        assert!(got <= n, "{series}: {got} > {n}\n{}", tls_lines.join("\n"));
        missing += n - got;
    };
    for (cell, reason, n) in expected {
        let upstream = lab.cells[cell].upstream;
        check(
            format!(
                "tracer_upstream_tls_failures_total{}",
                series(upstream, &format!(",tls_reason=\"{reason}\""))
            ),
            n as f64,
        );
        check(
            format!(
                "tracer_upstream_failures_total{}",
                series(upstream, ",cause=\"tls_handshake_failed\"")
            ),
            n as f64,
        );
    }
    check(
        format!(
            "tracer_upstream_failures_total{}",
            series(lab.cells[4].upstream, ",cause=\"plaintext_to_tls\"")
        ),
        2.0,
    );
    assert!(
        missing <= skipped as f64,
        "{missing} counts missing, {skipped} runs skipped:\n{}\n{}",
        tls_lines.join("\n"),
        tracer.stderr()
    );
    drop(tracer);
}
