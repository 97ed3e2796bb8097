//! The programs and where they attach: the probe table, which probes may be skipped, and loading
//! and attaching each one (an optional probe this kernel lacks is left on standby).

use aya::{
    Ebpf, EbpfLoader,
    programs::{RawTracePoint, TracePoint},
};
use tracer_common::{Config, OomFields, SyscallFields};

use super::{CaptureError, PROGRAMS};

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

pub const PROBES: [Probe; 27] = [
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
    Probe {
        program: "signal_generate",
        hook: Hook::Raw("signal_generate"),
        required: false,
        purpose: "who sent the signal that ended a worker (its master, the OOM killer, a \
                  person's kill): root cause worker_killed names the sender",
    },
    Probe {
        program: "sys_enter_write",
        hook: Hook::Tracepoint("syscalls", "sys_enter_write"),
        required: false,
        purpose: "the first bytes the proxy sends on a followed connection (a TLS ClientHello or plaintext): TLS failures; with the other read and write probes",
    },
    Probe {
        program: "sys_enter_sendto",
        hook: Hook::Tracepoint("syscalls", "sys_enter_sendto"),
        required: false,
        purpose: "as sys_enter_write, for send()/sendto()",
    },
    Probe {
        program: "sys_enter_writev",
        hook: Hook::Tracepoint("syscalls", "sys_enter_writev"),
        required: false,
        purpose: "as sys_enter_write, for writev()",
    },
    Probe {
        program: "sys_enter_sendmsg",
        hook: Hook::Tracepoint("syscalls", "sys_enter_sendmsg"),
        required: false,
        purpose: "as sys_enter_write, for sendmsg()",
    },
    Probe {
        program: "sys_enter_read",
        hook: Hook::Tracepoint("syscalls", "sys_enter_read"),
        required: false,
        purpose: "the first bytes an upstream sends, as the proxy reads them (a ServerHello, an alert or plaintext): TLS failures; with the other read and write probes",
    },
    Probe {
        program: "sys_enter_recvfrom",
        hook: Hook::Tracepoint("syscalls", "sys_enter_recvfrom"),
        required: false,
        purpose: "as sys_enter_read, for recv()/recvfrom()",
    },
    Probe {
        program: "sys_enter_readv",
        hook: Hook::Tracepoint("syscalls", "sys_enter_readv"),
        required: false,
        purpose: "as sys_enter_read, for readv()",
    },
    Probe {
        program: "sys_enter_recvmsg",
        hook: Hook::Tracepoint("syscalls", "sys_enter_recvmsg"),
        required: false,
        purpose: "as sys_enter_read, for recvmsg()",
    },
    Probe {
        program: "sys_exit_read",
        hook: Hook::Tracepoint("syscalls", "sys_exit_read"),
        required: false,
        purpose: "what read() returned on a followed connection (with sys_enter_read)",
    },
    Probe {
        program: "sys_exit_recvfrom",
        hook: Hook::Tracepoint("syscalls", "sys_exit_recvfrom"),
        required: false,
        purpose: "what recv()/recvfrom() returned (with sys_enter_recvfrom)",
    },
    Probe {
        program: "sys_exit_readv",
        hook: Hook::Tracepoint("syscalls", "sys_exit_readv"),
        required: false,
        purpose: "what readv() returned (with sys_enter_readv)",
    },
    Probe {
        program: "sys_exit_recvmsg",
        hook: Hook::Tracepoint("syscalls", "sys_exit_recvmsg"),
        required: false,
        purpose: "what recvmsg() returned (with sys_enter_recvmsg)",
    },
    Probe {
        program: "sys_enter_close",
        hook: Hook::Tracepoint("syscalls", "sys_enter_close"),
        required: false,
        purpose: "the proxy closing a watched connection's descriptor: one that an upstream reset before the proxy read its answer is decided then",
    },
];

/// How many probes a kernel uses: every one but one of the two that see requests
/// (`tcp_sendmsg_locked` on Linux 6.16+, `tcp_probe` before), which stands by.
pub const PROBES_IN_USE: usize = PROBES.len() - 1;

/// The two probes that see the proxy's requests; a kernel uses one of them.
pub const REQUEST_PROBES: [&str; 2] = ["tcp_sendmsg_locked", "tcp_probe"];

