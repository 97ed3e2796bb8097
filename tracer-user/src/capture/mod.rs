//! Kernel capture: check the host, load tracer's eBPF programs with the offsets this kernel needs,
//! attach them (degrading when an optional probe is missing), and hand out what they record:
//! failure records from the ring buffer, exact counts and health counters from per-CPU maps.
//!
//! Everything is attached through file descriptors owned by [`Capture`]: dropping it, or the
//! process ending in any way, detaches every program.

pub mod btf;
pub mod preflight;
pub mod procfs;
pub mod sock_diag;
pub mod tracefs;

use std::{sync::Arc, time::Duration};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{RawTracePoint, TracePoint},
};
use thiserror::Error;
use tokio::io::unix::AsyncFd;
use tracer_common::{
    Config, ConnTrack, CountKey, KernelOffsets, LatencyKey, OomFields, Stat, SyscallFields, Tally,
    counts::OVERFLOW_SLOTS, net::UnixPath,
};

use crate::decode::UnixPaths;

use self::{
    btf::{Btf, BtfError},
    preflight::PreflightError,
    tracefs::{Tracefs, TracefsError},
};

/// The compiled kernel programs (built by build.rs from the tracer-ebpf crate).
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

/// Where a program attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// A raw tracepoint: the kernel's own arguments, such as the `struct sock *`.
    Raw(&'static str),
    /// A classic tracepoint, attached through tracefs.
    Tracepoint(&'static str, &'static str),
}

/// One of tracer's kernel programs.
#[derive(Debug)]
pub struct Probe {
    /// The program's name in the object file.
    pub program: &'static str,
    pub hook: Hook,
    /// Without a required probe tracer cannot work at all.
    pub required: bool,
    /// What it is for, and what is lost without it.
    pub purpose: &'static str,
}

impl Probe {
    /// `category:name` of the tracepoint.
    pub fn tracepoint(&self) -> String {
        match self.hook {
            Hook::Raw(name) => format!("raw:{name}"),
            Hook::Tracepoint(category, name) => format!("{category}:{name}"),
        }
    }
}

pub const PROBES: [Probe; 13] = [
    Probe {
        program: "inet_sock_set_state",
        hook: Hook::Raw("inet_sock_set_state"),
        required: true,
        purpose: "every outbound TCP connection: who starts it, where to, how it ends",
    },
    Probe {
        program: "tcp_receive_reset",
        hook: Hook::Raw("tcp_receive_reset"),
        required: false,
        purpose: "RSTs from upstreams (without it resets are still known from the socket error)",
    },
    Probe {
        program: "tcp_retransmit_skb",
        hook: Hook::Raw("tcp_retransmit_skb"),
        required: false,
        purpose: "SYN and data retransmits, evidence for timeouts",
    },
    Probe {
        program: "tcp_sendmsg_locked",
        hook: Hook::Raw("tcp_sendmsg_locked"),
        required: false,
        purpose: "requests the proxy sends (Linux 6.16+; older kernels use tcp_probe instead)",
    },
    Probe {
        program: "tcp_probe",
        hook: Hook::Raw("tcp_probe"),
        required: false,
        purpose: "requests the proxy sends, inferred from the segments that arrive (where \
                  tcp_sendmsg_locked is missing; without either, once connected only resets are \
                  told apart)",
    },
    Probe {
        program: "sys_enter_connect",
        hook: Hook::Tracepoint("syscalls", "sys_enter_connect"),
        required: false,
        purpose: "where connect() goes (needed with sys_exit_connect)",
    },
    Probe {
        program: "sys_exit_connect",
        hook: Hook::Tracepoint("syscalls", "sys_exit_connect"),
        required: false,
        purpose: "connect() failing before any SYN (no route, no local port left), and every \
                  connect() to a Unix socket (php-fpm…)",
    },
    Probe {
        program: "sys_enter_bind",
        hook: Hook::Tracepoint("syscalls", "sys_enter_bind"),
        required: false,
        purpose: "a server binding the Unix socket it just failed to connect to (php-fpm \
                  probing its own socket as it starts): that connect() is not counted",
    },
    Probe {
        program: "sys_exit_socket",
        hook: Hook::Tracepoint("syscalls", "sys_exit_socket"),
        required: false,
        purpose: "socket() failing with EMFILE/ENFILE: the proxy out of file descriptors",
    },
    Probe {
        program: "sys_exit_accept4",
        hook: Hook::Tracepoint("syscalls", "sys_exit_accept4"),
        required: false,
        purpose: "accept4() failing with EMFILE/ENFILE: the proxy out of file descriptors for \
                  its clients",
    },
    Probe {
        program: "sys_exit_accept",
        hook: Hook::Tracepoint("syscalls", "sys_exit_accept"),
        required: false,
        purpose: "accept() failing with EMFILE/ENFILE (older servers)",
    },
    Probe {
        program: "sched_process_exit",
        hook: Hook::Raw("sched_process_exit"),
        required: false,
        purpose: "the death of processes that listen: exit code, fatal signal",
    },
    Probe {
        program: "mark_victim",
        hook: Hook::Tracepoint("oom", "mark_victim"),
        required: false,
        purpose: "processes the kernel's OOM killer chose (root cause upstream_oom_killed)",
    },
];

