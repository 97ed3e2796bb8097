//! The event stream: one line per failed upstream attempt, as text or JSON, with filters.

use std::{
    net::{IpAddr, SocketAddr},
    str::FromStr,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    classify::{Classified, Notice, containers::ContainerId, errno_name, explain, source_name},
    decode::{Failure, Upstream, alert_text, escape_bytes},
};

/// Which upstreams `--upstream` selects: `ip:port`, `[ipv6]:port`, `ip`, `:port`, or
/// `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamMatch {
    Addr(SocketAddr),
    Ip(IpAddr),
    Port(u16),
    Unix(String),
}

impl FromStr for UpstreamMatch {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:")
            && !path.is_empty()
        {
            return Ok(UpstreamMatch::Unix(path.to_string()));
        }
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(UpstreamMatch::Addr(addr));
        }
        // An IP alone, an IPv6 one with or without its brackets (both, or neither).
        let bare = s
            .strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))
            .unwrap_or(s);
        if let Ok(ip) = bare.parse::<IpAddr>()
            && (bare == s || ip.is_ipv6())
        {
            return Ok(UpstreamMatch::Ip(ip));
        }
        if let Some(port) = s.strip_prefix(':')
            && let Ok(port) = port.parse::<u16>()
        {
            return Ok(UpstreamMatch::Port(port));
        }
        Err(format!(
            "`{s}` is not an upstream: use IP:PORT (10.0.0.5:8000, [2001:db8::1]:443), an IP, \
             :PORT, or unix:PATH"
        ))
    }
}

impl UpstreamMatch {
    pub fn matches(&self, upstream: &Upstream) -> bool {
        match (self, upstream) {
            (UpstreamMatch::Addr(addr), Upstream::Ip(upstream)) => addr == upstream,
            (UpstreamMatch::Ip(ip), Upstream::Ip(upstream)) => *ip == upstream.ip(),
            (UpstreamMatch::Port(port), Upstream::Ip(upstream)) => *port == upstream.port(),
            (UpstreamMatch::Unix(path), Upstream::Unix(upstream)) => path == upstream,
            _ => false,
        }
    }
}

/// Which failures to show. Empty lists select everything.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub comms: Vec<String>,
    pub pids: Vec<u32>,
    pub upstreams: Vec<UpstreamMatch>,
}

impl EventFilter {
    pub fn matches(&self, f: &Failure) -> bool {
        (self.comms.is_empty() || self.comms.contains(&f.proxy.comm))
            && (self.pids.is_empty() || self.pids.contains(&f.proxy.pid))
            && (self.upstreams.is_empty() || self.upstreams.iter().any(|u| u.matches(&f.upstream)))
    }

    /// Notices are about upstreams: only `--upstream` selects them (a wildcard listener is
    /// selected by its port).
    pub fn matches_notice(&self, notice: &Notice) -> bool {
        let listener = match notice {
            Notice::ListenerGone { listener, .. } | Notice::ListenerBack { listener, .. } => {
                listener
            }
        };
        self.upstreams.is_empty()
            || self.upstreams.iter().any(|u| match u {
                UpstreamMatch::Addr(addr) => {
                    addr.port() == listener.port()
                        && (addr.ip() == listener.ip() || listener.ip().is_unspecified())
                }
                UpstreamMatch::Ip(ip) => *ip == listener.ip() || listener.ip().is_unspecified(),
                UpstreamMatch::Port(port) => *port == listener.port(),
                UpstreamMatch::Unix(_) => false,
            })
    }
}

fn failure_type() -> String {
    "failure".to_string()
}

/// The JSON form of a failure (one object per line): `tracer events --json`, `/api/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Always `failure` (listener notices are `listener_gone` and `listener_back`).
    #[serde(rename = "type", default = "failure_type")]
    pub kind: String,
    pub time: String,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub upstream: String,
    pub local: Option<String>,
    pub cause: String,
    pub errno: i32,
    pub errno_name: Option<String>,
    pub connect_ms: Option<f64>,
    pub syn_retransmits: u16,
    pub retransmits: u16,
    pub requests: u32,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub waited_ms: f64,
    pub ended_by: String,
    pub reset_received: bool,
    pub seen_at: String,
    pub explanation: String,
    /// Why, beyond the cause, when the upstream runs on this host: `upstream_oom_killed`,
    /// `upstream_crashed`, `upstream_exited`, `upstream_restarting`, `nothing_listened`,
    /// `listener_wrong_address`, `listener_other_netns`.
    #[serde(default)]
    pub root_cause: Option<String>,
    /// The upstream's process behind the root cause.
    #[serde(default)]
    pub root_cause_pid: Option<u32>,
    #[serde(default)]
    pub root_cause_comm: Option<String>,
    /// The root cause in one sentence, with its evidence.
    #[serde(default)]
    pub root_cause_detail: Option<String>,
    /// The proxy's container, when a container runtime names it (`--container-runtime`).
    #[serde(default)]
    pub proxy_container: Option<ContainerId>,
    /// The container that holds (or, for `stale_address` and a container that died, held) the
    /// upstream's address.
    #[serde(default)]
    pub upstream_container: Option<ContainerId>,
    /// For `tls_handshake_failed`: `plaintext_upstream`, `alert`, `proxy_rejected` or `closed`.
    #[serde(default)]
    pub tls_reason: Option<String>,
    /// The TLS alert behind the failure (`unknown_ca`, `protocol_version`…), when it was sent
    /// in plaintext.
    #[serde(default)]
    pub tls_alert: Option<String>,
    /// The first bytes (up to 8) the proxy sent and the upstream sent on the connection, for
    /// the TLS causes: printable ASCII as is, other bytes as `\xNN`.
    #[serde(default)]
    pub first_bytes_sent: Option<String>,
    #[serde(default)]
    pub first_bytes_received: Option<String>,
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1_000.0
}