/// Probes that only work together: skipping one skips the other.
pub(super) const PAIRED: [(&str, &str); 1] = [("sys_enter_connect", "sys_exit_connect")];

/// The probes that watch a connection's first bytes: they work all together or not at all (a
/// read seen without its return would look like an upstream that sent nothing).
pub const PEEK_PROBES: [&str; 13] = [
    "sys_enter_write",
    "sys_enter_sendto",
    "sys_enter_writev",
    "sys_enter_sendmsg",
    "sys_enter_read",
    "sys_enter_recvfrom",
    "sys_enter_readv",
    "sys_enter_recvmsg",
    "sys_exit_read",
    "sys_exit_recvfrom",
    "sys_exit_readv",
    "sys_exit_recvmsg",
    "sys_enter_close",
];

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

/// Whether `probe` is skipped, by name, through its pair or its group; the first-bytes probes
/// also go with the connect() pair (connect() starts their watch: without it they would run on
/// every read and write for nothing).
pub(super) fn is_skipped(skip: &[&str], probe: &str) -> bool {
    skip.iter().any(|s| {
        *s == probe
            || PAIRED
                .iter()
                .any(|(a, b)| (s == a && probe == *b) || (s == b && probe == *a))
            || (PEEK_PROBES.contains(s) && PEEK_PROBES.contains(&probe))
            || (PEEK_PROBES.contains(&probe) && PAIRED.iter().any(|(a, b)| s == a || s == b))
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

/// What the classic tracepoints' format files gave (or why not).
pub(super) struct Formats {
    pub(super) syscalls: Result<SyscallFields, String>,
    pub(super) oom: Result<OomFields, String>,
    /// Where the read and write tracepoints keep `fd`, the buffer and `ret`.
    pub(super) io: Result<(u32, u32, u32), String>,
}

/// How the programs see the proxy's requests, and so which of the two request probes is in use.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sends {
    /// A `Config::SENDS_*` value.
    pub(super) mode: u32,
    /// Whether this kernel has `tcp_sendmsg_locked` at all (Linux 6.16+).
    pub(super) kernel_has_sendmsg: bool,
}

impl Sends {
    pub(super) fn new(mode: u32, kernel_has_sendmsg: bool) -> Sends {
        Sends {
            mode,
            kernel_has_sendmsg,
        }
    }

    /// The program this mode relies on.
    pub(super) fn program(&self) -> Option<&'static str> {
        match self.mode {
            Config::SENDS_TRACED => Some("tcp_sendmsg_locked"),
            Config::SENDS_INFERRED => Some("tcp_probe"),
            _ => None,
        }
    }

    /// The next way down when this one's probe did not attach.
    pub(super) fn degraded(self) -> Sends {
        let mode = match self.mode {
            Config::SENDS_TRACED => Config::SENDS_INFERRED,
            _ => Config::SENDS_UNSEEN,
        };
        Sends { mode, ..self }
    }

    /// Why `program` is not loaded, when the other request probe does its work.
    pub(super) fn standby_reason(&self, program: &str, skip: &[&str]) -> Option<String> {
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

pub(super) type Loaded = (Ebpf, Vec<ProbeStatus>, Vec<(&'static Probe, String)>);

pub(super) fn load_and_attach(
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

pub(super) fn attach(ebpf: &mut Ebpf, probe: &Probe, formats: &Formats) -> Result<(), String> {
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
                _ if PEEK_PROBES.contains(&probe.program) => formats.io.as_ref().map(drop),
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
pub(super) fn load_failed(probe: &Probe, error: &aya::programs::ProgramError) -> String {
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
pub(super) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipping_follows_pairs_and_groups() {
        assert!(is_skipped(&["sys_enter_connect"], "sys_exit_connect"));
        assert!(is_skipped(&["sys_enter_write"], "sys_exit_recvmsg"));
        // connect() starts the first bytes' watch: the group goes with the pair, not the
        // other way round.
        assert!(is_skipped(&["sys_exit_connect"], "sys_enter_close"));
        assert!(is_skipped(&["sys_enter_connect"], "sys_enter_read"));
        assert!(!is_skipped(&["sys_enter_write"], "sys_exit_connect"));
        assert!(!is_skipped(&["tcp_retransmit_skb"], "sys_enter_read"));
    }
}
