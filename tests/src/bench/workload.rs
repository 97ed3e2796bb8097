//! The bench's workloads, generated from a private namespace by as many threads as there are
//! cores.

use std::{
    io::Read as _,
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{
    lab::{LabAddr, Route, Tier, nginx::Nginx},
    netns::Netns,
};

/// Where nothing listens: every connect is refused.
pub const CLOSED: &str = "127.79.1.1:9";
/// A server that accepts and closes at once.
pub const SERVER: &str = "127.79.2.1:8090";
/// nginx, proxying to its own responder without keep-alive.
pub const NGINX: &str = "127.0.0.1:8091";
pub const RESPONDER_PORT: u16 = 8092;
/// A second nginx, proxying over TLS (session resumption on, no keep-alive) to its own TLS
/// responder.
pub const NGINX_TLS: &str = "127.0.0.1:8093";
pub const TLS_RESPONDER: &str = "127.79.3.1:8094";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Workload {
    /// (a) connects to a closed port: every one refused.
    Refused,
    /// (b) connects to a listening server: every one accepted.
    Accepted,
    /// (c) HTTP through nginx to an upstream without keep-alive (wrk).
    Http,
    /// (d) accepted connects with 1% refused.
    Mix,
    /// (e) HTTP through nginx to a TLS upstream without keep-alive (wrk): the first-bytes
    /// probes' cost on the connections they follow through a handshake.
    Https,
}

impl Workload {
    pub const ALL: [Workload; 5] = [
        Workload::Refused,
        Workload::Accepted,
        Workload::Http,
        Workload::Mix,
        Workload::Https,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Refused => "(a) connect storm, all refused",
            Workload::Accepted => "(b) connect/accept/close storm",
            Workload::Http => "(c) HTTP through nginx, no upstream keep-alive",
            Workload::Mix => "(d) mix, 1% refused",
            Workload::Https => "(e) HTTP through nginx to a TLS upstream, no keep-alive",
        }
    }
}

/// What a workload did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Done {
    /// Operations (connects, or HTTP requests) and how long they took.
    pub ops: u64,
    pub elapsed: Duration,
    /// Connects refused and connects accepted, as the generator saw them.
    pub refused: u64,
    pub accepted: u64,
}

