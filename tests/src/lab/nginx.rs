//! Real nginx as the lab's reverse proxy, and its logs as the oracle.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::process::stop_gracefully;

use super::{
    Route, Tier,
    proxy::{LabProxy, LoggedFailure, LoggedRequest, parse_upstream_list},
};

/// The descriptors the few-files proxy's worker may hold. About ten are its own (logs, listening
/// socket, epoll, channels): room for a few requests with their upstream connection.
pub const FEW_FILES: u32 = 20;

/// A running nginx (master and workers) inside the proxy namespace.
pub struct Nginx {
    child: Child,
    pub dir: PathBuf,
}

impl Nginx {
    /// Writes the configuration for `routes` into `dir` and starts nginx in namespace `netns`.
    pub fn start(netns: &str, dir: &Path, routes: &[Route]) -> Nginx {
        Nginx::start_as(Tier::Main, netns, dir, routes)
    }

    /// Starts the lab's nginx `tier` (with its limits) for `routes`.
    pub fn start_as(tier: Tier, netns: &str, dir: &Path, routes: &[Route]) -> Nginx {
        Nginx::launch(netns, dir, &config(dir, tier, routes, &[]))
    }

    /// Like [`Nginx::start`], nginx also answering 200 itself on each of `responders` (an
    /// upstream that costs next to nothing).
    pub fn start_with_responders(
        netns: &str,
        dir: &Path,
        routes: &[Route],
        responders: &[SocketAddr],
    ) -> Nginx {
        Nginx::launch(netns, dir, &config(dir, Tier::Main, routes, responders))
    }

    fn launch(netns: &str, dir: &Path, config: &str) -> Nginx {
        Nginx::start_config(Some(netns), dir, config)
    }

