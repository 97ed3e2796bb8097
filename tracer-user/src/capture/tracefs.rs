//! Finding (or mounting) tracefs, and reading tracepoint format files.
//!
//! Classic tracepoints are attached through tracefs, and their record layout is published there
//! in `events/<category>/<name>/format`. On a fresh machine tracefs may not be mounted at all.

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use thiserror::Error;

/// Where tracefs is normally mounted, and the older place under debugfs.
pub const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

#[derive(Debug, Error)]
pub enum TracefsError {
    #[error(
        "tracefs is mounted at {0} but this process cannot read it: run tracer as root or give \
         it CAP_DAC_READ_SEARCH"
    )]
    Unreadable(String),
    #[error(
        "tracefs is not mounted and mounting it at {TRACEFS} failed: {0}; \
         mount it yourself: mount -t tracefs nodev {TRACEFS}"
    )]
    Mount(std::io::Error),
    #[error("the tracepoint {category}:{name} is not in this kernel ({path}: {source})")]
    NoTracepoint {
        category: String,
        name: String,
        path: String,
        source: std::io::Error,
    },
    #[error("the format of {category}:{name} has no field `{field}`")]
    NoField {
        category: String,
        name: String,
        field: String,
    },
}

/// A mounted tracefs.
#[derive(Debug, Clone)]
pub struct Tracefs {
    pub path: PathBuf,
    /// True when tracer mounted it itself.
    pub mounted_now: bool,
}

impl Tracefs {
    /// The mounted tracefs, mounting it at [`TRACEFS`] when it is nowhere to be found.
    pub fn find_or_mount() -> Result<Tracefs, TracefsError> {
        if let Some(path) = Tracefs::find() {
            return Ok(Tracefs {
                path,
                mounted_now: false,
            });
        }
        if let Some(mounted) = mount_points().into_iter().next() {
            return Err(TracefsError::Unreadable(mounted));
        }
        mount_tracefs(Path::new(TRACEFS)).map_err(TracefsError::Mount)?;
        Ok(Tracefs {
            path: PathBuf::from(TRACEFS),
            mounted_now: true,
        })
    }

    /// The mounted tracefs, if any.
    pub fn find() -> Option<PathBuf> {
        [TRACEFS, DEBUGFS_TRACING]
            .iter()
            .map(PathBuf::from)
            .find(|path| path.join("events").is_dir())
    }

    /// The fields of tracepoint `category:name`.
    pub fn format(&self, category: &str, name: &str) -> Result<Format, TracefsError> {
        let path = self
            .path
            .join("events")
            .join(category)
            .join(name)
            .join("format");
        let text = std::fs::read_to_string(&path).map_err(|source| TracefsError::NoTracepoint {
            category: category.to_string(),
            name: name.to_string(),
            path: path.display().to_string(),
            source,
        })?;
        Ok(Format {
            category: category.to_string(),
            name: name.to_string(),
            fields: parse_format(&text),
        })
    }
}

/// Where tracefs is mounted, from /proc/self/mountinfo.
pub fn mount_points() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == "tracefs")
                .then(|| left.split_whitespace().nth(4).map(str::to_string))?
        })
        .collect()
}

fn mount_tracefs(target: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(target)?;
    let source = CString::new("nodev").expect("no NUL");
    let fstype = CString::new("tracefs").expect("no NUL");
    let target =
        CString::new(target.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One field of a tracepoint record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub offset: u32,
    pub size: u32,
}

/// The record layout of one tracepoint.
#[derive(Debug, Clone)]
pub struct Format {
    pub category: String,
    pub name: String,
    pub fields: Vec<Field>,
}

impl Format {
    /// The offset of `field`, checking that it has the size the programs read.
    pub fn offset(&self, field: &str, size: u32) -> Result<u32, TracefsError> {
        self.fields
            .iter()
            .find(|f| f.name == field && f.size == size)
            .map(|f| f.offset)
            .ok_or_else(|| TracefsError::NoField {
                category: self.category.clone(),
                name: self.name.clone(),
                field: format!("{field} ({size} bytes)"),
            })
    }
}

/// Parses the `field:` lines of a format file, e.g.
/// `field:struct sockaddr * uservaddr;<TAB>offset:24;<TAB>size:8;<TAB>signed:0;`.
pub fn parse_format(text: &str) -> Vec<Field> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim().strip_prefix("field:")?;
            let mut parts = line.split(';').map(str::trim);
            let declaration = parts.next()?;
            let mut offset = None;
            let mut size = None;
            for part in parts {
                if let Some(v) = part.strip_prefix("offset:") {
                    offset = v.parse().ok();
                } else if let Some(v) = part.strip_prefix("size:") {
                    size = v.parse().ok();
                }
            }
            let name = declaration.rsplit([' ', '*']).next()?;
            let name = name.split('[').next()?.to_string();
            Some(Field {
                name,
                offset: offset?,
                size: size?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYS_ENTER_CONNECT: &str = "name: sys_enter_connect
ID: 1711
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;
\tfield:int fd;\toffset:16;\tsize:8;\tsigned:0;
\tfield:struct sockaddr * uservaddr;\toffset:24;\tsize:8;\tsigned:0;
\tfield:int addrlen;\toffset:32;\tsize:8;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:40;\tsize:4;\tsigned:0;

print fmt: \"fd: 0x%08lx\", ((unsigned long)(REC->fd))
";

    #[test]
    fn parses_fields_with_pointers_and_arrays() {
        let fields = parse_format(SYS_ENTER_CONNECT);
        assert_eq!(fields.len(), 9);
        let format = Format {
            category: "syscalls".into(),
            name: "sys_enter_connect".into(),
            fields,
        };
        assert_eq!(format.offset("fd", 8).unwrap(), 16);
        assert_eq!(format.offset("uservaddr", 8).unwrap(), 24);
        assert_eq!(format.offset("addrlen", 8).unwrap(), 32);
        assert_eq!(format.offset("saddr", 4).unwrap(), 40);
        assert_eq!(format.offset("common_pid", 4).unwrap(), 4);
    }

    #[test]
    fn a_missing_field_or_a_different_size_is_an_error() {
        let format = Format {
            category: "syscalls".into(),
            name: "sys_enter_connect".into(),
            fields: parse_format(SYS_ENTER_CONNECT),
        };
        let err = format.offset("uservaddr", 4).unwrap_err().to_string();
        assert!(err.contains("syscalls:sys_enter_connect has no field `uservaddr (4 bytes)`"));
        assert!(format.offset("nothing", 8).is_err());
    }
}
