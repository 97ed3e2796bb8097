//! `tracer check`: can this host run tracer? Kernel, privileges, BTF, tracefs, then every probe
//! loaded and attached for real (and detached again).

use anyhow::bail;

use super::CaptureArgs;
use crate::capture::{
    Capture, ProbeState,
    btf::{Btf, VMLINUX},
    kernel_offsets,
    preflight::{self, KernelVersion},
    tracefs::Tracefs,
};

struct Row {
    item: String,
    value: String,
    ok: bool,
    note: String,
}

pub fn check(args: &CaptureArgs) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    let mut row = |item: &str, value: String, ok: bool, note: String| {
        rows.push(Row {
            item: item.to_string(),
            value,
            ok,
            note,
        })
    };

    match KernelVersion::current() {
        Some((version, release)) => row(
            "kernel",
            release,
            version >= KernelVersion::MINIMUM,
            format!("needs {} or newer", KernelVersion::MINIMUM),
        ),
        None => row(
            "kernel",
            "unknown".into(),
            false,
            "cannot read /proc/sys/kernel/osrelease".into(),
        ),
    }
    let caps = preflight::effective_capabilities();
    let privileged = preflight::privileged(caps);
    row(
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
            row(
                VMLINUX,
                format!("{} types", btf.len()),
                true,
                "BTF type information".into(),
            );
            match kernel_offsets(&btf) {
                Ok(_) => row(
                    "struct offsets",
                    "all found".into(),
                    true,
                    "sock, tcp_sock, task_struct, files".into(),
                ),
                Err(e) => row("struct offsets", "missing".into(), false, e.to_string()),
            }
        }
        Err(e) => row(VMLINUX, "unreadable".into(), false, e.to_string()),
    }
    match Tracefs::find() {
        Some(path) => row(
            "tracefs",
            path.display().to_string(),
            true,
            "mounted".into(),
        ),
        None => row(
            "tracefs",
            "not mounted".into(),
            true,
            "tracer mounts it at /sys/kernel/tracing when it starts".into(),
        ),
    }

    let mut failed_required = false;
    if privileged {
        match Capture::start(&args.options()) {
            Ok(capture) => {
                for status in &capture.probes {
                    let (value, ok, note) = match &status.state {
                        ProbeState::Attached => (
                            "attached".to_string(),
                            true,
                            status.probe.purpose.to_string(),
                        ),
                        ProbeState::Failed(reason) => (
                            "NOT attached".to_string(),
                            !status.probe.required,
                            format!("{reason}; lost: {}", status.probe.purpose),
                        ),
                    };
                    failed_required |= !ok;
                    row(
                        &format!("probe {}", status.probe.tracepoint()),
                        value,
                        ok,
                        note,
                    );
                }
                let attached = capture.attached();
                let total = capture.probes.len();
                drop(capture);
                row(
                    "probes",
                    format!("{attached}/{total} attached"),
                    true,
                    "and detached again".into(),
                );
            }
            Err(e) => {
                failed_required = true;
                row("load and attach", "failed".into(), false, e.to_string());
            }
        }
    }

    let width = rows.iter().map(|r| r.item.len()).max().unwrap_or(0);
    let value_width = rows.iter().map(|r| r.value.len()).max().unwrap_or(0);
    for r in &rows {
        println!(
            "{:<4} {:<width$}  {:<value_width$}  {}",
            if r.ok { "ok" } else { "FAIL" },
            r.item,
            r.value,
            r.note
        );
    }
    if rows.iter().any(|r| !r.ok) || failed_required {
        bail!("this host cannot run tracer as it is; see the FAIL lines above");
    }
    Ok(())
}
