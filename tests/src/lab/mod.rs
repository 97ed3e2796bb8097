//! The fault lab: a real reverse proxy (nginx, HAProxy or Apache httpd) in front of upstreams
//! that fail on purpose, with the proxy's own logs as the oracle for what tracer must report.
//!
//! Two private hosts joined by a veth pair: the proxy host (the proxy, the clients; it has no route
//! to 10.88.9.0/24) and the upstream host (10.88.0.2, the upstream servers; its firewall drops
//! SYNs to one port). tracer runs on the real host, as the separate `tracer events --json`
//! process, and sees both. Nothing leaves this machine.

pub mod apache;
pub mod apps;
pub mod haproxy;
pub mod load;
pub mod nginx;
pub mod proxy;
pub mod report;
pub mod tls;

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use self::{
    apache::Apache, apps::App, haproxy::Haproxy, nginx::Nginx, proxy::LabProxy, report::LabReport,
};
use crate::{
    netns::{self, Netns},
    process::{MemoryCgroup, UpstreamProcess},
    tracer_process::Tracer,
    upstream::{Behaviour, UnixState, UnixUpstream, Upstream},
};

/// Where the lab's Unix-socket upstreams live (the lab runs one at a time).
pub const UNIX_DIR: &str = "/tmp/tracer-lab-unix";

/// The proxy's connect, send and read timeouts toward the upstreams: 1 s, and 3 s in a kernel
/// guest under emulation (`cargo xtask test --kernel` sets TRACER_TEST_GUEST). There a healthy
/// upstream's answer, or a refusal, can take longer than a second to reach the proxy's event
/// loop; it then logs a timeout for an attempt the kernel saw answered, and the lab would be
/// comparing the emulator's speed rather than tracer.
pub fn proxy_timeout() -> Duration {
    if std::env::var_os("TRACER_TEST_GUEST").is_some() {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(1)
    }
}

/// The reverse proxy a lab run puts in front of the upstreams, each from Debian's packages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Software {
    Nginx,
    Haproxy,
    Apache,
}

impl Software {
    pub const ALL: [Software; 3] = [Software::Nginx, Software::Haproxy, Software::Apache];

    pub fn name(self) -> &'static str {
        match self {
            Software::Nginx => "nginx",
            Software::Haproxy => "haproxy",
            Software::Apache => "apache",
        }
    }

    pub fn parse(name: &str) -> Option<Software> {
        Software::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Its processes' name (`tracer --comm`).
    pub fn comm(self) -> &'static str {
        match self {
            Software::Nginx => "nginx",
            Software::Haproxy => "haproxy",
            Software::Apache => "apache2",
        }
    }

    /// The class this proxy's log gives an attempt that failed with tracer's `cause`: the cause
    /// itself for nginx and Apache, whose logs carry the errno; HAProxy's termination state
    /// (`SC`, `sH`…), which says less.
    pub fn class_of(self, cause: &str) -> String {
        match self {
            Software::Haproxy => haproxy::class_of(cause).unwrap_or(cause).to_string(),
            Software::Nginx | Software::Apache => cause.to_string(),
        }
    }

    /// Starts it as the lab's proxy `tier` on `host`, for `routes`.
    fn start(self, tier: Tier, host: &Netns, dir: &Path, routes: &[Route]) -> Box<dyn LabProxy> {
        match self {
            Software::Nginx => Box::new(Nginx::start_as(tier, &host.name, dir, routes)),
            Software::Haproxy => Box::new(Haproxy::start(host, dir, routes)),
            Software::Apache => Box::new(Apache::start(host, dir, routes)),
        }
    }
}

impl fmt::Display for Software {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An upstream's address: TCP, or a Unix socket's path. Displayed as nginx's `server`
/// directive and tracer's events both write it: `10.88.0.2:9001`, `unix:/tmp/…/php.sock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabAddr {
    Tcp(SocketAddr),
    Unix(&'static str),
}

impl LabAddr {
    pub fn port(&self) -> Option<u16> {
        match self {
            LabAddr::Tcp(addr) => Some(addr.port()),
            LabAddr::Unix(_) => None,
        }
    }

    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            LabAddr::Tcp(addr) => Some(*addr),
            LabAddr::Unix(_) => None,
        }
    }
}

