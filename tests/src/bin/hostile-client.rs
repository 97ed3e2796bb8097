//! A client that picks its own process name, as anyone on a host may:
//! `hostile-client NAME unix PATH N` names itself NAME (`prctl(PR_SET_NAME)`, any bytes but
//! NUL) and connects N times to the Unix socket PATH; `hostile-client NAME tcp ADDR N` the same
//! to a TCP address, `tcp-range IP:FIRST-LAST N` to each port of a range N times. It prints
//! how each connect ended (an errno, or `connected`).
//! `hostile-client NAME probe-listen PATH N` starts as php-fpm does: it connects to the socket
//! path it is about to serve ("is another server there?"), then binds and listens on it, and
//! serves N connections (printing `listening` once it does).

use std::{ffi::CString, os::unix::ffi::OsStrExt as _, path::PathBuf};

fn main() {
    let mut args = std::env::args_os().skip(1);
    let usage = "usage: hostile-client NAME unix|tcp|tcp-range|probe-listen TARGET N";
    let name = CString::new(args.next().expect(usage).as_bytes()).expect("a name without NUL");
    let kind = args.next().expect(usage);
    let target = args.next().expect(usage);
    let n: usize = args
        .next()
        .and_then(|n| n.to_str()?.parse().ok())
        .expect(usage);
    // SAFETY: PR_SET_NAME with a NUL-terminated name (the kernel keeps its first 15 bytes).
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    if kind.to_str() == Some("probe-listen") {
        let path = PathBuf::from(&target);
        match std::os::unix::net::UnixStream::connect(&path) {
            Ok(_) => println!("connected"),
            Err(e) => println!("{}", e.raw_os_error().unwrap_or(0)),
        }
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        println!("listening");
        for stream in listener.incoming().take(n) {
            drop(stream);
        }
        return;
    }
    for _ in 0..n {
        let result = match kind.to_str() {
            Some("unix") => tracer_tests::client::unix_connect(&PathBuf::from(&target)).map(drop),
            Some("tcp") => {
                let addr: std::net::SocketAddr =
                    target.to_str().and_then(|t| t.parse().ok()).expect(usage);
                std::net::TcpStream::connect(addr).map(drop)
            }
            // Every port of IP:FIRST-LAST, N times each (a storm of distinct upstreams).
            Some("tcp-range") => {
                let text = target.to_str().expect(usage);
                let (ip, ports) = text.rsplit_once(':').expect(usage);
                let (first, last) = ports.split_once('-').expect(usage);
                let ip: std::net::IpAddr = ip.parse().expect(usage);
                for port in first.parse::<u16>().expect(usage)..=last.parse().expect(usage) {
                    match std::net::TcpStream::connect((ip, port)) {
                        Ok(_) => println!("connected"),
                        Err(e) => println!("{}", e.raw_os_error().unwrap_or(0)),
                    }
                }
                continue;
            }
            _ => panic!("{usage}"),
        };
        match result {
            Ok(()) => println!("connected"),
            Err(e) => match e.raw_os_error() {
                Some(errno) => println!("{errno}"),
                None => println!("{e}"),
            },
        }
    }
}
