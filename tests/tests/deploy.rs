//! The files under deploy/ do what they say: the systemd unit's capabilities are enough (and
//! needed), the alert rules pass promtool's tests, the dashboard and the DaemonSet are valid and
//! only use metrics tracer exports.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use tracer_tests::{
    kernel_tests_enabled,
    privileges::{capability, run_as},
    tracer_process::tracer_bin,
};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(deploy(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The capabilities the systemd unit grants, as numbers.
fn unit_capabilities() -> Vec<u32> {
    let unit = read("systemd/tracer.service");
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .expect("AmbientCapabilities in the unit");
    line.split_whitespace()
        .map(|name| capability(name).unwrap_or_else(|| panic!("unknown capability {name}")))
        .collect()
}

fn check_as_nobody(caps: &[u32]) -> (bool, String) {
    let mut command = Command::new(tracer_bin());
    command.arg("check");
    run_as(&mut command, 65534, 65534, caps);
    let out = command.output().expect("running tracer check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn systemd_units_capabilities_are_enough_without_root() {
    if !kernel_tests_enabled("systemd_units_capabilities_are_enough_without_root") {
        return;
    }
    let caps = unit_capabilities();
    let (ok, text) = check_as_nobody(&caps);
    assert!(
        ok,
        "tracer check as nobody with the unit's capabilities failed:\n{text}"
    );
    let all = tracer_user::capture::PROBES_IN_USE;
    assert!(text.contains(&format!("{all}/{all} attached")), "{text}");
    // Each one is needed, and its absence is explained.
    let without = |cap: u32| -> Vec<u32> { caps.iter().copied().filter(|c| *c != cap).collect() };
    let (ok, text) = check_as_nobody(&without(capability("CAP_BPF").unwrap()));
    assert!(!ok, "tracer check should fail without CAP_BPF:\n{text}");
    let row = text
        .lines()
        .find(|l| l.contains("privileges"))
        .unwrap_or_default();
    assert!(
        row.starts_with("FAIL") && row.contains("CAP_BPF, CAP_PERFMON"),
        "{text}"
    );
    // Without reading tracefs, the classic tracepoints are lost and tracer says why.
    let (ok, text) = check_as_nobody(&without(capability("CAP_DAC_READ_SEARCH").unwrap()));
    assert!(ok, "the other probes still attach:\n{text}");
    let classic = tracer_user::capture::PROBES
        .iter()
        .filter(|p| matches!(p.hook, tracer_user::capture::Hook::Tracepoint(..)))
        .count();
    let attached = format!("{}/{all} attached", all - classic);
    assert!(text.contains(&attached), "{attached}: {text}");
    assert!(
        text.contains("cannot read it: run tracer as root or give it CAP_DAC_READ_SEARCH"),
        "{text}"
    );
}

#[test]
fn alert_rules_pass_their_promtool_tests() {
    let out = Command::new("promtool")
        .current_dir(deploy("prometheus"))
        .args(["test", "rules", "tracer-alerts.test.yml"])
        .output()
        .expect("promtool (cargo xtask setup installs prometheus)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let config = Command::new("promtool")
        .current_dir(deploy("prometheus"))
        .args(["check", "config", "prometheus.yml"])
        .output()
        .expect("promtool");
    assert!(
        config.status.success(),
        "{}",
        String::from_utf8_lossy(&config.stdout)
    );
}

/// The metric names an expression uses (histogram series named by their family).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("tracer_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(&name)
            .to_string();
        names.insert(family);
    }
    names
}

/// Every metric family `tracer run` exports (from the code's own list).
fn exported_families() -> BTreeSet<String> {
    let source = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tracer-user/src/export/metrics.rs"),
    )
    .expect("metrics.rs");
    source
        .split('"')
        .filter(|s| {
            s.starts_with("tracer_") && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn dashboard_and_rules_only_use_exported_metrics() {
    let exported = exported_families();
    assert!(
        exported.contains("tracer_upstream_failures_total"),
        "{exported:?}"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("grafana/tracer-dashboard.json")).expect("valid dashboard JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 6);
    let mut used = BTreeSet::new();
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            used.extend(metric_names(target["expr"].as_str().unwrap_or_default()));
        }
    }
    used.extend(metric_names(&read("prometheus/tracer-alerts.yml")));
    for name in &used {
        assert!(
            exported.contains(name),
            "{name} is used but tracer does not export it"
        );
    }
    for needed in [
        "tracer_upstream_failures_total",
        "tracer_upstream_connects_total",
        "tracer_upstream_connect_duration_seconds",
    ] {
        assert!(used.contains(needed), "the dashboard should show {needed}");
    }
}

#[test]
fn daemonset_runs_on_the_hosts_pids_and_network_with_what_tracer_needs() {
    let text = read("kubernetes/tracer-daemonset.yaml");
    let docs: Vec<serde_json::Value> = text
        .split("\n---\n")
        .map(|doc| serde_norway::from_str(doc).expect("valid YAML"))
        .collect();
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let pod = &ds["spec"]["template"];
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );
    assert_eq!(pod["metadata"]["annotations"]["prometheus.io/port"], "9502");
    let spec = &pod["spec"];
    assert_eq!(spec["hostPID"], true);
    assert_eq!(spec["hostNetwork"], true);
    let container = &spec["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert_eq!(args, ["run", "--listen", "0.0.0.0:9502"]);
    let added: BTreeSet<String> = container["securityContext"]["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("CAP_{}", c.as_str().unwrap()))
        .collect();
    let unit: BTreeSet<String> = read("systemd/tracer.service")
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .unwrap()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(
        added, unit,
        "the DaemonSet and the systemd unit grant the same capabilities"
    );
    let mounts: BTreeSet<&str> = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    for needed in ["/sys/kernel/btf", "/sys/kernel/tracing", "/sys/fs/cgroup"] {
        assert!(mounts.contains(needed), "missing mount {needed}");
    }
}