/// How many probes a kernel uses: every one but one of the two that see requests
/// (`tcp_sendmsg_locked` on Linux 6.16+, `tcp_probe` before), which stands by.
pub const PROBES_IN_USE: usize = PROBES.len() - 1;

/// The two probes that see the proxy's requests; a kernel uses one of them.
pub const REQUEST_PROBES: [&str; 2] = ["tcp_sendmsg_locked", "tcp_probe"];

/// Probes that only work together: skipping one skips the other.
const PAIRED: [(&str, &str); 1] = [("sys_enter_connect", "sys_exit_connect")];

/// The probe a `--skip-probe` value names (its program name or its tracepoint); required
/// probes cannot be skipped.
pub fn skippable_probe(name: &str) -> Result<&'static str, String> {
    let probe = PROBES
        .iter()
        .find(|p| p.program == name || p.tracepoint() == name)
        .ok_or_else(|| {
            let known: Vec<&str> = PROBES
                .iter()
                .filter(|p| !p.required)
                .map(|p| p.program)
                .collect();
            format!(
                "no probe {name}; these can be skipped: {}",
                known.join(", ")
            )
        })?;
    if probe.required {
        return Err(format!(
            "{} is required: tracer cannot work without it",
            probe.program
        ));
    }
    Ok(probe.program)
}

/// Whether `probe` is skipped, by name or through its pair.
fn is_skipped(skip: &[&str], probe: &str) -> bool {
    skip.iter().any(|s| {
        *s == probe
            || PAIRED
                .iter()
                .any(|(a, b)| (s == a && probe == *b) || (s == b && probe == *a))
    })
}

/// What became of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeState {
    Attached,
    /// Not attached; why.
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct ProbeStatus {
    pub probe: &'static Probe,
    pub state: ProbeState,
}

impl ProbeStatus {
    pub fn attached(&self) -> bool {
        self.state == ProbeState::Attached
    }
}

#[derive(Debug, Error)]
pub enum CaptureError {
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error("reading the kernel's BTF: {0}")]
    Btf(#[from] BtfError),
    #[error("loading tracer's eBPF programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the {probe} probe, which tracer cannot work without, failed: {reason}")]
    RequiredProbe { probe: String, reason: String },
    #[error("tracer's eBPF object has no map {0}")]
    NoMap(&'static str),
    #[error("using map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("watching the event ring buffer: {0}")]
    Io(#[from] std::io::Error),
}

/// How the capture should behave.
#[derive(Debug, Clone)]
pub struct Options {
    /// See [`Config::min_wait_ns`].
    pub min_wait: Duration,
    /// See [`Config::events_per_second`].
    pub events_per_second: u32,
    /// Programs not to attach (`--skip-probe`), checked with [`skippable_probe`].
    pub skip_probes: Vec<&'static str>,
    /// Leave this process's own attempts out (its HTTP clients, its failed accept()s): true
    /// for the agent; tests that run the agent inside the process they measure turn it off.
    pub ignore_own_process: bool,
    /// Upstreams with series of their own (`--max-upstreams`; see `aggregate::ledger`).
    pub max_upstreams: usize,
    /// Kernel count entries unchanged this long are moved to the agent (`--idle-after`).
    pub idle_after: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            min_wait: Duration::from_nanos(Config::DEFAULT_MIN_WAIT_NS),
            events_per_second: Config::DEFAULT_EVENTS_PER_SECOND,
            skip_probes: Vec::new(),
            ignore_own_process: true,
            max_upstreams: crate::aggregate::ledger::DEFAULT_MAX_UPSTREAMS,
            idle_after: crate::aggregate::ledger::DEFAULT_IDLE_AFTER,
        }
    }
}

