//! The container runtime's own account of its containers, from the Docker Engine API on its Unix
//! socket: Docker's (`/var/run/docker.sock`) and Podman's service (`/run/podman/podman.sock`),
//! which serves the same API. At start every container is inspected; then the runtime's event
//! stream says when one starts, dies (and how), is OOM-killed or removed, and each is inspected
//! again. What it says goes into `classify::containers`. A container the agent meets before
//! the runtime's event about it has come (a listener's or a proxy's process in a container the
//! model does not know: Podman's service, freshly started, reports late) is *sighted*: its id
//! comes down a bounded channel and is inspected at once.
//!
//! The runtime's answers are others' words: names and images are escaped and cut, and bodies,
//! lines and the number of containers are bounded.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use serde::Deserialize;

use crate::{
    classify::containers::{ContainerId, Containers, Observed},
    decode::text::untrusted,
    export::http::{Server, get, get_stream},
};

/// Where runtimes put their API socket, in the order tried: on the host, then under
/// `/host/run`, where tracer's DaemonSet mounts the host's `/run` (read-only: connecting to a
/// socket is allowed there).
pub const SOCKETS: &[&str] = &[
    "/var/run/docker.sock",
    "/run/docker.sock",
    "/run/podman/podman.sock",
    "/host/run/docker.sock",
    "/host/run/podman/podman.sock",
];

/// The first runtime socket on this host that accepts a connection now (a socket file left by
/// a runtime that is gone does not). A runtime started after tracer is followed only when named
/// with `--container-runtime SOCKET`, which is retried until it answers.
pub fn find_socket() -> Option<PathBuf> {
    SOCKETS
        .iter()
        .map(PathBuf::from)
        .find(|p| std::os::unix::net::UnixStream::connect(p).is_ok())
}

/// At most this many containers are inspected at start.
const MAX_LISTED: usize = 4096;
/// How long to wait before following the runtime again after it went away.
const RETRY: Duration = Duration::from_secs(5);

