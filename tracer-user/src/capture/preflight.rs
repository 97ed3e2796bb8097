//! What tracer needs from the host before it loads anything, checked up front so that a missing
//! piece is reported with what to do about it.

use std::fmt;

use thiserror::Error;

use super::btf::VMLINUX;

/// Capability numbers (linux/capability.h).
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[derive(Debug, Error)]
pub enum PreflightError {
    #[error(
        "not privileged enough to load eBPF programs (effective capabilities {caps}): \
         run tracer as root (sudo tracer …) or give it CAP_BPF, CAP_PERFMON and \
         CAP_DAC_READ_SEARCH (setcap cap_bpf,cap_perfmon,cap_dac_read_search+ep tracer)"
    )]
    NotPrivileged { caps: String },
    #[error(
        "this kernel has no BTF type information at {VMLINUX}: tracer needs a kernel built \
         with CONFIG_DEBUG_INFO_BTF=y (Linux 5.8 or newer; most distributions ship it)"
    )]
    NoBtf,
    #[error("kernel {found} is too old: tracer needs Linux {needed} or newer")]
    OldKernel {
        found: KernelVersion,
        needed: KernelVersion,
    },
}

/// A kernel release, e.g. 6.18.44.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelVersion(pub u32, pub u32, pub u32);

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

impl KernelVersion {
    /// Ring buffers and BTF for every kernel struct tracer reads: 5.8.
    pub const MINIMUM: KernelVersion = KernelVersion(5, 8, 0);

    /// The oldest kernel the kernel matrix (`cargo xtask test --kernel all`) proves: Debian 11's.
    pub const OLDEST_TESTED: KernelVersion = KernelVersion(5, 10, 0);

    /// The running kernel's release.
    pub fn current() -> Option<(KernelVersion, String)> {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
        let release = release.trim().to_string();
        Some((KernelVersion::parse(&release)?, release))
    }

    /// Parses a release like `6.18.44-fc-v657` or `5.15.0-91-generic`.
    pub fn parse(release: &str) -> Option<KernelVersion> {
        let mut numbers = release
            .split(|c: char| !c.is_ascii_digit())
            .take(3)
            .map(|n| n.parse::<u32>().ok());
        let major = numbers.next()??;
        let minor = numbers.next()??;
        let patch = numbers.next().flatten().unwrap_or(0);
        Some(KernelVersion(major, minor, patch))
    }
}

/// The effective capability set of this process.
pub fn effective_capabilities() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Whether this process may load and attach tracing programs.
pub fn privileged(caps: u64) -> bool {
    let has = |cap: u32| caps & (1 << cap) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

/// Everything that must hold before loading: privileges, kernel version, BTF.
pub fn check() -> Result<(), PreflightError> {
    let caps = effective_capabilities();
    if !privileged(caps) {
        return Err(PreflightError::NotPrivileged {
            caps: format!("{caps:#x}"),
        });
    }
    if let Some((found, _)) = KernelVersion::current()
        && found < KernelVersion::MINIMUM
    {
        return Err(PreflightError::OldKernel {
            found,
            needed: KernelVersion::MINIMUM,
        });
    }
    if !std::path::Path::new(VMLINUX).exists() {
        return Err(PreflightError::NoBtf);
    }
    Ok(())
}

/// This process's seccomp mode (`Seccomp:` in /proc/self/status): 2 when a filter is
/// installed, as container runtimes do by default.
fn seccomp_mode() -> Option<u32> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))?
        .trim()
        .parse()
        .ok()
}

/// An error and its causes, `a: b: c`, leaving out a cause whose text the previous one already
/// ends with.
pub fn causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let next = e.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = e.source();
    }
    text
}

/// What to do about a load that the kernel refused although the capabilities were there: the
/// usual reason is a container runtime's default seccomp profile, which lets some bpf() calls
/// through and refuses others.
pub fn load_hint(error: &aya::EbpfError) -> String {
    let mut refused = false;
    let mut cause: Option<&dyn std::error::Error> = Some(error);
    while let Some(e) = cause {
        refused |= e.to_string().contains("(os error 1)");
        cause = e.source();
    }
    if refused && seccomp_mode() == Some(2) {
        " (a seccomp filter is active, as container runtimes install by default, and it \
         refuses bpf() calls: run tracer's container without it, Kubernetes: securityContext \
         seccompProfile type Unconfined; docker and podman: --security-opt seccomp=unconfined)"
            .to_string()
    } else {
        String::new()
    }
}

/// Lifts the locked-memory limit, which kernels before 5.11 charge BPF maps against.
pub fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct; failure only matters on old kernels and shows at load.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    if rc != 0 {
        tracing::debug!(
            "could not lift RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn an_errors_causes_are_told_once_each() {
        let error = Layer(
            "map error",
            Some(Box::new(Layer(
                "failed to create map `X`",
                Some(Box::new(Layer(
                    "failed to create map `X`",
                    Some(Box::new(Layer(
                        "Operation not permitted (os error 1)",
                        None,
                    ))),
                ))),
            ))),
        );
        assert_eq!(
            causes(&error),
            "map error: failed to create map `X`: Operation not permitted (os error 1)"
        );
    }

    #[test]
    fn parses_kernel_releases() {
        assert_eq!(
            KernelVersion::parse("6.18.44-fc-v657"),
            Some(KernelVersion(6, 18, 44))
        );
        assert_eq!(
            KernelVersion::parse("5.15.0-91-generic"),
            Some(KernelVersion(5, 15, 0))
        );
        assert_eq!(KernelVersion::parse("6.1"), Some(KernelVersion(6, 1, 0)));
        assert_eq!(KernelVersion::parse("garbage"), None);
        assert!(KernelVersion(5, 4, 0) < KernelVersion::MINIMUM);
        assert!(KernelVersion(6, 18, 44) > KernelVersion::MINIMUM);
    }

    #[test]
    fn privileges_need_sys_admin_or_bpf_with_perfmon() {
        assert!(privileged(1 << CAP_SYS_ADMIN));
        assert!(privileged((1 << CAP_BPF) | (1 << CAP_PERFMON)));
        assert!(!privileged(1 << CAP_BPF));
        assert!(!privileged(0));
        assert!(privileged(0x1ff_ffff_ffff));
    }
}