    /// Writes `config` into `dir` and starts nginx with it, in namespace `netns` or on the host,
    /// its error log in `dir`; returns once it listens.
    pub fn start_config(netns: Option<&str>, dir: &Path, config: &str) -> Nginx {
        make_temp_dirs(dir);
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config).expect("writing nginx.conf");
        let mut command = match netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns, "nginx"]);
                command
            }
            None => Command::new("nginx"),
        };
        let child = command
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .spawn()
            .expect("starting nginx (cargo xtask setup installs it)");
        let nginx = Nginx {
            child,
            dir: dir.to_path_buf(),
        };
        nginx.wait_started();
        nginx
    }

    fn wait_started(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid = self.dir.join("nginx.pid");
        while !pid.exists() {
            assert!(
                Instant::now() < deadline,
                "nginx did not start: {}",
                self.error_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The pid file is written once the listening sockets are open; give workers a moment.
        std::thread::sleep(Duration::from_millis(200));
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    /// Stops nginx gracefully (it closes its idle upstream connections) and waits for it.
    pub fn stop(&mut self) {
        stop_gracefully(&mut self.child, libc::SIGQUIT, Duration::from_secs(5));
    }
}

impl LabProxy for Nginx {
    fn stop(&mut self) {
        Nginx::stop(self);
    }

    fn failures(&self) -> Vec<LoggedFailure> {
        failures_in(&self.error_log())
    }

    fn requests(&self) -> Vec<LoggedRequest> {
        requests_in(&self.access_log())
    }
}

impl Drop for Nginx {
    /// SIGQUIT, then SIGKILL after 5 s: killing the master outright leaves its workers running.
    fn drop(&mut self) {
        stop_gracefully(&mut self.child, libc::SIGQUIT, Duration::from_secs(5));
    }
}

/// nginx's temporary folders, under `dir` (see [`temp_paths`]).
const TEMP_DIRS: [(&str, &str); 5] = [
    ("client_body_temp_path", "tmp/body"),
    ("proxy_temp_path", "tmp/proxy"),
    ("fastcgi_temp_path", "tmp/fastcgi"),
    ("uwsgi_temp_path", "tmp/uwsgi"),
    ("scgi_temp_path", "tmp/scgi"),
];

/// Makes nginx's temporary folders under `dir`, where [`temp_paths`] points it.
pub fn make_temp_dirs(dir: &Path) {
    for (_, sub) in TEMP_DIRS {
        std::fs::create_dir_all(dir.join(sub)).expect("nginx temp dirs");
    }
}

/// The `http` block's lines that keep nginx's temporary files under `dir` (the packaged
/// defaults are under /var/lib/nginx, which a test's nginx may not own).
pub fn temp_paths(dir: &Path) -> String {
    TEMP_DIRS
        .iter()
        .map(|(directive, sub)| format!("    {directive} {}/{sub};\n", dir.display()))
        .collect()
}

fn config(dir: &Path, tier: Tier, routes: &[Route], responders: &[SocketAddr]) -> String {
    let d = dir.display();
    let workers = match tier {
        Tier::FewFiles => format!("worker_processes 1;\nworker_rlimit_nofile {FEW_FILES};"),
        Tier::Main | Tier::FewPorts => "worker_processes 2;".to_string(),
    };
    let mut conf = format!(
        "user nobody nogroup;
{workers}
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    log_format lab '$msec $request_time $status $server_port \"$upstream_addr\"';
    access_log {d}/access.log lab;
{temp}    proxy_connect_timeout {timeout}ms;
    proxy_read_timeout {timeout}ms;
    proxy_send_timeout {timeout}ms;
    keepalive_timeout 0;
",
        timeout = super::proxy_timeout().as_millis(),
        temp = temp_paths(dir),
    );
    for route in routes {
        let servers: String = route
            .upstreams
            .iter()
            .map(|u| format!("        server {u};\n"))
            .collect();
        let keepalive = if route.keepalive {
            "        keepalive 16;\n"
        } else {
            ""
        };
        let _ = write!(
            conf,
            "    upstream {name} {{\n{servers}{keepalive}    }}\n",
            name = route.name
        );
        let http11 = if route.keepalive {
            " proxy_http_version 1.1; proxy_set_header Connection \"\";"
        } else {
            ""
        };
        let location = match route.app {
            // The app servers' scripts are in the lab's directory, the parent of nginx's.
            Some(app) => app.nginx_location(route.name, dir.parent().unwrap_or(dir)),
            None => format!("proxy_pass http://{};{http11}", route.name),
        };
        let _ = writeln!(
            conf,
            "    server {{ listen {listen}; location / {{ {location} }} }}",
            listen = route.listen(),
        );
    }
    for responder in responders {
        let _ = writeln!(
            conf,
            "    server {{ listen {responder}; access_log off; location / {{ return 200 \"ok\\n\"; }} }}"
        );
    }
    conf.push_str("}\n");
    conf
}

/// The tracer cause an nginx error-log message means (the table in docs/causes.md).
pub fn cause_of(message: &str) -> Option<&'static str> {
    let errno = message
        .split_once(" failed (")
        .or_else(|| message.split_once(" timed out ("))
        .and_then(|(_, rest)| rest.split(':').next())
        .and_then(|n| n.parse::<i32>().ok());
    if message.starts_with("connect() to unix:") {
        // php-fpm and the like: what connect() said is the whole story.
        return Some(match errno? {
            2 => "unix_missing",
            111 => "unix_refused",
            11 => "unix_backlog_full",
            13 | 1 => "unix_permission",
            _ => "connect_error",
        });
    }
    if message.contains("while connecting to upstream") {
        if message.starts_with("upstream timed out") {
            return Some("connect_timeout");
        }
        return Some(match errno? {
            111 => "refused",
            110 => "connect_timeout",
            113 | 101 | 112 | 100 => "unreachable",
            99 => "no_ephemeral_port",
            24 | 23 => "fd_exhausted",
            _ => "connect_error",
        });
    }
    if message.starts_with("upstream timed out") {
        return Some("response_timeout");
    }
    if message.ends_with("while SSL handshaking to upstream") {
        return Some("tls_handshake_failed");
    }
    // What nginx logs when a TLS record comes back to its plaintext request (it then passes the
    // bytes on as an HTTP/0.9 answer).
    if message.starts_with("upstream sent no valid HTTP/1.0 header") {
        return Some("plaintext_to_tls");
    }
    // "… closed connection" (HTTP), "… closed FastCGI stdout" (php-fpm).
    if message.starts_with("upstream prematurely closed")
        && message.ends_with("while reading response header from upstream")
    {
        return Some("closed_before_response");
    }
    if matches!(errno, Some(104) | Some(32)) {
        if message.contains("while reading response header")
            || message.contains("while sending request")
        {
            return Some("reset_before_response");
        }
        if message.contains("while reading upstream") {
            return Some("reset_mid_response");
        }
    }
    None
}

/// The `tls_reason` an nginx "… while SSL handshaking to upstream" message means (OpenSSL's
/// words): the proxy's own verdict on the upstream's certificate, an alert the upstream sent,
/// the upstream's plaintext answer ("wrong version number", "packet length too long"), or the
/// upstream closing.
pub fn tls_reason_of(message: &str) -> Option<&'static str> {
    if !message.ends_with("while SSL handshaking to upstream") {
        return None;
    }
    Some(if message.starts_with("upstream SSL certificate") {
        "proxy_rejected"
    } else if message.contains("SSL alert number") {
        "alert"
    } else if message.contains("wrong version number") || message.contains("packet length too long")
    {
        "plaintext_upstream"
    } else if message.starts_with("peer closed connection in SSL handshake")
        || message.contains("Connection reset by peer")
        || message.contains("unexpected eof")
    {
        "closed"
    } else {
        return None;
    })
}

