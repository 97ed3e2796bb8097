//! Unix-socket upstreams (php-fpm, gunicorn on a socket), made to fail for real: the socket file
//! missing, a stale file nobody listens on, a listener whose queue is full, a socket the proxy
//! may not open. What the real `tracer events --json` reports, and what `tracer run` counts.

use std::{
    io::ErrorKind,
    os::unix::{fs::PermissionsExt as _, net::UnixListener},
    path::{Path, PathBuf},
    time::Duration,
};

use tracer_tests::{
    assert_failures, client::unix_connect, http::get, kernel_tests_enabled, process::test_bin,
    tracer_process::Tracer,
};

const N: usize = 10;
const WAIT: Duration = Duration::from_secs(10);
const SETTLE: Duration = Duration::from_millis(500);

/// A private directory for one test's sockets, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("tracer-unix-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("socket directory");
        // Others (the unprivileged thread below) may reach the sockets inside.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Dir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn upstream(path: &Path) -> String {
    format!("unix:{}", path.display())
}

fn failing_connects(path: &Path, n: usize, kind: ErrorKind) {
    for _ in 0..n {
        let error = unix_connect(path).expect_err("the connect fails");
        assert_eq!(error.kind(), kind, "{error}");
    }
}

#[test]
fn missing_socket_file_is_unix_missing() {
    if !kernel_tests_enabled("missing_socket_file_is_unix_missing") {
        return;
    }
    let dir = Dir::new("missing");
    let path = dir.path("php-fpm.sock");
    let tracer = Tracer::events(&["--upstream", &upstream(&path)]);
    failing_connects(&path, N, ErrorKind::NotFound);
    let events = tracer.collect(N, WAIT, SETTLE);
    for event in assert_failures(&events, &upstream(&path), "unix_missing", N) {
        assert_eq!(event["errno_name"], "ENOENT", "{event}");
        assert_eq!(event["seen_at"], "connect_call", "{event}");
    }
    tracer.stop();
}

#[test]
fn stale_socket_file_is_unix_refused() {
    if !kernel_tests_enabled("stale_socket_file_is_unix_refused") {
        return;
    }
    let dir = Dir::new("stale");
    let path = dir.path("php-fpm.sock");
    // A listener that went away without removing its file: what a crashed php-fpm leaves.
    drop(UnixListener::bind(&path).expect("bind"));
    assert!(path.exists());
    let tracer = Tracer::events(&["--upstream", &upstream(&path)]);
    failing_connects(&path, N, ErrorKind::ConnectionRefused);
    let events = tracer.collect(N, WAIT, SETTLE);
    for event in assert_failures(&events, &upstream(&path), "unix_refused", N) {
        assert_eq!(event["errno_name"], "ECONNREFUSED", "{event}");
    }
    tracer.stop();
}

#[test]
fn listener_that_never_accepts_is_unix_backlog_full() {
    if !kernel_tests_enabled("listener_that_never_accepts_is_unix_backlog_full") {
        return;
    }
    let dir = Dir::new("backlog");
    let path = dir.path("php-fpm.sock");
    // A pool with every worker busy: nobody accepts, and the queue holds one connection.
    let listener = UnixListener::bind(&path).expect("bind");
    // SAFETY: listen(2) on our own socket, to shrink its queue to the minimum.
    assert_eq!(
        unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 0) },
        0
    );
    let tracer = Tracer::events(&["--upstream", &upstream(&path)]);
    let queued = unix_connect(&path).expect("the first connection is queued");
    failing_connects(&path, N, ErrorKind::WouldBlock);
    let events = tracer.collect(N, WAIT, SETTLE);
    let me = std::process::id();
    for event in assert_failures(&events, &upstream(&path), "unix_backlog_full", N) {
        assert_eq!(event["errno_name"], "EAGAIN", "{event}");
        assert!(
            event["explanation"]
                .as_str()
                .is_some_and(|e| e.contains("listen queue is full")),
            "{event}"
        );
        // The listener, its queue and backlog from the socket diagnostics, and its process.
        assert_eq!(event["root_cause"], "never_accepted", "{event}");
        assert_eq!(event["root_cause_pid"], me, "{event}");
        assert!(
            event["root_cause_detail"]
                .as_str()
                .is_some_and(|d| d.contains("its queue is full (1 queued now, backlog 0)")),
            "{event}"
        );
    }
    drop(queued);
    drop(listener);
    tracer.stop();
}

#[test]
fn socket_the_proxy_may_not_open_is_unix_permission() {
    if !kernel_tests_enabled("socket_the_proxy_may_not_open_is_unix_permission") {
        return;
    }
    let dir = Dir::new("permission");
    let path = dir.path("php-fpm.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).unwrap();
    let tracer = Tracer::events(&["--upstream", &upstream(&path)]);
    // A worker running as nobody, like nginx's: the raw setresuid changes this thread only.
    std::thread::scope(|scope| {
        scope.spawn(|| {
            // SAFETY: raw syscalls that change this thread's credentials and nothing else.
            unsafe {
                assert_eq!(libc::syscall(libc::SYS_setresgid, 65534, 65534, 65534), 0);
                assert_eq!(libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534), 0);
            }
            failing_connects(&path, N, ErrorKind::PermissionDenied);
        });
    });
    let events = tracer.collect(N, WAIT, SETTLE);
    for event in assert_failures(&events, &upstream(&path), "unix_permission", N) {
        assert_eq!(event["errno_name"], "EACCES", "{event}");
    }
    drop(listener);
    tracer.stop();
}

