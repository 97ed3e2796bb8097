//! `tracer check`: can this host run tracer? Kernel, privileges, BTF, tracefs, then every probe
//! loaded and attached for real (and detached again).

use anyhow::bail;

use super::CaptureArgs;
use crate::capture::{
    Capture, ContainerRuntime, ProbeState,
    btf::{Btf, VMLINUX},
    kernel_offsets,
    preflight::{self, KernelVersion},
    runtime,
    tracefs::{self, Tracefs},
};

struct Row {
    item: String,
    value: String,
    /// `ok`, `warn` (tracer runs without it, with less detail) or `FAIL`.
    status: &'static str,
    note: String,
}

struct Rows(Vec<Row>);

impl Rows {
    fn row(&mut self, item: &str, value: String, ok: bool, note: String) {
        self.row_with(item, value, if ok { "ok" } else { "FAIL" }, note);
    }

    fn row_with(&mut self, item: &str, value: String, status: &'static str, note: String) {
        self.0.push(Row {
            item: item.to_string(),
            value,
            status,
            note,
        });
    }
}

/// Whether containers can be named: the runtime socket `--container-runtime` gives, and how
/// many containers it lists; containerd's and CRI-O's bundles. Never a failure: tracer works
/// without them.
async fn container_runtime(rows: &mut Rows, choice: &ContainerRuntime) {
    if *choice != ContainerRuntime::None {
        let found = crate::capture::bundles::census();
        let (value, note) = if found.is_empty() {
            (
                "none".to_string(),
                "no containerd or CRI-O bundles under /run or /host/run".to_string(),
            )
        } else {
            let dirs: Vec<String> = found
                .iter()
                .map(|(dir, n)| {
                    // A containerd namespace is named by whoever made it: escaped.
                    let dir = crate::decode::text::untrusted(
                        std::os::unix::ffi::OsStrExt::as_bytes(dir.as_os_str()),
                    );
                    format!("{dir} ({n})")
                })
                .collect();
            (
                dirs.join(", "),
                "Kubernetes containers: the proxy's container, pod and image in events".to_string(),
            )
        };
        rows.row("container bundles", value, true, note);
    }
    let Some(socket) = choice.socket() else {
        let note = if *choice == ContainerRuntime::None {
            "--container-runtime none: containers are not named".to_string()
        } else {
            format!(
                "no Docker or Podman API socket answers ({}): containers are not named",
                runtime::SOCKETS.join(", ")
            )
        };
        rows.row("container runtime", "none".into(), true, note);
        return;
    };
    let listed = crate::export::http::get(
        crate::export::http::Server::Unix(&socket),
        "/containers/json?all=1",
    )
    .await
    .map_err(|e| e.to_string())
    .and_then(|body| {
        serde_json::from_str::<Vec<serde_json::Value>>(&body).map_err(|e| e.to_string())
    });
    match listed {
        Ok(containers) => rows.row(
            "container runtime",
            socket.display().to_string(),
            true,
            format!(
                "{} containers: names, images and fates in events",
                containers.len()
            ),
        ),
        Err(e) => rows.row_with(
            "container runtime",
            socket.display().to_string(),
            "warn",
            format!("does not answer ({e}): containers are not named until it does"),
        ),
    }
}

