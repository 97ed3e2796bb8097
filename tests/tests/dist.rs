//! What a release ships (`cargo xtask dist`, into target/dist/), used the way users use it: the
//! static binary checks the host; the Debian package installs, runs and leaves nothing behind;
//! the image runs the way the DaemonSet runs it and counts refusals exactly.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use serde_json::Value;
use tracer_tests::{
    client::refuse,
    http::get,
    kernel_tests_enabled,
    netns::Netns,
    podman::{Container, effective_caps, podman, podman_ok, runtime_limits, text},
};

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// An artifact of `cargo xtask dist`, or `None` (the test is skipped) when it was not built;
/// under CI=true a missing artifact fails the test.
fn artifact(name: &str, test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("TRACER_DIST")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/dist"));
    let path = dir.join(name);
    if path.exists() {
        return Some(path);
    }
    assert!(
        !in_ci(),
        "{test}: no {} (cargo xtask test builds it with cargo xtask dist)",
        path.display()
    );
    eprintln!(
        "skipped {test}: no {} (run cargo xtask dist)",
        path.display()
    );
    None
}

fn run(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Output {
    let program = program.as_ref();
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program:?}: {e}"))
}

#[track_caller]
fn run_ok(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> String {
    let program = program.as_ref().to_owned();
    let out = run(&program, args);
    assert!(
        out.status.success(),
        "{program:?} {} failed: {}",
        args.join(" "),
        text(&out)
    );
    text(&out)
}

/// `tracer check` passed and attached every probe this kernel has.
#[track_caller]
fn assert_check_attached_all(said: &str) {
    let probes = said
        .lines()
        .find(|l| l.split_whitespace().take(2).eq(["ok", "probes"]))
        .unwrap_or_else(|| panic!("no probes row in tracer check's output:\n{said}"));
    let count = probes
        .split_whitespace()
        .find(|w| w.contains('/'))
        .expect("attached/total");
    let (attached, total) = count.split_once('/').unwrap();
    assert_eq!(attached, total, "{said}");
}

#[test]
fn the_static_binary_is_static_and_checks_this_host() {
    let test = "the_static_binary_is_static_and_checks_this_host";
    let Some(tracer) = artifact("tracer", test) else {
        return;
    };
    let ldd = text(&run("ldd", &[tracer.to_str().unwrap()]));
    assert!(
        ldd.contains("not a dynamic executable") || ldd.contains("statically linked"),
        "ldd: {ldd}"
    );
    let elf = std::fs::read(&tracer).unwrap();
    assert!(
        !elf.windows(b"ld-linux".len()).any(|w| w == b"ld-linux"),
        "the static binary names glibc's loader"
    );
    assert!(run_ok(&tracer, &["--version"]).contains(VERSION));
    if !kernel_tests_enabled(test) {
        return;
    }
    assert_check_attached_all(&run_ok(&tracer, &["check"]));
}

#[test]
fn the_debian_package_installs_runs_and_uninstalls_cleanly() {
    let test = "the_debian_package_installs_runs_and_uninstalls_cleanly";
    let Some(deb) = artifact(&format!("tracer_{VERSION}_amd64.deb"), test) else {
        return;
    };
    let deb = deb.to_str().unwrap();
    let info = run_ok("dpkg-deb", &["--info", deb]);
    for field in [
        "Package: tracer",
        &format!("Version: {VERSION}"),
        "Architecture: amd64",
    ] {
        assert!(info.contains(field), "{field} in:\n{info}");
    }
    let expected = [
        "/usr/bin/tracer",
        "/lib/systemd/system/tracer.service",
        "/usr/share/tracer/prometheus/tracer-alerts.yml",
        "/usr/share/tracer/grafana/tracer-dashboard.json",
        "/usr/share/doc/tracer/copyright",
    ];
    let contents = run_ok("dpkg-deb", &["--contents", deb]);
    for file in expected {
        assert!(
            contents.lines().any(|l| l.ends_with(&format!(".{file}"))),
            "{file} in the package:\n{contents}"
        );
    }
    if !kernel_tests_enabled(test) {
        return;
    }
    // Never over a tracer package someone installed on this machine, unless in CI.
    if run("dpkg", &["--status", "tracer"]).status.success() && !in_ci() {
        eprintln!("skipped installing: a tracer package is already installed here");
        return;
    }
    run_ok("dpkg", &["--install", deb]);
    let listed = run_ok("dpkg", &["--listfiles", "tracer"]);
    for file in expected {
        assert!(listed.lines().any(|l| l == file), "{file}:\n{listed}");
        assert!(Path::new(file).is_file(), "{file} was not installed");
    }
    let unit = std::fs::read_to_string("/lib/systemd/system/tracer.service").unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let binary = exec.split_whitespace().next().unwrap();
    assert_eq!(binary, "/usr/bin/tracer", "{unit}");
    assert!(run_ok(binary, &["--version"]).contains(VERSION));
    assert_check_attached_all(&run_ok(binary, &["check"]));
    let rules = std::fs::read_to_string("/usr/share/tracer/prometheus/tracer-alerts.yml").unwrap();
    assert!(rules.contains("tracer_upstream_failures_total"));
    run_ok("dpkg", &["--purge", "tracer"]);
    assert!(!run("dpkg", &["--status", "tracer"]).status.success());
    for file in expected {
        assert!(!Path::new(file).exists(), "{file} left behind");
    }
    assert!(
        !Path::new("/usr/share/tracer").exists(),
        "/usr/share/tracer left behind"
    );
}

/// The DaemonSet's pod spec.
fn daemonset_pod() -> Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/tracer-daemonset.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    text.split("\n---\n")
        .map(|doc| serde_norway::from_str::<Value>(doc).expect("valid YAML"))
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet")["spec"]["template"]["spec"]
        .clone()
}