#[test]
fn metrics_count_every_unix_attempt_under_its_path() {
    if !kernel_tests_enabled("metrics_count_every_unix_attempt_under_its_path") {
        return;
    }
    let dir = Dir::new("metrics");
    let path = dir.path("app.sock");
    let (tracer, listen) = Tracer::agent(&[]);
    failing_connects(&path, 3, ErrorKind::NotFound);
    // This process listens on the path next: had it bound it right away, its last failed
    // connect() would look like a server probing its own socket (and not count).
    std::thread::sleep(
        Duration::from_nanos(tracer_common::counts::SELF_PROBE_WINDOW_NS)
            + Duration::from_millis(200),
    );
    let listener = UnixListener::bind(&path).expect("bind");
    let accepted: Vec<_> = (0..5)
        .map(|_| unix_connect(&path).expect("accepted"))
        .collect();
    drop(accepted);
    drop(listener);
    failing_connects(&path, 2, ErrorKind::ConnectionRefused);
    let (_, scrape) = get(listen, "/metrics").expect("scrape");
    let comm = tracer_tests::own_comm();
    let labels = format!(
        "proxy=\"{comm}\",cgroup=\"/\",upstream=\"{}\"",
        upstream(&path)
    );
    let value = |series: String| {
        scrape.lines().find_map(|l| {
            l.strip_prefix(&series)?
                .strip_prefix(' ')?
                .parse::<f64>()
                .ok()
        })
    };
    assert_eq!(
        value(format!("tracer_upstream_connects_total{{{labels}}}")),
        Some(10.0),
        "{scrape}"
    );
    for (cause, n) in [
        ("unix_missing", 3.0),
        ("unix_refused", 2.0),
        ("unix_backlog_full", 0.0),
    ] {
        assert_eq!(
            value(format!(
                "tracer_upstream_failures_total{{{labels},cause=\"{cause}\"}}"
            )),
            Some(n),
            "{cause}: {scrape}"
        );
    }
    // The five that connected have their connect time in the histogram.
    assert_eq!(
        value(format!(
            "tracer_upstream_connect_duration_seconds_count{{{labels}}}"
        )),
        Some(5.0),
        "{scrape}"
    );
    // A Unix upstream has no TCP causes.
    assert_eq!(
        value(format!(
            "tracer_upstream_failures_total{{{labels},cause=\"reset_before_response\"}}"
        )),
        None
    );
    tracer.stop();
}

#[test]
fn hostile_process_names_and_socket_paths_are_escaped_in_text_output() {
    if !kernel_tests_enabled("hostile_process_names_and_socket_paths_are_escaped_in_text_output") {
        return;
    }
    use std::os::unix::ffi::OsStrExt as _;
    let dir = Dir::new("hostile");
    // A path that, printed raw, forges a whole event line, clears the screen, and holds a byte
    // that is not UTF-8; and a process name that retitles the terminal.
    // (A sockaddr_un path holds 107 bytes.)
    let forged = "2026-11-29T18:00:00Z  nginx[1]  10.0.0.5:80  refused";
    let mut name = b"x\n".to_vec();
    name.extend_from_slice(forged.as_bytes());
    name.extend_from_slice(b"\x1b[2J\xff");
    let path = dir.0.join(std::ffi::OsStr::from_bytes(&name));
    let escaped = format!("unix:{}/x\\x0a{forged}\\x1b[2J\\xff", dir.0.display());
    let tracer = Tracer::start(&["events", "--upstream", &escaped]);
    // A process of its own, named to retitle the terminal (the name of a process, not of a
    // thread, is what tracer reports).
    let out = std::process::Command::new(test_bin("hostile-client"))
        .arg(std::ffi::OsStr::from_bytes(b"\x1b]0;pwn\x07\\"))
        .arg("unix")
        .arg(&path)
        .arg(N.to_string())
        .output()
        .expect("hostile-client runs");
    let enoent = format!("{}\n", libc::ENOENT).repeat(N);
    assert_eq!(String::from_utf8_lossy(&out.stdout), enoent, "{out:?}");
    let lines = tracer.collect_lines(N, WAIT, SETTLE);
    assert_eq!(
        lines.len(),
        N,
        "one line per failure:\n{}",
        lines.join("\n")
    );
    for line in &lines {
        assert!(
            !line.chars().any(|c| c.is_control() || c == '\u{fffd}'),
            "raw control character or byte in {line:?}"
        );
        assert!(line.contains(&escaped[5..]), "{line}");
        assert!(line.contains("\\x1b]0;pwn\\x07\\\\["), "{line}");
    }
    tracer.stop();
}

