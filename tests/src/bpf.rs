//! The kernel's view of tracer's programs, through /proc and bpftool: which a process holds,
//! whether they are still loaded, and how long they run.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
};

/// The ids of the eBPF programs process `pid` holds file descriptors to.
pub fn programs_held_by(pid: u32) -> BTreeSet<u32> {
    std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .collect()
}

/// Whether the kernel still has program `id` loaded.
pub fn program_loaded(id: u32) -> bool {
    Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .expect("bpftool (cargo xtask setup installs it)")
        .status
        .success()
}

/// bpftool's record (JSON) of each program process `pid` holds.
fn held_programs(pid: u32) -> Vec<serde_json::Value> {
    let held = programs_held_by(pid);
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .expect("bpftool (cargo xtask setup installs it)");
    let programs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    programs
        .into_iter()
        .filter(|p| {
            p["id"]
                .as_u64()
                .is_some_and(|id| held.contains(&(id as u32)))
        })
        .collect()
}

/// The programs of process `pid` the kernel skipped runs of because one was already running on
/// that CPU (`recursion_misses`), by name (the kernel keeps 15 characters of it, so two
/// programs can share one: their skips add up), with how many.
pub fn program_misses(pid: u32) -> BTreeMap<String, u64> {
    let mut misses = BTreeMap::new();
    for p in held_programs(pid) {
        let n = p["recursion_misses"].as_u64().unwrap_or(0);
        if n > 0 {
            let name = p["name"].as_str().unwrap_or("?").to_string();
            *misses.entry(name).or_insert(0) += n;
        }
    }
    misses
}

/// Per program of process `pid`, by name: how many times it ran and for how long in all (ns).
/// The kernel keeps these only while `kernel.bpf_stats_enabled` is 1 ([`BpfStats`]).
pub fn program_stats(pid: u32) -> BTreeMap<String, (u64, u64)> {
    held_programs(pid)
        .iter()
        .filter_map(|p| {
            Some((
                p["name"].as_str()?.to_string(),
                (
                    p["run_cnt"].as_u64().unwrap_or(0),
                    p["run_time_ns"].as_u64().unwrap_or(0),
                ),
            ))
        })
        .collect()
}

/// Turns the kernel's per-program run-time statistics on; off again on drop.
pub struct BpfStats;

impl BpfStats {
    const PATH: &str = "/proc/sys/kernel/bpf_stats_enabled";

    pub fn enable() -> BpfStats {
        std::fs::write(Self::PATH, "1").expect("enabling kernel.bpf_stats_enabled");
        BpfStats
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, "0");
    }
}
