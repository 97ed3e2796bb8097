//! Real containers (Debian's docker) behind real nginx: tracer names the containers and tells
//! what happened to the upstream's, with nginx's error log as the oracle for each failure's
//! cause. Each scenario prints tracer's sentence and what `docker inspect` said at the time.
//!
//! - an upstream container recreated with a new address while nginx proxies to the old one;
//! - one OOM-killed at its `--memory` limit;
//! - one in a crash loop under a restart policy;
//! - nginx itself in a container;
//! - nginx in a Kubernetes pod's container on containerd (no Docker API: named from the
//!   container's bundle);
//! - an upstream in a pod of its own network on containerd, named from the process that
//!   listened behind the pod's address, after it exited;
//! - nginx in a podman container, named through Podman's API service.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde_json::Value;
use tracer_tests::{
    docker::{self, Container, GATEWAY},
    http::{free_port, get},
    kernel_tests_enabled,
    lab::nginx::{Nginx, failures_in, make_temp_dirs, temp_paths},
    netns::{Netns, host_ip},
    podman::{self, podman, podman_ok, runtime_limits},
    process::upstream_process_bin,
    tracer_process::{Tracer, tracer_bin},
    wait_until,
};

/// One scenario at a time: they share the daemon, the network and the host's nginx ports.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A scenario in progress: when it ends (and passed), the host's firewall rules and IP
/// forwarding must be as they were before the daemon was started.
struct Scenario {
    _one: std::sync::MutexGuard<'static, ()>,
    before: (String, String),
}

fn host_network() -> (String, String) {
    let rules = Command::new("nft")
        .args(["list", "ruleset"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let forwarding = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
    (rules, forwarding)
}

impl Drop for Scenario {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert_eq!(
                host_network(),
                self.before,
                "the containers changed the host's firewall rules or IP forwarding"
            );
        }
    }
}

fn scenario(test: &str) -> Option<Scenario> {
    if !kernel_tests_enabled(test) {
        return None;
    }
    let one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    static BEFORE: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    let before = BEFORE.get_or_init(host_network).clone();
    docker::setup();
    Some(Scenario { _one: one, before })
}

fn workdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tracer-containers-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    make_temp_dirs(&dir);
    dir
}