impl fmt::Display for LabAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabAddr::Tcp(addr) => addr.fmt(f),
            LabAddr::Unix(path) => write!(f, "unix:{path}"),
        }
    }
}

/// What an upstream of the lab does, and what tracer must say about it.
#[derive(Debug, Clone)]
pub struct UpstreamSpec {
    pub addr: LabAddr,
    /// The TCP server listening there; `None` when nothing listens.
    pub behaviour: Option<Behaviour>,
    /// What a Unix-socket upstream is like.
    pub unix: Option<UnixState>,
    /// The upstream host's firewall drops SYNs to it.
    pub syns_dropped: bool,
    /// The failure cause tracer must report for it; `None` for a healthy upstream.
    pub expected: Option<&'static str>,
    /// Whether the lab must produce at least one such failure (races may produce none).
    pub must_fail: bool,
    /// A process of its own (`upstream-process`) that dies this way (`oom` in a memory-limited
    /// cgroup, `segv`) soon after tracer starts, instead of a server thread.
    pub dies: Option<&'static str>,
    /// The root cause tracer must give its failures.
    pub root_cause: Option<&'static str>,
    /// A real application server listening there instead (gunicorn, php-fpm).
    pub app: Option<App>,
}

impl UpstreamSpec {
    /// The upstream tracer names for its failures (`none` for `fd_exhausted`).
    pub fn tracer_upstream(&self) -> String {
        report::as_tracer_names_it(&self.addr.to_string(), self.expected.unwrap_or(""))
    }
}

/// Which of the lab's proxy servers a route goes through: the main one, or one of nginx's two
/// with limits of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// The lab's nginx, on the proxy host.
    Main,
    /// A second nginx on the proxy host whose one worker may hold only a few files
    /// (`worker_rlimit_nofile`): it runs out of descriptors (`fd_exhausted`).
    FewFiles,
    /// A proxy tier on the upstream host, whose namespace has only two local ports
    /// (`ip_local_port_range`), in front of an upstream on that host's loopback: it runs out of
    /// ports toward it (`no_ephemeral_port`). Only that host connects out, so nothing else is
    /// short of ports.
    FewPorts,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Main, Tier::FewFiles, Tier::FewPorts];

    /// The address its servers listen on (the clients run on the proxy host).
    pub fn listen_ip(self) -> std::net::IpAddr {
        match self {
            Tier::Main | Tier::FewFiles => [127, 0, 0, 1].into(),
            Tier::FewPorts => [10, 88, 0, 2].into(),
        }
    }

    /// Its working directory's name under the lab's.
    fn dir_name(self) -> &'static str {
        match self {
            Tier::Main => "main",
            Tier::FewFiles => "few-files",
            Tier::FewPorts => "few-ports",
        }
    }
}

/// The local ports of the few-ports proxy's host: two.
pub const FEW_PORTS: &str = "40000 40001";

/// A listening address of the proxy in front of its upstreams (nginx's `server` + `upstream`,
/// HAProxy's frontend + backend, an Apache virtual host), and the load sent through it.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: &'static str,
    pub tier: Tier,
    pub listen_port: u16,
    pub upstreams: Vec<LabAddr>,
    /// `keepalive` connections to the upstream (HTTP/1.1), or one connection per request.
    pub keepalive: bool,
    pub requests: usize,
    pub concurrency: usize,
    /// The application server behind it, whose own kind of request (a path, a PHP script over
    /// FastCGI) the route asks for.
    pub app: Option<App>,
}

impl Route {
    /// Where its clients send their requests.
    pub fn listen(&self) -> SocketAddr {
        SocketAddr::new(self.tier.listen_ip(), self.listen_port)
    }
}