#[derive(Deserialize)]
struct Listed {
    #[serde(rename = "Id")]
    id: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct Inspect {
    id: String,
    name: String,
    config: InspectConfig,
    state: InspectState,
    restart_count: u32,
    host_config: InspectHost,
    network_settings: InspectNetwork,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct InspectConfig {
    image: String,
    labels: Option<std::collections::HashMap<String, String>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct InspectState {
    running: bool,
    restarting: bool,
    #[serde(rename = "OOMKilled")]
    oom_killed: bool,
    exit_code: i64,
    started_at: String,
    finished_at: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct InspectHost {
    memory: u64,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct InspectNetwork {
    #[serde(rename = "IPAddress")]
    ip_address: String,
    networks: Option<std::collections::HashMap<String, InspectEndpoint>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct InspectEndpoint {
    #[serde(rename = "IPAddress")]
    ip_address: String,
    #[serde(rename = "GlobalIPv6Address")]
    global_ipv6_address: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Event {
    #[serde(rename = "Type")]
    kind: String,
    #[serde(rename = "Action")]
    action: String,
    #[serde(rename = "Actor")]
    actor: Actor,
    #[serde(rename = "timeNano")]
    time_nano: u64,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct Actor {
    #[serde(rename = "ID")]
    id: String,
    attributes: std::collections::HashMap<String, String>,
}

/// A name from the runtime, escaped and cut to `max` characters.
pub(crate) fn name(text: &str, max: usize) -> String {
    let text = untrusted(text.as_bytes());
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// A runtime time (RFC 3339, UTC); runtimes say `0001-01-01T00:00:00Z` for never.
fn time(text: &str) -> Option<SystemTime> {
    let utc = text.strip_suffix("+00:00").map(|t| format!("{t}Z"));
    humantime::parse_rfc3339(utc.as_deref().unwrap_or(text))
        .ok()
        .filter(|t| *t > SystemTime::UNIX_EPOCH)
}

impl Inspect {
    fn observed(self) -> Option<Observed> {
        if self.id.len() < 12 || !self.id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let labels = self.config.labels.unwrap_or_default();
        let label = |key: &str| labels.get(key).map(|v| name(v, 128));
        let pod = match (
            label("io.kubernetes.pod.namespace"),
            label("io.kubernetes.pod.name"),
        ) {
            (Some(ns), Some(pod)) => Some(format!("{ns}/{pod}")),
            _ => None,
        };
        let container_name = label("io.kubernetes.container.name")
            .unwrap_or_else(|| name(self.name.trim_start_matches('/'), 128));
        let mut addresses: Vec<IpAddr> = Vec::new();
        let mut add = |text: &str| {
            if let Ok(ip) = text.parse::<IpAddr>()
                && !addresses.contains(&ip)
            {
                addresses.push(ip);
            }
        };
        add(&self.network_settings.ip_address);
        for endpoint in self.network_settings.networks.unwrap_or_default().values() {
            add(&endpoint.ip_address);
            add(&endpoint.global_ipv6_address);
        }
        Some(Observed {
            who: ContainerId {
                id: self.id[..12].to_string(),
                name: container_name,
                image: name(&self.config.image, 256),
                pod,
            },
            full_id: self.id,
            running: self.state.running,
            restarting: self.state.restarting,
            oom_killed: self.state.oom_killed,
            exit_code: self.state.exit_code,
            started_at: time(&self.state.started_at),
            finished_at: time(&self.state.finished_at),
            restart_count: self.restart_count,
            memory_limit: (self.host_config.memory > 0).then_some(self.host_config.memory),
            addresses,
        })
    }
}

async fn inspect(socket: &Path, id: &str) -> std::io::Result<Option<Observed>> {
    if !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Ok(None);
    }
    let body = get(Server::Unix(socket), &format!("/containers/{id}/json")).await?;
    let inspected: Inspect = serde_json::from_str(&body).map_err(std::io::Error::other)?;
    Ok(inspected.observed())
}

/// Containers sighted by the agent before the runtime told of them (full ids).
pub type Sightings = tokio::sync::mpsc::Receiver<String>;

/// How many sightings may wait for the follower; more are dropped (and sighted again later).
pub const SIGHTINGS: usize = 64;

/// Follows the runtime at `socket` for as long as the agent runs, reconnecting when it goes
/// away, and keeps `containers` up to date; inspects each container `sightings` names.
pub async fn follow(socket: PathBuf, containers: Arc<Mutex<Containers>>, mut sightings: Sightings) {
    let mut warned = false;
    loop {
        match follow_once(&socket, &containers, &mut sightings, &mut warned).await {
            Ok(()) => tracing::info!(
                "the container runtime at {} closed its event stream",
                socket.display()
            ),
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(
                    "container runtime at {}: {e}; containers are not named until it answers \
                     (retrying every {} s)",
                    socket.display(),
                    RETRY.as_secs()
                );
            }
            Err(_) => {}
        }
        tokio::time::sleep(RETRY).await;
    }
}

fn lock(containers: &Mutex<Containers>) -> std::sync::MutexGuard<'_, Containers> {
    containers.lock().unwrap_or_else(|p| p.into_inner())
}

async fn follow_once(
    socket: &Path,
    containers: &Mutex<Containers>,
    sightings: &mut Sightings,
    warned: &mut bool,
) -> std::io::Result<()> {
    // Events from before the listing on, so that nothing between the two is missed.
    let since = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let listed: Vec<Listed> =
        serde_json::from_str(&get(Server::Unix(socket), "/containers/json?all=1").await?)
            .map_err(std::io::Error::other)?;
    for entry in listed.iter().take(MAX_LISTED) {
        if let Some(observed) = inspect(socket, &entry.id).await? {
            lock(containers).observe(observed, SystemTime::now());
        }
    }
    if *warned {
        tracing::info!(
            "the container runtime at {} answers again",
            socket.display()
        );
        *warned = false;
    }
    tracing::debug!("{} containers from {}", listed.len(), socket.display());
    // filters={"type":["container"]}
    let path = format!("/events?since={since}&filters=%7B%22type%22%3A%5B%22container%22%5D%7D");
    // Podman's service answers the stream's request only with its first event: sightings are
    // served meanwhile too.
    let opening = get_stream(Server::Unix(socket), &path);
    tokio::pin!(opening);
    let mut events = loop {
        tokio::select! {
            opened = &mut opening => break opened?,
            Some(id) = sightings.recv() => inspect_sighted(socket, containers, &id).await,
        }
    };
    loop {
        tokio::select! {
            line = events.next_line() => match line? {
                Some(line) => on_event(socket, containers, &line).await,
                None => return Ok(()),
            },
            Some(id) = sightings.recv() => inspect_sighted(socket, containers, &id).await,
        }
    }
}

/// A container the agent met before the runtime told of it.
async fn inspect_sighted(socket: &Path, containers: &Mutex<Containers>, id: &str) {
    if lock(containers).of_full_id(id).is_none()
        && let Ok(Some(observed)) = inspect(socket, id).await
    {
        tracing::debug!(
            "container {} inspected as soon as met",
            &id[..12.min(id.len())]
        );
        lock(containers).observe(observed, SystemTime::now());
    }
}

/// One line of the runtime's event stream.
async fn on_event(socket: &Path, containers: &Mutex<Containers>, line: &str) {
    let Ok(event) = serde_json::from_str::<Event>(line) else {
        return;
    };
    if event.kind != "container" {
        return;
    }
    let id = event.actor.id.as_str();
    let at = SystemTime::UNIX_EPOCH + Duration::from_nanos(event.time_nano);
    match event.action.as_str() {
        "oom" => lock(containers).oom(id, at),
        "die" => {
            let code = event
                .actor
                .attributes
                .get("exitCode")
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            if let Ok(Some(observed)) = inspect(socket, id).await {
                lock(containers).observe(observed, at);
            }
            lock(containers).died(id, at, code);
        }
        "destroy" | "remove" => lock(containers).removed(id, at),
        "start" | "restart" | "rename" | "update" | "create" | "stop" | "kill" | "connect"
        | "disconnect" => {
            if let Ok(Some(observed)) = inspect(socket, id).await {
                lock(containers).observe(observed, at);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_docker_inspect() {
        let body = r#"{"Id":"16daf7440aa0a8c8824462c87fad73d07b41a1b06fc9d1edb8707d8f18cb4cc0",
            "Name":"/web-1\u001b[2J","RestartCount":2,
            "Config":{"Image":"shop:1.4","Labels":{}},
            "State":{"Running":true,"Restarting":false,"OOMKilled":false,"ExitCode":0,
                     "StartedAt":"2026-11-30T11:08:59.665123456Z","FinishedAt":"0001-01-01T00:00:00Z"},
            "HostConfig":{"Memory":33554432},
            "NetworkSettings":{"IPAddress":"","Networks":{"tracer-test":{"IPAddress":"172.31.77.5","GlobalIPv6Address":""}}}}"#;
        let inspected: Inspect = serde_json::from_str(body).unwrap();
        let o = inspected.observed().unwrap();
        assert_eq!(o.who.id, "16daf7440aa0");
        assert_eq!(o.who.name, "web-1\\x1b[2J", "escaped");
        assert_eq!(o.who.image, "shop:1.4");
        assert_eq!(o.addresses, ["172.31.77.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(o.memory_limit, Some(32 << 20));
        assert_eq!(o.restart_count, 2);
        assert!(o.running);
        assert_eq!(o.finished_at, None, "0001-01-01 is never");
        let started = o.started_at.unwrap();
        assert_eq!(
            humantime::format_rfc3339_nanos(started).to_string(),
            "2026-11-30T11:08:59.665123456Z"
        );
    }

    #[test]
    fn names_a_kubernetes_containers_pod() {
        let body = r#"{"Id":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "Name":"/k8s_web_shop-7d9_default_1234_0",
            "Config":{"Image":"shop:1.4","Labels":{"io.kubernetes.pod.namespace":"default",
              "io.kubernetes.pod.name":"shop-7d9","io.kubernetes.container.name":"web"}},
            "State":{"Running":true}}"#;
        let o = serde_json::from_str::<Inspect>(body)
            .unwrap()
            .observed()
            .unwrap();
        assert_eq!(o.who.name, "web");
        assert_eq!(o.who.pod.as_deref(), Some("default/shop-7d9"));
    }

    /// A runtime that lists no container and holds its event stream's answer back (as a fresh
    /// Podman service does until its first event), but answers inspects.
    async fn holding_runtime(socket: PathBuf, id: &'static str) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut request = vec![0u8; 4096];
                let n = conn.read(&mut request).await.unwrap_or(0);
                let line = String::from_utf8_lossy(&request[..n]).into_owned();
                let body = if line.starts_with("GET /containers/json") {
                    "[]".to_string()
                } else if line.starts_with(&format!("GET /containers/{id}/json")) {
                    format!(
                        r#"{{"Id":"{id}","Name":"/edge","Config":{{"Image":"nginx:1.22"}},
                        "State":{{"Running":true}}}}"#
                    )
                } else {
                    // The event stream: no answer, for as long as the test runs.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return;
                };
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            });
        }
    }

    #[tokio::test]
    async fn a_sighted_container_is_inspected_while_the_event_stream_is_silent() {
        let id = "5ee1e5ee1e5ee1e5ee1e5ee1e5ee1e5ee1e5ee1e5ee1e5ee1e5ee1e5ee1e5ee1";
        let dir = std::env::temp_dir().join(format!("tracer-runtime-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("runtime.sock");
        tokio::spawn(holding_runtime(socket.clone(), id));
        let containers = Arc::new(Mutex::new(Containers::default()));
        let (tell, sightings) = tokio::sync::mpsc::channel(SIGHTINGS);
        let follower = tokio::spawn(follow(socket, containers.clone(), sightings));
        tell.send(id.to_string()).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let named = loop {
            if let Some(who) = lock(&containers).of_full_id(id).cloned() {
                break who;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the sighted container was never inspected"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(
            (named.name.as_str(), named.image.as_str()),
            ("edge", "nginx:1.22")
        );
        follower.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn refuses_ids_that_are_not_hex_and_cuts_long_names() {
        let bad: Inspect = serde_json::from_str(r#"{"Id":"../../etc"}"#).unwrap();
        assert!(bad.observed().is_none());
        assert_eq!(name(&"x".repeat(300), 128).chars().count(), 129);
    }
}
