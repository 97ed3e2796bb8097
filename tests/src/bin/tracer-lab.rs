//! `cargo xtask lab`: runs the nginx fault lab and prints the agreement table between tracer and
//! nginx's error log. Exits non-zero when a cell falls below the target.
//!
//! Interrupted (Ctrl-C, SIGTERM), it removes what it made: namespaces, nginx, its tracer.

use std::process::ExitCode;

use signal_hook::{
    consts::{SIGINT, SIGTERM},
    iterator::Signals,
};
use tracer_tests::{kernel_tests_enabled, lab};

fn main() -> ExitCode {
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
    let report = lab::run(&lab::Matrix::standard(), &lab::Options::default());
    print!("{report}");
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