/// tracer's programs, loaded and attached.
pub struct Capture {
    /// Owns the programs and their links; dropping it detaches everything.
    _ebpf: Ebpf,
    /// The probes in use, attached or not.
    pub probes: Vec<ProbeStatus>,
    /// Probes not loaded because another one does their work on this kernel, and why.
    pub standby: Vec<(&'static Probe, String)>,
    /// The tracefs used, if one was found or mounted.
    pub tracefs: Option<Tracefs>,
    events: Option<RingBuf<MapData>>,
    lifecycle: Option<RingBuf<MapData>>,
    /// Processes whose exits the kernel reports (listener owners).
    listener_owners: BpfHashMap<MapData, u32, u32>,
    /// The kernel's counters, shareable with other tasks (the metrics endpoint).
    pub counters: Arc<Counters>,
}

/// The kernel's exact counters, read from its maps.
pub struct Counters {
    // Locked: the agent frees idle entries while scrapes read them.
    counts: std::sync::Mutex<PerCpuHashMap<MapData, CountKey, Tally>>,
    latency: std::sync::Mutex<PerCpuHashMap<MapData, LatencyKey, u64>>,
    overflow: PerCpuArray<MapData, Tally>,
    stats: PerCpuArray<MapData, u64>,
    conns: BpfHashMap<MapData, u64, ConnTrack>,
    unix_paths: BpfHashMap<MapData, u64, UnixPath>,
    /// The attached programs, by name, to ask the kernel how often it skipped them.
    programs: Vec<(&'static str, std::os::fd::OwnedFd)>,
}

impl UnixPaths for Counters {
    fn unix_path(&self, key: u64) -> Option<UnixPath> {
        self.unix_paths.get(&key, 0).ok()
    }
}

impl Counters {
    /// The exact counts per route × outcome, summed over CPUs.
    pub fn counts(&self) -> Vec<(CountKey, Tally)> {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts
            .iter()
            .filter_map(Result::ok)
            .map(|(key, per_cpu)| (key, sum_tallies(per_cpu.iter())))
            .collect()
    }

