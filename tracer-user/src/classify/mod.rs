//! Classify: a decoded failure's cause, put in the user's words with its evidence, and its root
//! cause when the upstream runs on this host ([`root_cause`]).
//!
//! The cause itself is decided in the kernel, by `tracer_common::conn` (so that the kernel can
//! count it exactly); this stage explains it: one sentence a person on call can act on.

pub mod containers;
pub mod root_cause;
pub mod self_probe;

use std::time::Duration;

use tracer_common::{Outcome, Source, conn::EndKind};

pub use self::root_cause::{Listeners, Notice, RootCause};
use tracer_common::peek::TlsReason;

use crate::decode::{Failure, Upstream, alert_text, escape_bytes};

/// A failure with its root cause, when one is known.
#[derive(Debug, Clone, PartialEq)]
pub struct Classified {
    pub failure: Failure,
    pub root_cause: Option<RootCause>,
    /// The proxy's container and the upstream's, when a container runtime names them.
    pub proxy_container: Option<containers::ContainerId>,
    pub upstream_container: Option<containers::ContainerId>,
}

impl Classified {
    /// The failure's explanation, followed by its root cause's.
    pub fn explain(&self) -> String {
        match &self.root_cause {
            Some(root) => format!(
                "{}. {}",
                explain(&self.failure),
                root.explain(&self.failure)
            ),
            None => explain(&self.failure),
        }
    }
}

/// The symbolic name of an errno, as in errno.h.
pub fn errno_name(errno: i32) -> Option<&'static str> {
    Some(match errno {
        1 => "EPERM",
        2 => "ENOENT",
        4 => "EINTR",
        11 => "EAGAIN",
        13 => "EACCES",
        22 => "EINVAL",
        24 => "EMFILE",
        23 => "ENFILE",
        32 => "EPIPE",
        98 => "EADDRINUSE",
        99 => "EADDRNOTAVAIL",
        100 => "ENETDOWN",
        101 => "ENETUNREACH",
        103 => "ECONNABORTED",
        104 => "ECONNRESET",
        110 => "ETIMEDOUT",
        111 => "ECONNREFUSED",
        112 => "EHOSTDOWN",
        113 => "EHOSTUNREACH",
        _ => return None,
    })
}

/// The errno's message, as the proxy's log prints it ("Connection refused").
pub fn errno_text(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    match text.find(" (os error") {
        Some(end) => text[..end].to_string(),
        None => text,
    }
}

