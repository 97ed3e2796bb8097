//! Kubernetes containers named from their OCI bundles, for nodes whose runtime has no Docker API
//! (containerd, CRI-O: most Kubernetes nodes). Both runtimes write the pod's namespace and name,
//! the container's name and its image into the annotations of each running container's
//! `config.json`, in a bundle directory under `/run`:
//!
//! - containerd: `/run/containerd/io.containerd.runtime.v2.task/NAMESPACE/ID/config.json`
//!   (`io.kubernetes.cri.container-name`, `…sandbox-name`, `…sandbox-namespace`,
//!   `…image-name`; the CRI plugin's namespace is `k8s.io`);
//! - CRI-O: `/run/containers/storage/overlay-containers/ID/userdata/config.json`
//!   (`io.kubernetes.container.name`, `io.kubernetes.pod.name`, `…pod.namespace`,
//!   `io.kubernetes.cri-o.ImageName`).
//!
//! The id comes from the process's cgroup path (`cri-containerd-ID.scope`, `crio-ID.scope`).
//! No CRI (gRPC) client and no kubelet: a file read per container, the first time one of its
//! processes listens or fails. Under the DaemonSet the host's `/run` is mounted at `/host/run`.
//!
//! The files are others' words: their size is bounded, and names are escaped and cut.

use std::{
    collections::HashMap,
    io::Read as _,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::runtime::name;
use crate::classify::containers::{ContainerId, container_id_in};

/// Where the host's `/run` may be: on the host, or mounted by the DaemonSet.
pub const RUN_DIRS: &[&str] = &["/run", "/host/run"];

/// containerd's running tasks, one directory per containerd namespace, under a `/run`.
const CONTAINERD_TASKS: &str = "containerd/io.containerd.runtime.v2.task";
/// CRI-O's (and Podman's) running containers, under a `/run`.
const CONTAINERS_STORAGE: &str = "containers/storage/overlay-containers";
/// A bundle's `config.json` is a few tens of KiB; larger ones are not read.
const MAX_CONFIG_BYTES: u64 = 4 << 20;
/// containerd namespaces looked through.
const MAX_NAMESPACES: usize = 64;
/// Containers remembered (found or not).
const MAX_CACHED: usize = 4096;

#[derive(Deserialize)]
struct Spec {
    #[serde(default)]
    annotations: HashMap<String, String>,
}

/// Finds containers' names in their bundles, and remembers them.
pub struct Bundles {
    run_dirs: Vec<PathBuf>,
    cache: HashMap<String, Option<ContainerId>>,
}

impl Bundles {
    pub fn new() -> Bundles {
        Bundles::with_run_dirs(RUN_DIRS.iter().map(PathBuf::from).collect())
    }

    /// Over other `/run` directories (for tests).
    pub fn with_run_dirs(run_dirs: Vec<PathBuf>) -> Bundles {
        Bundles {
            run_dirs,
            cache: HashMap::new(),
        }
    }

    /// The Kubernetes container a cgroup path (`…/cri-containerd-ID.scope`) names.
    pub fn of_cgroup_path(&mut self, path: &str) -> Option<ContainerId> {
        let id = container_id_in(path)?.to_string();
        self.of_container(&id)
    }

    /// The Kubernetes container with this full id (64 hex digits), when a bundle names it.
    pub fn of_container(&mut self, full_id: &str) -> Option<ContainerId> {
        if let Some(found) = self.cache.get(full_id) {
            return found.clone();
        }
        let found = self
            .run_dirs
            .iter()
            .flat_map(|run| configs(run, full_id))
            .find_map(|config| read_config(&config).and_then(|a| identity(&a, full_id)));
        if self.cache.len() >= MAX_CACHED {
            self.cache.clear();
        }
        self.cache.insert(full_id.to_string(), found.clone());
        found
    }
}

impl Default for Bundles {
    fn default() -> Bundles {
        Bundles::new()
    }
}

/// The runtimes' bundle folders found on this host, with how many containers each holds now
/// (for `tracer check`).
pub fn census() -> Vec<(PathBuf, usize)> {
    let count = |dir: &Path| std::fs::read_dir(dir).map_or(0, |d| d.filter_map(Result::ok).count());
    let mut found = Vec::new();
    for run in RUN_DIRS.iter().map(Path::new) {
        if let Ok(namespaces) = std::fs::read_dir(run.join(CONTAINERD_TASKS)) {
            for ns in namespaces.filter_map(Result::ok).take(MAX_NAMESPACES) {
                found.push((ns.path(), count(&ns.path())));
            }
        }
        let storage = run.join(CONTAINERS_STORAGE);
        if storage.is_dir() {
            found.push((storage.clone(), count(&storage)));
        }
    }
    found
}

/// Where container `id`'s `config.json` may be under the `/run` directory `run`.
fn configs(run: &Path, id: &str) -> Vec<PathBuf> {
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Vec::new();
    }
    let mut found = vec![
        run.join(CONTAINERS_STORAGE)
            .join(id)
            .join("userdata/config.json"),
    ];
    if let Ok(namespaces) = std::fs::read_dir(run.join(CONTAINERD_TASKS)) {
        found.extend(
            namespaces
                .filter_map(Result::ok)
                .take(MAX_NAMESPACES)
                .map(|ns| ns.path().join(id).join("config.json")),
        );
    }
    found
}