    /// Successful connects per route × connect-time bucket, summed over CPUs.
    pub fn latency(&self) -> Vec<(LatencyKey, u64)> {
        let latency = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        latency
            .iter()
            .filter_map(Result::ok)
            .map(|(key, per_cpu)| (key, per_cpu.iter().sum()))
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

    /// Frees latency entry `key`, returning its last value.
    pub fn take_latency(&self, key: &LatencyKey) -> Option<u64> {
        let mut latency = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let n = latency.get(key, 0).ok()?.iter().sum();
        latency.remove(key).ok()?;
        Some(n)
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

    /// How many connections the kernel is following right now.
    pub fn live_connections(&self) -> u64 {
        self.conns.keys().filter(Result::is_ok).count() as u64
    }
}

/// The offsets the programs need, from the running kernel's BTF.
pub fn kernel_offsets(btf: &Btf) -> Result<KernelOffsets, BtfError> {
    let sock = |member: &str| btf.member_offset("sock", member);
    let offsets = KernelOffsets {
        skc_family: sock("__sk_common.skc_family")?,
        skc_dport: sock("__sk_common.skc_dport")?,
        skc_num: sock("__sk_common.skc_num")?,

        skc_daddr: sock("__sk_common.skc_daddr")?,
        skc_rcv_saddr: sock("__sk_common.skc_rcv_saddr")?,
        skc_v6_daddr: sock("__sk_common.skc_v6_daddr")?,
        skc_v6_rcv_saddr: sock("__sk_common.skc_v6_rcv_saddr")?,
        inet_sport: btf.member_offset("inet_sock", "inet_sport")?,
        sk_protocol: sock("sk_protocol")?,
        sk_err: sock("sk_err")?,
        tcp_bytes_received: btf.member_offset("tcp_sock", "bytes_received")?,
        tcp_bytes_acked: btf.member_offset("tcp_sock", "bytes_acked")?,
        tcp_write_seq: btf.member_offset("tcp_sock", "write_seq")?,
        tcp_clock_cache: btf
            .member_offset("tcp_sock", "tcp_clock_cache")
            .unwrap_or(KernelOffsets::MISSING),
        skb_len: btf.member_offset("sk_buff", "len")?,
        skb_data: btf.member_offset("sk_buff", "data")?,
        task_group_leader: btf.member_offset("task_struct", "group_leader")?,
        task_comm: btf.member_offset("task_struct", "comm")?,
        task_files: btf.member_offset("task_struct", "files")?,
        files_fdt: btf.member_offset("files_struct", "fdt")?,
        fdtable_fd: btf.member_offset("fdtable", "fd")?,
        fdtable_max_fds: btf.member_offset("fdtable", "max_fds")?,
        file_private_data: btf.member_offset("file", "private_data")?,
        socket_sk: btf.member_offset("socket", "sk")?,
        skc_net: sock("__sk_common.skc_net.net")?,
        net_ns_inum: btf.member_offset("net", "ns.inum")?,
        task_flags: btf.member_offset("task_struct", "flags")?,
        task_exit_code: btf.member_offset("task_struct", "exit_code")?,
        task_tgid: btf.member_offset("task_struct", "tgid")?,
        task_pid: btf.member_offset("task_struct", "pid")?,
        task_nsproxy: btf.member_offset("task_struct", "nsproxy")?,
        nsproxy_net_ns: btf.member_offset("nsproxy", "net_ns")?,
        socket_type: btf.member_offset("socket", "type")?,
        socket_state: btf.member_offset("socket", "state")?,
        sk_max_ack_backlog: sock("sk_max_ack_backlog")?,
    };
    // The programs read these from one block of Config::SOCK_COMMON_BLOCK bytes.
    let in_block = [
        ("skc_family", offsets.skc_family, 2),
        ("skc_dport", offsets.skc_dport, 2),
        ("skc_daddr", offsets.skc_daddr, 4),
        ("skc_rcv_saddr", offsets.skc_rcv_saddr, 4),
        ("skc_v6_daddr", offsets.skc_v6_daddr, 16),
        ("skc_v6_rcv_saddr", offsets.skc_v6_rcv_saddr, 16),
        ("skc_net", offsets.skc_net, 8),
    ];
    for (member, offset, size) in in_block {
        if offset + size > Config::SOCK_COMMON_BLOCK {
            return Err(BtfError::OutsideBlock {
                member,
                offset,
                block: Config::SOCK_COMMON_BLOCK,
            });
        }
    }
    Ok(offsets)
}

/// The `oom:mark_victim` tracepoint's field offsets; only `pid` is needed, the rest is evidence.
pub fn oom_fields(tracefs: &Tracefs) -> Result<OomFields, TracefsError> {
    let format = tracefs.format("oom", "mark_victim")?;
    let optional =
        |field: &str, size: u32| format.offset(field, size).unwrap_or(OomFields::MISSING);
    Ok(OomFields {
        pid: format.offset("pid", 4)?,
        comm: optional("comm", 4),
        anon_rss: optional("anon_rss", 8),
        total_vm: optional("total_vm", 8),
    })
}

/// The connect() tracepoints' field offsets, from their format files.
pub fn syscall_fields(tracefs: &Tracefs) -> Result<SyscallFields, TracefsError> {
    let enter = tracefs.format("syscalls", "sys_enter_connect")?;
    let exit = tracefs.format("syscalls", "sys_exit_connect")?;
    let socket = tracefs.format("syscalls", "sys_exit_socket")?;
    let accept = tracefs.format("syscalls", "sys_exit_accept4")?;
    let bind = tracefs.format("syscalls", "sys_enter_bind")?;
    Ok(SyscallFields {
        connect_fd: enter.offset("fd", 8)?,
        connect_uservaddr: enter.offset("uservaddr", 8)?,
        connect_addrlen: enter.offset("addrlen", 8)?,
        connect_ret: exit.offset("ret", 8)?,
        socket_ret: socket.offset("ret", 8)?,
        accept_ret: accept.offset("ret", 8)?,
        bind_umyaddr: bind.offset("umyaddr", 8)?,
        bind_addrlen: bind.offset("addrlen", 8)?,
    })
}

impl Capture {
    /// Checks the host, loads the programs and attaches every probe that this kernel has.
    pub fn start(options: &Options) -> Result<Capture, CaptureError> {
        preflight::check()?;
        preflight::raise_memlock_limit();
        // Everything the programs need from BTF, read with our own light reader and dropped.
        let (offsets, sends) = {
            let btf = Btf::from_sys_fs()?;
            let usable =
                |probe: &str| btf.has_tracepoint(probe) && !is_skipped(&options.skip_probes, probe);
            let sends = if usable("tcp_sendmsg_locked") {
                Config::SENDS_TRACED
            } else if usable("tcp_probe") {
                Config::SENDS_INFERRED
            } else {
                Config::SENDS_UNSEEN
            };
            (
                kernel_offsets(&btf)?,
                Sends::new(sends, btf.has_tracepoint("tcp_sendmsg_locked")),
            )
        };

        let mut config = Config {
            offsets,
            min_wait_ns: u64::try_from(options.min_wait.as_nanos()).unwrap_or(u64::MAX),
            ready: 1,
            sends: sends.mode,
            events_per_second: options.events_per_second,
            ignored_tgid: if options.ignore_own_process {
                own_global_tgid().unwrap_or(0)
            } else {
                0
            },
            ..Config::UNSET
        };
        // Classic tracepoints need tracefs; without it only the connect() probes are lost.
        let tracefs = Tracefs::find_or_mount();
        let formats = match &tracefs {
            Ok(tracefs) => Formats {
                syscalls: syscall_fields(tracefs).map_err(|e| e.to_string()),
                oom: oom_fields(tracefs).map_err(|e| e.to_string()),
            },
            Err(e) => Formats {
                syscalls: Err(e.to_string()),
                oom: Err(e.to_string()),
            },
        };
        if let Ok(fields) = &formats.syscalls {
            config.syscalls = *fields;
        }
        if let Ok(fields) = &formats.oom {
            config.oom = *fields;
        }
        let tracefs = tracefs.ok();

        let mut sends = sends;
        let (mut ebpf, mut probes, mut standby) =
            load_and_attach(&config, &formats, &options.skip_probes, &sends)?;
        // The programs were told how requests are seen; if that probe did not attach, they
        // must not count on it: load them again with the next way down.
        while let Some(program) = sends.program() {
            if probes
                .iter()
                .any(|p| p.probe.program == program && p.attached())
            {
                break;
            }
            drop(ebpf);
            sends = sends.degraded();
            config.sends = sends.mode;
            (ebpf, probes, standby) =
                load_and_attach(&config, &formats, &options.skip_probes, &sends)?;
        }

        let programs = probes
            .iter()
            .filter(|p| p.attached())
            .filter_map(|p| {
                let fd = ebpf.program(p.probe.program)?.fd().ok()?;
                let owned = std::os::fd::AsFd::as_fd(fd).try_clone_to_owned().ok()?;
                Some((p.probe.program, owned))
            })
            .collect();
        let events = take(&mut ebpf, "EVENTS")?;
        let lifecycle = take(&mut ebpf, "LIFECYCLE")?;
        let listener_owners = take(&mut ebpf, "LISTENER_OWNERS")?;
        let counters = Counters {
            counts: std::sync::Mutex::new(take(&mut ebpf, "COUNTS")?),
            latency: std::sync::Mutex::new(take(&mut ebpf, "CONNECT_LATENCY")?),
            overflow: take(&mut ebpf, "OVERFLOW_COUNTS")?,
            stats: take(&mut ebpf, "STATS")?,
            conns: take(&mut ebpf, "CONNS")?,
            unix_paths: take(&mut ebpf, "UNIX_PATHS")?,
            programs,
        };
        Ok(Capture {
            _ebpf: ebpf,
            probes,
            standby,
            tracefs,
            events: Some(events),
            lifecycle: Some(lifecycle),
            listener_owners,
            counters: Arc::new(counters),
        })
    }

    /// Tells the kernel to report the exits of these processes (listeners that were there before
    /// tracer started).
    pub fn watch_listener_owners(&mut self, pids: impl IntoIterator<Item = u32>) {
        for pid in pids {
            if let Err(e) = self.listener_owners.insert(pid, 1, 0) {
                tracing::debug!("cannot watch pid {pid}: {e}");
            }
        }
    }

    /// How many probes are attached.
    pub fn attached(&self) -> usize {
        self.probes.iter().filter(|p| p.attached()).count()
    }

    /// The failure records and the lifecycle records, to be read asynchronously. Can be taken
    /// once.
    pub fn take_events(&mut self) -> Result<(Events, Events), CaptureError> {
        let failures = self
            .events
            .take()
            .ok_or(CaptureError::NoMap("EVENTS (already taken)"))?;
        let lifecycle = self
            .lifecycle
            .take()
            .ok_or(CaptureError::NoMap("LIFECYCLE (already taken)"))?;
        Ok((Events::new(failures)?, Events::new(lifecycle)?))
    }
}

/// `bpf_prog_info.recursion_misses` of the program behind `fd` (0 before Linux 5.12, where the
/// field does not exist and stays zero).
fn recursion_misses(fd: &std::os::fd::OwnedFd) -> std::io::Result<u64> {
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
fn sum_tallies<'a>(tallies: impl Iterator<Item = &'a Tally>) -> Tally {
    tallies.fold(Tally::default(), |sum, t| Tally {
        count: sum.count.wrapping_add(t.count),
        sum_ns: sum.sum_ns.wrapping_add(t.sum_ns),
        ..Tally::default()
    })
}

/// Takes map `name` out of the object as the typed map `T`.
fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, CaptureError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(CaptureError::NoMap(name))?;
    T::try_from(map).map_err(|source| CaptureError::Map { map: name, source })
}

/// What the classic tracepoints' format files gave (or why not).
struct Formats {
    syscalls: Result<SyscallFields, String>,
    oom: Result<OomFields, String>,
}

/// How the programs see the proxy's requests, and so which of the two request probes is in use.
#[derive(Debug, Clone, Copy)]
struct Sends {
    /// A `Config::SENDS_*` value.
    mode: u32,
    /// Whether this kernel has `tcp_sendmsg_locked` at all (Linux 6.16+).
    kernel_has_sendmsg: bool,
}

impl Sends {
    fn new(mode: u32, kernel_has_sendmsg: bool) -> Sends {
        Sends {
            mode,
            kernel_has_sendmsg,
        }
    }