impl From<&Classified> for EventRecord {
    fn from(c: &Classified) -> Self {
        let f = &c.failure;
        let e = &f.evidence;
        let root = c.root_cause.as_ref();
        EventRecord {
            kind: failure_type(),
            time: humantime::format_rfc3339_millis(f.time).to_string(),
            pid: f.proxy.pid,
            tid: f.proxy.tid,
            comm: f.proxy.comm.clone(),
            cgroup_id: f.proxy.cgroup_id,
            upstream: f.upstream.to_string(),
            local: f.local.map(|l| l.to_string()),
            cause: f.cause.name().to_string(),
            errno: e.errno,
            errno_name: errno_name(e.errno).map(str::to_string),
            connect_ms: e.connect_time.map(millis),
            syn_retransmits: e.syn_retransmits,
            retransmits: e.retransmits,
            requests: e.requests,
            bytes_sent: e.bytes_sent,
            bytes_received: e.bytes_received,
            waited_ms: millis(e.waited),
            ended_by: e.ended_by.name().to_string(),
            reset_received: e.reset_received,
            seen_at: source_name(e.source).to_string(),
            explanation: explain(f),
            root_cause: root.map(|r| r.name().to_string()),
            root_cause_pid: root.and_then(|r| r.process()).map(|p| p.pid),
            root_cause_comm: root.and_then(|r| r.process()).map(|p| p.comm.clone()),
            root_cause_detail: root.map(|r| r.explain(f)),
            proxy_container: c.proxy_container.clone(),
            upstream_container: c.upstream_container.clone(),
            tls_reason: e
                .tls
                .as_ref()
                .and_then(|t| t.reason)
                .map(|r| r.name().to_string()),
            tls_alert: e
                .tls
                .as_ref()
                .and_then(|t| t.alert)
                .map(|(_, d)| alert_text(d)),
            first_bytes_sent: e.tls.as_ref().map(|t| escape_bytes(&t.sent)),
            first_bytes_received: e.tls.as_ref().map(|t| escape_bytes(&t.received)),
        }
    }
}

/// The JSON form of a listener notice.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NoticeRecord {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub time: String,
    pub listener: String,
    pub pid: u32,
    pub comm: String,
    /// How it went away: oom_killed, crashed, exited, closed.
    pub reason: Option<&'static str>,
    /// How long it was gone, and how many connections to it failed meanwhile.
    pub gap_ms: Option<f64>,
    pub failed_meanwhile: Option<u64>,
    pub explanation: String,
}

impl From<&Notice> for NoticeRecord {
    fn from(notice: &Notice) -> Self {
        match notice {
            Notice::ListenerGone {
                listener,
                process,
                at,
                death,
            } => NoticeRecord {
                kind: "listener_gone",
                time: humantime::format_rfc3339_millis(*at).to_string(),
                listener: listener.to_string(),
                pid: process.pid,
                comm: process.comm.clone(),
                reason: Some(death.as_ref().map_or("closed", |d| d.reason())),
                gap_ms: None,
                failed_meanwhile: None,
                explanation: notice.explain(),
            },
            Notice::ListenerBack {
                listener,
                process,
                at,
                gap,
                failed_meanwhile,
            } => NoticeRecord {
                kind: "listener_back",
                time: humantime::format_rfc3339_millis(*at).to_string(),
                listener: listener.to_string(),
                pid: process.pid,
                comm: process.comm.clone(),
                reason: None,
                gap_ms: Some(millis(*gap)),
                failed_meanwhile: Some(*failed_meanwhile),
                explanation: notice.explain(),
            },
        }
    }
}

