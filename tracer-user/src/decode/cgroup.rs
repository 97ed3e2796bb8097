//! cgroup ids (as `bpf_get_current_cgroup_id` gives them) into cgroup paths, for a container or
//! service label: `/system.slice/nginx.service`, `/kubepods.slice/…/cri-containerd-….scope`.
//!
//! A cgroup v2 id is the inode number of its directory in the cgroup2 file system, so the paths
//! are found by walking that tree. The walk is cached and redone at most every few seconds when
//! an unknown id shows up.

use std::{
    collections::HashMap,
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::text::untrusted;

/// Resolves cgroup ids to paths relative to the cgroup2 root.
pub struct CgroupPaths {
    root: Option<PathBuf>,
    paths: HashMap<u64, String>,
    last_walk: Option<Instant>,
}

const WALK_AT_MOST_EVERY: Duration = Duration::from_secs(5);

impl CgroupPaths {
    /// Finds the cgroup2 mount (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid hosts).
    pub fn new() -> CgroupPaths {
        CgroupPaths {
            root: cgroup2_mount(),
            paths: HashMap::new(),
            last_walk: None,
        }
    }

    /// A resolver over a given tree (for tests).
    pub fn with_root(root: &Path) -> CgroupPaths {
        CgroupPaths {
            root: Some(root.to_path_buf()),
            paths: HashMap::new(),
            last_walk: None,
        }
    }

    /// The path of cgroup `id`, `/` for the root, or `None` when it is not (or no longer) there.
    pub fn path(&mut self, id: u64) -> Option<String> {
        if let Some(path) = self.paths.get(&id) {
            return Some(path.clone());
        }
        let due = self
            .last_walk
            .is_none_or(|at| at.elapsed() >= WALK_AT_MOST_EVERY);
        if due {
            self.walk();
        }
        self.paths.get(&id).cloned()
    }

    fn walk(&mut self) {
        self.last_walk = Some(Instant::now());
        let Some(root) = self.root.clone() else {
            return;
        };
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            if let Ok(meta) = std::fs::metadata(&dir) {
                let relative = dir.strip_prefix(&root).unwrap_or(Path::new(""));
                self.paths.insert(
                    meta.ino(),
                    format!("/{}", untrusted(relative.as_os_str().as_bytes())),
                );
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            stack.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
}

impl Default for CgroupPaths {
    fn default() -> Self {
        CgroupPaths::new()
    }
}

/// Where the cgroup2 hierarchy is mounted, from /proc/self/mountinfo.
fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        // … mount-point … - fstype source options
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_paths_by_directory_inode() {
        let root = std::env::temp_dir().join(format!("tracer-cgroup-test-{}", std::process::id()));
        let service = root.join("system.slice").join("nginx.service");
        std::fs::create_dir_all(&service).unwrap();
        let mut paths = CgroupPaths::with_root(&root);
        let id = std::fs::metadata(&service).unwrap().ino();
        assert_eq!(
            paths.path(id).as_deref(),
            Some("/system.slice/nginx.service")
        );
        let root_id = std::fs::metadata(&root).unwrap().ino();
        assert_eq!(paths.path(root_id).as_deref(), Some("/"));
        assert_eq!(paths.path(1), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn finds_this_hosts_cgroup2_mount() {
        let Some(mount) = cgroup2_mount() else {
            crate::skip("this machine has no cgroup2 mount");
            return;
        };
        assert!(mount.is_dir(), "{}", mount.display());
        // The root's id resolves to `/`, through the mount found.
        let root_id = std::fs::metadata(&mount).unwrap().ino();
        assert_eq!(CgroupPaths::new().path(root_id).as_deref(), Some("/"));
    }
}