/// `podman run` flags (docker's too) that run a container the way the kubelet runs the
/// DaemonSet's: every
/// field of the pod and container spec that changes how the container runs is translated, and
/// one this function does not know fails the test (so the two cannot drift apart).
fn run_flags(pod: &Value) -> (Vec<String>, String, Vec<String>) {
    let known = |object: &Value, keys: &[&str], what: &str| {
        for key in object.as_object().unwrap().keys() {
            assert!(
                keys.contains(&key.as_str()),
                "the DaemonSet's {what} has `{key}`, which the image test does not run: teach \
                 run_flags what it means"
            );
        }
    };
    // Scheduling and DNS change nothing on one host with the host's network.
    known(
        pod,
        &[
            "hostPID",
            "hostNetwork",
            "dnsPolicy",
            "tolerations",
            "containers",
            "volumes",
        ],
        "pod spec",
    );
    let mut flags = Vec::new();
    if pod["hostPID"] == true {
        flags.push("--pid=host".to_string());
    }
    if pod["hostNetwork"] == true {
        flags.push("--network=host".to_string());
    }
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1, "one container");
    let c = &containers[0];
    known(
        c,
        &[
            "name",
            "image",
            "args",
            "ports",
            "securityContext",
            "readinessProbe",
            "livenessProbe",
            "resources",
            "volumeMounts",
        ],
        "container",
    );
    let security = &c["securityContext"];
    known(
        security,
        &[
            "runAsUser",
            "readOnlyRootFilesystem",
            "allowPrivilegeEscalation",
            "capabilities",
            "seccompProfile",
        ],
        "securityContext",
    );
    flags.push(format!(
        "--user={}",
        security["runAsUser"].as_u64().unwrap()
    ));
    if security["readOnlyRootFilesystem"] == true {
        flags.push("--read-only".into());
    }
    if security["allowPrivilegeEscalation"] == false {
        flags.push("--security-opt=no-new-privileges".into());
    }
    match security["seccompProfile"]["type"].as_str() {
        None | Some("RuntimeDefault") => {}
        Some("Unconfined") => flags.push("--security-opt=seccomp=unconfined".into()),
        Some(other) => panic!("seccompProfile {other}"),
    }
    for cap in security["capabilities"]["drop"].as_array().unwrap() {
        flags.push(format!("--cap-drop={}", cap.as_str().unwrap()));
    }
    for cap in security["capabilities"]["add"].as_array().unwrap() {
        flags.push(format!("--cap-add={}", cap.as_str().unwrap()));
    }
    if let Some(memory) = c["resources"]["limits"]["memory"].as_str() {
        let mib = memory.strip_suffix("Mi").expect("a limit in Mi");
        flags.push(format!("--memory={mib}m"));
    }
    let volumes = pod["volumes"].as_array().unwrap();
    for mount in c["volumeMounts"].as_array().unwrap() {
        known(mount, &["name", "mountPath", "readOnly"], "volumeMount");
        let volume = volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .expect("the mount's volume");
        known(volume, &["name", "hostPath"], "volume");
        let host = volume["hostPath"]["path"].as_str().unwrap();
        let path = mount["mountPath"].as_str().unwrap();
        let ro = if mount["readOnly"] == true { ":ro" } else { "" };
        flags.push(format!("--volume={host}:{path}{ro}"));
    }
    let image = c["image"].as_str().unwrap().to_string();
    let args = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    (flags, image, args)
}