/// One JSON line.
pub fn json_line(c: &Classified) -> String {
    serde_json::to_string(&EventRecord::from(c))
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// One JSON line for a listener notice.
pub fn notice_json_line(notice: &Notice) -> String {
    serde_json::to_string(&NoticeRecord::from(notice))
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// One text line for a listener notice.
pub fn notice_text_line(notice: &Notice) -> String {
    let r = NoticeRecord::from(notice);
    format!("{}  {}  {}", r.time, r.kind, r.explanation)
}

/// One text line: time, proxy, upstream, cause, evidence, root cause.
pub fn text_line(c: &Classified) -> String {
    let r = EventRecord::from(c);
    let mut line = format!(
        "{}  {}[{}]  {}  {}  waited={}ms",
        r.time, r.comm, r.pid, r.upstream, r.cause, r.waited_ms
    );
    if let Some(name) = &r.errno_name {
        line.push_str(&format!(" errno={name}"));
    } else if r.errno != 0 {
        line.push_str(&format!(" errno={}", r.errno));
    }
    if let Some(ms) = r.connect_ms {
        line.push_str(&format!(" connect={ms}ms"));
    }
    if r.syn_retransmits > 0 {
        line.push_str(&format!(" syn_retransmits={}", r.syn_retransmits));
    }
    if r.requests > 0 {
        line.push_str(&format!(
            " requests={} sent={}B received={}B",
            r.requests, r.bytes_sent, r.bytes_received
        ));
    }
    line.push_str(&format!(" ended_by={}", r.ended_by));
    if let Some(reason) = &r.tls_reason {
        line.push_str(&format!(" tls_reason={reason}"));
    }
    if let Some(alert) = &r.tls_alert {
        line.push_str(&format!(" tls_alert={alert}"));
    }
    if let Some(container) = &r.proxy_container {
        line.push_str(&format!(" proxy_container={}", container.name));
    }
    if let Some(container) = &r.upstream_container {
        line.push_str(&format!(" upstream_container={}", container.name));
    }
    if let Some(root) = &r.root_cause {
        line.push_str(&format!(" root_cause={root}"));
        if let (Some(comm), Some(pid)) = (&r.root_cause_comm, r.root_cause_pid) {
            line.push_str(&format!("({comm}[{pid}])"));
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use tracer_common::Outcome;

    use super::*;
    use crate::decode::{Evidence, Task};

    fn classified() -> Classified {
        Classified {
            failure: failure(),
            root_cause: None,
            proxy_container: None,
            upstream_container: None,
        }
    }

    fn failure() -> Failure {
        Failure {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_763_769_600_123),
            proxy: Task {
                comm: "nginx".into(),
                pid: 812,
                tid: 813,
                cgroup_id: 1,
                netns: 4026531840,
            },
            upstream: Upstream::Ip("10.0.0.5:8000".parse().unwrap()),
            local: Some("10.0.0.1:40000".parse().unwrap()),
            cause: Outcome::Refused,
            evidence: Evidence {
                errno: 111,
                waited: Duration::from_micros(250),
                ..crate::classify::tests::evidence()
            },
        }
    }

    #[test]
    fn json_has_the_documented_fields() {
        let value: serde_json::Value = serde_json::from_str(&json_line(&classified())).unwrap();
        assert_eq!(value["type"], "failure");
        assert_eq!(value["root_cause"], serde_json::Value::Null);
        assert_eq!(value["time"], "2025-11-22T00:00:00.123Z");
        assert_eq!(value["pid"], 812);
        assert_eq!(value["comm"], "nginx");
        assert_eq!(value["upstream"], "10.0.0.5:8000");
        assert_eq!(value["cause"], "refused");
        assert_eq!(value["errno_name"], "ECONNREFUSED");
        assert_eq!(value["waited_ms"], 0.25);
        assert_eq!(value["ended_by"], "upstream_reset");
        assert!(
            value["explanation"]
                .as_str()
                .unwrap()
                .contains("nothing is listening")
        );
    }

    #[test]
    fn text_line_reads_left_to_right() {
        assert_eq!(
            text_line(&classified()),
            "2025-11-22T00:00:00.123Z  nginx[812]  10.0.0.5:8000  refused  waited=0.25ms \
             errno=ECONNREFUSED ended_by=upstream_reset"
        );
    }

    #[test]
    fn filters_select_by_comm_pid_and_upstream() {
        let f = failure();
        assert!(EventFilter::default().matches(&f));
        let by = |comms: &[&str], pids: &[u32], ups: &[&str]| EventFilter {
            comms: comms.iter().map(|s| s.to_string()).collect(),
            pids: pids.to_vec(),
            upstreams: ups.iter().map(|s| s.parse().unwrap()).collect(),
        };
        assert!(by(&["nginx"], &[], &[]).matches(&f));
        assert!(!by(&["haproxy"], &[], &[]).matches(&f));
        assert!(by(&[], &[812], &[]).matches(&f));
        assert!(!by(&[], &[1], &[]).matches(&f));
        assert!(by(&[], &[], &["10.0.0.5:8000"]).matches(&f));
        assert!(by(&[], &[], &["10.0.0.5"]).matches(&f));
        assert!(by(&[], &[], &[":8000"]).matches(&f));
        assert!(!by(&[], &[], &["10.0.0.5:8001"]).matches(&f));
        assert!("[::1]:443".parse::<UpstreamMatch>().is_ok());
        assert!("[::1]".parse::<UpstreamMatch>().is_ok());
        assert!("::1".parse::<UpstreamMatch>().is_ok());
        for half_bracketed in ["[::1", "::1]", "[10.0.0.5]", "[10.0.0.5"] {
            assert!(
                half_bracketed.parse::<UpstreamMatch>().is_err(),
                "{half_bracketed}"
            );
        }
        assert!(
            "nonsense"
                .parse::<UpstreamMatch>()
                .unwrap_err()
                .contains("IP:PORT")
        );
    }
}
