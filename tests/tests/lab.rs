//! The fault lab as a test: real proxies (nginx, HAProxy, Apache httpd), upstreams that fail on
//! purpose, tracer as a separate process. tracer must agree with each proxy's own logs on every
//! failed attempt (≥ 99.5% per upstream and cause), report nothing for healthy upstreams, and
//! explain every 502/503/504.

use tracer_tests::{kernel_tests_enabled, lab};

fn lab_passes_behind(software: lab::Software) {
    let report = lab::run(&lab::Matrix::for_proxy(software), &lab::Options::default());
    println!("{report}");
    assert!(
        report.passed(),
        "the lab failed behind {software}:\n{report}"
    );
}

#[test]
fn tracer_agrees_with_nginx_error_log_on_every_failure() {
    if !kernel_tests_enabled("tracer_agrees_with_nginx_error_log_on_every_failure") {
        return;
    }
    lab_passes_behind(lab::Software::Nginx);
}

#[test]
fn tracer_agrees_with_haproxy_log_on_every_failure() {
    if !kernel_tests_enabled("tracer_agrees_with_haproxy_log_on_every_failure") {
        return;
    }
    lab_passes_behind(lab::Software::Haproxy);
}

#[test]
fn tracer_agrees_with_apache_error_log_on_every_failure() {
    if !kernel_tests_enabled("tracer_agrees_with_apache_error_log_on_every_failure") {
        return;
    }
    lab_passes_behind(lab::Software::Apache);
}

#[test]
fn tracer_agrees_with_nginx_on_real_app_servers() {
    if !kernel_tests_enabled("tracer_agrees_with_nginx_on_real_app_servers") {
        return;
    }
    let report = lab::run(&lab::Matrix::apps(), &lab::Options::default());
    println!("{report}");
    assert!(report.passed(), "the app servers' lab failed:\n{report}");
}

#[test]
fn lab_can_run_twice_in_a_row() {
    if !kernel_tests_enabled("lab_can_run_twice_in_a_row") {
        return;
    }
    // A small matrix behind each proxy, twice: a run must leave nothing that breaks the next.
    // In a kernel guest, behind nginx only: each run costs half a minute there, and what a run
    // leaves behind does not depend on the kernel.
    let proxies: &[lab::Software] = if std::env::var_os("TRACER_TEST_GUEST").is_some() {
        &[lab::Software::Nginx]
    } else {
        &lab::Software::ALL
    };
    for &software in proxies {
        let mut matrix = lab::Matrix::for_proxy(software);
        matrix.retain_routes(|r| r.name == "refused" || r.name == "healthy");
        for route in &mut matrix.routes {
            route.requests = 20;
        }
        for _ in 0..2 {
            let report = lab::run(&matrix, &lab::Options::default());
            assert!(report.passed(), "{report}");
        }
    }
    let leftovers = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let leftovers = String::from_utf8_lossy(&leftovers.stdout);
    assert!(
        !leftovers.contains(&format!("lab-proxy-{}", std::process::id())),
        "{leftovers}"
    );
    assert!(
        !std::path::Path::new(lab::UNIX_DIR).exists(),
        "the lab left {} behind",
        lab::UNIX_DIR
    );
}