/// The lab's proxy, upstreams and routes.
#[derive(Debug, Clone)]
pub struct Matrix {
    /// What the report calls it.
    pub name: &'static str,
    pub software: Software,
    pub upstreams: Vec<UpstreamSpec>,
    pub routes: Vec<Route>,
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// Where the proxy host has no route (`ip route add unreachable`).
pub const UNROUTED: &str = "10.88.9.0/24";

impl Matrix {
    /// The standard matrix behind `software`. nginx's runs cover all of it; HAProxy and Apache
    /// run every route of the main proxy tier with one server: the few-files and few-ports
    /// tiers are nginx's own set-ups, and trying the next server after a failure is nginx's
    /// `proxy_next_upstream` (HAProxy would need retries, which hide the failed attempt from its
    /// log).
    pub fn for_proxy(software: Software) -> Matrix {
        let mut matrix = Matrix::standard();
        matrix.software = software;
        if software != Software::Nginx {
            matrix.retain_routes(|r| r.tier == Tier::Main && r.upstreams.len() == 1);
        }
        if software == Software::Apache {
            // Apache's mod_proxy connects to a Unix socket with a blocking connect(): on a full
            // listener it waits, without an error or a log line, until the listener drains or
            // goes away (docs/causes.md). There is no failed attempt to compare.
            let busy: Vec<LabAddr> = matrix
                .upstreams
                .iter()
                .filter(|u| u.unix == Some(UnixState::Busy))
                .map(|u| u.addr.clone())
                .collect();
            matrix.retain_routes(|r| !r.upstreams.iter().any(|u| busy.contains(u)));
        }
        matrix
    }

    /// Keeps only the routes `keep` selects, and the upstreams they use.
    pub fn retain_routes(&mut self, keep: impl Fn(&Route) -> bool) {
        self.routes.retain(|r| keep(r));
        self.retain_used_upstreams();
    }

    fn retain_used_upstreams(&mut self) {
        let routes = &self.routes;
        self.upstreams
            .retain(|u| routes.iter().any(|r| r.upstreams.contains(&u.addr)));
    }

