//! A proxy out of file descriptors: `fd-hog N` lowers its RLIMIT_NOFILE, opens files until it
//! has none left, then calls socket() N times (each fails with EMFILE, as an nginx worker's
//! would) and prints how many failed.

fn main() {
    let attempts: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("usage: fd-hog N");
    let limit = libc::rlimit {
        rlim_cur: 64,
        rlim_max: 64,
    };
    // SAFETY: plain setrlimit on this process.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    let mut held = Vec::new();
    while let Ok(file) = std::fs::File::open("/dev/null") {
        held.push(file);
    }
    let mut failed = 0;
    for _ in 0..attempts {
        // SAFETY: plain socket(2); a descriptor it might return is closed at once.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        if fd < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EMFILE) {
            failed += 1;
        } else if fd >= 0 {
            // SAFETY: our own descriptor.
            unsafe { libc::close(fd) };
        }
    }
    println!("{failed}");
}