/// A short human duration: 850 µs, 12.3 ms, 1.02 s.
pub fn human_duration(d: Duration) -> String {
    let micros = d.as_micros();
    if micros < 1_000 {
        format!("{micros} µs")
    } else if micros < 1_000_000 {
        format!("{:.1} ms", micros as f64 / 1_000.0)
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

/// Unix sockets that the C library itself tries, in every process that looks up a user or a
/// host (nscd, systemd's user database): their absence is normal and they are not upstreams.
const NAME_SERVICE_SOCKETS: [&str; 3] = ["/var/run/nscd/", "/run/nscd/", "/run/systemd/userdb/"];

/// Whether a connection to `upstream` is not a proxy's upstream at all (see
/// `NAME_SERVICE_SOCKETS`); such connections are neither counted nor reported.
pub fn is_not_an_upstream(upstream: &Upstream) -> bool {
    match upstream {
        Upstream::Unix(path) => NAME_SERVICE_SOCKETS.iter().any(|p| path.starts_with(p)),
        Upstream::Ip(_) | Upstream::None | Upstream::Other => false,
    }
}

/// One sentence: who failed to get what from which upstream, why, and the evidence.
pub fn explain(f: &Failure) -> String {
    let e = &f.evidence;
    let who = format!("{} → {}", f.proxy, f.upstream);
    let waited = human_duration(e.waited);
    let errno = || match errno_name(e.errno) {
        Some(name) => format!("{name}, {}", errno_text(e.errno)),
        None => format!("errno {}", e.errno),
    };
    match f.cause {
        Outcome::Refused if e.reset_received => format!(
            "{who}: connection refused (the host answered the SYN with a RST after {waited}): \
             nothing is listening on {}",
            f.upstream
        ),
        Outcome::Refused => format!(
            "{who}: connection refused ({}) after {waited}: nothing is listening on {}",
            errno(),
            f.upstream
        ),
        Outcome::ConnectTimeout => {
            let who_gave_up = match e.connect_time {
                // The SYN-ACK came as the proxy's connect timer fired.
                Some(took) => format!(
                    "the proxy gave up as the last was answered after {}",
                    human_duration(took)
                ),
                None if e.errno != 0 => "the kernel gave up".to_string(),
                None => "the proxy gave up".to_string(),
            };
            format!(
                "{who}: connect timed out after {waited} with {} SYN retransmit(s) unanswered \
                 ({who_gave_up}): a firewall dropping SYNs, a host that is down, or a full \
                 listen backlog",
                e.syn_retransmits
            )
        }
        Outcome::Unreachable => format!(
            "{who}: {} after {waited}: no route to {}",
            errno(),
            f.upstream
                .socket_addr()
                .map_or_else(|| f.upstream.to_string(), |a| a.ip().to_string())
        ),
        Outcome::NoEphemeralPort => format!(
            "{who}: connect() failed ({}): the proxy has no local port left to reach this \
             upstream (too many connections in TIME_WAIT or a narrow ip_local_port_range)",
            errno()
        ),
        Outcome::ConnectError => format!("{who}: connect() failed ({}) after {waited}", errno()),
        Outcome::UnixMissing => format!(
            "{who}: connect() failed ({}): the socket file does not exist (the upstream is not \
             running, or listens on another path)",
            errno()
        ),
        Outcome::UnixRefused => format!(
            "{who}: connection refused ({}): the socket file exists but nothing listens on it \
             (left behind by an upstream that crashed or stopped)",
            errno()
        ),
        Outcome::UnixBacklogFull => format!(
            "{who}: connect() failed ({}): the socket's listen queue is full (every worker is \
             busy: the pool is exhausted or too small)",
            errno()
        ),
        Outcome::UnixPermission => format!(
            "{who}: connect() failed ({}): the proxy may not connect to the socket (its file \
             mode, owner or group)",
            errno()
        ),
        Outcome::FdExhausted if e.source == Source::AcceptCall => format!(
            "{}: accept() failed ({}): the proxy is out of file descriptors (its \
             RLIMIT_NOFILE, nginx's worker_rlimit_nofile, or the host's fs.file-max) and could \
             not take a client's connection (clients wait or time out)",
            f.proxy,
            errno()
        ),
        Outcome::FdExhausted => format!(
            "{}: socket() failed ({}): the proxy is out of file descriptors (its \
             RLIMIT_NOFILE, nginx's worker_rlimit_nofile, or the host's fs.file-max) and could \
             not open a connection to any upstream",
            f.proxy,
            errno()
        ),
        Outcome::ResetBeforeResponse if e.requests == 0 => {
            format!("{who}: the upstream reset the connection before the proxy sent its request")
        }
        Outcome::ResetBeforeResponse => format!(
            "{who}: the upstream reset the connection {waited} after the request, before any \
             response byte (a worker that crashed, was killed, or refused the request)"
        ),
        Outcome::ResetMidResponse => format!(
            "{who}: the upstream reset the connection mid-response, {waited} after the request \
             ({} bytes received)",
            e.bytes_received
        ),
        Outcome::ClosedBeforeResponse => format!(
            "{who}: the upstream closed the connection {waited} after the request without \
             answering (upstream prematurely closed connection)"
        ),
        Outcome::ResponseTimeout if e.ended_by == EndKind::KernelError => format!(
            "{who}: no response {waited} after the request and the kernel gave up on the \
             connection ({}, {} retransmit(s))",
            errno(),
            e.retransmits
        ),
        Outcome::ResponseTimeout => format!(
            "{who}: the proxy gave up after waiting {waited} for a response (the upstream is \
             slow or stuck)"
        ),
        Outcome::TlsHandshakeFailed | Outcome::PlaintextToTls => explain_tls(f, &who),
        Outcome::Connected | Outcome::ConnectAbandoned | Outcome::RequestAbandoned => {
            format!("{who}: {}", f.cause.name())
        }
    }
}

/// A TLS failure in words, with the bytes that told it.
fn explain_tls(f: &Failure, who: &str) -> String {
    let Some(tls) = &f.evidence.tls else {
        return format!("{who}: {}", f.cause.name());
    };
    let received = escape_bytes(&tls.received);
    let alert = |(level, description): (u8, u8)| {
        let level = if level == 2 { "fatal" } else { "warning" };
        format!("{level} alert {}", alert_text(description))
    };
    match (f.cause, tls.reason) {
        (Outcome::PlaintextToTls, _) => format!(
            "{who}: the proxy sent plaintext (\"{}\") and the upstream answered in TLS ({}): \
             the upstream speaks TLS, the proxy does not (use https:// toward it)",
            escape_bytes(&tls.sent),
            tls.alert.map_or_else(|| format!("\"{received}\""), alert)
        ),
        (_, Some(TlsReason::PlaintextUpstream)) => format!(
            "{who}: TLS handshake failed: the proxy sent a ClientHello and the upstream answered \
             in plaintext (\"{received}\"): the upstream does not speak TLS on this port \
             (wrong version number; use http:// toward it, or enable TLS on it)"
        ),
        (_, Some(TlsReason::Alert)) => format!(
            "{who}: TLS handshake failed: the upstream answered the ClientHello with a {} \
             (the two sides share no protocol version, cipher or name, or the upstream wants a \
             client certificate)",
            tls.alert.map_or_else(|| "TLS alert".to_string(), alert)
        ),
        (_, Some(TlsReason::ProxyRejected)) => format!(
            "{who}: TLS handshake failed: the proxy ended the handshake after the upstream's \
             first flight ({}): it rejected what the upstream offered, most often its \
             certificate (not trusted, expired, or for another name)",
            tls.alert.map_or_else(
                || "its alert went encrypted, after the handshake, or it just closed".to_string(),
                |a| format!("its own {}", alert(a))
            )
        ),
        (_, Some(TlsReason::Closed)) => format!(
            "{who}: TLS handshake failed: the upstream {} the connection during the handshake",
            if f.evidence.reset_received {
                "reset"
            } else {
                "closed"
            }
        ),
        (_, None) => format!("{who}: {}", f.cause.name()),
    }
}

/// One sentence about a route's failures over a window, for the live view's detail pane:
/// "nginx (pid 812) → 10.0.0.5:8000: 312 connections refused in the last 60 s; nothing is
/// listening on 10.0.0.5:8000".
pub fn explain_route(
    proxy: &str,
    pid: Option<u32>,
    upstream: &str,
    cause: Outcome,
    count: u64,
    window: Duration,
) -> String {
    let who = match pid {
        Some(pid) => format!("{proxy} (pid {pid}) → {upstream}"),
        None => format!("{proxy} → {upstream}"),
    };
    let when = format!("in the last {} s", window.as_secs());
    if upstream == "other" {
        // Upstreams past the agent's --max-upstreams, folded together: no one host to blame.
        return format!(
            "{who}: {count} failures ({}) {when} toward upstreams past the agent's \
             --max-upstreams, counted together; their events name each one",
            cause.name()
        );
    }
    let host = upstream
        .rsplit_once(':')
        .map_or(upstream, |(host, _)| host)
        .trim_matches(['[', ']']);
    let what = match cause {
        Outcome::Refused => {
            format!("{count} connections refused {when}; nothing is listening on {upstream}")
        }
        Outcome::ConnectTimeout => format!(
            "{count} connects timed out {when}; SYNs go unanswered (a firewall dropping them, \
             the host down, or its listen backlog full)"
        ),
        Outcome::Unreachable => format!("{count} connects failed {when}: no route to {host}"),
        Outcome::NoEphemeralPort => format!(
            "{count} connects failed {when}: the proxy has no local port left for this upstream"
        ),
        Outcome::ConnectError => format!("{count} connects failed {when}"),
        Outcome::UnixMissing => {
            format!("{count} connects failed {when}: the socket file does not exist")
        }
        Outcome::UnixRefused => format!(
            "{count} connects refused {when}: the socket file exists but nothing listens on it"
        ),
        Outcome::UnixBacklogFull => format!(
            "{count} connects failed {when}: the socket's listen queue is full (every worker busy)"
        ),
        Outcome::UnixPermission => {
            format!("{count} connects failed {when}: the proxy may not connect to the socket")
        }
        Outcome::FdExhausted => format!(
            "{count} sockets could not be opened or accepted {when}: the proxy is out of file \
             descriptors"
        ),
        Outcome::ResetBeforeResponse => format!(
            "{count} connections reset by the upstream before any response {when} (a worker \
             crashed, was killed or recycled)"
        ),
        Outcome::ResetMidResponse => {
            format!("{count} connections reset by the upstream in the middle of a response {when}")
        }
        Outcome::ClosedBeforeResponse => {
            format!("{count} connections closed by the upstream without a response {when}")
        }
        Outcome::ResponseTimeout => format!(
            "{count} requests got no response before the proxy gave up {when} (a slow or stuck \
             upstream)"
        ),
        Outcome::TlsHandshakeFailed => format!(
            "{count} TLS handshakes failed {when} (see the events for the reason: plaintext \
             upstream, alert, certificate rejected or closed)"
        ),
        Outcome::PlaintextToTls => {
            format!("{count} plaintext requests to a port that speaks TLS {when}")
        }
        Outcome::Connected | Outcome::ConnectAbandoned | Outcome::RequestAbandoned => {
            format!("{count} {} {when}", cause.name())
        }
    };
    format!("{who}: {what}")
}

/// Where the failure was seen, in words.
pub fn source_name(source: Source) -> &'static str {
    match source {
        Source::SocketClosed => "socket_closed",
        Source::ConnectCall => "connect_call",
        Source::SocketCall => "socket_call",
        Source::AcceptCall => "accept_call",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::decode::{Evidence, Task};

    #[test]
    fn the_c_librarys_name_service_sockets_are_not_upstreams() {
        for path in [
            "unix:/var/run/nscd/socket",
            "unix:/run/systemd/userdb/io.systemd.Multiplexer",
        ] {
            assert!(is_not_an_upstream(&path.parse().unwrap()), "{path}");
        }
        for upstream in ["unix:/run/php/php-fpm.sock", "10.0.0.5:8000"] {
            assert!(
                !is_not_an_upstream(&upstream.parse().unwrap()),
                "{upstream}"
            );
        }
    }

    fn failure(cause: Outcome, evidence: Evidence) -> Failure {
        Failure {
            time: SystemTime::UNIX_EPOCH,
            proxy: Task {
                comm: "nginx".into(),
                pid: 812,
                tid: 812,
                cgroup_id: 1,
                netns: 4026531840,
            },
            upstream: "10.0.0.5:8000".parse().unwrap(),
            local: None,
            cause,
            evidence,
        }
    }

    /// A refusal's evidence, for the tests' made-up failures to start from.
    pub(crate) fn evidence() -> Evidence {
        Evidence {
            errno: 0,
            connect_time: None,
            syn_retransmits: 0,
            retransmits: 0,
            requests: 0,
            bytes_sent: 0,
            bytes_received: 0,
            waited: Duration::from_micros(150),
            ended_by: EndKind::PeerReset,
            reset_received: true,
            source: Source::SocketClosed,
            tls: None,
        }
    }

    #[test]
    fn refused_names_the_upstream_and_says_nothing_listens() {
        let text = explain(&failure(
            Outcome::Refused,
            Evidence {
                errno: 111,
                ..evidence()
            },
        ));
        assert_eq!(
            text,
            "nginx (pid 812) → 10.0.0.5:8000: connection refused (the host answered the SYN \
             with a RST after 150 µs): nothing is listening on 10.0.0.5:8000"
        );
    }

    #[test]
    fn timeouts_say_who_gave_up() {
        let kernel = Evidence {
            errno: 110,
            syn_retransmits: 6,
            waited: Duration::from_secs(127),
            ended_by: EndKind::KernelError,
            reset_received: false,
            ..evidence()
        };
        let text = explain(&failure(Outcome::ConnectTimeout, kernel.clone()));
        assert!(
            text.contains("after 127.00 s with 6 SYN retransmit(s)"),
            "{text}"
        );
        assert!(text.contains("the kernel gave up"), "{text}");
        let proxy = Evidence { errno: 0, ..kernel };
        assert!(explain(&failure(Outcome::ConnectTimeout, proxy)).contains("the proxy gave up"));
    }

    #[test]
    fn unreachable_gives_the_errno_as_the_proxy_logs_it() {
        let text = explain(&failure(
            Outcome::Unreachable,
            Evidence {
                errno: 113,
                ..evidence()
            },
        ));
        assert!(text.contains("EHOSTUNREACH, No route to host"), "{text}");
        assert!(text.ends_with("no route to 10.0.0.5"), "{text}");
    }

    #[test]
    fn response_phase_causes_carry_the_wait() {
        let e = Evidence {
            requests: 1,
            waited: Duration::from_millis(1_000),
            ended_by: EndKind::ProxyClose,
            reset_received: false,
            ..evidence()
        };
        let text = explain(&failure(Outcome::ResponseTimeout, e.clone()));
        assert!(text.contains("waiting 1.00 s for a response"), "{text}");
        let text = explain(&failure(
            Outcome::ResetMidResponse,
            Evidence {
                bytes_received: 40,
                ..e
            },
        ));
        assert!(text.contains("(40 bytes received)"), "{text}");
    }

    #[test]
    fn route_explanations_say_how_many_and_why() {
        let text = explain_route(
            "nginx",
            Some(812),
            "10.0.0.5:8000",
            Outcome::Refused,
            312,
            Duration::from_secs(60),
        );
        assert_eq!(
            text,
            "nginx (pid 812) → 10.0.0.5:8000: 312 connections refused in the last 60 s; \
             nothing is listening on 10.0.0.5:8000"
        );
        let text = explain_route(
            "haproxy",
            None,
            "[2001:db8::1]:443",
            Outcome::Unreachable,
            3,
            Duration::from_secs(60),
        );
        assert!(text.ends_with("no route to 2001:db8::1"), "{text}");
        assert!(text.starts_with("haproxy → [2001:db8::1]:443"), "{text}");
        let text = explain_route(
            "nginx",
            None,
            "other",
            Outcome::Refused,
            9,
            Duration::from_secs(60),
        );
        assert!(!text.contains("nothing is listening on other"), "{text}");
        assert!(text.contains("--max-upstreams"), "{text}");
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(Duration::from_micros(850)), "850 µs");
        assert_eq!(human_duration(Duration::from_micros(12_345)), "12.3 ms");
        assert_eq!(human_duration(Duration::from_millis(1_020)), "1.02 s");
        assert_eq!(errno_text(111), "Connection refused");
        assert_eq!(errno_name(113), Some("EHOSTUNREACH"));
        assert_eq!(errno_name(9999), None);
    }
}