    /// One upstream per failure kind, two healthy ones, and a route that retries, behind nginx.
    pub fn standard() -> Matrix {
        let up = |port: u16, behaviour: Option<Behaviour>, expected: Option<&'static str>| {
            UpstreamSpec {
                addr: LabAddr::Tcp(SocketAddr::from(([10, 88, 0, 2], port))),
                behaviour,
                unix: None,
                syns_dropped: false,
                expected,
                must_fail: expected.is_some(),
                dies: None,
                root_cause: None,
                app: None,
            }
        };
        let unix = |path: &'static str, state, expected: Option<&'static str>| UpstreamSpec {
            addr: LabAddr::Unix(path),
            behaviour: None,
            unix: Some(state),
            syns_dropped: false,
            expected,
            must_fail: expected.is_some(),
            dies: None,
            root_cause: None,
            app: None,
        };
        let idle = |secs| Behaviour::Answer {
            idle_close: Duration::from_secs(secs),
        };
        let upstreams = vec![
            up(9000, Some(idle(60)), None),
            // Nothing ever listens there, while the host listens on other ports.
            UpstreamSpec {
                root_cause: Some("nothing_listened"),
                ..up(9001, None, Some("refused"))
            },
            UpstreamSpec {
                syns_dropped: true,
                ..up(9002, None, Some("connect_timeout"))
            },
            UpstreamSpec {
                addr: LabAddr::Tcp(addr("10.88.9.1:9003")),
                ..up(9003, None, Some("unreachable"))
            },
            up(
                9004,
                Some(Behaviour::ResetBeforeAnswer),
                Some("reset_before_response"),
            ),
            up(
                9005,
                Some(Behaviour::PartialThenReset),
                Some("reset_mid_response"),
            ),
            up(
                9006,
                Some(Behaviour::CloseAfterRequest),
                Some("closed_before_response"),
            ),
            up(9007, Some(Behaviour::NeverAnswer), Some("response_timeout")),
            up(9008, Some(idle(5)), None),
            // nginx may reuse a connection the upstream is closing: it logs "upstream
            // prematurely closed connection" and retries. How often is up to the race.
            UpstreamSpec {
                must_fail: false,
                ..up(
                    9009,
                    Some(Behaviour::AnswerThenClose),
                    Some("closed_before_response"),
                )
            },
            // Upstreams whose process dies before nginx sends them anything: OOM-killed in a
            // memory-limited cgroup, crashed with SIGSEGV.
            UpstreamSpec {
                dies: Some("oom"),
                root_cause: Some("upstream_oom_killed"),
                ..up(9010, None, Some("refused"))
            },
            UpstreamSpec {
                dies: Some("segv"),
                root_cause: Some("upstream_crashed"),
                ..up(9011, None, Some("refused"))
            },
            // A server too busy to accept: its queue of one fills with nginx's first two
            // connections (which then time out waiting for a response), and every SYN after
            // them is dropped.
            UpstreamSpec {
                root_cause: Some("backlog_overflow"),
                ..up(9012, Some(Behaviour::NeverAccept), Some("connect_timeout"))
            },
            // The same failures over IPv6.
            UpstreamSpec {
                addr: LabAddr::Tcp(addr("[fd00:88::2]:9013")),
                ..up(9013, None, Some("refused"))
            },
            UpstreamSpec {
                addr: LabAddr::Tcp(addr("[fd00:88::2]:9014")),
                ..up(
                    9014,
                    Some(Behaviour::ResetBeforeAnswer),
                    Some("reset_before_response"),
                )
            },
            UpstreamSpec {
                addr: LabAddr::Tcp(addr("[fd00:88::2]:9015")),
                ..up(9015, Some(Behaviour::NeverAnswer), Some("response_timeout"))
            },
            // php-fpm-style Unix sockets: missing, stale, a pool with every worker busy, one
            // nginx's workers (nobody) may not open, and a healthy one.
            unix(
                "/tmp/tracer-lab-unix/missing.sock",
                UnixState::Missing,
                Some("unix_missing"),
            ),
            unix(
                "/tmp/tracer-lab-unix/stale.sock",
                UnixState::Stale,
                Some("unix_refused"),
            ),
            unix(
                "/tmp/tracer-lab-unix/busy.sock",
                UnixState::Busy,
                Some("unix_backlog_full"),
            ),
            unix(
                "/tmp/tracer-lab-unix/denied.sock",
                UnixState::Denied,
                Some("unix_permission"),
            ),
            unix("/tmp/tracer-lab-unix/healthy.sock", UnixState::Answer, None),
            // The proxy's own limits. A slow upstream holds the few-files proxy's descriptors
            // until socket() fails (nginx answers 500; tracer cannot know the upstream: `none`);
            // one on the few-ports proxy's loopback holds its two local ports.
            up(9016, Some(Behaviour::NeverAnswer), Some("fd_exhausted")),
            UpstreamSpec {
                addr: LabAddr::Tcp(addr("127.0.0.1:9020")),
                ..up(
                    9020,
                    Some(Behaviour::NeverAnswer),
                    Some("no_ephemeral_port"),
                )
            },
        ];
        let route = |name, listen_port, ports: &[u16], keepalive, requests, concurrency| Route {
            name,
            tier: Tier::Main,
            listen_port,
            upstreams: ports
                .iter()
                .map(|p| {
                    upstreams
                        .iter()
                        .find(|u| u.addr.port() == Some(*p))
                        .expect("upstream of the matrix")
                        .addr
                        .clone()
                })
                .collect(),
            keepalive,
            requests,
            concurrency,
            app: None,
        };
        let routes = vec![
            route("healthy_keepalive", 8100, &[9000], true, 400, 8),
            route("refused", 8101, &[9001], false, 200, 8),
            route("connect_timeout", 8102, &[9002], false, 20, 10),
            route("unreachable", 8103, &[9003], false, 200, 8),
            route("reset_before_response", 8104, &[9004], true, 200, 8),
            route("reset_mid_response", 8105, &[9005], false, 200, 8),
            route("closed_before_response", 8106, &[9006], true, 200, 8),
            route("response_timeout", 8107, &[9007], false, 20, 10),
            route("healthy", 8108, &[9008], false, 400, 8),
            // nginx tries the next server when one fails: client 200s, failed attempts logged.
            route("retry", 8109, &[9001, 9008], false, 100, 4),
            route("keepalive_race", 8110, &[9009], true, 400, 8),
            route("oom_killed", 8111, &[9010], false, 100, 4),
            route("crashed", 8112, &[9011], false, 100, 4),
            route("backlog_full", 8117, &[9012], false, 20, 10),
            route("refused_v6", 8119, &[9013], false, 100, 4),
            route("reset_v6", 8120, &[9014], false, 100, 4),
            route("response_timeout_v6", 8121, &[9015], false, 20, 10),
            Route {
                tier: Tier::FewFiles,
                ..route("few_files", 8122, &[9016], false, 60, 12)
            },
            Route {
                tier: Tier::FewPorts,
                ..route("few_ports", 8123, &[9020], false, 60, 6)
            },
        ];
        let unix_route = |name, listen_port, path: &'static str, requests| Route {
            name,
            tier: Tier::Main,
            listen_port,
            upstreams: vec![LabAddr::Unix(path)],
            keepalive: false,
            requests,
            concurrency: 4,
            app: None,
        };
        let routes = routes
            .into_iter()
            .chain([
                unix_route(
                    "unix_missing",
                    8113,
                    "/tmp/tracer-lab-unix/missing.sock",
                    100,
                ),
                unix_route("unix_refused", 8114, "/tmp/tracer-lab-unix/stale.sock", 100),
                unix_route(
                    "unix_backlog_full",
                    8115,
                    "/tmp/tracer-lab-unix/busy.sock",
                    100,
                ),
                unix_route(
                    "unix_healthy",
                    8116,
                    "/tmp/tracer-lab-unix/healthy.sock",
                    200,
                ),
                unix_route(
                    "unix_permission",
                    8118,
                    "/tmp/tracer-lab-unix/denied.sock",
                    100,
                ),
            ])
            .collect();
        Matrix {
            name: "fault matrix",
            software: Software::Nginx,
            upstreams,
            routes,
        }
    }
}

