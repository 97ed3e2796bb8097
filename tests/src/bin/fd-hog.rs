//! A proxy out of file descriptors: `fd-hog N` lowers its RLIMIT_NOFILE, opens files until it
//! has none left, then calls socket() N times (each fails with EMFILE, as an nginx worker's
//! would) and prints how many failed. `fd-hog N accept` first queues N client connections on a
//! listener of its own, then, out of descriptors, calls accept4() N times instead.

use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;

fn main() {
    let mut args = std::env::args().skip(1);
    let attempts: usize = args
        .next()
        .and_then(|n| n.parse().ok())
        .expect("usage: fd-hog N [accept]");
    let accept = args.next().as_deref() == Some("accept");
    let limit = libc::rlimit {
        rlim_cur: 64,
        rlim_max: 64,
    };
    // SAFETY: plain setrlimit on this process.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    // The clients wait in the listener's queue: accept4() fails before taking one.
    let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
    let _clients: Vec<TcpStream> = if accept {
        let addr = listener.local_addr().expect("address");
        (0..attempts)
            .map(|_| TcpStream::connect(addr).expect("client"))
            .collect()
    } else {
        Vec::new()
    };
    let mut held = Vec::new();
    while let Ok(file) = std::fs::File::open("/dev/null") {
        held.push(file);
    }
    let mut failed = 0;
    for _ in 0..attempts {
        let fd = if accept {
            // SAFETY: plain accept4(2) on our listener, without the peer's address.
            unsafe {
                libc::accept4(
                    listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK,
                )
            }
        } else {
            // SAFETY: plain socket(2).
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) }
        };
        if fd < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EMFILE) {
            failed += 1;
        } else if fd >= 0 {
            // SAFETY: our own descriptor, closed at once.
            unsafe { libc::close(fd) };
        }
    }
    println!("{failed}");
}