#[test]
fn the_daemonset_runs_the_image_that_dist_builds() {
    let (flags, image, args) = run_flags(&daemonset_pod());
    assert_eq!(image, format!("tracer:{VERSION}"));
    assert_eq!(args, ["run", "--listen", "0.0.0.0:9502"]);
    assert!(flags.contains(&"--cap-drop=ALL".to_string()), "{flags:?}");
    assert!(!flags.iter().any(|f| f.contains("privileged")), "{flags:?}");
}

/// The effective capabilities of process `pid`, from /proc.

#[test]
fn the_image_runs_as_the_daemonset_does_and_counts_refusals_exactly() {
    let test = "the_image_runs_as_the_daemonset_does_and_counts_refusals_exactly";
    let Some(tar) = artifact("tracer-image.tar", test) else {
        return;
    };
    if !kernel_tests_enabled(test) {
        return;
    }
    let host_network = host_network_configuration();
    let loaded = text(&podman(&["load", "--input", tar.to_str().unwrap()]));
    let (mut flags, image, args) = run_flags(&daemonset_pod());
    // `tracer:V` is short for docker.io/library/tracer:V, as Kubernetes reads it.
    assert!(
        loaded.contains(&format!("docker.io/library/{image}")),
        "podman load: {loaded}"
    );
    flags.extend(runtime_limits());

    // The image: one layer, holding the binary and nothing else, labelled with the version.
    let inspect: Value = serde_json::from_str(&podman_ok(&["image", "inspect", &image])).unwrap();
    let config = &inspect[0]["Config"];
    assert_eq!(config["Entrypoint"], serde_json::json!(["/tracer"]));
    assert_eq!(
        config["Labels"]["org.opencontainers.image.version"],
        VERSION
    );
    assert_eq!(
        inspect[0]["RootFS"]["Layers"].as_array().unwrap().len(),
        1,
        "no base image: {inspect}"
    );
    let created = podman_ok(&["create", "--network=none", &image]);
    let id = created.trim().to_string();
    let _created = Container(id.clone());
    let exported = Command::new("sh")
        .arg("-c")
        .arg(format!("podman --runtime runc export {id} | tar -t"))
        .output()
        .unwrap();
    let files: BTreeSet<String> = String::from_utf8_lossy(&exported.stdout)
        .lines()
        .filter(|l| !l.ends_with('/'))
        .map(str::to_string)
        .collect();
    // The runtime adds its mount points' placeholders (etc/hosts, run/.containerenv, …).
    let ours: Vec<&String> = files
        .iter()
        .filter(|f| {
            !["etc/", "dev/", "run/", "proc/", "sys/", ".dockerenv"]
                .iter()
                .any(|p| f.starts_with(p))
        })
        .collect();
    assert_eq!(ours, ["tracer"], "the image's files: {files:?}");

    // The host has tracefs where the DaemonSet mounts it from (systemd mounts it at boot).
    if !Path::new("/sys/kernel/tracing/events").is_dir() {
        run_ok("mount", &["-t", "tracefs", "nodev", "/sys/kernel/tracing"]);
    }
    let name = format!("tracer-image-test-{}", std::process::id());
    let mut run_args = vec!["run", "--detach", "--name", &name];
    run_args.extend(flags.iter().map(String::as_str));
    run_args.push(&image);
    run_args.extend(args.iter().map(String::as_str));
    // Removed however the test ends, a failed start included.
    let _container = Container(name.clone());
    podman_ok(&run_args);
    let metrics: SocketAddr = "127.0.0.1:9502".parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(get(metrics, "/healthz"), Ok((200, _))) {
        let state = podman_ok(&["inspect", "--format", "{{.State.Status}}", &name]);
        assert!(
            state.trim() == "running" && Instant::now() < deadline,
            "the container did not get ready ({}); its log:\n{}",
            state.trim(),
            text(&podman(&["logs", &name]))
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Only the DaemonSet's capabilities, as root: not privileged.
    let pid: u32 = podman_ok(&["inspect", "--format", "{{.State.Pid}}", &name])
        .trim()
        .parse()
        .unwrap();
    let wanted = [2u32, 38, 39] // CAP_DAC_READ_SEARCH, CAP_PERFMON, CAP_BPF
        .iter()
        .fold(0u64, |m, c| m | 1 << c);
    assert_eq!(effective_caps(pid), wanted, "the agent's capabilities");

    let ns = Netns::new("image");
    let upstream: SocketAddr = "127.77.41.1:8041".parse().unwrap();
    let n = 40;
    refuse(&ns, upstream, n);
    let series = |scrape: &str, family: &str| -> f64 {
        scrape
            .lines()
            .filter(|l| l.starts_with(&format!("{family}{{")))
            .filter(|l| l.contains(&format!("upstream=\"{upstream}\"")))
            .filter(|l| {
                family != "tracer_upstream_failures_total" || l.contains("cause=\"refused\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (failures, connects) = loop {
        let (status, scrape) = get(metrics, "/metrics").expect("scraping the container");
        assert_eq!(status, 200);
        let failures = series(&scrape, "tracer_upstream_failures_total");
        if failures >= n as f64 || Instant::now() > deadline {
            // A moment more: nothing beyond n may arrive.
            std::thread::sleep(Duration::from_secs(1));
            let (_, scrape) = get(metrics, "/metrics").unwrap();
            break (
                series(&scrape, "tracer_upstream_failures_total"),
                series(&scrape, "tracer_upstream_connects_total"),
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        failures,
        n as f64,
        "refusals counted by the container; its log:\n{}",
        text(&podman(&["logs", &name]))
    );
    assert_eq!(connects, n as f64, "attempts counted by the container");
    println!("the image's agent counted {failures} of {n} refusals ({connects} attempts)");
    drop(_container);

    // Under the runtime's default seccomp profile the load fails, and tracer says what to do.
    let mut confined: Vec<&str> = vec!["run", "--rm"];
    confined.extend(
        flags
            .iter()
            .map(String::as_str)
            .filter(|f| !f.contains("seccomp")),
    );
    confined.extend([image.as_str(), "check"]);
    let out = podman(&confined);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("seccomp filter is active")
            && said.contains("seccompProfile type Unconfined"),
        "{said}"
    );
    assert_eq!(
        host_network_configuration(),
        host_network,
        "running the image changed the host's firewall or IP forwarding"
    );
}

/// The host's firewall rules and IP forwarding, which running the image must leave alone.
fn host_network_configuration() -> (String, String) {
    (
        text(&run("nft", &["list", "ruleset"])),
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
    )
}