impl Matrix {
    /// Real application servers behind nginx (`lab::apps`): gunicorn killing a worker past its
    /// timeout and a worker crashing, php-fpm's pool exhausted on a Unix socket and on TCP, a
    /// script killed by `request_terminate_timeout` on TCP, and php-fpm's socket gone after a
    /// stop.
    pub fn apps() -> Matrix {
        let spec = |addr: LabAddr, app, expected, root_cause| UpstreamSpec {
            addr,
            behaviour: None,
            unix: None,
            syns_dropped: false,
            expected: Some(expected),
            must_fail: true,
            dies: None,
            root_cause,
            app: Some(app),
        };
        let tcp = |port: u16| LabAddr::Tcp(SocketAddr::from(([10, 88, 0, 2], port)));
        let upstreams = vec![
            spec(
                tcp(9030),
                App::GunicornTimeout,
                "closed_before_response",
                Some("worker_killed"),
            ),
            spec(
                tcp(9032),
                App::GunicornCrash,
                "closed_before_response",
                Some("worker_crashed"),
            ),
            // The listener's queue, from the socket diagnostics. (After connect() on a Unix
            // socket tracer sees nothing: no worker root causes there.)
            spec(
                LabAddr::Unix("/tmp/tracer-lab-unix/php-busy.sock"),
                App::PhpFpmExhausted,
                "unix_backlog_full",
                Some("never_accepted"),
            ),
            // The same pool on TCP: SYNs to its full accept queue are dropped.
            // (backlog_overflow for most, but the queue is read at most once a second and a
            // child may have drained it since: not asked for.)
            spec(tcp(9033), App::PhpFpmExhausted, "connect_timeout", None),
            spec(
                tcp(9031),
                App::PhpFpmTerminate,
                "reset_before_response",
                Some("worker_killed"),
            ),
            spec(
                LabAddr::Unix("/tmp/tracer-lab-unix/php-stopped.sock"),
                App::PhpFpmStopped,
                "unix_missing",
                None,
            ),
            spec(
                tcp(9034),
                App::PhpFpmSlow,
                "response_timeout",
                Some("slow_upstream|never_accepted"),
            ),
            // The killed child had not read all of nginx's request: a reset.
            spec(
                tcp(9035),
                App::PhpFpmOom,
                "reset_before_response",
                Some("worker_oom_killed"),
            ),
        ];
        let route = |name, listen_port, upstream: usize, requests, concurrency| Route {
            name,
            tier: Tier::Main,
            listen_port,
            upstreams: vec![upstreams[upstream].addr.clone()],
            keepalive: false,
            requests,
            concurrency,
            app: upstreams[upstream].app,
        };
        let routes = vec![
            route("gunicorn_timeout", 8130, 0, 4, 2),
            route("gunicorn_crash", 8131, 1, 20, 2),
            route("php_fpm_exhausted", 8132, 2, 24, 12),
            route("php_fpm_exhausted_tcp", 8135, 3, 24, 12),
            route("php_fpm_terminated", 8133, 4, 4, 2),
            route("php_fpm_stopped", 8134, 5, 20, 4),
            route("php_fpm_slow", 8136, 6, 4, 4),
            route("php_fpm_oom", 8137, 7, 3, 1),
        ];
        Matrix {
            name: "real app servers",
            software: Software::Nginx,
            upstreams,
            routes,
        }
    }
}

