//! An upstream server that is a process of its own, so tests can make it die the ways real
//! upstreams do: `upstream-process ADDR [oom|segv|exit|prefork] [AFTER_MS]`.
//!
//! It listens on ADDR and answers every request (`upstream::Behaviour::Answer`). After AFTER_MS
//! it allocates memory until the kernel OOM-kills it (`oom`, in a memory-limited cgroup),
//! crashes with SIGSEGV (`segv`), or exits with code 0 (`exit`). With no action it runs until
//! killed.
//!
//! `prefork` is a pre-fork server instead: the process (the master) keeps the listener and
//! forks one worker, which accepts connections, reads their requests and never answers; the
//! master only waits. Tests find the worker among its children and kill it.

use std::{io::Read, net::TcpListener, time::Duration};

use tracer_tests::upstream::{Behaviour, serve_listener};

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args
        .next()
        .expect("usage: upstream-process ADDR [oom|segv|exit] [AFTER_MS]");
    let action = args.next().unwrap_or_default();
    let after = Duration::from_millis(args.next().and_then(|a| a.parse().ok()).unwrap_or(500));
    let listener = TcpListener::bind(&addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    if action == "prefork" {
        prefork(listener);
    }
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

/// Forks the worker (before any thread starts), tells the test, and waits.
fn prefork(listener: TcpListener) -> ! {
    // SAFETY: no other thread exists yet; the child only uses the listener and the heap.
    match unsafe { libc::fork() } {
        0 => {
            // SAFETY: plain prctl: the worker dies with its master.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
            let mut held = Vec::new();
            for mut stream in listener.incoming().flatten() {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request);
                held.push(stream);
            }
            std::process::exit(0)
        }
        -1 => panic!("fork: {}", std::io::Error::last_os_error()),
        _ => {
            println!("listening");
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
    }
}
