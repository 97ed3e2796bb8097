//! Kernel capture: check the host, load tracer's eBPF programs with the offsets this kernel needs,
//! attach them (degrading when an optional probe is missing), and hand out what they record:
//! failure records from the ring buffer, exact counts and health counters from per-CPU maps.
//!
//! Everything is attached through file descriptors owned by [`Capture`]: dropping it, or the
//! process ending in any way, detaches every program.

pub mod btf;
pub mod bundles;
mod counters;
mod offsets;
pub mod preflight;
mod probes;
pub mod procfs;
pub mod runtime;
pub mod sock_diag;
pub mod tracefs;

use std::{sync::Arc, time::Duration};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, RingBuf},
};
use thiserror::Error;
use tokio::io::unix::AsyncFd;
use tracer_common::Config;

use self::{
    btf::{Btf, BtfError},
    preflight::PreflightError,
    probes::{Formats, Sends, is_skipped, load_and_attach},
    tracefs::Tracefs,
};
pub use self::{
    counters::Counters,
    offsets::{io_fields, kernel_offsets, oom_fields, syscall_fields},
    probes::{
        Hook, PEEK_PROBES, PROBES, PROBES_IN_USE, Probe, ProbeState, ProbeStatus, REQUEST_PROBES,
        skippable_probe,
    },
};

/// The compiled kernel programs (built by build.rs from the tracer-ebpf crate).
pub(super) static PROGRAMS: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

#[derive(Debug, Error)]
pub enum CaptureError {
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error("reading the kernel's BTF: {0}")]
    Btf(#[from] BtfError),
    /// The whole chain of causes is in the message (aya repeats itself at each level, so only
    /// new ones are kept), then what to do where tracer knows it.
    #[error("loading tracer's eBPF programs: {}{}", preflight::causes(.0), preflight::load_hint(.0))]
    Load(aya::EbpfError),
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

impl From<aya::EbpfError> for CaptureError {
    fn from(error: aya::EbpfError) -> Self {
        CaptureError::Load(error)
    }
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
    /// Where container names come from (`--container-runtime`).
    pub container_runtime: ContainerRuntime,
    /// Have the programs read the syscall tracepoints' fields at their format files' offsets
    /// even where the usual layout lets them load them directly (`SyscallFields::usual`): the
    /// path of a kernel whose layout differs, which tests keep honest.
    pub syscall_fields_from_format: bool,
}

/// Which container runtime to ask for container names (see `runtime`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ContainerRuntime {
    /// The first of `runtime::SOCKETS` that exists.
    #[default]
    Auto,
    None,
    Socket(std::path::PathBuf),
}

impl ContainerRuntime {
    /// The socket to follow, if any.
    pub fn socket(&self) -> Option<std::path::PathBuf> {
        match self {
            ContainerRuntime::Auto => runtime::find_socket(),
            ContainerRuntime::None => None,
            ContainerRuntime::Socket(path) => Some(path.clone()),
        }
    }
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
            container_runtime: ContainerRuntime::Auto,
            syscall_fields_from_format: false,
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
    /// Whether the programs load the syscall tracepoints' fields directly (the usual layout),
    /// rather than read them at their format files' offsets.
    pub syscall_fields_direct: bool,
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
                io: io_fields(tracefs).map_err(|e| e.to_string()),
            },
            Err(e) => Formats {
                syscalls: Err(e.to_string()),
                oom: Err(e.to_string()),
                io: Err(e.to_string()),
            },
        };
        if let Ok(fields) = &formats.syscalls {
            config.syscalls = *fields;
        }
        if let (Ok(_), Ok((fd, buf, ret))) = (&formats.syscalls, &formats.io) {
            config.syscalls.io_fd = *fd;
            config.syscalls.io_buf = *buf;
            config.syscalls.io_ret = *ret;
            // The first bytes are watched from connect() on: it must be seen too.
            config.peek = u32::from(
                !is_skipped(&options.skip_probes, PEEK_PROBES[0])
                    && !is_skipped(&options.skip_probes, "sys_exit_connect"),
            );
        }
        config.syscalls.usual = u32::from(
            !options.syscall_fields_from_format
                && formats.syscalls.is_ok()
                && config.syscalls.is_usual(formats.io.is_ok()),
        );
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
        // The first-bytes probes work all together or not at all: if one did not attach, the
        // programs must not count on them (a read seen without its return would look like an
        // upstream that sent nothing).
        if config.peek != 0 {
            let missing = PEEK_PROBES.iter().find_map(|name| {
                let status = probes.iter().find(|p| p.probe.program == *name)?;
                match &status.state {
                    ProbeState::Failed(reason) => Some(format!("{name}: {reason}")),
                    ProbeState::Attached => None,
                }
            });
            let connect_seen = probes
                .iter()
                .any(|p| p.probe.program == "sys_exit_connect" && p.attached());
            let missing = missing
                .or_else(|| (!connect_seen).then(|| "sys_exit_connect did not attach".to_string()));
            if let Some(why) = missing {
                drop(ebpf);
                config.peek = 0;
                let mut skip = options.skip_probes.clone();
                skip.extend(PEEK_PROBES);
                (ebpf, probes, standby) = load_and_attach(&config, &formats, &skip, &sends)?;
                for status in probes
                    .iter_mut()
                    .filter(|p| PEEK_PROBES.contains(&p.probe.program))
                {
                    status.state = ProbeState::Failed(format!(
                        "left out with the other read and write probes ({why})"
                    ));
                }
            }
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
            overflow: take(&mut ebpf, "OVERFLOW_COUNTS")?,
            stats: take(&mut ebpf, "STATS")?,
            program_errors: take(&mut ebpf, "PROGRAM_ERRORS")?,
            conns: take(&mut ebpf, "CONNS")?,
            unix_paths: take(&mut ebpf, "UNIX_PATHS")?,
            peeks: std::sync::Mutex::new(take(&mut ebpf, "PEEKS")?),
            host_pids: own_global_tgid().is_some(),
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
            syscall_fields_direct: config.syscalls.usual != 0,
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

/// Takes map `name` out of the object as the typed map `T`.
fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, CaptureError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(CaptureError::NoMap(name))?;
    T::try_from(map).map_err(|source| CaptureError::Map { map: name, source })
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