    /// The program this mode relies on.
    fn program(&self) -> Option<&'static str> {
        match self.mode {
            Config::SENDS_TRACED => Some("tcp_sendmsg_locked"),
            Config::SENDS_INFERRED => Some("tcp_probe"),
            _ => None,
        }
    }

    /// The next way down when this one's probe did not attach.
    fn degraded(self) -> Sends {
        let mode = match self.mode {
            Config::SENDS_TRACED => Config::SENDS_INFERRED,
            _ => Config::SENDS_UNSEEN,
        };
        Sends { mode, ..self }
    }

    /// Why `program` is not loaded, when the other request probe does its work.
    fn standby_reason(&self, program: &str, skip: &[&str]) -> Option<String> {
        match (program, self.mode) {
            ("tcp_probe", Config::SENDS_TRACED) => {
                Some("not needed: tcp_sendmsg_locked sees each request".to_string())
            }
            ("tcp_sendmsg_locked", Config::SENDS_INFERRED) => Some(format!(
                "{}: requests are inferred at raw:tcp_probe instead (the sends between two \
                 answers count as one request, timed by the kernel's last activity on the \
                 connection)",
                if is_skipped(skip, program) {
                    "skipped (--skip-probe)"
                } else if self.kernel_has_sendmsg {
                    "did not attach"
                } else {
                    "this kernel has no tcp_sendmsg_locked (Linux 6.16+)"
                }
            )),
            _ => None,
        }
    }
}

type Loaded = (Ebpf, Vec<ProbeStatus>, Vec<(&'static Probe, String)>);

fn load_and_attach(
    config: &Config,
    formats: &Formats,
    skip: &[&str],
    sends: &Sends,
) -> Result<Loaded, CaptureError> {
    // No kernel BTF for aya: the programs make no CO-RE relocations (their offsets come in
    // CONFIG), and parsing vmlinux's BTF again would double tracer's peak memory.
    let mut ebpf = EbpfLoader::new()
        .btf(None)
        .override_global("CONFIG", config, true)
        .load(PROGRAMS)?;
    let mut probes = Vec::with_capacity(PROBES.len());
    let mut standby = Vec::new();
    for probe in &PROBES {
        if let Some(reason) = sends.standby_reason(probe.program, skip) {
            standby.push((probe, reason));
            continue;
        }
        if is_skipped(skip, probe.program) {
            let reason = "skipped (--skip-probe)".to_string();
            probes.push(ProbeStatus {
                probe,
                state: ProbeState::Failed(reason),
            });
            continue;
        }
        let state = match attach(&mut ebpf, probe, formats) {
            Ok(()) => ProbeState::Attached,
            Err(reason) if probe.required => {
                return Err(CaptureError::RequiredProbe {
                    probe: probe.tracepoint(),
                    reason,
                });
            }
            Err(reason) => {
                tracing::warn!(
                    "probe {} not attached: {reason}; lost: {}",
                    probe.tracepoint(),
                    probe.purpose
                );
                ProbeState::Failed(reason)
            }
        };
        probes.push(ProbeStatus { probe, state });
    }
    Ok((ebpf, probes, standby))
}

fn attach(ebpf: &mut Ebpf, probe: &Probe, formats: &Formats) -> Result<(), String> {
    let program = ebpf
        .program_mut(probe.program)
        .ok_or_else(|| format!("no program {} in the object file", probe.program))?;
    match probe.hook {
        Hook::Raw(name) => {
            let program: &mut RawTracePoint = program.try_into().map_err(|e| format!("{e}"))?;
            program.load().map_err(|e| load_failed(probe, &e))?;
            program
                .attach(name)
                .map_err(|e| format!("attaching: {}", error_chain(&e)))?;
        }
        Hook::Tracepoint(category, name) => {
            let fields = match category {
                "oom" => formats.oom.as_ref().map(drop),
                _ => formats.syscalls.as_ref().map(drop),
            };
            if let Err(reason) = fields {
                return Err(reason.clone());
            }
            let program: &mut TracePoint = program.try_into().map_err(|e| format!("{e}"))?;
            program.load().map_err(|e| load_failed(probe, &e))?;
            program
                .attach(category, name)
                .map_err(|e| format!("attaching: {}", error_chain(&e)))?;
        }
    }
    Ok(())
}

/// Why `probe` did not load, and what to do about it. The kernel's verifier refusing a program
/// is a defect of tracer on this kernel, not of the host.
fn load_failed(probe: &Probe, error: &aya::programs::ProgramError) -> String {
    let verifier = matches!(error, aya::programs::ProgramError::LoadError { .. });
    let mut text = format!("loading: {}", error_chain(error));
    if verifier {
        text.push_str(
            "; the kernel's verifier rejected the program (its reason is above): this is a \
             tracer defect on this kernel, please report it with the output of `tracer check`",
        );
        if !probe.required {
            text.push_str(&format!(
                "; tracer runs without this probe (--skip-probe {} leaves it out)",
                probe.program
            ));
        }
    }
    text
}

/// An error with its sources, on one line (aya's verifier log comes as a source).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// Records from one of the kernel's ring buffers, read as they come.
pub struct Events {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl Events {
    fn new(ring: RingBuf<MapData>) -> std::io::Result<Events> {
        // SAFETY: the RingBuf owns its map's file descriptor for as long as it lives, and it
        // lives inside the AsyncFd, so the descriptor stays open and the same.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        Ok(Events { ring })
    }

    /// Waits until records may be there. Read them with [`Events::drain`] afterwards: the kernel
    /// wakes the reader again only once it has caught up.
    pub async fn ready(&mut self) -> std::io::Result<()> {
        let mut guard = self.ring.readable_mut().await?;
        guard.clear_ready();
        Ok(())
    }

    /// Hands every record that is there to `each`, as raw bytes, without waiting.
    pub fn drain(&mut self, mut each: impl FnMut(&[u8])) {
        let ring = self.ring.get_mut();
        while let Some(record) = ring.next() {
            each(&record);
        }
    }
}

/// This process's tgid as the kernel programs see it (in the initial PID namespace), or `None`
/// when it runs in a PID namespace of its own (a container without the host's PID namespace):
/// its own pid is then another number, perhaps some other process's.
fn own_global_tgid() -> Option<u32> {
    // The initial PID namespace's inode number (PROC_PID_INIT_INO).
    const INIT_PID_NS: &str = "pid:[4026531836]";
    let ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
    (ns.to_str() == Some(INIT_PID_NS)).then(std::process::id)
}
