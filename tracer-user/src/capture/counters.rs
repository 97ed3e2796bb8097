//! The kernel's exact counters (per-CPU maps), read for the metrics and the agent.

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap};
use tracer_common::{
    ConnTrack, CountKey, Program, Stat, Tally, counts::OVERFLOW_SLOTS, net::UnixPath,
};

use crate::decode::UnixPaths;

/// The kernel's exact counters, read from its maps.
pub struct Counters {
    // Locked: the agent frees idle entries while scrapes read them.
    pub(super) counts: std::sync::Mutex<PerCpuHashMap<MapData, CountKey, Tally>>,
    pub(super) overflow: PerCpuArray<MapData, Tally>,
    pub(super) stats: PerCpuArray<MapData, u64>,
    pub(super) program_errors: PerCpuArray<MapData, u64>,
    pub(super) conns: BpfHashMap<MapData, u64, ConnTrack>,
    pub(super) unix_paths: BpfHashMap<MapData, u64, UnixPath>,
    /// The attached programs, by name, to ask the kernel how often it skipped them.
    pub(super) programs: Vec<(&'static str, std::os::fd::OwnedFd)>,
    /// The first-bytes watches, (tgid, fd) → socket (`PEEKS`).
    pub(super) peeks: std::sync::Mutex<BpfHashMap<MapData, u64, u64>>,
    /// Whether /proc's pids are the kernel's tgids (the agent runs in the initial PID
    /// namespace): only then can the watches of processes that are gone be told.
    pub(super) host_pids: bool,
}

impl UnixPaths for Counters {
    fn unix_path(&self, key: u64) -> Option<UnixPath> {
        self.unix_paths.get(&key, 0).ok()
    }
}

impl Counters {
    /// The exact counts per route × outcome (× connect-time bucket for connects), summed over
    /// CPUs.
    pub fn counts(&self) -> Vec<(CountKey, Tally)> {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts
            .iter()
            .filter_map(Result::ok)
            .map(|(key, per_cpu)| (key, sum_tallies(per_cpu.iter())))
            .collect()
    }

    /// Frees count entry `key`, returning its last value (read just before, to leave the
    /// kernel as little time as possible to add to it unseen).
    pub fn take_count(&self, key: &CountKey) -> Option<Tally> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let tally = sum_tallies(counts.get(key, 0).ok()?.iter());
        counts.remove(key).ok()?;
        Some(tally)
    }

    /// Counts per outcome code that did not fit in the counts map.
    pub fn overflow_counts(&self) -> Vec<(u8, Tally)> {
        (0..OVERFLOW_SLOTS)
            .filter_map(|slot| {
                let per_cpu = self.overflow.get(&slot, 0).ok()?;
                let tally = sum_tallies(per_cpu.iter());
                (tally.count > 0).then_some((slot as u8, tally))
            })
            .collect()
    }

    /// A health counter, summed over CPUs.
    pub fn stat(&self, which: Stat) -> u64 {
        self.stats
            .get(&(which as u32), 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }

    /// Per attached program, how many times the kernel did not run it because it was already
    /// running on that CPU (`bpf_prog_info.recursion_misses`, Linux 5.12+): a program
    /// preempted by a task that hits the same tracepoint (kernels that preempt kernel code,
    /// such as 7.x's lazy preemption) loses that second run. Counts stay exact for everything
    /// the kernel ran; these say what it did not.
    pub fn program_misses(&self) -> Vec<(&'static str, u64)> {
        self.programs
            .iter()
            .map(|(name, fd)| (*name, recursion_misses(fd).unwrap_or(0)))
            .collect()
    }

    /// Runs of each program that stopped before finishing, summed over CPUs.
    pub fn program_errors(&self) -> Vec<(&'static str, u64)> {
        Program::ALL
            .into_iter()
            .map(|program| {
                let n = self
                    .program_errors
                    .get(&(program as u32), 0)
                    .map_or(0, |per_cpu| per_cpu.iter().sum());
                (program.name(), n)
            })
            .collect()
    }

    /// Forgets the first-bytes watches (`PEEKS` slots) of processes that are gone, and returns
    /// how many went. A process that exits with followed connections open never calls close()
    /// on them, and a descriptor's slot stays for its next connection: left alone, such slots
    /// would wait for the LRU to evict them, which, once the table is full, may take a live
    /// connection's watch first.
    pub fn forget_watches_of_exited(&self) -> usize {
        if !self.host_pids {
            return 0;
        }
        let mut peeks = self.peeks.lock().unwrap_or_else(|p| p.into_inner());
        let keys: Vec<u64> = peeks.keys().filter_map(Result::ok).collect();
        let mut alive = std::collections::HashMap::new();
        let mut gone = 0;
        for key in keys {
            let tgid = (key >> 32) as u32;
            let live = *alive
                .entry(tgid)
                .or_insert_with(|| std::path::Path::new(&format!("/proc/{tgid}")).exists());
            if !live && peeks.remove(&key).is_ok() {
                gone += 1;
            }
        }
        gone
    }

    /// The processes with first-bytes watch slots in the kernel.
    pub fn watching_processes(&self) -> std::collections::BTreeSet<u32> {
        let peeks = self.peeks.lock().unwrap_or_else(|p| p.into_inner());
        peeks
            .keys()
            .filter_map(Result::ok)
            .map(|key| (key >> 32) as u32)
            .collect()
    }

    /// How many connections the kernel is following right now.
    pub fn live_connections(&self) -> u64 {
        self.conns.keys().filter(Result::is_ok).count() as u64
    }
}

/// `bpf_prog_info.recursion_misses` of the program behind `fd` (0 before Linux 5.12, where the
/// field does not exist and stays zero).
pub(super) fn recursion_misses(fd: &std::os::fd::OwnedFd) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: bpf_prog_info is plain old data; all zeroes is what the kernel expects.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    // union bpf_attr's info member, as BPF_OBJ_GET_INFO_BY_FD reads it.
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: std::ptr::addr_of_mut!(info) as u64,
    };
    // SAFETY: attr points at a live buffer of info_len bytes; the kernel writes at most that.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            aya_obj::generated::bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
            std::ptr::addr_of_mut!(attr),
            std::mem::size_of::<InfoByFd>() as libc::c_long,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info.recursion_misses)
}

/// The sum of a key's per-CPU values. Wrapping: a count taken back (a server's probe of its own
/// socket) is taken on the CPU where the server binds, whose value may go below zero alone.
pub(super) fn sum_tallies<'a>(tallies: impl Iterator<Item = &'a Tally>) -> Tally {
    tallies.fold(Tally::default(), |sum, t| Tally {
        count: sum.count.wrapping_add(t.count),
        sum_ns: sum.sum_ns.wrapping_add(t.sum_ns),
        ..Tally::default()
    })
}
