//! Real Apache httpd (Debian's, event MPM, mod_proxy_http) as the lab's reverse proxy, and its
//! error log as the oracle.
//!
//! mod_proxy logs each failed attempt once, at level error, with the errno (or APR status) and
//! a message id: AH00957 (connect() to a TCP server failed), AH02454 (to a Unix socket),
//! AH01102 (reading the status line failed), AH01110 (reading the body failed). Each route is a
//! virtual host of its own with its own error log, which names the upstream: some of these
//! messages do not.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{
    LabAddr, Route,
    proxy::{Daemon, LabProxy, LoggedFailure, LoggedRequest, errno_in, listen_addrs},
};
use crate::netns::Netns;

const MODULES: &str = "/usr/lib/apache2/modules";

/// A running Apache (its parent and the children that serve) inside the proxy namespace.
pub struct Apache {
    daemon: Daemon,
    dir: PathBuf,
    routes: Vec<Route>,
}

impl Apache {
    /// Writes the configuration for `routes` into `dir` and starts Apache in `netns`.
    pub fn start(netns: &Netns, dir: &Path, routes: &[Route]) -> Apache {
        std::fs::create_dir_all(dir).expect("Apache's directory");
        let conf = dir.join("apache2.conf");
        std::fs::write(&conf, config(dir, routes)).expect("writing apache2.conf");
        let daemon = Daemon::start(
            "apache2",
            netns,
            &[
                "apache2".as_ref(),
                "-f".as_ref(),
                conf.as_os_str(),
                "-DFOREGROUND".as_ref(),
            ],
            &dir.join("output.log"),
            &listen_addrs(routes),
            // A graceful stop, finishing the requests in progress.
            libc::SIGWINCH,
            Duration::from_secs(5),
        );
        Apache {
            daemon,
            dir: dir.to_path_buf(),
            routes: routes.to_vec(),
        }
    }
}

impl LabProxy for Apache {
    fn stop(&mut self) {
        self.daemon.stop();
    }

    fn failures(&self) -> Vec<LoggedFailure> {
        self.routes
            .iter()
            .flat_map(|route| {
                let log = std::fs::read_to_string(error_log(&self.dir, route)).unwrap_or_default();
                let upstream = route.upstreams.first().map(|u| u.to_string());
                failures_in(&log, &upstream.unwrap_or_default())
            })
            .collect()
    }

    fn requests(&self) -> Vec<LoggedRequest> {
        let log = std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default();
        requests_in(&log, &self.routes)
    }
}

fn error_log(dir: &Path, route: &Route) -> PathBuf {
    dir.join(format!("error-{}.log", route.listen_port))
}

/// mod_proxy's URL for an upstream.
fn backend_url(addr: &LabAddr) -> String {
    match addr {
        LabAddr::Tcp(addr) => format!("http://{addr}/"),
        LabAddr::Unix(path) => format!("unix:{path}|http://localhost/"),
    }
}

/// What every Apache of the tests starts with: its files in `dir`, the event MPM, mod_proxy_http
/// and the `modules` given (`ssl` …), workers as nobody, no client keep-alive, the main error
/// log.
pub fn base_config(dir: &Path, modules: &[&str]) -> String {
    let d = dir.display();
    let mut conf = format!(
        "ServerRoot {d}
ServerName lab
PidFile {d}/apache2.pid
DefaultRuntimeDir {d}
Mutex file:{d} default
"
    );
    for module in ["mpm_event", "authz_core", "proxy", "proxy_http"]
        .iter()
        .chain(modules)
    {
        let _ = writeln!(conf, "LoadModule {module}_module {MODULES}/mod_{module}.so");
    }
    let _ = write!(
        conf,
        "User nobody
Group nogroup
KeepAlive Off
ErrorLog {d}/error.log
"
    );
    conf
}