pub async fn check(args: &CaptureArgs) -> anyhow::Result<()> {
    let mut rows = Rows(Vec::new());

    match KernelVersion::current() {
        Some((version, release)) if version < KernelVersion::MINIMUM => rows.row(
            "kernel",
            release,
            false,
            format!("needs {} or newer", KernelVersion::MINIMUM),
        ),
        Some((version, release)) if version < KernelVersion::OLDEST_TESTED => rows.row_with(
            "kernel",
            release,
            "warn",
            format!(
                "older than the oldest tested kernel ({}): the probes may load, but this kernel \
                 is not proven",
                KernelVersion::OLDEST_TESTED
            ),
        ),
        Some((_, release)) => rows.row(
            "kernel",
            release,
            true,
            format!(
                "needs {} or newer; tested on {} and newer",
                KernelVersion::MINIMUM,
                KernelVersion::OLDEST_TESTED
            ),
        ),
        None => rows.row(
            "kernel",
            "unknown".into(),
            false,
            "cannot read /proc/sys/kernel/osrelease".into(),
        ),
    }
    let caps = preflight::effective_capabilities();
    let privileged = preflight::privileged(caps);
    rows.row(
        "privileges",
        format!("CapEff {caps:#x}"),
        privileged,
        if privileged {
            "may load and attach eBPF programs".into()
        } else {
            "run as root, or with CAP_BPF, CAP_PERFMON and CAP_DAC_READ_SEARCH".into()
        },
    );
    match Btf::from_sys_fs() {
        Ok(btf) => {
            rows.row(
                VMLINUX,
                format!("{} types", btf.len()),
                true,
                "BTF type information".into(),
            );
            match kernel_offsets(&btf) {
                Ok(_) => rows.row(
                    "struct offsets",
                    "all found".into(),
                    true,
                    "sock, tcp_sock, task_struct, files".into(),
                ),
                Err(e) => rows.row("struct offsets", "missing".into(), false, e.to_string()),
            }
        }
        Err(e) => rows.row(VMLINUX, "unreadable".into(), false, e.to_string()),
    }
    match (Tracefs::find(), tracefs::mount_points().into_iter().next()) {
        (Some(path), _) => rows.row(
            "tracefs",
            path.display().to_string(),
            true,
            "mounted".into(),
        ),
        // Mounted, but this process may not look inside (mode 700 for root).
        (None, Some(mounted)) => rows.row_with(
            "tracefs",
            format!("{mounted} (unreadable)"),
            "warn",
            "mounted, but this process may not read it: the probes on classic tracepoints \
             will not attach (run tracer as root or give it CAP_DAC_READ_SEARCH)"
                .into(),
        ),
        (None, None) => rows.row(
            "tracefs",
            "not mounted".into(),
            true,
            "tracer mounts it at /sys/kernel/tracing when it starts".into(),
        ),
    }

    container_runtime(&mut rows, &args.options().container_runtime).await;

    let mut failed_required = false;
    if privileged {
        match Capture::start(&args.options()) {
            Ok(capture) => {
                for status in &capture.probes {
                    let (value, level, note) = match &status.state {
                        ProbeState::Attached => (
                            "attached".to_string(),
                            "ok",
                            status.probe.purpose.to_string(),
                        ),
                        ProbeState::Failed(reason) => (
                            "NOT attached".to_string(),
                            if status.probe.required {
                                "FAIL"
                            } else {
                                "warn"
                            },
                            format!("{reason}; lost: {}", status.probe.purpose),
                        ),
                    };
                    failed_required |= level == "FAIL";
                    rows.row_with(
                        &format!("probe {}", status.probe.tracepoint()),
                        value,
                        level,
                        note,
                    );
                }
                for (probe, reason) in &capture.standby {
                    rows.row_with(
                        &format!("probe {}", probe.tracepoint()),
                        "standby".to_string(),
                        "ok",
                        reason.clone(),
                    );
                }
                rows.row(
                    "syscall fields",
                    if capture.syscall_fields_direct {
                        "loaded directly"
                    } else {
                        "read at the format offsets"
                    }
                    .into(),
                    true,
                    "the syscall tracepoints' records have the usual layout, or not (a helper \
                     call per field then)"
                        .into(),
                );
                let attached = capture.attached();
                let total = capture.probes.len();
                drop(capture);
                rows.row(
                    "probes",
                    format!("{attached}/{total} attached"),
                    true,
                    "and detached again".into(),
                );
            }
            Err(e) => {
                failed_required = true;
                rows.row("load and attach", "failed".into(), false, e.to_string());
            }
        }
    }

    let rows = rows.0;
    let width = rows.iter().map(|r| r.item.len()).max().unwrap_or(0);
    let value_width = rows.iter().map(|r| r.value.len()).max().unwrap_or(0);
    for r in &rows {
        println!(
            "{:<4} {:<width$}  {:<value_width$}  {}",
            r.status, r.item, r.value, r.note
        );
    }
    if rows.iter().any(|r| r.status == "FAIL") || failed_required {
        bail!("this host cannot run tracer as it is; see the FAIL lines above");
    }
    Ok(())
}
