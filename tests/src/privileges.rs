//! Running a command as an unprivileged user that holds only some capabilities, the way a
//! systemd unit with `DynamicUser=` and `AmbientCapabilities=` runs it.

use std::{os::unix::process::CommandExt as _, process::Command};

/// A capability's number from its name (`CAP_BPF`), for the ones tracer's deployments use.
pub fn capability(name: &str) -> Option<u32> {
    Some(match name {
        "CAP_DAC_READ_SEARCH" => 2,
        "CAP_SYS_ADMIN" => 21,
        "CAP_SYS_RESOURCE" => 24,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        "CAP_NET_ADMIN" => 12,
        _ => return None,
    })
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Makes `command` run as `uid`/`gid` with exactly `caps` (as ambient capabilities).
pub fn run_as(command: &mut Command, uid: u32, gid: u32, caps: &[u32]) {
    let caps = caps.to_vec();
    // SAFETY: only async-signal-safe system calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            let check = |rc: libc::c_long| {
                if rc < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) as libc::c_long)?;
            check(libc::setgroups(0, std::ptr::null()) as libc::c_long)?;
            check(libc::setresgid(gid, gid, gid) as libc::c_long)?;
            check(libc::setresuid(uid, uid, uid) as libc::c_long)?;
            let mut data = [CapData::default(); 2];
            for cap in &caps {
                let (word, bit) = ((*cap / 32) as usize, 1u32 << (cap % 32));
                data[word].permitted |= bit;
                data[word].effective |= bit;
                data[word].inheritable |= bit;
            }
            let header = CapHeader {
                version: LINUX_CAPABILITY_VERSION_3,
                pid: 0,
            };
            check(libc::syscall(libc::SYS_capset, &header, data.as_ptr()))?;
            for cap in &caps {
                check(libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    *cap as libc::c_ulong,
                    0,
                    0,
                ) as libc::c_long)?;
            }
            Ok(())
        });
    }
}
