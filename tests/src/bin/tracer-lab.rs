//! `cargo xtask lab [--proxy nginx|haproxy|apache]`: runs the fault lab behind each proxy (all
//! three when none is named), and real application servers (gunicorn, php-fpm) behind nginx,
//! then the TLS cells behind each (`lab::tls`), and prints for each the agreement table between
//! tracer and the proxy's own logs. Exits
//! non-zero when a cell falls below the target.
//!
//! Interrupted (Ctrl-C, SIGTERM), it removes what it made: namespaces, nginx, its tracer.

use std::process::ExitCode;

use signal_hook::{
    consts::{SIGINT, SIGTERM},
    iterator::Signals,
};
use tracer_tests::{kernel_tests_enabled, lab};

const USAGE: &str = "usage: tracer-lab [--proxy nginx|haproxy|apache]...";

/// The proxies named with `--proxy` (repeated, or separated by commas); all when none is.
fn proxies(args: &[String]) -> Result<Vec<lab::Software>, String> {
    let mut chosen = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let names = match arg.strip_prefix("--proxy=") {
            Some(names) => names,
            None if arg == "--proxy" => args.next().ok_or("--proxy needs a name")?,
            None => return Err(format!("unknown argument {arg:?}\n{USAGE}")),
        };
        for name in names.split(',') {
            let software = lab::Software::parse(name).ok_or_else(|| {
                format!("unknown proxy {name:?}: the lab runs nginx, haproxy and apache")
            })?;
            if !chosen.contains(&software) {
                chosen.push(software);
            }
        }
    }
    Ok(if chosen.is_empty() {
        lab::Software::ALL.to_vec()
    } else {
        chosen
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let proxies = match proxies(&args) {
        Ok(proxies) => proxies,
        Err(e) => {
            eprintln!("tracer-lab: {e}");
            return ExitCode::from(2);
        }
    };
    if !kernel_tests_enabled("the fault lab") {
        return ExitCode::FAILURE;
    }
    match Signals::new([SIGINT, SIGTERM]) {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                if let Some(signal) = signals.forever().next() {
                    eprintln!("tracer-lab: interrupted; cleaning up");
                    lab::clean_up_after_interrupt();
                    std::process::exit(128 + signal);
                }
            });
        }
        Err(e) => eprintln!(
            "tracer-lab: cannot handle signals ({e}); an interrupted run is cleaned up by the next"
        ),
    }
    // Behind nginx, the real application servers (gunicorn, php-fpm) too.
    let tls_proxies = proxies.clone();
    let matrices = proxies.into_iter().flat_map(|software| {
        let mut matrices = vec![lab::Matrix::for_proxy(software)];
        if software == lab::Software::Nginx {
            matrices.push(lab::Matrix::apps());
        }
        matrices
    });
    let mut failed = Vec::new();
    for matrix in matrices {
        let report = lab::run(&matrix, &lab::Options::default());
        println!("{report}");
        if !report.passed() {
            failed.push(format!("{} ({})", matrix.software, matrix.name));
        }
    }
    // TLS between each proxy and its upstreams (lab::tls).
    for software in tls_proxies {
        let report = lab::tls::run(software);
        println!("{}", report.markdown());
        if !report.passed() {
            failed.push(format!("{software} (TLS)"));
        }
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("tracer-lab: below target behind {}", failed.join(", "));
        ExitCode::FAILURE
    }
}