/// "accept4() failed (24: Too many open files)": the worker could not take a client's
/// connection for want of a descriptor (`fd_exhausted`). Other accept() errors are not tracer's.
fn accept_failure(message: &str) -> Option<&'static str> {
    let rest = message
        .strip_prefix("accept4() failed (")
        .or_else(|| message.strip_prefix("accept() failed ("))?;
    matches!(rest.split(':').next(), Some("24") | Some("23")).then_some("fd_exhausted")
}

/// Lines that name an upstream without being a failed attempt of their own.
const NOT_ATTEMPTS: [&str; 3] = [
    // [warn] after max_fails failures: the failures were logged one by one already.
    "upstream server temporarily disabled",
    // No server was tried at all.
    "no live upstreams",
    // What a FastCGI server (php-fpm) wrote to its stderr, passed on at level error.
    "FastCGI sent in stderr",
];

/// The failed upstream attempts in an error.log: the lines of level error or worse that name an
/// upstream.
pub fn failures_in(error_log: &str) -> Vec<LoggedFailure> {
    error_log
        .lines()
        .filter_map(|line| {
            // 2026/11/22 00:30:01 [error] 812#812: *5 MESSAGE, client: …, upstream: "http://10.88.0.2:9001/", host: …
            let level = line.split_once(" [")?.1.split_once(']')?.0;
            if !matches!(level, "error" | "crit" | "alert" | "emerg") {
                return None;
            }
            let (_, after_level) = line.split_once("] ")?;
            let (_, after_pid) = after_level.split_once(": ")?;
            let message = after_pid
                .strip_prefix('*')
                .and_then(|m| m.split_once(' ').map(|(_, m)| m))
                .unwrap_or(after_pid);
            let message = message.split(", client: ").next()?.to_string();
            if NOT_ATTEMPTS.iter().any(|n| message.starts_with(n)) {
                return None;
            }
            if let Some(cause) = accept_failure(&message) {
                // Not an upstream attempt, but the proxy out of descriptors all the same:
                // tracer reports it as such, with no upstream.
                return Some(LoggedFailure {
                    upstream: "none".to_string(),
                    cause: Some(cause),
                    message,
                });
            }
            let upstream = line.split("upstream: \"").nth(1)?.split('"').next()?;
            let upstream = upstream
                .split_once("://")
                .map_or(upstream, |(_scheme, rest)| rest);
            let upstream = match upstream.strip_prefix("unix:") {
                // "http://unix:/run/php.sock:/": the path ends at the last ':'.
                Some(rest) => format!("unix:{}", rest.rsplit_once(':')?.0),
                None => upstream
                    .trim_end_matches('/')
                    .split('/')
                    .next()?
                    .to_string(),
            };
            Some(LoggedFailure {
                cause: cause_of(&message),
                upstream,
                message,
            })
        })
        .collect()
}

