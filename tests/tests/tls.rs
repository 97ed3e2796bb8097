//! TLS between the proxy and its upstreams, for real: nginx proxying over TLS to upstreams that
//! get it wrong in each of the ways that end in a 502, with certificates the test makes with
//! `openssl`, and nginx's error log as the oracle for every failed attempt's cause and
//! `tls_reason`:
//!
//! - `proxy_pass https://` to a plaintext upstream (nginx's own plain server answers the
//!   ClientHello with `HTTP/1.1 400`): `plaintext_upstream`;
//! - `proxy_ssl_verify on` against an upstream whose certificate nginx does not trust:
//!   `proxy_rejected`;
//! - an upstream that speaks only TLS 1.2 to a proxy that allows only TLS 1.3 (the upstream
//!   answers with an alert): `alert`, named `protocol_version`;
//! - an upstream that reads the ClientHello and closes: `closed`;
//! - `proxy_pass http://` to a TLS port whose server answers plaintext with an alert
//!   (`gnutls-serv`): `plaintext_to_tls`;
//! - healthy TLS upstreams, with keep-alive and with TLS session resumption on new
//!   connections: no failure at all.
use std::{
    io::Read,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use tracer_tests::{
    http::{free_port, get},
    kernel_tests_enabled,
    lab::nginx::{failures_in, make_temp_dirs, temp_paths, tls_reason_of},
    process::stop_gracefully,
    tracer_process::Tracer,
};

/// One lab at a time: a tracer sees every nginx's failures, and each test checks that nothing
/// but its own cells failed.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The certificates: the upstream's (self-signed, for `upstream.test`) and another CA's that
/// does not vouch for it.
struct Certificates {
    cert: PathBuf,
    key: PathBuf,
    other_ca: PathBuf,
}

fn certificates(dir: &Path) -> Certificates {
    let make = |name: &str, subject: &str| {
        let status = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .arg("-keyout")
            .arg(dir.join(format!("{name}.key")))
            .arg("-out")
            .arg(dir.join(format!("{name}.pem")))
            .args(["-subj", subject])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl (cargo xtask setup installs it)");
        assert!(status.success(), "openssl req failed");
    };
    make("upstream", "/CN=upstream.test");
    make("other", "/CN=another.test");
    Certificates {
        cert: dir.join("upstream.pem"),
        key: dir.join("upstream.key"),
        other_ca: dir.join("other.pem"),
    }
}

/// One way of proxying: the path nginx serves it under, the upstream port, and what every
/// request's attempt must come to (`None`: no failure).
struct Cell {
    path: &'static str,
    upstream: u16,
    expect: Option<(&'static str, Option<&'static str>)>,
    requests: usize,
}

struct Lab {
    dir: PathBuf,
    certs: Certificates,
    nginx: Child,
    gnutls: Child,
    proxy: SocketAddr,
    cells: Vec<Cell>,
    /// The healthy TLS upstream (the one `/untrusted` does not trust).
    tls: u16,
}

impl Lab {
    fn start(tag: &str) -> Lab {
        let dir = std::env::temp_dir().join(format!("tracer-tls-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        make_temp_dirs(&dir);
        let certs = certificates(&dir);
        let [proxy, plain, tls, tls12, closer, gnutls] = std::array::from_fn(|_| free_port());
        let cells = vec![
            Cell {
                path: "/plaintext-upstream",
                upstream: plain,
                expect: Some(("tls_handshake_failed", Some("plaintext_upstream"))),
                requests: 5,
            },
            Cell {
                path: "/untrusted",
                upstream: tls,
                expect: Some(("tls_handshake_failed", Some("proxy_rejected"))),
                requests: 5,
            },
            Cell {
                path: "/alert",
                upstream: tls12,
                expect: Some(("tls_handshake_failed", Some("alert"))),
                requests: 5,
            },
            Cell {
                path: "/closed",
                upstream: closer,
                expect: Some(("tls_handshake_failed", Some("closed"))),
                requests: 5,
            },
            Cell {
                path: "/plaintext-to-tls",
                upstream: gnutls,
                expect: Some(("plaintext_to_tls", None)),
                requests: 5,
            },
        ];
        std::fs::write(
            dir.join("nginx.conf"),
            nginx_conf(&dir, &certs, proxy, plain, tls, tls12, closer, gnutls),
        )
        .unwrap();
        // An upstream that reads the ClientHello and closes (a worker dying mid-handshake).
        let listener = TcpListener::bind(("127.0.0.1", closer)).expect("closer port");
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let mut hello = [0u8; 4096];
                let _ = stream.read(&mut hello);
            }
        });
        let gnutls_port = gnutls;
        let gnutls = Command::new("gnutls-serv")
            .args([
                "--port",
                &gnutls_port.to_string(),
                "--http",
                "--x509certfile",
            ])
            .arg(&certs.cert)
            .arg("--x509keyfile")
            .arg(&certs.key)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("gnutls-serv (cargo xtask setup installs gnutls-bin)");
        let nginx = Command::new("nginx")
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .spawn()
            .expect("nginx (cargo xtask setup installs it)");
        let proxy: SocketAddr = ([127, 0, 0, 1], proxy).into();
        let listening = |port: u16| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        wait_until(
            Duration::from_secs(10),
            "nginx and gnutls-serv to listen",
            || listening(proxy.port()) && listening(gnutls_port),
        );
        Lab {
            dir,
            certs,
            nginx,
            gnutls,
            proxy,
            cells,
            tls,
        }
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    fn resumed_sessions(&self) -> usize {
        std::fs::read_to_string(self.dir.join("sessions.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.trim() == "r")
            .count()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // SIGQUIT: the master stops its workers too.
        stop_gracefully(&mut self.nginx, libc::SIGQUIT, Duration::from_secs(5));
        stop_gracefully(&mut self.gnutls, libc::SIGTERM, Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[allow(clippy::too_many_arguments, reason = "one port per server of the lab")]
fn nginx_conf(
    dir: &Path,
    certs: &Certificates,
    proxy: u16,
    plain: u16,
    tls: u16,
    tls12: u16,
    closer: u16,
    gnutls: u16,
) -> String {
    let d = dir.display();
    let (cert, key, other) = (
        certs.cert.display(),
        certs.key.display(),
        certs.other_ca.display(),
    );
    format!(
        "user nobody nogroup;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
{temp}    proxy_connect_timeout 2s;
    proxy_read_timeout 3s;
    proxy_next_upstream off;
    log_format session '$ssl_session_reused';
    # The upstreams.
    server {{ listen 127.0.0.1:{plain}; location / {{ return 200 \"plain\\n\"; }} }}
    server {{
        listen 127.0.0.1:{tls} ssl;
        ssl_certificate {cert}; ssl_certificate_key {key};
        access_log {d}/sessions.log session;
        location / {{ return 200 \"tls\\n\"; }}
    }}
    server {{
        listen 127.0.0.1:{tls12} ssl;
        ssl_certificate {cert}; ssl_certificate_key {key};
        ssl_protocols TLSv1.2;
        location / {{ return 200 \"tls 1.2\\n\"; }}
    }}
    upstream kept_alive {{ server 127.0.0.1:{tls}; keepalive 8; }}
    # The proxy.
    server {{
        listen 127.0.0.1:{proxy};
        location /plaintext-upstream {{ proxy_pass https://127.0.0.1:{plain}; }}
        location /untrusted {{
            proxy_pass https://127.0.0.1:{tls};
            proxy_ssl_verify on; proxy_ssl_trusted_certificate {other}; proxy_ssl_name upstream.test;
        }}
        location /alert {{ proxy_pass https://127.0.0.1:{tls12}; proxy_ssl_protocols TLSv1.3; }}
        location /closed {{ proxy_pass https://127.0.0.1:{closer}; }}
        location /plaintext-to-tls {{ proxy_pass http://127.0.0.1:{gnutls}; }}
        location /kept-alive {{
            proxy_pass https://kept_alive; proxy_http_version 1.1; proxy_set_header Connection \"\";
        }}
        location /resumed {{
            proxy_pass https://127.0.0.1:{tls}; proxy_ssl_session_reuse on;
        }}
    }}
}}
",
        temp = temp_paths(dir)
    )
}

#[track_caller]
fn wait_until(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "waited {within:?} for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn statuses(proxy: SocketAddr, path: &str, n: usize) -> Vec<u16> {
    (0..n)
        .map(|_| get(proxy, path).map(|(s, _)| s).unwrap_or(0))
        .collect()
}

#[test]
fn tls_failures_behind_nginx_agree_with_its_error_log() {
    if !kernel_tests_enabled("tls_failures_behind_nginx_agree_with_its_error_log") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let lab = Lab::start("events");
    let tracer = Tracer::events(&["--comm", "nginx"]);
    let mut answered = Vec::new();
    for cell in &lab.cells {
        answered.push((cell.path, statuses(lab.proxy, cell.path, cell.requests)));
    }
    // Healthy TLS: one kept-alive connection for many requests, and a new connection per
    // request that resumes the first one's TLS session.
    let kept_alive = statuses(lab.proxy, "/kept-alive", 20);
    let resumed = statuses(lab.proxy, "/resumed", 20);
    let (events, stderr) = tracer.stop_collecting();
    let log = lab.error_log();
    println!("nginx answered: {answered:?}");
    assert!(
        kept_alive.iter().all(|s| *s == 200),
        "{kept_alive:?}\n{log}"
    );
    assert!(resumed.iter().all(|s| *s == 200), "{resumed:?}\n{log}");
    assert!(
        lab.resumed_sessions() >= 10,
        "TLS sessions were not resumed ({} of 40)",
        lab.resumed_sessions()
    );
    let logged = failures_in(&log);
    let failures: Vec<&Value> = events.iter().filter(|e| e["type"] == "failure").collect();
    for cell in &lab.cells {
        let upstream = format!("127.0.0.1:{}", cell.upstream);
        let ours: Vec<&&Value> = failures
            .iter()
            .filter(|e| e["upstream"] == upstream.as_str())
            .collect();
        let theirs: Vec<_> = logged.iter().filter(|f| f.upstream == upstream).collect();
        let (cause, reason) = cell.expect.expect("failing cells");
        assert_eq!(
            theirs.len(),
            cell.requests,
            "{}: nginx logged {} failures, expected one per request:\n{log}",
            cell.path,
            theirs.len()
        );
        for f in &theirs {
            assert_eq!(
                f.cause,
                Some(cause),
                "{}: nginx said {:?}",
                cell.path,
                f.message
            );
            assert_eq!(
                tls_reason_of(&f.message),
                reason,
                "{}: {:?}",
                cell.path,
                f.message
            );
        }
        assert_eq!(
            ours.len(),
            theirs.len(),
            "{}: tracer reported {} failures, nginx logged {}:\ntracer: {ours:#?}\nnginx:\n{log}\n{stderr}",
            cell.path,
            ours.len(),
            theirs.len()
        );
        for e in &ours {
            assert_eq!(e["cause"], cause, "{}: {e:#}", cell.path);
            assert_eq!(e["tls_reason"].as_str(), reason, "{}: {e:#}", cell.path);
            assert_eq!(e["comm"], "nginx", "{e:#}");
        }
        println!(
            "{:<20} nginx: {:<80} tracer: {} {} ({})",
            cell.path,
            theirs[0].message,
            ours[0]["cause"],
            ours[0]["tls_reason"],
            ours[0]["explanation"]
        );
    }
    // The alert is named: an upstream limited to TLS 1.2 refuses a TLS 1.3-only ClientHello.
    let alert_upstream = format!("127.0.0.1:{}", lab.cells[2].upstream);
    for e in failures
        .iter()
        .filter(|e| e["upstream"] == alert_upstream.as_str())
    {
        assert_eq!(e["tls_alert"], "protocol_version", "{e:#}");
    }
    // Nothing else failed: not the healthy TLS upstream, kept alive or resumed.
    let known: Vec<String> = lab
        .cells
        .iter()
        .map(|c| format!("127.0.0.1:{}", c.upstream))
        .collect();
    let others: Vec<&&Value> = failures
        .iter()
        .filter(|e| !known.iter().any(|k| e["upstream"] == k.as_str()))
        .collect();
    assert!(
        others.is_empty(),
        "failures toward healthy upstreams: {others:#?}"
    );
}

fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The agent counts TLS failures exactly, by cause and by reason, in its metrics.
#[test]
fn tls_failures_are_counted_by_reason_in_the_metrics() {
    if !kernel_tests_enabled("tls_failures_are_counted_by_reason_in_the_metrics") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let lab = Lab::start("metrics");
    let (tracer, addr) = Tracer::agent(&[]);
    let expected = [
        (0, "plaintext_upstream", 7),
        (1, "proxy_rejected", 4),
        (2, "alert", 3),
    ];
    for (cell, _, n) in expected {
        statuses(lab.proxy, lab.cells[cell].path, n);
    }
    statuses(lab.proxy, "/plaintext-to-tls", 2);
    statuses(lab.proxy, "/kept-alive", 5);
    let series = |upstream: u16, rest: &str| {
        format!("{{proxy=\"nginx\",cgroup=\"/\",upstream=\"127.0.0.1:{upstream}\"{rest}}}")
    };
    let mut scrape = String::new();
    let counted = |scrape: &str| {
        expected.iter().all(|(cell, reason, n)| {
            let upstream = lab.cells[*cell].upstream;
            sample(
                scrape,
                &format!(
                    "tracer_upstream_tls_failures_total{}",
                    series(upstream, &format!(",tls_reason=\"{reason}\""))
                ),
            ) == Some(*n as f64)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        scrape = get(addr, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default();
        if counted(&scrape) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let tls_lines: Vec<&str> = scrape.lines().filter(|l| l.contains("tls")).collect();
    assert!(
        counted(&scrape),
        "{}\n{}",
        tls_lines.join("\n"),
        tracer.stderr()
    );
    for (cell, _, n) in expected {
        let upstream = lab.cells[cell].upstream;
        let failures = format!(
            "tracer_upstream_failures_total{}",
            series(upstream, ",cause=\"tls_handshake_failed\"")
        );
        assert_eq!(sample(&scrape, &failures), Some(n as f64), "{failures}");
    }
    let plaintext = format!(
        "tracer_upstream_failures_total{}",
        series(lab.cells[4].upstream, ",cause=\"plaintext_to_tls\"")
    );
    assert_eq!(sample(&scrape, &plaintext), Some(2.0), "{plaintext}");
    drop(tracer);
}

/// A failed attempt as a proxy's log tells it: the upstream's port, the cause and the
/// `tls_reason`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Logged {
    upstream: u16,
    cause: &'static str,
    reason: Option<&'static str>,
}

/// OpenSSL's reason for a failed handshake, as HAProxy (`ssl_bc_err_str`) and Apache (`SSL
/// Library Error`) log it, as a `tls_reason`.
fn reason_of_openssl(text: &str) -> &'static str {
    if text.contains("wrong version number") || text.contains("packet length too long") {
        "plaintext_upstream"
    } else if text.contains("certificate verify") {
        "proxy_rejected"
    } else if text.contains("alert") {
        "alert"
    } else {
        "closed"
    }
}

/// How each failing cell is proxied: TLS toward it or not, and the TLS options.
fn tls_options(cell: &Cell) -> Option<&'static str> {
    match cell.path {
        "/plaintext-to-tls" => None,
        "/untrusted" => Some("verify"),
        "/alert" => Some("tls13"),
        _ => Some(""),
    }
}

/// HAProxy with one frontend per cell and one for the healthy TLS upstream (kept alive, as
/// HAProxy reuses server connections); its log line carries the termination state and
/// OpenSSL's error.
struct Haproxy {
    child: Child,
    log: PathBuf,
    fronts: Vec<(SocketAddr, u16)>,
    healthy: SocketAddr,
}

impl Haproxy {
    fn start(lab: &Lab) -> Haproxy {
        let timeout = 3;
        let mut conf = format!(
            "global
    log stdout format raw local0 info
defaults
    mode http
    log global
    log-format \"%b %ST %ts ssl_err=%[ssl_bc_err_str]\"
    retries 0
    timeout connect {timeout}s
    timeout client 10s
    timeout server {timeout}s
"
        );
        let mut fronts = Vec::new();
        // Backends are named by their upstream's port (the log names the backend), the
        // healthy one apart (its upstream is /untrusted's too).
        let mut add = |name: String, upstream: u16, server: String| {
            let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
            conf.push_str(&format!(
                "frontend f{name}\n    bind {listen}\n    default_backend b{name}\n\
                 backend b{name}\n    server s 127.0.0.1:{upstream}{server}\n"
            ));
            listen
        };
        for cell in &lab.cells {
            let server = match tls_options(cell) {
                None => String::new(),
                Some("verify") => format!(
                    " ssl verify required ca-file {}",
                    lab.certs.other_ca.display()
                ),
                Some("tls13") => " ssl verify none ssl-min-ver TLSv1.3".to_string(),
                Some(_) => " ssl verify none".to_string(),
            };
            fronts.push((
                add(cell.upstream.to_string(), cell.upstream, server),
                cell.upstream,
            ));
        }
        let healthy = add(
            "healthy".to_string(),
            lab.tls,
            " ssl verify none".to_string(),
        );
        let config = lab.dir.join("haproxy.cfg");
        std::fs::write(&config, conf).unwrap();
        let log = lab.dir.join("haproxy.log");
        let child = Command::new("haproxy")
            .arg("-f")
            .arg(&config)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(lab.dir.join("haproxy.err")).unwrap())
            .spawn()
            .expect("haproxy (cargo xtask setup installs it)");
        let err = lab.dir.join("haproxy.err");
        wait_until(Duration::from_secs(10), "haproxy to listen", || {
            let up = std::net::TcpStream::connect(healthy).is_ok();
            if !up && let Ok(text) = std::fs::read_to_string(&err) {
                assert!(!text.contains("ALERT"), "haproxy did not start:\n{text}");
            }
            up
        });
        Haproxy {
            child,
            log,
            fronts,
            healthy,
        }
    }

    /// "b9001 503 SC ssl_err=error:0A00010B:SSL routines::wrong version number".
    fn logged(&self) -> Vec<Logged> {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .filter_map(|line| {
                let mut words = line.splitn(4, ' ');
                let upstream: u16 = words.next()?.strip_prefix('b')?.parse().ok()?;
                let _status = words.next()?;
                let state = words.next()?;
                let error = words.next()?.strip_prefix("ssl_err=")?;
                let (cause, reason) = if state.starts_with("SC") && error != "-" {
                    ("tls_handshake_failed", Some(reason_of_openssl(error)))
                } else if state.starts_with("SC") {
                    ("tls_handshake_failed", Some("closed"))
                } else if state.starts_with("PH") {
                    ("plaintext_to_tls", None)
                } else if state.starts_with("--") {
                    return None;
                } else {
                    ("?", None)
                };
                Some(Logged {
                    upstream,
                    cause,
                    reason,
                })
            })
            .collect()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        stop_gracefully(&mut self.child, libc::SIGUSR1, Duration::from_secs(5));
    }
}

/// Apache httpd (event MPM, mod_proxy_http, mod_ssl) with one virtual host per cell, each with
/// its own error log at `ssl:info`, where OpenSSL's reason is written.
struct Apache {
    child: Child,
    dir: PathBuf,
    fronts: Vec<(SocketAddr, u16)>,
    healthy: SocketAddr,
}

const APACHE_MODULES: &str = "/usr/lib/apache2/modules";

impl Apache {
    fn start(lab: &Lab) -> Apache {
        let dir = lab.dir.join("apache");
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.display();
        let m = APACHE_MODULES;
        let mut conf = format!(
            "ServerRoot {d}
ServerName tls-lab
PidFile {d}/apache2.pid
DefaultRuntimeDir {d}
Mutex file:{d} default
LoadModule mpm_event_module {m}/mod_mpm_event.so
LoadModule authz_core_module {m}/mod_authz_core.so
LoadModule proxy_module {m}/mod_proxy.so
LoadModule proxy_http_module {m}/mod_proxy_http.so
LoadModule ssl_module {m}/mod_ssl.so
LoadModule socache_shmcb_module {m}/mod_socache_shmcb.so
User nobody
Group nogroup
KeepAlive Off
ErrorLog {d}/error.log
LogLevel warn ssl:info
Timeout 3
"
        );
        let mut fronts = Vec::new();
        let mut add = |upstream: u16, tls: Option<&str>| {
            let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let (scheme, ssl) = match tls {
                None => ("http", String::new()),
                Some(options) => (
                    "https",
                    format!(
                        "    SSLProxyEngine on\n{}",
                        match options {
                            "verify" => format!(
                                "    SSLProxyVerify require\n    SSLProxyCACertificateFile {}\n",
                                lab.certs.other_ca.display()
                            ),
                            "tls13" => "    SSLProxyVerify none\n    SSLProxyCheckPeerName off\n    SSLProxyProtocol TLSv1.3\n".to_string(),
                            _ => "    SSLProxyVerify none\n    SSLProxyCheckPeerName off\n".to_string(),
                        }
                    ),
                ),
            };
            conf.push_str(&format!(
                "Listen {listen}\n<VirtualHost {listen}>\n    ErrorLog {d}/error-{upstream}.log\n{ssl}    ProxyPass / {scheme}://127.0.0.1:{upstream}/ retry=0\n</VirtualHost>\n"
            ));
            listen
        };
        for cell in &lab.cells {
            fronts.push((add(cell.upstream, tls_options(cell)), cell.upstream));
        }
        let healthy = add(lab.tls, Some(""));
        let config = dir.join("apache2.conf");
        std::fs::write(&config, conf).unwrap();
        let child = Command::new("apache2")
            .arg("-f")
            .arg(&config)
            .arg("-DFOREGROUND")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("output.log")).unwrap())
            .spawn()
            .expect("apache2 (cargo xtask setup installs it)");
        wait_until(Duration::from_secs(10), "apache2 to listen", || {
            std::net::TcpStream::connect(healthy).is_ok()
        });
        Apache {
            child,
            dir,
            fronts,
            healthy,
        }
    }

    /// Per virtual host: each "AH00898: Error during SSL Handshake with remote server" is a
    /// failed handshake, its reason the "SSL Library Error" before it; each "AH01102: error
    /// reading status line" toward the plaintext cell a TLS answer to plaintext.
    fn logged(&self) -> Vec<Logged> {
        let mut all = Vec::new();
        for (_, upstream) in &self.fronts {
            let log = std::fs::read_to_string(self.dir.join(format!("error-{upstream}.log")))
                .unwrap_or_default();
            let mut reason = None;
            for line in log.lines() {
                if let Some((_, error)) = line.split_once("SSL Library Error: ") {
                    reason = Some(reason_of_openssl(error));
                } else if line.contains("AH00898: Error during SSL Handshake") {
                    all.push(Logged {
                        upstream: *upstream,
                        cause: "tls_handshake_failed",
                        reason: Some(reason.take().unwrap_or("closed")),
                    });
                } else if line.contains("AH01102: error reading status line") {
                    all.push(Logged {
                        upstream: *upstream,
                        cause: "plaintext_to_tls",
                        reason: None,
                    });
                }
            }
        }
        all
    }
}

impl Drop for Apache {
    fn drop(&mut self) {
        // A graceful stop.
        stop_gracefully(&mut self.child, libc::SIGWINCH, Duration::from_secs(5));
    }
}

/// Every cell's requests through `fronts` (listen address, upstream port), and 20 to the
/// healthy TLS upstream through `healthy`; tracer's failures for `comm` must be the proxy's
/// log's, one for one, cause and reason, and nothing toward the healthy upstream.
#[track_caller]
fn agree_with(
    lab: &Lab,
    comm: &str,
    fronts: &[(SocketAddr, u16)],
    healthy: SocketAddr,
    logged: impl Fn() -> Vec<Logged>,
) {
    let tracer = Tracer::events(&["--comm", comm]);
    let mut answered = Vec::new();
    for (listen, upstream) in fronts {
        let cell = lab.cells.iter().find(|c| c.upstream == *upstream).unwrap();
        answered.push((cell.path, statuses(*listen, "/", cell.requests)));
    }
    let healthy_answers = statuses(healthy, "/", 20);
    // Let the proxy log the last attempts.
    std::thread::sleep(Duration::from_millis(300));
    let (events, stderr) = tracer.stop_collecting();
    println!("{comm} answered: {answered:?}");
    assert!(
        healthy_answers.iter().all(|s| *s == 200),
        "{healthy_answers:?}"
    );
    let mut theirs = logged();
    let mut ours: Vec<Logged> = events
        .iter()
        .filter(|e| e["type"] == "failure")
        .map(|e| {
            let upstream = e["upstream"].as_str().unwrap_or_default();
            let port = upstream.rsplit(':').next().and_then(|p| p.parse().ok());
            let cause = match e["cause"].as_str() {
                Some("tls_handshake_failed") => "tls_handshake_failed",
                Some("plaintext_to_tls") => "plaintext_to_tls",
                _ => "other",
            };
            let reason = match e["tls_reason"].as_str() {
                Some("plaintext_upstream") => Some("plaintext_upstream"),
                Some("alert") => Some("alert"),
                Some("proxy_rejected") => Some("proxy_rejected"),
                Some("closed") => Some("closed"),
                _ => None,
            };
            assert_eq!(e["comm"], comm, "{e:#}");
            assert_ne!(cause, "other", "not a TLS cause: {e:#}");
            Logged {
                upstream: port.unwrap_or(0),
                cause,
                reason,
            }
        })
        .collect();
    theirs.sort();
    ours.sort();
    let expected: usize = fronts
        .iter()
        .map(|(_, u)| {
            lab.cells
                .iter()
                .find(|c| c.upstream == *u)
                .unwrap()
                .requests
        })
        .sum();
    assert_eq!(theirs.len(), expected, "{comm} logged: {theirs:#?}");
    assert_eq!(ours, theirs, "tracer against {comm}'s log\n{stderr}");
    for cell in &lab.cells {
        let (cause, reason) = cell.expect.unwrap();
        assert!(
            theirs
                .iter()
                .filter(|l| l.upstream == cell.upstream)
                .all(|l| l.cause == cause && l.reason == reason),
            "{comm} {}: {theirs:?}",
            cell.path
        );
    }
}

#[test]
fn tls_failures_behind_haproxy_agree_with_its_log() {
    if !kernel_tests_enabled("tls_failures_behind_haproxy_agree_with_its_log") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let lab = Lab::start("haproxy");
    let haproxy = Haproxy::start(&lab);
    agree_with(&lab, "haproxy", &haproxy.fronts, haproxy.healthy, || {
        haproxy.logged()
    });
}

#[test]
fn tls_failures_behind_apache_agree_with_its_error_log() {
    if !kernel_tests_enabled("tls_failures_behind_apache_agree_with_its_error_log") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let lab = Lab::start("apache");
    let apache = Apache::start(&lab);
    agree_with(&lab, "apache2", &apache.fronts, apache.healthy, || {
        apache.logged()
    });
}