impl Done {
    pub fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The namespace the workloads run in, with their server and nginx.
pub struct Env {
    pub ns: Netns,
    threads: usize,
    server_stop: Arc<AtomicBool>,
    server: Option<JoinHandle<()>>,
    _nginx: Nginx,
    _tls_nginx: Nginx,
    dir: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let ns = Netns::new("bench");
        // Room for many short connections from one address, and no TIME_WAIT: otherwise how
        // full the TIME_WAIT table is after the previous run decides the next one's rate.
        for (key, value) in [
            ("net.ipv4.ip_local_port_range", "1024 65535"),
            ("net.ipv4.tcp_tw_reuse", "1"),
            ("net.ipv4.tcp_max_tw_buckets", "0"),
        ] {
            let status = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &ns.name,
                    "sysctl",
                    "-q",
                    "-w",
                    &format!("{key}={value}"),
                ])
                .status()
                .expect("sysctl");
            assert!(status.success(), "sysctl {key}");
        }
        let server_stop = Arc::new(AtomicBool::new(false));
        let server = {
            let stop = server_stop.clone();
            let netns = ns.name.clone();
            let (ready_tx, ready) = std::sync::mpsc::channel();
            let handle = std::thread::spawn(move || {
                crate::netns::enter(&netns);
                let listener = TcpListener::bind(SERVER).expect("bench server");
                ready_tx.send(()).expect("ready");
                for stream in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    // Close at once: the server closes first, so clients keep no TIME_WAIT.
                    drop(stream);
                }
            });
            ready.recv().expect("bench server listens");
            handle
        };
        let dir = std::env::temp_dir().join(format!("tracer-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("bench directory");
        let responder: SocketAddr = format!("127.79.3.1:{RESPONDER_PORT}")
            .parse()
            .expect("address");
        let route = Route {
            name: "bench",
            tier: Tier::Main,
            listen_port: 8091,
            upstreams: vec![LabAddr::Tcp(responder)],
            keepalive: false,
            requests: 0,
            concurrency: 0,
            app: None,
        };
        let nginx = Nginx::start_with_responders(&ns.name, &dir, &[route], &[responder]);
        let tls_nginx = start_tls_nginx(&ns, &dir.join("tls"));
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        Env {
            ns,
            threads,
            server_stop,
            server: Some(server),
            _nginx: nginx,
            _tls_nginx: tls_nginx,
            dir,
        }
    }

    /// Runs `workload` for `duration`.
    pub fn run(&self, workload: Workload, duration: Duration) -> Done {
        match workload {
            Workload::Refused => self.storm(duration, |_| Attempt::Refused),
            Workload::Accepted => self.storm(duration, |_| Attempt::Accepted),
            Workload::Mix => self.storm(duration, |i| {
                if i % 100 == 99 {
                    Attempt::Refused
                } else {
                    Attempt::Accepted
                }
            }),
            Workload::Http => self.wrk(NGINX, duration),
            Workload::Https => self.wrk(NGINX_TLS, duration),
        }
    }

    /// Connects from every thread until `duration` is over.
    fn storm(&self, duration: Duration, kind: impl Fn(u64) -> Attempt + Sync) -> Done {
        let refused = AtomicU64::new(0);
        let accepted = AtomicU64::new(0);
        let closed: SocketAddr = CLOSED.parse().expect("address");
        let server: SocketAddr = SERVER.parse().expect("address");
        let started = Instant::now();
        self.ns.run(|| {
            std::thread::scope(|scope| {
                for _ in 0..self.threads {
                    scope.spawn(|| {
                        let mut i = 0u64;
                        while started.elapsed() < duration {
                            match kind(i) {
                                Attempt::Refused => {
                                    if TcpStream::connect(closed).is_err() {
                                        refused.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                                Attempt::Accepted => {
                                    if let Ok(mut stream) = TcpStream::connect(server) {
                                        accepted.fetch_add(1, Ordering::Relaxed);
                                        // Wait for the server's close, so the client closes second.
                                        let _ = stream.read(&mut [0u8; 1]);
                                    }
                                }
                            }
                            i += 1;
                        }
                    });
                }
            })
        });
        let elapsed = started.elapsed();
        let (refused, accepted) = (refused.into_inner(), accepted.into_inner());
        Done {
            ops: refused + accepted,
            elapsed,
            refused,
            accepted,
        }
    }

    /// HTTP through the nginx at `nginx` with wrk, as many threads as cores, 64 connections.
    fn wrk(&self, nginx: &str, duration: Duration) -> Done {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns.name, "wrk"])
            .arg(format!("-t{}", self.threads))
            .args(["-c64", &format!("-d{}s", duration.as_secs().max(1))])
            .arg(format!("http://{nginx}/"))
            .output()
            .expect("wrk (cargo xtask bench installs it)");
        let text = String::from_utf8_lossy(&out.stdout);
        let requests: u64 = text
            .lines()
            .find(|l| l.contains("requests in"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("wrk printed no request count:\n{text}"));
        let errors = text
            .lines()
            .any(|l| l.contains("Non-2xx") || l.contains("Socket errors"));
        assert!(!errors, "wrk saw errors:\n{text}");
        Done {
            ops: requests,
            elapsed: duration.max(Duration::from_secs(1)),
            refused: 0,
            accepted: 0,
        }
    }

    /// Refused connects at `per_second` for `duration`, from one thread.
    pub fn paced_refusals(&self, per_second: u64, duration: Duration) -> u64 {
        let closed: SocketAddr = CLOSED.parse().expect("address");
        self.ns.run(|| {
            let started = Instant::now();
            let mut done = 0u64;
            while started.elapsed() < duration {
                let due = (started.elapsed().as_secs_f64() * per_second as f64) as u64;
                while done < due {
                    let _ = TcpStream::connect(closed);
                    done += 1;
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            done
        })
    }

    /// One refused connect to each of `count` distinct upstreams (127.79.10.0/16, ports from
    /// 20000), from every thread.
    pub fn refuse_distinct(&self, count: u64) -> u64 {
        let next = AtomicU64::new(0);
        let refused = AtomicU64::new(0);
        self.ns.run(|| {
            std::thread::scope(|scope| {
                for _ in 0..self.threads {
                    scope.spawn(|| {
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= count {
                                return;
                            }
                            let host = i / 500;
                            let upstream = SocketAddr::from((
                                [127, 79, 10 + (host / 250) as u8, 1 + (host % 250) as u8],
                                20_000 + (i % 500) as u16,
                            ));
                            if TcpStream::connect(upstream).is_err() {
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                }
            })
        });
        refused.into_inner()
    }
}

impl Default for Env {
    fn default() -> Self {
        Env::new()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.server_stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let server: SocketAddr = SERVER.parse().expect("address");
        self.ns.run(|| {
            let _ = TcpStream::connect(server);
        });
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

enum Attempt {
    Refused,
    Accepted,
}

/// The second nginx of (e), in `ns`: a self-signed certificate made with openssl, a TLS
/// responder and a proxy to it over TLS.
fn start_tls_nginx(ns: &Netns, dir: &std::path::Path) -> Nginx {
    std::fs::create_dir_all(dir).expect("the TLS nginx's directory");
    let (cert, key) = crate::lab::tls::self_signed(dir, "bench", "/CN=bench.test");
    let d = dir.display();
    let conf = format!(
        "worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temp}    server {{
        listen {TLS_RESPONDER} ssl;
        ssl_certificate {cert}; ssl_certificate_key {key};
        location / {{ return 200 \"ok\\n\"; }}
    }}
    server {{
        listen {NGINX_TLS};
        location / {{ proxy_pass https://{TLS_RESPONDER}; proxy_ssl_session_reuse on; }}
    }}
}}
",
        cert = cert.display(),
        key = key.display(),
        temp = crate::lab::nginx::temp_paths(dir)
    );
    Nginx::start_config(Some(&ns.name), dir, &conf)
}