/// A bundle's annotations, when the file is there, small enough and JSON.
fn read_config(path: &Path) -> Option<HashMap<String, String>> {
    let file = std::fs::File::open(path).ok()?;
    let mut text = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut text)
        .ok()?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return None;
    }
    serde_json::from_slice::<Spec>(&text)
        .ok()
        .map(|spec| spec.annotations)
}

/// A Kubernetes container's identity from its bundle's annotations (containerd's CRI plugin's
/// or CRI-O's); none for a pod's sandbox (its pause process) or a container no kubelet made.
pub fn identity(annotations: &HashMap<String, String>, full_id: &str) -> Option<ContainerId> {
    let get = |keys: &[&str]| keys.iter().find_map(|k| annotations.get(*k));
    let kind = get(&[
        "io.kubernetes.cri.container-type",
        "io.kubernetes.cri-o.ContainerType",
    ]);
    if kind.is_some_and(|k| k == "sandbox") {
        return None;
    }
    let container = get(&[
        "io.kubernetes.cri.container-name",
        "io.kubernetes.container.name",
    ])?;
    let pod = get(&["io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name"]);
    let namespace = get(&[
        "io.kubernetes.cri.sandbox-namespace",
        "io.kubernetes.pod.namespace",
    ]);
    let image = get(&[
        "io.kubernetes.cri.image-name",
        "io.kubernetes.cri-o.ImageName",
    ]);
    Some(ContainerId {
        id: full_id.get(..12)?.to_string(),
        name: name(container, 128),
        image: image.map_or_else(String::new, |i| name(i, 256)),
        pod: match (namespace, pod) {
            (Some(ns), Some(pod)) => Some(format!("{}/{}", name(ns, 128), name(pod, 128))),
            _ => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "7be7ca56452ce0f69575654683e3b8cdc61d8898d06caf92fbf5ffffcd856bd7";

    fn bundle(run: &Path, at: &str, annotations: &str) {
        let path = run.join(at);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(
            path,
            format!(r#"{{"ociVersion":"1.0.2","process":{{}},"annotations":{annotations}}}"#),
        )
        .unwrap();
    }

    #[test]
    fn names_containerd_and_cri_o_containers_from_their_bundles() {
        let run = std::env::temp_dir().join(format!("tracer-bundles-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run);
        bundle(
            &run,
            &format!("{CONTAINERD_TASKS}/k8s.io/{ID}/config.json"),
            r#"{"io.kubernetes.cri.container-type":"container",
                "io.kubernetes.cri.container-name":"web",
                "io.kubernetes.cri.image-name":"shop:1.4",
                "io.kubernetes.cri.sandbox-name":"shop-7d9",
                "io.kubernetes.cri.sandbox-namespace":"default"}"#,
        );
        let crio = ID.replace('7', "8");
        bundle(
            &run,
            &format!("{CONTAINERS_STORAGE}/{crio}/userdata/config.json"),
            r#"{"io.kubernetes.cri-o.ContainerType":"container",
                "io.kubernetes.container.name":"edge\u001b[31m",
                "io.kubernetes.cri-o.ImageName":"nginx:1.27",
                "io.kubernetes.pod.name":"edge-0","io.kubernetes.pod.namespace":"ingress"}"#,
        );
        let sandbox = ID.replace('7', "9");
        bundle(
            &run,
            &format!("{CONTAINERD_TASKS}/k8s.io/{sandbox}/config.json"),
            r#"{"io.kubernetes.cri.container-type":"sandbox",
                "io.kubernetes.cri.sandbox-name":"shop-7d9"}"#,
        );
        let mut bundles = Bundles::with_run_dirs(vec![run.join("nothing"), run.clone()]);
        let web = bundles.of_container(ID).expect("containerd's bundle");
        assert_eq!(web.name, "web");
        assert_eq!(web.image, "shop:1.4");
        assert_eq!(web.pod.as_deref(), Some("default/shop-7d9"));
        assert_eq!(web.id, &ID[..12]);
        let edge = bundles.of_container(&crio).expect("CRI-O's bundle");
        assert_eq!(edge.name, "edge\\x1b[31m", "escaped");
        assert_eq!(edge.pod.as_deref(), Some("ingress/edge-0"));
        assert_eq!(
            bundles.of_container(&sandbox),
            None,
            "a pod's pause container"
        );
        assert_eq!(bundles.of_container(&ID.replace('7', "a")), None);
        assert_eq!(bundles.of_container("../../etc"), None);
        let _ = std::fs::remove_dir_all(&run);
    }
}