#[test]
fn a_server_probing_its_own_socket_before_listening_is_not_a_failure() {
    if !kernel_tests_enabled("a_server_probing_its_own_socket_before_listening_is_not_a_failure") {
        return;
    }
    let dir = Dir::new("selfprobe");
    let own = dir.path("php-fpm.sock");
    let missing = dir.path("missing.sock");
    let (agent, agent_addr) = Tracer::agent(&[]);
    let tracer = Tracer::events(&[
        "--upstream",
        &upstream(&own),
        "--upstream",
        &upstream(&missing),
    ]);
    // A server starting as php-fpm does: it connects to its own socket path (ENOENT: nobody
    // there yet), then binds and listens on it; a client of it connects once.
    let mut server = std::process::Command::new(test_bin("hostile-client"))
        .args(["php-fpm8.2", "probe-listen"])
        .arg(&own)
        .arg("1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("hostile-client");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(
        server.stdout.take().expect("stdout"),
    ));
    assert_eq!(lines.next().unwrap().unwrap(), libc::ENOENT.to_string());
    assert_eq!(lines.next().unwrap().unwrap(), "listening");
    drop(unix_connect(&own).expect("the server listens"));
    assert!(server.wait().expect("the server ends").success());
    // A real failure beside it, so that the events are seen at all.
    failing_connects(&missing, 1, ErrorKind::NotFound);
    // Past the time failures that may be probes are held back.
    let events = tracer.collect(1, WAIT, Duration::from_secs(2));
    assert_failures(&events, &upstream(&missing), "unix_missing", 1);
    assert_failures(&events, &upstream(&own), "unix_missing", 0);
    let (status, scrape) = get(agent_addr, "/metrics").expect("a scrape");
    assert_eq!(status, 200);
    let count = |comm: &str, path: &Path| -> f64 {
        scrape
            .lines()
            .filter(|l| {
                l.starts_with("tracer_upstream_failures_total{")
                    && l.contains(&format!("proxy=\"{comm}\""))
                    && l.contains(&format!("upstream=\"{}\"", upstream(path)))
                    && l.contains("cause=\"unix_missing\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(count("php-fpm8.2", &own), 0.0, "the probe is not counted");
    assert_eq!(count(&tracer_tests::own_comm(), &missing), 1.0, "{scrape}");
    tracer.stop();
    agent.stop();
}

#[test]
fn php_fpm_starting_up_is_not_a_failing_upstream() {
    if !kernel_tests_enabled("php_fpm_starting_up_is_not_a_failing_upstream") {
        return;
    }
    let Some(php_fpm) = tracer_tests::lab::apps::php_fpm_binary() else {
        assert!(
            std::env::var("CI").is_err(),
            "CI=true: php-fpm must be installed (cargo xtask test installs it)"
        );
        eprintln!("skipped: no php-fpm (cargo xtask test installs it)");
        return;
    };
    let dir = Dir::new("phpfpm");
    let sock = dir.path("php-fpm.sock");
    let missing = dir.path("missing.sock");
    let conf = dir.path("php-fpm.conf");
    std::fs::write(
        &conf,
        format!(
            "[global]\npid = {d}/php-fpm.pid\nerror_log = {d}/php-fpm.log\ndaemonize = no\n\
             [www]\nlisten = {s}\nuser = nobody\ngroup = nogroup\npm = static\n\
             pm.max_children = 1\n",
            d = dir.0.display(),
            s = sock.display()
        ),
    )
    .unwrap();
    let tracer = Tracer::events(&[
        "--upstream",
        &upstream(&sock),
        "--upstream",
        &upstream(&missing),
    ]);
    // As it starts, php-fpm connects to its socket path to see whether another one serves it
    // already (ENOENT), then binds and listens on it.
    let mut server = std::process::Command::new(&php_fpm)
        .args(["--nodaemonize", "--fpm-config"])
        .arg(&conf)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("php-fpm starts");
    // (Slow under emulation: the kernel matrix's guests.)
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !sock.exists() {
        let log = || std::fs::read_to_string(dir.path("php-fpm.log")).unwrap_or_default();
        if let Ok(Some(status)) = server.try_wait() {
            panic!("php-fpm ended ({status}) before it listened:\n{}", log());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "php-fpm did not listen in 60 s:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: signalling the child we started (SIGQUIT: graceful stop).
    unsafe { libc::kill(server.id() as i32, libc::SIGQUIT) };
    let _ = server.wait();
    // A real failure beside it, so that the events are seen at all.
    failing_connects(&missing, 1, ErrorKind::NotFound);
    let events = tracer.collect(1, WAIT, Duration::from_secs(2));
    assert_failures(&events, &upstream(&missing), "unix_missing", 1);
    assert_failures(&events, &upstream(&sock), "unix_missing", 0);
    tracer.stop();
}