/// One virtual host per route. `retry=0` keeps a worker that failed in use (no time-out in
/// the error state), so that every request is an attempt; Apache's mod_proxy does not try
/// another server on its own.
fn config(dir: &Path, routes: &[Route]) -> String {
    let d = dir.display();
    let timeout = super::proxy_timeout().as_secs().max(1);
    let mut conf = base_config(dir, &[]);
    let _ = write!(
        conf,
        "LogLevel warn
LogFormat \"%{{end:sec}}t.%{{end:msec_frac}}t %D %>s %{{local}}p\" lab
CustomLog {d}/access.log lab
"
    );
    for route in routes {
        let Some(upstream) = route.upstreams.first() else {
            continue;
        };
        let reuse = if route.keepalive {
            ""
        } else {
            " disablereuse=On"
        };
        let _ = write!(
            conf,
            "Listen {listen}
<VirtualHost {listen}>
    ErrorLog {log}
    ProxyPass / \"{url}\" connectiontimeout={timeout} timeout={timeout} retry=0{reuse}
</VirtualHost>
",
            listen = route.listen(),
            log = error_log(dir, route).display(),
            url = backend_url(upstream),
        );
    }
    conf
}

/// Message ids that follow a failed attempt already logged, and are not attempts of their own.
const NOT_ATTEMPTS: [&str; 3] = [
    // "ap_proxy_connect_backend disabling worker for (…)"
    "AH00959", // "HTTP: failed to make connection to backend: …"
    "AH01114",
    // "AH00898: Error reading from remote server returned by /", after AH01102/AH01110
    "AH00898",
];

/// The tracer cause of a mod_proxy message: its id and its errno or APR status (docs/causes.md).
pub fn cause_of(id: &str, errno: Option<i32>) -> Option<&'static str> {
    const TIMEUP: i32 = 70007;
    const EOF: i32 = 70014;
    const EGENERAL: i32 = 20014;
    const INCOMPLETE: i32 = 70008;
    Some(match (id, errno?) {
        ("AH00957", 111) => "refused",
        ("AH00957", 110 | TIMEUP) => "connect_timeout",
        ("AH00957", 113 | 101 | 112 | 100) => "unreachable",
        ("AH00957", 99) => "no_ephemeral_port",
        ("AH02454", 2) => "unix_missing",
        ("AH02454", 111) => "unix_refused",
        ("AH02454", 11) => "unix_backlog_full",
        ("AH02454", 13 | 1) => "unix_permission",
        ("AH00957" | "AH02454", _) => "connect_error",
        ("AH01102", 104 | 32) => "reset_before_response",
        // An end of file, or the bare APR_EGENERAL that Apache 2.4 reports when the server
        // closed without a byte of a status line.
        ("AH01102", EOF | EGENERAL) => "closed_before_response",
        ("AH01102", TIMEUP) => "response_timeout",
        // The body ended before its Content-Length: ECONNRESET, or APR_INCOMPLETE when the
        // reset's connection end came before Apache's read (under emulation, 32 of 200). A
        // close (FIN) mid-body reads the same; tracer sees only the reset (docs/causes.md).
        ("AH01110", 104 | INCOMPLETE) => "reset_mid_response",
        _ => return None,
    })
}

/// The failed attempts in one virtual host's error log, all on `upstream`: the lines of level
/// error or worse from mod_proxy and its HTTP module.
pub fn failures_in(log: &str, upstream: &str) -> Vec<LoggedFailure> {
    log.lines()
        .filter_map(|line| {
            // [Mon Nov 30 01:02:03.456789 2026] [proxy:error] [pid 12:tid 34] (111)Connection refused: AH00957: …
            let (_, rest) = line.split_once("] [")?;
            let (module_level, rest) = rest.split_once("] ")?;
            let (module, level) = module_level.split_once(':')?;
            if !module.starts_with("proxy")
                || !matches!(level, "error" | "crit" | "alert" | "emerg")
            {
                return None;
            }
            let (_, message) = rest.split_once("] ")?;
            let id = message.find("AH").and_then(|at| message.get(at..at + 7))?;
            if NOT_ATTEMPTS.contains(&id) {
                return None;
            }
            let errno = message
                .starts_with('(')
                .then(|| errno_in(message))
                .flatten();
            Some(LoggedFailure {
                upstream: upstream.to_string(),
                cause: cause_of(id, errno),
                message: message.to_string(),
            })
        })
        .collect()
}

