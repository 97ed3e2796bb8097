//! Real HAProxy (Debian's) as the lab's reverse proxy, and its log as the oracle.
//!
//! HAProxy logs one line per request, with the server it tried (`%b`, `%si:%sp`) and a
//! termination state (`%ts`) whose first letter says who ended the session (`S`: the server
//! aborted or refused, `s`: the server timed out) and whose second says when (`C`: while
//! connecting, `H`: waiting for the response's headers, `D`: during its body). Those two letters
//! are the oracle's classes: coarser than tracer's causes (a refusal and an unreachable host are
//! both `SC`; see docs/causes.md), so the report compares tracer with HAProxy per class, and
//! checks tracer's finer cause against what the lab made.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use super::{
    LabAddr, Route,
    proxy::{Daemon, LabProxy, LoggedFailure, LoggedRequest, listen_addrs},
};
use crate::netns::Netns;

/// A running HAProxy inside the proxy namespace.
pub struct Haproxy {
    daemon: Daemon,
    log: Syslog,
    routes: Vec<Route>,
}

impl Haproxy {
    /// Writes the configuration for `routes` into `dir` and starts HAProxy in `netns`.
    pub fn start(netns: &Netns, dir: &Path, routes: &[Route]) -> Haproxy {
        std::fs::create_dir_all(dir).expect("HAProxy's directory");
        let log = Syslog::start(netns);
        let conf = dir.join("haproxy.cfg");
        std::fs::write(&conf, config(routes, log.addr)).expect("writing haproxy.cfg");
        let daemon = Daemon::start(
            "haproxy",
            netns,
            // -db: stay in the foreground.
            &[
                "haproxy".as_ref(),
                "-db".as_ref(),
                "-f".as_ref(),
                conf.as_os_str(),
            ],
            &dir.join("output.log"),
            &listen_addrs(routes),
            // A soft stop, finishing the sessions in progress.
            libc::SIGUSR1,
            Duration::from_secs(5),
        );
        Haproxy {
            daemon,
            log,
            routes: routes.to_vec(),
        }
    }
}

impl LabProxy for Haproxy {
    fn stop(&mut self) {
        self.daemon.stop();
        self.log.finish();
    }

    fn failures(&self) -> Vec<LoggedFailure> {
        entries(&self.log.text(), &self.routes)
            .into_iter()
            .filter_map(|e| e.failure)
            .collect()
    }

    fn requests(&self) -> Vec<LoggedRequest> {
        entries(&self.log.text(), &self.routes)
            .into_iter()
            .map(|e| e.request)
            .collect()
    }
}

