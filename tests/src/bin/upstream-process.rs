//! An upstream server that is a process of its own, so tests can make it die the ways real
//! upstreams do: `upstream-process ADDR [oom|segv|exit] [AFTER_MS]`.
//!
//! It listens on ADDR and answers every request (`upstream::Behaviour::Answer`). After AFTER_MS
//! it allocates memory until the kernel OOM-kills it (`oom`, in a memory-limited cgroup),
//! crashes with SIGSEGV (`segv`), or exits with code 0 (`exit`). With no action it runs until
//! killed.

use std::{net::TcpListener, time::Duration};

use tracer_tests::upstream::{Behaviour, serve_listener};

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args
        .next()
        .expect("usage: upstream-process ADDR [oom|segv|exit] [AFTER_MS]");
    let action = args.next().unwrap_or_default();
    let after = Duration::from_millis(args.next().and_then(|a| a.parse().ok()).unwrap_or(500));
    let listener = TcpListener::bind(&addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    std::thread::spawn(move || {
        serve_listener(
            listener,
            Behaviour::Answer {
                idle_close: Duration::from_secs(30),
            },
        )
    });
    // Tell the test we listen.
    println!("listening");
    std::thread::sleep(after);
    match action.as_str() {
        "oom" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                // Touch every page so the memory is really used.
                hoard.push(vec![1u8; 16 << 20]);
            }
        }
        "segv" => {
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: plain setrlimit, signal and raise. Rust's runtime handles SIGSEGV (to
            // report stack overflows) and would swallow a raised one: restore the default.
            unsafe {
                libc::setrlimit(libc::RLIMIT_CORE, &no_core);
                libc::signal(libc::SIGSEGV, libc::SIG_DFL);
                libc::raise(libc::SIGSEGV);
            }
            unreachable!("SIGSEGV kills the process");
        }
        "exit" => std::process::exit(0),
        _ => loop {
            std::thread::sleep(Duration::from_secs(60));
        },
    }
}