/// The lab's two hosts.
pub struct Topology {
    pub proxy: Netns,
    pub upstream: Netns,
}

impl Topology {
    pub fn create(matrix: &Matrix) -> Topology {
        let proxy = Netns::new("lab-proxy");
        let upstream = Netns::new("lab-up");
        proxy.ip(&[
            "link",
            "add",
            "lab-p0",
            "type",
            "veth",
            "peer",
            "name",
            "lab-u0",
            "netns",
            &upstream.name,
        ]);
        proxy.ip(&["addr", "add", "10.88.0.1/24", "dev", "lab-p0"]);
        upstream.ip(&["addr", "add", "10.88.0.2/24", "dev", "lab-u0"]);
        proxy.ip(&["addr", "add", "fd00:88::1/64", "dev", "lab-p0", "nodad"]);
        upstream.ip(&["addr", "add", "fd00:88::2/64", "dev", "lab-u0", "nodad"]);
        proxy.ip(&["link", "set", "lab-p0", "up"]);
        upstream.ip(&["link", "set", "lab-u0", "up"]);
        proxy.ip(&["route", "add", "unreachable", UNROUTED]);
        // IPv6 needs a moment (neighbour discovery) before the first SYN gets through: wait until
        // the upstream host refuses a connect, before anyone watches.
        proxy.run(|| {
            let probe: SocketAddr = "[fd00:88::2]:1".parse().expect("address");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                match std::net::TcpStream::connect_timeout(&probe, Duration::from_millis(200)) {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
                    _ => std::thread::sleep(Duration::from_millis(50)),
                }
            }
            panic!("the upstream host is not reachable over IPv6");
        });
        if matrix.routes.iter().any(|r| r.tier == Tier::FewPorts) {
            upstream.sysctl("net.ipv4.ip_local_port_range", FEW_PORTS);
        }
        for port in matrix
            .upstreams
            .iter()
            .filter(|u| u.syns_dropped)
            .filter_map(|u| u.addr.port())
        {
            upstream.firewall(&format!("tcp dport {port} drop"));
        }
        Topology { proxy, upstream }
    }
}

/// Options of a lab run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Lowest agreement accepted per (upstream, cause).
    pub target: f64,
}

impl Default for Options {
    fn default() -> Self {
        Options { target: 0.995 }
    }
}