/// A syslog receiver (UDP, in the proxy's namespace) for HAProxy's log. HAProxy's threads
/// writing to stdout drop lines when they contend for it (about 1 in 1,000 here); datagrams
/// into a large receive buffer lose none.
struct Syslog {
    addr: SocketAddr,
    text: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Syslog {
    fn start(netns: &Netns) -> Syslog {
        let socket = netns
            .run(|| UdpSocket::bind("127.0.0.1:0"))
            .expect("a UDP socket for HAProxy's log");
        let bytes: libc::c_int = 16 << 20;
        // SAFETY: setsockopt on a socket we own, with a pointer to a c_int and its size.
        // SO_RCVBUFFORCE (root) passes net.core.rmem_max; if refused, the default is kept.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&raw const bytes).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let addr = socket.local_addr().expect("the log socket's address");
        let text = Arc::new(Mutex::new(String::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (text, stop) = (text.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                loop {
                    match socket.recv(&mut buf) {
                        Ok(n) => {
                            let mut text = text.lock().unwrap_or_else(|p| p.into_inner());
                            text.push_str(String::from_utf8_lossy(&buf[..n]).trim_end());
                            text.push('\n');
                        }
                        // Nothing came for 100 ms: done once asked to stop.
                        Err(_) if stop.load(Ordering::Relaxed) => return,
                        Err(_) => {}
                    }
                }
            })
        };
        Syslog {
            addr,
            text,
            stop,
            thread: Some(thread),
        }
    }

    /// Reads what is still queued, then stops.
    fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    fn text(&self) -> String {
        self.text.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Syslog {
    fn drop(&mut self) {
        self.finish();
    }
}

/// How HAProxy writes a server's address.
fn server_addr(addr: &LabAddr) -> String {
    match addr {
        LabAddr::Tcp(SocketAddr::V4(a)) => format!("ipv4@{}:{}", a.ip(), a.port()),
        LabAddr::Tcp(SocketAddr::V6(a)) => format!("ipv6@{}:{}", a.ip(), a.port()),
        LabAddr::Unix(path) => format!("unix@{path}"),
    }
}

/// One frontend and backend per route. No retries, no redispatch and no health checks: every
/// request is one attempt on its server, whatever happened to the previous one.
fn config(routes: &[Route], log: SocketAddr) -> String {
    let timeout = super::proxy_timeout().as_millis();
    let mut conf = format!(
        "global
    log {log} format raw local0 info
    user nobody
    group nogroup
    # HAProxy's internal HTTP client would load the system's CA store as HAProxy starts: 8 s
    # of a kernel guest's emulated CPU. The lab makes no TLS connection.
    httpclient.ssl.verify none
defaults
    mode http
    log global
    option dontlognull
    retries 0
    timeout connect {timeout}ms
    timeout server {timeout}ms
    timeout client 30s
    timeout http-request 10s
    log-format \"%Ts.%ms %Tt %ST %fp %b %si:%sp %ts\"
"
    );
    for route in routes {
        let _ = write!(
            conf,
            "frontend {name}\n    bind {listen}\n    default_backend {name}\nbackend {name}\n",
            name = route.name,
            listen = route.listen(),
        );
        if !route.keepalive {
            // A connection to the server per request, as nginx without `keepalive`.
            conf.push_str("    option http-server-close\n");
        }
        for (i, upstream) in route.upstreams.iter().enumerate() {
            let _ = writeln!(conf, "    server s{i} {}", server_addr(upstream));
        }
    }
    conf
}

/// One log line: the request, and the failed attempt it records if it does.
struct Entry {
    request: LoggedRequest,
    failure: Option<LoggedFailure>,
}

/// The termination states that record a failed attempt on a server, and the tracer causes each
/// may mean (docs/causes.md).
pub const CLASSES: [(&str, &[&str]); 6] = [
    (
        "SC",
        &[
            "refused",
            "unreachable",
            "connect_error",
            "unix_missing",
            "unix_refused",
            // A full Unix listener's EAGAIN, which HAProxy takes for a refusal.
            "unix_backlog_full",
            "unix_permission",
        ],
    ),
    ("sC", &["connect_timeout"]),
    // Out of a resource while connecting: no local port, no descriptor.
    ("RC", &["no_ephemeral_port", "fd_exhausted"]),
    ("SH", &["reset_before_response", "closed_before_response"]),
    ("sH", &["response_timeout"]),
    ("SD", &["reset_mid_response"]),
];

/// The termination state HAProxy logs for an attempt that failed with tracer's `cause`.
pub fn class_of(cause: &str) -> Option<&'static str> {
    CLASSES
        .iter()
        .find(|(_, causes)| causes.contains(&cause))
        .map(|(class, _)| *class)
}

/// Parses the lab's log format: `%Ts.%ms %Tt %ST %fp %b %si:%sp %ts`. A Unix socket's server
/// has no `%si:%sp`: its route (the backend, `%b`) names it.
fn entries(log: &str, routes: &[Route]) -> Vec<Entry> {
    log.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let [start, total_ms, status, port, backend, server, state] = fields[..] else {
                return None;
            };
            let start: f64 = start.parse().ok()?;
            let duration = total_ms.parse::<f64>().ok()? / 1000.0;
            let route = routes.iter().find(|r| r.name == backend);
            let upstream = match server.rsplit_once(':') {
                Some((ip, port)) if ip.parse::<IpAddr>().is_ok() => {
                    Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?).to_string())
                }
                // No server was tried.
                _ if server == "-:-" => None,
                // A Unix socket's path is not printed.
                _ => route
                    .and_then(|r| r.upstreams.first())
                    .map(|u| u.to_string()),
            };
            let class = state.get(..2)?;
            let failure = (class.starts_with(['S', 's']) || class == "RC").then(|| LoggedFailure {
                upstream: upstream.clone().unwrap_or_else(|| "-".to_string()),
                cause: CLASSES.iter().find(|(c, _)| *c == class).map(|(c, _)| *c),
                message: format!("termination state {state}, status {status}"),
            });
            Some(Entry {
                request: LoggedRequest {
                    end: start + duration,
                    duration,
                    status: status.parse().ok()?,
                    port: port.parse().ok()?,
                    upstreams: upstream.into_iter().collect(),
                },
                failure,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_give_the_server_and_the_termination_state() {
        let route = |name, port, upstream: LabAddr| Route {
            name,
            tier: super::super::Tier::Main,
            listen_port: port,
            upstreams: vec![upstream],
            keepalive: false,
            requests: 1,
            concurrency: 1,
            app: None,
        };
        let routes = [
            route("unix_missing", 8113, LabAddr::Unix("/run/php.sock")),
            route(
                "refused_v6",
                8119,
                LabAddr::Tcp("[fd00:88::2]:9013".parse().unwrap()),
            ),
        ];
        let log = "1795999106.537 0 503 8101 refused 10.88.0.2:9001 SC\n\
                   1795999107.000 1001 504 8107 response_timeout 10.88.0.2:9007 sH\n\
                   1795999108.250 3 200 8108 healthy 10.88.0.2:9008 --\n\
                   1795999109.000 0 503 8113 unix_missing unix:0 SC\n\
                   1795999110.000 0 503 8119 refused_v6 fd00:88::2:9013 SC\n\
                   1795999111.000 20 200 8105 reset_mid_response 10.88.0.2:9005 SD\n\
                   1795999112.000 5 400 8101 refused -:- CR\n";
        let entries = entries(log, &routes);
        assert_eq!(entries.len(), 7);
        let failures: Vec<(String, Option<&str>)> = entries
            .iter()
            .filter_map(|e| e.failure.clone())
            .map(|f| (f.upstream, f.cause))
            .collect();
        assert_eq!(
            failures,
            vec![
                ("10.88.0.2:9001".to_string(), Some("SC")),
                ("10.88.0.2:9007".to_string(), Some("sH")),
                ("unix:/run/php.sock".to_string(), Some("SC")),
                ("[fd00:88::2]:9013".to_string(), Some("SC")),
                ("10.88.0.2:9005".to_string(), Some("SD")),
            ]
        );
        let timeout = &entries[1].request;
        assert_eq!((timeout.status, timeout.port), (504, 8107));
        assert!((timeout.duration - 1.001).abs() < 1e-9);
        assert!((timeout.end - 1795999108.001).abs() < 1e-6);
        // A request refused by HAProxy itself tried no server.
        assert!(entries[6].request.upstreams.is_empty());
    }

    #[test]
    fn every_class_maps_back_to_its_tracer_causes() {
        assert_eq!(class_of("refused"), Some("SC"));
        assert_eq!(class_of("unreachable"), Some("SC"));
        assert_eq!(class_of("connect_timeout"), Some("sC"));
        assert_eq!(class_of("closed_before_response"), Some("SH"));
        assert_eq!(class_of("response_timeout"), Some("sH"));
        assert_eq!(class_of("no_such_cause"), None);
    }
}