/// Parses the lab's access-log format: `$msec $request_time $status $server_port "$upstream_addr"`.
pub fn requests_in(access_log: &str) -> Vec<LoggedRequest> {
    access_log
        .lines()
        .filter_map(|line| {
            let mut fields = line.splitn(5, ' ');
            let end = fields.next()?.parse().ok()?;
            let duration = fields.next()?.parse().ok()?;
            let status = fields.next()?.parse().ok()?;
            let port = fields.next()?.parse().ok()?;
            let upstreams = fields.next()?.trim_matches('"');
            Some(LoggedRequest {
                end,
                duration,
                status,
                port,
                upstreams: parse_upstream_list(upstreams),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ERROR_LOG: &str = r#"2026/11/22 00:30:01 [error] 812#812: *5 connect() failed (111: Connection refused) while connecting to upstream, client: 127.0.0.1, server: , request: "GET / HTTP/1.1", upstream: "http://10.88.0.2:9001/", host: "127.0.0.1:8101"
2026/11/22 00:30:02 [error] 812#812: *6 upstream timed out (110: Connection timed out) while connecting to upstream, client: 127.0.0.1, server: , request: "GET / HTTP/1.1", upstream: "http://10.88.0.2:9002/", host: "127.0.0.1:8102"
2026/11/22 00:30:03 [error] 812#812: *7 connect() to 10.88.9.1:9003 failed (113: No route to host) while connecting to upstream, client: 127.0.0.1, server: , request: "GET / HTTP/1.1", upstream: "http://10.88.9.1:9003/", host: "127.0.0.1:8103"
2026/11/22 00:30:04 [error] 812#812: *8 recv() failed (104: Connection reset by peer) while reading response header from upstream, client: 127.0.0.1, server: , request: "GET / HTTP/1.1", upstream: "http://10.88.0.2:9004/", host: "127.0.0.1:8104"
2026/11/22 00:30:05 [error] 812#812: *9 recv() failed (104: Connection reset by peer) while reading upstream, client: 127.0.0.1, server: , request: "GET / HTTP/1.1", upstream: "http://10.88.0.2:9005/", host: "127.0.0.1:8105"
2026/11/22 00:30:06 [error] 812#812: *10 upstream prematurely closed connection while reading response header from upstream, client: 127.0.0.1, server: , request: "GET / HTTP/1.1", upstream: "http://10.88.0.2:9006/", host: "127.0.0.1:8106"
2026/11/22 00:30:07 [error] 812#812: *11 upstream timed out (110: Connection timed out) while reading response header from upstream, client: 127.0.0.1, server: , request: "GET / HTTP/1.1", upstream: "http://[fd00:88::2]:9007/", host: "127.0.0.1:8107"
2026/11/22 00:30:08 [notice] 811#811: signal process started
2026/11/22 00:30:08 [warn] 812#812: *13 upstream server temporarily disabled while connecting to upstream, client: 127.0.0.1, server: , request: "GET / HTTP/1.1", upstream: "http://10.88.0.2:9001/", host: "127.0.0.1:8109"
2026/11/22 00:30:08 [error] 812#812: *14 no live upstreams while connecting to upstream, client: 127.0.0.1, server: , request: "GET / HTTP/1.1", upstream: "http://retry/", host: "127.0.0.1:8109"
2026/11/22 00:30:09 [error] 812#812: *12 upstream prematurely closed connection while reading upstream, client: 127.0.0.1, server: , request: "GET / HTTP/1.1", upstream: "http://10.88.0.2:9008/", host: "127.0.0.1:8108"
"#;

    #[test]
    fn every_error_log_line_maps_to_its_tracer_cause() {
        let failures = failures_in(ERROR_LOG);
        let got: Vec<(&str, Option<&str>)> = failures
            .iter()
            .map(|f| (f.upstream.as_str(), f.cause))
            .collect();
        assert_eq!(
            got,
            vec![
                ("10.88.0.2:9001", Some("refused")),
                ("10.88.0.2:9002", Some("connect_timeout")),
                ("10.88.9.1:9003", Some("unreachable")),
                ("10.88.0.2:9004", Some("reset_before_response")),
                ("10.88.0.2:9005", Some("reset_mid_response")),
                ("10.88.0.2:9006", Some("closed_before_response")),
                ("[fd00:88::2]:9007", Some("response_timeout")),
                // A body cut short by a FIN: the kernel cannot tell it (docs/causes.md).
                ("10.88.0.2:9008", None),
            ]
        );
        assert_eq!(
            failures[0].message,
            "connect() failed (111: Connection refused) while connecting to upstream"
        );
    }

    #[test]
    fn other_connect_errors_map_by_errno() {
        assert_eq!(
            cause_of(
                "connect() to 10.0.0.1:80 failed (99: Cannot assign requested address) while connecting to upstream"
            ),
            Some("no_ephemeral_port")
        );
        assert_eq!(
            cause_of("socket() failed (24: Too many open files) while connecting to upstream"),
            Some("fd_exhausted")
        );
        assert_eq!(
            cause_of("connect() failed (110: Connection timed out) while connecting to upstream"),
            Some("connect_timeout")
        );
        assert_eq!(
            cause_of("connect() failed (13: Permission denied) while connecting to upstream"),
            Some("connect_error")
        );
        assert_eq!(
            cause_of("writev() failed (32: Broken pipe) while sending request to upstream"),
            Some("reset_before_response")
        );
    }

    #[test]
    fn a_proxy_out_of_descriptors_is_fd_exhausted_with_no_upstream_for_accept() {
        let log = r#"2026/11/22 00:30:14 [crit] 812#812: accept4() failed (24: Too many open files)
2026/11/22 00:30:14 [alert] 812#812: *30 socket() failed (24: Too many open files) while connecting to upstream, client: 127.0.0.1, server: , request: "GET / HTTP/1.1", upstream: "http://10.88.0.2:9016/", host: "127.0.0.1:8122"
2026/11/22 00:30:15 [error] 812#812: accept4() failed (103: Software caused connection abort)
"#;
        let got: Vec<(String, Option<&str>)> = failures_in(log)
            .into_iter()
            .map(|f| (f.upstream, f.cause))
            .collect();
        assert_eq!(
            got,
            vec![
                ("none".to_string(), Some("fd_exhausted")),
                ("10.88.0.2:9016".to_string(), Some("fd_exhausted")),
            ]
        );
    }

    #[test]
    fn access_log_lists_every_upstream_tried() {
        let requests = requests_in(
            "1763769600.123 1.002 504 8107 \"10.88.0.2:9007\"\n\
             1763769601.500 0.004 200 8110 \"10.88.0.2:9001, 10.88.0.2:9000\"\n\
             1763769602.000 0.000 502 8103 \"[fd00:88::2]:9003\"\n",
        );
        assert_eq!(requests.len(), 3);
        assert_eq!(requests[0].status, 504);
        assert_eq!(requests[0].port, 8107);
        assert!((requests[0].duration - 1.002).abs() < 1e-9);
        assert_eq!(requests[0].upstreams, vec!["10.88.0.2:9007".to_string()]);
        assert_eq!(requests[1].upstreams.len(), 2);
        assert_eq!(requests[2].upstreams, vec!["[fd00:88::2]:9003".to_string()]);
        let unix = requests_in("1763769603.000 0.000 502 8113 \"unix:/run/php/php-fpm.sock\"\n");
        assert_eq!(
            unix[0].upstreams,
            vec!["unix:/run/php/php-fpm.sock".to_string()]
        );
    }

    #[test]
    fn unix_socket_upstreams_are_named_as_tracer_names_them() {
        let log = r#"2026/11/22 00:30:10 [error] 812#812: *20 connect() to unix:/run/php/php-fpm.sock failed (2: No such file or directory) while connecting to upstream, client: 127.0.0.1, server: , request: "GET / HTTP/1.1", upstream: "http://unix:/run/php/php-fpm.sock:/", host: "127.0.0.1:8113"
2026/11/22 00:30:11 [error] 812#812: *21 connect() to unix:/run/php/php-fpm.sock failed (111: Connection refused) while connecting to upstream, client: 127.0.0.1, server: , request: "GET / HTTP/1.1", upstream: "http://unix:/run/php/php-fpm.sock:/", host: "127.0.0.1:8114"
2026/11/22 00:30:12 [error] 812#812: *22 connect() to unix:/run/php/php-fpm.sock failed (11: Resource temporarily unavailable) while connecting to upstream, client: 127.0.0.1, server: , request: "GET / HTTP/1.1", upstream: "http://unix:/run/php/php-fpm.sock:/", host: "127.0.0.1:8115"
2026/11/22 00:30:13 [crit] 812#812: *23 connect() to unix:/run/php/php-fpm.sock failed (13: Permission denied) while connecting to upstream, client: 127.0.0.1, server: , request: "GET / HTTP/1.1", upstream: "http://unix:/run/php/php-fpm.sock:/", host: "127.0.0.1:8116"
"#;
        let got: Vec<(String, Option<&str>)> = failures_in(log)
            .into_iter()
            .map(|f| (f.upstream, f.cause))
            .collect();
        let sock = "unix:/run/php/php-fpm.sock".to_string();
        assert_eq!(
            got,
            vec![
                (sock.clone(), Some("unix_missing")),
                (sock.clone(), Some("unix_refused")),
                (sock.clone(), Some("unix_backlog_full")),
                (sock, Some("unix_permission")),
            ]
        );
    }
}