/// Parses the lab's access-log format, `%{end:sec}t.%{end:msec_frac}t %D %>s %{local}p`: the
/// route, known by its port, names the upstream tried.
pub fn requests_in(log: &str, routes: &[Route]) -> Vec<LoggedRequest> {
    log.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let end: f64 = fields.next()?.parse().ok()?;
            let duration = fields.next()?.parse::<f64>().ok()? / 1e6;
            let status = fields.next()?.parse().ok()?;
            let port: u16 = fields.next()?.parse().ok()?;
            let route = routes.iter().find(|r| r.listen_port == port);
            Some(LoggedRequest {
                end,
                duration,
                status,
                port,
                upstreams: route
                    .map(|r| r.upstreams.iter().take(1).map(|u| u.to_string()).collect())
                    .unwrap_or_default(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "[Mon Nov 30 01:02:03.456789 2026] [proxy:error] [pid 12:tid 34] (111)Connection refused: AH00957: http: attempt to connect to 10.88.0.2:9001 (10.88.0.2:9001) failed
[Mon Nov 30 01:02:03.456799 2026] [proxy_http:error] [pid 12:tid 34] [client 127.0.0.1:40000] AH01114: HTTP: failed to make connection to backend: 10.88.0.2
[Mon Nov 30 01:02:03.456799 2026] [proxy:error] [pid 12:tid 34] AH00959: ap_proxy_connect_backend disabling worker for (10.88.0.2:9001) for 0s
[Mon Nov 30 01:02:04.000000 2026] [proxy_http:error] [pid 12:tid 35] (104)Connection reset by peer: [client 127.0.0.1:40002] AH01102: error reading status line from remote server 10.88.0.2:9004
[Mon Nov 30 01:02:05.000000 2026] [proxy_http:error] [pid 12:tid 35] (70007)The timeout specified has expired: [client 127.0.0.1:40004] AH01102: error reading status line from remote server 10.88.0.2:9007
[Mon Nov 30 01:02:06.000000 2026] [proxy_http:error] [pid 12:tid 35] (70014)End of file found: [client 127.0.0.1:40006] AH01102: error reading status line from remote server 10.88.0.2:9006
[Mon Nov 30 01:02:07.000000 2026] [proxy:error] [pid 12:tid 36] (2)No such file or directory: AH02454: HTTP: attempt to connect to Unix domain socket /tmp/missing.sock (localhost:80) failed
[Mon Nov 30 01:02:08.000000 2026] [core:warn] [pid 11] AH00098: pid file overwritten
";

    #[test]
    fn each_failed_attempt_is_one_line_with_its_errno() {
        let got: Vec<Option<&str>> = failures_in(LOG, "x").into_iter().map(|f| f.cause).collect();
        assert_eq!(
            got,
            vec![
                Some("refused"),
                Some("reset_before_response"),
                Some("response_timeout"),
                Some("closed_before_response"),
                Some("unix_missing"),
            ]
        );
    }

    #[test]
    fn the_access_log_names_the_route_and_its_timing() {
        let routes = [Route {
            name: "refused",
            tier: super::super::Tier::Main,
            listen_port: 8101,
            upstreams: vec![LabAddr::Tcp("10.88.0.2:9001".parse().unwrap())],
            keepalive: false,
            requests: 1,
            concurrency: 1,
            app: None,
        }];
        let requests = requests_in("1796000000.250 1500 503 8101\n", &routes);
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].status, 503);
        assert!((requests[0].end - 1796000000.25).abs() < 1e-6);
        assert!((requests[0].duration - 0.0015).abs() < 1e-9);
        assert_eq!(requests[0].upstreams, vec!["10.88.0.2:9001".to_string()]);
    }
}