/// nginx's configuration: one server on `listen` proxying to `upstream`, giving up a connect
/// after 1 s.
fn nginx_conf(dir: &Path, listen: &str, upstream: SocketAddr) -> String {
    let d = dir.display();
    format!(
        "user nobody nogroup;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
{temp}    proxy_connect_timeout 1s;
    proxy_read_timeout 3s;
    keepalive_timeout 0;
    server {{ listen {listen}; location / {{ proxy_pass http://{upstream}; proxy_next_upstream off; }} }}
}}
",
        temp = temp_paths(dir)
    )
}

/// nginx on the host, proxying from a loopback port to `upstream`.
struct HostNginx {
    nginx: Nginx,
    dir: PathBuf,
    addr: SocketAddr,
}

impl HostNginx {
    fn start(tag: &str, upstream: SocketAddr) -> HostNginx {
        let dir = workdir(tag);
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let nginx = Nginx::start_config(None, &dir, &nginx_conf(&dir, &addr.to_string(), upstream));
        HostNginx { nginx, dir, addr }
    }

    fn error_log(&self) -> String {
        self.nginx.error_log()
    }
}

impl Drop for HostNginx {
    fn drop(&mut self) {
        // Before its directory goes.
        self.nginx.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An upstream container running `upstream-process 0.0.0.0:8000 ARGS` at `ip`.
fn upstream(name: &str, ip: &str, options: &[&str], args: &[&str]) -> Container {
    let binary = upstream_process_bin();
    let binary = binary.to_str().unwrap();
    let mut all = vec!["--ip", ip];
    all.extend_from_slice(options);
    let mut command = vec![binary, "0.0.0.0:8000"];
    command.extend_from_slice(args);
    Container::run(name, &all, &docker::binaries(), &command)
}

/// Makes `n` requests through `nginx` (each one attempt toward its upstream), returning their
/// status codes.
fn requests(nginx: SocketAddr, n: usize, gap: Duration) -> Vec<u16> {
    (0..n)
        .map(|_| {
            let status = get(nginx, "/").map(|(s, _)| s).unwrap_or(0);
            std::thread::sleep(gap);
            status
        })
        .collect()
}

/// tracer's failures toward `upstream`, checked one for one against nginx's error log: the
/// same number, the same causes, made by nginx. Returns them.
#[track_caller]
fn agree_with_nginx(events: &[Value], error_log: &str, upstream: &str) -> Vec<Value> {
    let ours: Vec<Value> = events
        .iter()
        .filter(|e| e["type"] == "failure" && e["upstream"] == upstream)
        .cloned()
        .collect();
    let mut logged: Vec<&str> = failures_in(error_log)
        .iter()
        .filter(|f| f.upstream == upstream)
        .map(|f| f.cause.unwrap_or("?"))
        .collect();
    let mut seen: Vec<&str> = ours.iter().map(|e| e["cause"].as_str().unwrap()).collect();
    logged.sort_unstable();
    seen.sort_unstable();
    assert!(!logged.is_empty(), "nginx logged no failure:\n{error_log}");
    assert_eq!(
        seen, logged,
        "tracer's causes against nginx's for {upstream}; nginx's log:\n{error_log}\ntracer: {ours:#?}"
    );
    for e in &ours {
        assert_eq!(e["comm"], "nginx", "{e}");
    }
    ours
}

/// Makes `n` requests through the host's `nginx` toward `upstream`, stops `tracer`, and returns
/// nginx's answers and tracer's failures toward `upstream` (checked against nginx's log).
#[track_caller]
fn through_nginx(
    tracer: Tracer,
    nginx: &HostNginx,
    upstream: SocketAddr,
    n: usize,
    gap: Duration,
) -> (Vec<u16>, Vec<Value>) {
    let statuses = requests(nginx.addr, n, gap);
    let (events, _) = tracer.stop_collecting();
    let ours = agree_with_nginx(&events, &nginx.error_log(), &upstream.to_string());
    (statuses, ours)
}

#[track_caller]
fn assert_root_cause(events: &[Value], root_cause: &str, container: &str, detail: &[&str]) {
    for e in events {
        assert_eq!(e["root_cause"], root_cause, "{e:#}");
        assert_eq!(e["upstream_container"]["name"], container, "{e:#}");
        let text = e["root_cause_detail"].as_str().unwrap_or_default();
        for part in detail {
            assert!(text.contains(part), "{part:?} not in {text:?}");
        }
    }
    println!(
        "tracer: {} {}: {}",
        events[0]["cause"], events[0]["upstream"], events[0]["root_cause_detail"]
    );
}

#[test]
fn an_upstream_container_recreated_with_a_new_address_leaves_a_stale_address() {
    let Some(_one) =
        scenario("an_upstream_container_recreated_with_a_new_address_leaves_a_stale_address")
    else {
        return;
    };
    let tracer = Tracer::events(&["--comm", "nginx"]);
    let name = "tracer-test-web";
    let web = upstream(name, "10.213.77.5", &[], &[]);
    let old: SocketAddr = "10.213.77.5:8000".parse().unwrap();
    wait_until(Duration::from_secs(10), "the upstream to listen", || {
        std::net::TcpStream::connect_timeout(&old, Duration::from_millis(200)).is_ok()
    });
    let nginx = HostNginx::start("stale", old);
    assert_eq!(requests(nginx.addr, 1, Duration::ZERO), [200]);
    // Recreated: a new container of the same name, at a new address.
    drop(web);
    let web = upstream(name, "10.213.77.9", &[], &[]);
    web.wait_for("{{.State.Running}}", "true", Duration::from_secs(10));
    println!(
        "docker inspect: {name} {} at {}, started {}",
        web.inspect("{{.Id}}"),
        web.ip(),
        web.inspect("{{.State.StartedAt}}")
    );
    let (statuses, ours) = through_nginx(tracer, &nginx, old, 3, Duration::ZERO);
    assert!(
        statuses.iter().all(|s| *s == 504 || *s == 502),
        "{statuses:?}"
    );
    assert_eq!(ours.len(), 3);
    assert_root_cause(
        &ours,
        "stale_address",
        name,
        &[
            "10.213.77.5 belonged to container tracer-test-web (image tracer-test-base:1) until",
            "tracer-test-web now runs at 10.213.77.9",
        ],
    );
}

#[test]
fn an_upstream_container_oom_killed_at_its_memory_limit() {
    let Some(_one) = scenario("an_upstream_container_oom_killed_at_its_memory_limit") else {
        return;
    };
    let tracer = Tracer::events(&["--comm", "nginx"]);
    let name = "tracer-test-oom";
    let addr: SocketAddr = "10.213.77.7:8000".parse().unwrap();
    let api = upstream(
        name,
        "10.213.77.7",
        &["--memory", "64m", "--memory-swap", "64m"],
        &["oom", "1500"],
    );
    let nginx = HostNginx::start("oom", addr);
    api.wait_for("{{.State.OOMKilled}}", "true", Duration::from_secs(30));
    println!(
        "docker inspect: {name} {}, OOMKilled {}, exit code {}, memory limit {}, finished {}",
        api.inspect("{{.State.Status}}"),
        api.inspect("{{.State.OOMKilled}}"),
        api.inspect("{{.State.ExitCode}}"),
        api.inspect("{{.HostConfig.Memory}}"),
        api.inspect("{{.State.FinishedAt}}")
    );
    // The runtime's events reach tracer within moments.
    std::thread::sleep(Duration::from_millis(500));
    let (statuses, ours) = through_nginx(tracer, &nginx, addr, 3, Duration::ZERO);
    assert!(statuses.iter().all(|s| *s >= 500), "{statuses:?}");
    assert_root_cause(
        &ours,
        "container_oom_killed",
        name,
        &[
            "container tracer-test-oom (image tracer-test-base:1) was OOM-killed at its memory \
             limit (64 MiB)",
        ],
    );
}

#[test]
fn an_upstream_container_in_a_crash_loop() {
    let Some(_one) = scenario("an_upstream_container_in_a_crash_loop") else {
        return;
    };
    let tracer = Tracer::events(&["--comm", "nginx"]);
    let name = "tracer-test-crash";
    let addr: SocketAddr = "10.213.77.8:8000".parse().unwrap();
    // It exits 0.7 s after each start; docker starts it again (after 0.1 s, 0.2 s, 0.4 s…).
    let worker = upstream(
        name,
        "10.213.77.8",
        &["--restart", "always"],
        &["exit", "700"],
    );
    let nginx = HostNginx::start("crash", addr);
    wait_until(Duration::from_secs(30), "three restarts", || {
        worker
            .inspect("{{.RestartCount}}")
            .parse::<u32>()
            .unwrap_or(0)
            >= 3
    });
    println!(
        "docker inspect: {name} {}, RestartCount {}, last exit code {}, started {}",
        worker.inspect("{{.State.Status}}"),
        worker.inspect("{{.RestartCount}}"),
        worker.inspect("{{.State.ExitCode}}"),
        worker.inspect("{{.State.StartedAt}}")
    );
    let (statuses, ours) = through_nginx(tracer, &nginx, addr, 8, Duration::from_millis(300));
    println!("nginx answered {statuses:?}");
    assert_root_cause(
        &ours,
        "container_crash_loop",
        name,
        &["container tracer-test-crash (image tracer-test-base:1) is in a crash loop: restarted"],
    );
}

#[test]
fn an_upstream_container_stopped_leaves_its_address_without_an_owner() {
    let Some(_one) = scenario("an_upstream_container_stopped_leaves_its_address_without_an_owner")
    else {
        return;
    };
    let tracer = Tracer::events(&["--comm", "nginx"]);
    let name = "tracer-test-stopped";
    let addr: SocketAddr = "10.213.77.12:8000".parse().unwrap();
    let db = upstream(name, "10.213.77.12", &[], &[]);
    wait_until(Duration::from_secs(10), "the upstream to listen", || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    });
    let nginx = HostNginx::start("stopped", addr);
    assert_eq!(requests(nginx.addr, 1, Duration::ZERO), [200]);
    docker::docker_ok(&["stop", "--time", "1", name]);
    println!(
        "docker inspect: {name} {}, exit code {}, finished {}",
        db.inspect("{{.State.Status}}"),
        db.inspect("{{.State.ExitCode}}"),
        db.inspect("{{.State.FinishedAt}}")
    );
    std::thread::sleep(Duration::from_millis(500));
    let (statuses, ours) = through_nginx(tracer, &nginx, addr, 3, Duration::ZERO);
    assert!(statuses.iter().all(|s| *s >= 500), "{statuses:?}");
    assert_root_cause(
        &ours,
        "container_stopped",
        name,
        &[
            "container tracer-test-stopped (image tracer-test-base:1) stopped at",
            "its address has had no owner since",
        ],
    );
}

#[test]
fn tracer_check_says_which_runtime_names_containers() {
    let Some(_one) = scenario("tracer_check_says_which_runtime_names_containers") else {
        return;
    };
    let web = upstream("tracer-test-check", "10.213.77.13", &[], &[]);
    web.wait_for("{{.State.Running}}", "true", Duration::from_secs(10));
    let listed = docker::docker_ok(&["ps", "--all", "--quiet"])
        .lines()
        .count();
    let out = Command::new(tracer_bin()).arg("check").output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let row = said
        .lines()
        .find(|l| l.contains("container runtime"))
        .unwrap_or_else(|| panic!("no container runtime row:\n{said}"));
    assert!(row.starts_with("ok"), "{row}");
    assert!(row.contains("/var/run/docker.sock"), "{row}");
    assert!(row.contains(&format!("{listed} containers")), "{row}");
    let none = Command::new(tracer_bin())
        .args(["check", "--container-runtime", "none"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&none.stdout);
    assert!(
        said.lines()
            .any(|l| l.contains("container runtime") && l.contains("--container-runtime none")),
        "{said}"
    );
}

/// The agent's `/metrics` at `metrics`, scraped until `done` says it has what is awaited (the
/// runtime's answers come asynchronously), or for 15 s; the last scrape.
fn scrape_until(metrics: SocketAddr, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let scrape = get(metrics, "/metrics").map(|(_, b)| b).unwrap_or_default();
        if done(&scrape) || Instant::now() >= deadline {
            return scrape;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What a container needs to run nginx: a work folder (`workdir(tag)`, to mount at the same
/// path) whose nginx.conf proxies `listen` to `upstream`, its error log, and the command.
struct ContainedNginx {
    dir: PathBuf,
    log: PathBuf,
    conf: PathBuf,
}

impl ContainedNginx {
    fn new(tag: &str, listen: &str, upstream: SocketAddr) -> ContainedNginx {
        let dir = workdir(tag);
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, nginx_conf(&dir, listen, upstream)).unwrap();
        ContainedNginx {
            log: dir.join("error.log"),
            conf,
            dir,
        }
    }

    /// nginx in the foreground, with this configuration and error log.
    fn command(&self) -> [&str; 7] {
        [
            "/usr/sbin/nginx",
            "-e",
            self.log.to_str().unwrap(),
            "-c",
            self.conf.to_str().unwrap(),
            "-g",
            "daemon off;",
        ]
    }
}

/// nginx in a container `name` on the test network, proxying its port 8080 to `upstream`;
/// returns it, its entry address and its error log's path.
fn nginx_container(name: &str, upstream: SocketAddr) -> (Container, SocketAddr, PathBuf) {
    let nginx = ContainedNginx::new(name, "0.0.0.0:8080", upstream);
    let mount = format!("{0}:{0}", nginx.dir.display());
    let proxy = Container::run(
        name,
        &["--volume", &mount],
        &docker::binaries(),
        &nginx.command(),
    );
    proxy.wait_for("{{.State.Running}}", "true", Duration::from_secs(10));
    let entry = SocketAddr::new(proxy.ip(), 8080);
    wait_until(Duration::from_secs(10), "nginx in its container", || {
        std::net::TcpStream::connect(entry).is_ok()
    });
    (proxy, entry, nginx.log)
}

#[test]
fn nginx_in_a_container_is_named_as_the_proxy() {
    let Some(_one) = scenario("nginx_in_a_container_is_named_as_the_proxy") else {
        return;
    };
    let tracer = Tracer::events(&["--comm", "nginx"]);
    // Its upstream: a port on the host (the network's gateway) where nothing listens.
    let upstream: SocketAddr = format!("{GATEWAY}:{}", free_port()).parse().unwrap();
    let name = "tracer-test-nginx";
    let (proxy, entry, log) = nginx_container(name, upstream);
    println!(
        "docker inspect: {name} {} at {}",
        proxy.inspect("{{.Id}}"),
        proxy.ip()
    );
    let statuses = requests(entry, 5, Duration::ZERO);
    assert_eq!(statuses, [502; 5]);
    let (events, _) = tracer.stop_collecting();
    let error_log = std::fs::read_to_string(&log).unwrap_or_default();
    let ours = agree_with_nginx(&events, &error_log, &upstream.to_string());
    assert_eq!(ours.len(), 5);
    for e in &ours {
        assert_eq!(e["cause"], "refused");
        assert_eq!(e["proxy_container"]["name"], name, "{e:#}");
        assert_eq!(
            e["proxy_container"]["id"],
            &proxy.inspect("{{.Id}}")[..12],
            "{e:#}"
        );
        assert!(
            e["upstream_container"].is_null(),
            "the host is no container: {e:#}"
        );
    }
    println!(
        "tracer: {} from nginx in {}: {}",
        ours[0]["cause"], ours[0]["proxy_container"], ours[0]["explanation"]
    );
    let _ = std::fs::remove_dir_all(log.parent().unwrap());
}

#[test]
fn metrics_say_which_container_each_upstream_and_proxy_is() {
    let Some(_one) = scenario("metrics_say_which_container_each_upstream_and_proxy_is") else {
        return;
    };
    let (agent, metrics) = Tracer::agent(&["--container-metrics"]);
    let web = upstream("tracer-test-web2", "10.213.77.11", &[], &[]);
    web.wait_for("{{.State.Running}}", "true", Duration::from_secs(10));
    // A port of the upstream's container where nothing listens: refused.
    let target: SocketAddr = "10.213.77.11:9999".parse().unwrap();
    let (proxy, entry, log) = nginx_container("tracer-test-nginx2", target);
    assert_eq!(requests(entry, 3, Duration::ZERO), [502; 3]);
    let short_id = |c: &Container| c.inspect("{{.Id}}")[..12].to_string();
    let upstream_info = format!(
        "tracer_upstream_container_info{{upstream=\"{target}\",container=\"tracer-test-web2\",\
         image=\"{image}\",container_id=\"{id}\",pod=\"\"}} 1",
        image = docker::IMAGE,
        id = short_id(&web)
    );
    let proxy_info = format!(
        "container=\"tracer-test-nginx2\",image=\"{image}\",container_id=\"{id}\",pod=\"\"}} 1",
        image = docker::IMAGE,
        id = short_id(&proxy)
    );
    let failures = format!("upstream=\"{target}\",cause=\"refused\"");
    let scrape = scrape_until(metrics, |scrape| {
        scrape.contains(&upstream_info) && scrape.contains(&proxy_info)
    });
    let lines =
        |needle: &str| -> Vec<&str> { scrape.lines().filter(|l| l.contains(needle)).collect() };
    assert!(
        scrape.contains(&upstream_info),
        "{upstream_info} not in:\n{:#?}",
        lines("container_info")
    );
    let proxy_lines = lines("tracer_proxy_container_info{proxy=\"nginx\"");
    assert!(
        proxy_lines.iter().any(|l| l.ends_with(&proxy_info)),
        "{proxy_info} not in {proxy_lines:#?}"
    );
    let refused: f64 = lines("tracer_upstream_failures_total")
        .iter()
        .filter(|l| l.contains(&failures))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(
        refused,
        3.0,
        "{:#?}",
        lines("tracer_upstream_failures_total")
    );
    println!("metrics: {upstream_info}\nmetrics: {}", proxy_lines[0]);
    drop(agent);
    let _ = std::fs::remove_dir_all(log.parent().unwrap());
}

/// containerd, as on a Kubernetes node without Docker: the host's own when one answers at
/// `/run/containerd/containerd.sock`, else one started here (no CRI plugin: the test makes the
/// container as the CRI plugin would). Its running containers' bundles are under
/// `/run/containerd`, where tracer reads them.
struct Containerd {
    child: Option<std::process::Child>,
    address: PathBuf,
    dir: PathBuf,
    /// Whether `/run/containerd` is ours to remove afterwards (it was not there).
    made_state: bool,
}

impl Containerd {
    fn start() -> Containerd {
        let dir = std::env::temp_dir().join(format!("tracer-containerd-{}", std::process::id()));
        let host = PathBuf::from("/run/containerd/containerd.sock");
        if std::os::unix::net::UnixStream::connect(&host).is_ok() {
            return Containerd {
                child: None,
                address: host,
                dir,
                made_state: false,
            };
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let address = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n",
        )
        .unwrap();
        let made_state = !Path::new("/run/containerd").exists();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .arg("--address")
            .arg(&address)
            .arg("--root")
            .arg(dir.join("root"))
            .args(["--state", "/run/containerd"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd (cargo xtask setup installs it)");
        let containerd = Containerd {
            child: Some(child),
            address,
            dir,
            made_state,
        };
        wait_until(Duration::from_secs(30), "containerd to answer", || {
            containerd.ctr(&["version"]).status.success()
        });
        containerd
    }

    /// `ctr --address … --namespace k8s.io ARGS` (the CRI plugin's namespace).
    fn ctr(&self, args: &[&str]) -> std::process::Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.address)
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
            .expect("ctr")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.made_state {
            let _ = std::fs::remove_dir_all("/run/containerd");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A container as kubelet has containerd's CRI plugin make one: namespace `k8s.io`, a cgroup
/// of its pod's (cgroupfs driver), the plugin's annotations; the host's network or the pod's
/// (`netns`, a namespace's path, as a CNI plugin makes one), the host's /usr and `read_only`
/// mounted read-only, `writable` writable, each at its own path.
struct PodContainer<'a> {
    containerd: &'a Containerd,
    id: String,
    cgroup_parents: Vec<String>,
    rootfs: PathBuf,
}

impl<'a> PodContainer<'a> {
    fn run(
        containerd: &'a Containerd,
        annotations: &[(&str, &str)],
        writable: &Path,
        read_only: &[&Path],
        netns: Option<&Path>,
        command: &[&str],
    ) -> PodContainer<'a> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let seed = u64::from(std::process::id()) ^ (now.as_nanos() as u64);
        let id = format!(
            "{:016x}{:016x}{:016x}{:016x}",
            seed,
            0x7ace_7ace_u64,
            seed.rotate_left(17),
            0xc0ff_ee00_u64
        );
        let pod = format!(
            "pod{:08x}-0000-4000-8000-{:012x}",
            seed as u32,
            seed & 0xffff_ffff_ffff
        );
        let parents = vec![
            "tracer-test-kubepods".to_string(),
            "tracer-test-kubepods/besteffort".to_string(),
            format!("tracer-test-kubepods/besteffort/{pod}"),
        ];
        let cgroup = format!("/{}/{id}", parents[2]);
        let rootfs = containerd.dir.join(format!("rootfs-{}", &id[..12]));
        docker::base_rootfs(&rootfs);
        let usr = "type=bind,src=/usr,dst=/usr,options=rbind:ro".to_string();
        let work = format!(
            "type=bind,src={0},dst={0},options=rbind:rw",
            writable.display()
        );
        let read_only: Vec<String> = read_only
            .iter()
            .map(|p| format!("type=bind,src={0},dst={0},options=rbind:ro", p.display()))
            .collect();
        let network = match netns {
            Some(path) => format!("network:{}", path.display()),
            None => String::new(),
        };
        let notes: Vec<String> = annotations
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let mut args = vec!["run", "--detach", "--cgroup", &cgroup];
        if netns.is_some() {
            args.extend(["--with-ns", network.as_str()]);
        } else {
            args.push("--net-host");
        }
        args.extend(["--mount", &usr, "--mount", &work]);
        for mount in &read_only {
            args.extend(["--mount", mount.as_str()]);
        }
        for note in &notes {
            args.extend(["--annotation", note.as_str()]);
        }
        let root = rootfs.to_str().unwrap().to_string();
        args.extend(["--rootfs", &root, &id]);
        args.extend_from_slice(command);
        let container = PodContainer {
            containerd,
            id: id.clone(),
            cgroup_parents: parents,
            rootfs,
        };
        let out = containerd.ctr(&args);
        assert!(
            out.status.success(),
            "ctr run: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        container
    }
}

impl Drop for PodContainer<'_> {
    fn drop(&mut self) {
        let _ = self
            .containerd
            .ctr(&["task", "kill", "--signal", "SIGKILL", &self.id]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self
            .containerd
            .ctr(&["task", "rm", &self.id])
            .status
            .success()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.containerd.ctr(&["container", "rm", &self.id]);
        let _ = std::fs::remove_dir_all(&self.rootfs);
        // The pod's cgroups, in every hierarchy, innermost first.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for line in mounts.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let fs = fields.iter().skip_while(|f| **f != "-").nth(1);
            if matches!(fs, Some(&"cgroup" | &"cgroup2")) {
                for parent in self.cgroup_parents.iter().rev() {
                    let _ = std::fs::remove_dir(Path::new(fields[4]).join(parent));
                }
            }
        }
    }
}

#[test]
fn nginx_in_a_kubernetes_pod_on_containerd_is_named_from_its_bundle() {
    if !kernel_tests_enabled("nginx_in_a_kubernetes_pod_on_containerd_is_named_from_its_bundle") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let containerd = Containerd::start();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // Its upstream: a port on the host where nothing listens.
    let upstream: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let nginx = ContainedNginx::new("pod", &listen.to_string(), upstream);
    let tracer = Tracer::events(&["--comm", "nginx"]);
    let (agent, metrics) = Tracer::agent(&["--container-metrics"]);
    let image = "registry.example/edge/nginx:1.22";
    let pod = PodContainer::run(
        &containerd,
        &[
            ("io.kubernetes.cri.container-type", "container"),
            ("io.kubernetes.cri.container-name", "edge"),
            ("io.kubernetes.cri.image-name", image),
            ("io.kubernetes.cri.sandbox-name", "edge-7f9c4-x2x8q"),
            ("io.kubernetes.cri.sandbox-namespace", "ingress"),
        ],
        &nginx.dir,
        &[],
        None,
        &nginx.command(),
    );
    wait_until(Duration::from_secs(10), "nginx in its pod", || {
        std::net::TcpStream::connect(listen).is_ok()
    });
    let bundle = format!(
        "/run/containerd/io.containerd.runtime.v2.task/k8s.io/{}/config.json",
        pod.id
    );
    println!(
        "ctr: container {} running; its bundle's annotations: {}",
        &pod.id[..12],
        serde_json::from_str::<Value>(&std::fs::read_to_string(&bundle).unwrap_or_default())
            .map(|spec| spec["annotations"].to_string())
            .unwrap_or_else(|e| format!("({bundle}: {e})"))
    );
    let statuses = requests(listen, 5, Duration::ZERO);
    assert_eq!(statuses, [502; 5]);
    let (events, _) = tracer.stop_collecting();
    // `tracer check` tells where it finds such containers.
    let out = Command::new(tracer_bin()).arg("check").output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let row = said
        .lines()
        .find(|l| l.contains("container bundles"))
        .unwrap_or_else(|| panic!("no container bundles row:\n{said}"));
    assert!(
        row.starts_with("ok") && row.contains("io.containerd.runtime.v2.task/k8s.io ("),
        "{row}"
    );
    let error_log = std::fs::read_to_string(&nginx.log).unwrap_or_default();
    let ours = agree_with_nginx(&events, &error_log, &upstream.to_string());
    assert_eq!(ours.len(), 5);
    for e in &ours {
        assert_eq!(e["cause"], "refused");
        assert_eq!(e["proxy_container"]["name"], "edge", "{e:#}");
        assert_eq!(
            e["proxy_container"]["pod"], "ingress/edge-7f9c4-x2x8q",
            "{e:#}"
        );
        assert_eq!(e["proxy_container"]["image"], image, "{e:#}");
        assert_eq!(e["proxy_container"]["id"], &pod.id[..12], "{e:#}");
    }
    println!(
        "tracer: {} from nginx in {}: {}",
        ours[0]["cause"], ours[0]["proxy_container"], ours[0]["explanation"]
    );
    // The agent's metrics name the proxy's container too (`--container-metrics`).
    let proxy_info = format!(
        "container=\"edge\",image=\"{image}\",container_id=\"{}\",pod=\"ingress/edge-7f9c4-x2x8q\"}} 1",
        &pod.id[..12]
    );
    let scrape = scrape_until(metrics, |scrape| scrape.contains(&proxy_info));
    let proxy_lines: Vec<&str> = scrape
        .lines()
        .filter(|l| l.starts_with("tracer_proxy_container_info{proxy=\"nginx\""))
        .collect();
    assert!(
        proxy_lines.iter().any(|l| l.ends_with(&proxy_info)),
        "{proxy_info} not in {proxy_lines:#?}"
    );
    println!("metrics: {}", proxy_lines[0]);
    drop(agent);
    drop(pod);
    let _ = std::fs::remove_dir_all(&nginx.dir);
}

/// Podman's API service (`podman system service`), serving the Docker Engine API on a socket of
/// the test's own; it ends with the test.
struct PodmanService {
    child: std::process::Child,
    socket: PathBuf,
    dir: PathBuf,
}

impl PodmanService {
    fn start() -> PodmanService {
        let dir = std::env::temp_dir().join(format!("tracer-podman-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("podman.sock");
        let log = std::fs::File::create(dir.join("service.log")).unwrap();
        let child = Command::new("podman")
            .args(["--runtime", "runc", "system", "service", "--time=0"])
            .arg(format!("unix://{}", socket.display()))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("podman (cargo xtask setup installs it)");
        let service = PodmanService { child, socket, dir };
        wait_until(Duration::from_secs(30), "podman's API service", || {
            std::os::unix::net::UnixStream::connect(&service.socket).is_ok()
        });
        service
    }
}

impl Drop for PodmanService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn nginx_in_a_podman_container_is_named_through_podmans_api() {
    if !kernel_tests_enabled("nginx_in_a_podman_container_is_named_through_podmans_api") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let before = host_network();
    let image = "localhost/tracer-test-base:1";
    if !podman(&["image", "exists", image]).status.success() {
        let archive = docker::base_image_archive("podman");
        podman_ok(&["import", archive.to_str().unwrap(), image]);
        let _ = std::fs::remove_file(&archive);
    }
    let service = PodmanService::start();
    let socket = service.socket.to_str().unwrap().to_string();
    let tracer = Tracer::events(&["--comm", "nginx", "--container-runtime", &socket]);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // Its upstream: a port on the host where nothing listens.
    let upstream: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let nginx = ContainedNginx::new("podman", &listen.to_string(), upstream);
    let name = "tracer-test-podman-nginx";
    let _ = podman(&["rm", "--force", name]);
    let container = podman::Container(name.to_string());
    let work = format!("{0}:{0}", nginx.dir.display());
    let mut args = vec![
        "run",
        "--detach",
        "--name",
        name,
        "--network=host",
        "--volume",
        "/usr:/usr:ro",
        "--volume",
        &work,
    ];
    let limits = runtime_limits();
    args.extend(limits.iter().map(String::as_str));
    args.push(image);
    args.extend(nginx.command());
    podman_ok(&args);
    wait_until(
        Duration::from_secs(10),
        "nginx in its podman container",
        || std::net::TcpStream::connect(listen).is_ok(),
    );
    let id = podman_ok(&["inspect", "--format", "{{.Id}}", name]);
    println!("podman inspect: {name} {}", id.trim());
    // A fresh service's event stream tells of the container up to a second or two late, but
    // tracer asks the service as soon as nginx listens in a container it has not heard of: its
    // first failure is named already, unless the host is so slow that the answer comes after
    // it. One request at a time until a failure names the container (each is checked against
    // nginx's log below too), then 5.
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut early = 0;
    loop {
        assert_eq!(requests(listen, 1, Duration::ZERO), [502]);
        let mut got = Vec::new();
        while !got.iter().any(|e: &Value| e["type"] == "failure") {
            let more = tracer.collect(1, Duration::from_secs(5), Duration::ZERO);
            assert!(!more.is_empty(), "no failure event from tracer");
            got.extend(more);
        }
        let named = got
            .iter()
            .any(|e| e["type"] == "failure" && e["proxy_container"]["name"] == name);
        events.extend(got);
        if named {
            break;
        }
        early += 1;
        assert!(
            Instant::now() < deadline,
            "tracer never named the container"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("failures before tracer had heard of the container: {early}");
    let statuses = requests(listen, 5, Duration::ZERO);
    assert_eq!(statuses, [502; 5]);
    let (rest, _) = tracer.stop_collecting();
    let error_log = std::fs::read_to_string(&nginx.log).unwrap_or_default();
    let all: Vec<Value> = events.into_iter().chain(rest).collect();
    let ours = agree_with_nginx(&all, &error_log, &upstream.to_string());
    assert_eq!(ours.len(), early + 6);
    for e in &ours[early..] {
        assert_eq!(e["cause"], "refused");
        assert_eq!(e["proxy_container"]["name"], name, "{e:#}");
        assert_eq!(e["proxy_container"]["id"], &id.trim()[..12], "{e:#}");
        assert_eq!(e["proxy_container"]["image"], image, "{e:#}");
    }
    println!(
        "tracer: {} from nginx in {}: {}",
        ours[0]["cause"], ours[0]["proxy_container"], ours[0]["explanation"]
    );
    drop(container);
    drop(service);
    let _ = std::fs::remove_dir_all(&nginx.dir);
    assert_eq!(
        host_network(),
        before,
        "podman changed the host's firewall rules or IP forwarding"
    );
}

/// A pod's network as a CNI plugin makes one: a namespace of its own with an address
/// (`10.213.99.2`), reached from the host through a veth pair. Deleted on drop.
struct PodNetwork {
    netns: Netns,
    host_side: String,
}

impl PodNetwork {
    const ADDRESS: &str = "10.213.99.2";

    fn new() -> PodNetwork {
        let netns = Netns::new("pod");
        let host_side = format!("trpod{}", std::process::id() % 1_000_000);
        host_ip(&[
            "link",
            "add",
            &host_side,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns.name,
        ]);
        let network = PodNetwork { netns, host_side };
        host_ip(&["addr", "add", "10.213.99.1/30", "dev", &network.host_side]);
        host_ip(&["link", "set", &network.host_side, "up"]);
        network.netns.ip(&[
            "addr",
            "add",
            &format!("{}/30", Self::ADDRESS),
            "dev",
            "eth0",
        ]);
        network.netns.ip(&["link", "set", "eth0", "up"]);
        network
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        // Its peer goes with the namespace; this one too, in case the namespace is held.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_side])
            .output();
    }
}

#[test]
fn an_upstream_pod_on_containerd_is_named_from_the_process_that_listened_in_it() {
    if !kernel_tests_enabled(
        "an_upstream_pod_on_containerd_is_named_from_the_process_that_listened_in_it",
    ) {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let containerd = Containerd::start();
    let network = PodNetwork::new();
    let upstream: SocketAddr = format!("{}:8000", PodNetwork::ADDRESS).parse().unwrap();
    let nginx = HostNginx::start("pod-upstream", upstream);
    let tracer = Tracer::events(&["--comm", "nginx"]);
    let (agent, metrics) = Tracer::agent(&["--container-metrics"]);
    let work = workdir("pod-upstream-work");
    let binary = upstream_process_bin();
    let image = "registry.example/shop/api:2.3";
    // It listens on all of its pod's addresses, answers for 3 s, then exits. No runtime API
    // names it: only its bundle does, and only its listener ties it to its address.
    let pod = PodContainer::run(
        &containerd,
        &[
            ("io.kubernetes.cri.container-type", "container"),
            ("io.kubernetes.cri.container-name", "api"),
            ("io.kubernetes.cri.image-name", image),
            ("io.kubernetes.cri.sandbox-name", "api-5d8f7-q2w3e"),
            ("io.kubernetes.cri.sandbox-namespace", "shop"),
        ],
        &work,
        &[&docker::binaries()],
        Some(&network.netns.path()),
        &[binary.to_str().unwrap(), "0.0.0.0:8000", "exit", "3000"],
    );
    wait_until(
        Duration::from_secs(20),
        "the pod's upstream to listen",
        || std::net::TcpStream::connect_timeout(&upstream, Duration::from_secs(1)).is_ok(),
    );
    assert_eq!(requests(nginx.addr, 1, Duration::ZERO), [200]);
    wait_until(
        Duration::from_secs(30),
        "the pod's upstream to crash",
        || {
            std::net::TcpStream::connect_timeout(&upstream, Duration::from_secs(1))
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
        },
    );
    let (statuses, ours) = through_nginx(tracer, &nginx, upstream, 5, Duration::ZERO);
    assert_eq!(statuses, [502; 5]);
    assert_eq!(ours.len(), 5);
    assert_root_cause(&ours, "upstream_exited", "api", &["exited"]);
    for e in &ours {
        assert_eq!(
            e["upstream_container"]["pod"], "shop/api-5d8f7-q2w3e",
            "{e:#}"
        );
        assert_eq!(e["upstream_container"]["image"], image, "{e:#}");
        assert_eq!(e["upstream_container"]["id"], &pod.id[..12], "{e:#}");
    }
    println!(
        "tracer: {} {} in {}: {}",
        ours[0]["cause"],
        ours[0]["upstream"],
        ours[0]["upstream_container"],
        ours[0]["explanation"]
    );
    // The agent's metrics name it too, by the address its namespace had.
    let info = format!(
        "tracer_upstream_container_info{{upstream=\"{upstream}\",container=\"api\",image=\"{image}\",container_id=\"{}\",pod=\"shop/api-5d8f7-q2w3e\"}} 1",
        &pod.id[..12]
    );
    let scrape = scrape_until(metrics, |scrape| scrape.contains(&info));
    let lines: Vec<&str> = scrape
        .lines()
        .filter(|l| l.starts_with("tracer_upstream_container_info"))
        .collect();
    assert!(lines.contains(&info.as_str()), "{info} not in {lines:#?}");
    println!("metrics: {info}");
    drop(agent);
    drop(pod);
    let _ = std::fs::remove_dir_all(&work);
}