/// A new working directory for one lab run (the proxy's config and logs).
fn lab_dir() -> PathBuf {
    static RUNS: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "tracer-lab-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Lab runs use the same upstream addresses and tracer follows every such proxy: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Removes what killed runs left: their namespaces (and the proxies in them), their directories.
pub fn clean_leftovers() {
    netns::delete_leftovers();
    remove_dirs(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists());
}

/// Removes what this process's runs made, when it is interrupted.
pub fn clean_up_after_interrupt() {
    let me = std::process::id();
    netns::delete_owned_by(me);
    remove_dirs(|pid| pid == me);
    let _ = std::fs::remove_dir_all(UNIX_DIR);
}

/// Removes the lab directories whose owning process `owner` selects.
fn remove_dirs(owner: impl Fn(u32) -> bool) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("tracer-lab-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(&owner) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Runs the whole lab and compares tracer's report with the proxy's logs.
pub fn run(matrix: &Matrix, options: &Options) -> LabReport {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let started = Instant::now();
    clean_leftovers();
    let dir = lab_dir();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("lab directory");

    let topology = Topology::create(matrix);
    let _servers: Vec<Upstream> = matrix
        .upstreams
        .iter()
        .filter_map(|spec| {
            let behaviour = spec.behaviour?;
            Some(Upstream::start(
                &topology.upstream,
                spec.addr.tcp()?,
                behaviour,
            ))
        })
        .collect();
    // Unix sockets are not in a network namespace: nginx reaches them through the filesystem.
    let _ = std::fs::remove_dir_all(UNIX_DIR);
    std::fs::create_dir_all(UNIX_DIR).expect("the Unix sockets' directory");
    let unix_servers: Vec<UnixUpstream> = matrix
        .upstreams
        .iter()
        .filter_map(|spec| match (&spec.addr, spec.unix) {
            (LabAddr::Unix(path), Some(state)) => Some(UnixUpstream::start(Path::new(path), state)),
            _ => None,
        })
        .collect();
    let software = matrix.software;
    // Application servers start (and a stopped one stops) before tracer watches.
    let mut apps: Vec<proxy::Daemon> = matrix
        .upstreams
        .iter()
        .filter_map(|spec| Some(spec.app?.start(&spec.addr, &topology.upstream, &dir)))
        .collect();
    let tracer = Tracer::events(&["--comm", software.comm()]);
    // Upstreams that die: started once tracer watches, dead before nginx sends them anything.
    let memory = MemoryCgroup::new("lab-oom", 64 << 20);
    let mut dying: Vec<UpstreamProcess> = matrix
        .upstreams
        .iter()
        .filter_map(|spec| {
            let action = spec.dies?;
            let addr = spec.addr.to_string();
            Some(UpstreamProcess::start_with(
                &topology.upstream,
                &addr,
                action,
                200,
                |pid| {
                    if action == "oom" {
                        memory.add(pid);
                    }
                },
            ))
        })
        .collect();
    for process in &mut dying {
        process.wait();
    }
    let mut proxies: Vec<Box<dyn LabProxy>> = Tier::ALL
        .into_iter()
        .filter_map(|tier| {
            let routes: Vec<Route> = matrix
                .routes
                .iter()
                .filter(|r| r.tier == tier)
                .cloned()
                .collect();
            if routes.is_empty() {
                return None;
            }
            let host = match tier {
                Tier::Main | Tier::FewFiles => &topology.proxy,
                Tier::FewPorts => &topology.upstream,
            };
            Some(software.start(tier, host, &dir.join(tier.dir_name()), &routes))
        })
        .collect();

    let load_started = Instant::now();
    let load = load::run_routes(&topology.proxy, &matrix.routes);
    let load_time = load_started.elapsed();
    let servers_died: Vec<String> = apps.iter_mut().filter_map(proxy::Daemon::died).collect();
    // Let the last timeouts fire, then stop the proxy gracefully (it closes its idle
    // keep-alive connections) and tracer.
    std::thread::sleep(proxy_timeout() + Duration::from_millis(500));
    for proxy in &mut proxies {
        proxy.stop();
    }
    std::thread::sleep(Duration::from_millis(300));
    // Runs of tracer's programs the kernel skipped (one was running on that CPU already, e.g.
    // interrupted by a softirq): tracer exports them as tracer_program_misses_total.
    let skipped_runs: u64 = crate::bpf::program_misses(tracer.pid()).values().sum();
    let (events, _stderr) = tracer.stop_collecting();

    let failures = proxies.iter().flat_map(|p| p.failures()).collect();
    let requests = proxies.iter().flat_map(|p| p.requests()).collect();
    let mut report = LabReport::build(
        matrix,
        options,
        failures,
        requests,
        &events,
        load,
        load_time,
        started.elapsed(),
    );
    report.skipped_runs = skipped_runs;
    report.servers_died = servers_died;
    drop(proxies);
    drop(apps);
    drop(unix_servers);
    if std::env::var_os("TRACER_LAB_KEEP").is_some() {
        eprintln!(
            "lab: kept the proxy's configuration and logs in {}",
            dir.display()
        );
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = std::fs::remove_dir_all(UNIX_DIR);
    report
}
