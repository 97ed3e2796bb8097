//! Decode: what the kernel sent, as bytes and kernel-side structs, into typed values: socket
//! addresses, process names, wall-clock times.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, SystemTime},
};

use thiserror::Error;
pub mod cgroup;
mod lifecycle;
mod server;
pub mod text;

pub use self::{
    lifecycle::{Ending, ExistingListenerInfo, Lifecycle, ListenerChange, OomKill, ProcessExit},
    server::{ServerEnd, ServerEndHow, SignalSent},
};

use tracer_common::{
    ConnTrack, CountKey, Endpoint, ExitEvent, FailureEvent, ListenerEvent, OomEvent, Outcome,
    RecordKind, RouteKey, Source, Task as KernelTask,
    conn::EndKind,
    net::{AF_INET, AF_INET6, AF_UNIX, UnixPath},
    peek::{self, TlsReason},
};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("a failure record of {got} bytes, expected {expected}")]
    Size { got: usize, expected: usize },
    #[error("unknown outcome code {0}")]
    Outcome(u8),
    #[error("unknown address family {0}")]
    Family(u16),
    #[error("unknown record kind {0}")]
    Kind(u32),
}

/// A record from one of the kernel's ring buffers, by its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    Failure(FailureEvent),
    Listener(ListenerEvent),
    Oom(OomEvent),
    Exit(ExitEvent),
    SelfProbe(tracer_common::event::SelfProbeEvent),
    ServerEnd(tracer_common::event::ServerEndEvent),
}

/// A record from a ring buffer.
pub fn record(bytes: &[u8]) -> Result<Record, DecodeError> {
    let kind = bytes
        .get(..4)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(DecodeError::Size {
            got: bytes.len(),
            expected: 4,
        })?;
    Ok(
        match RecordKind::from_u32(kind).ok_or(DecodeError::Kind(kind))? {
            RecordKind::Failure => Record::Failure(plain(bytes)?),
            RecordKind::Listener => Record::Listener(plain(bytes)?),
            RecordKind::Oom => Record::Oom(plain(bytes)?),
            RecordKind::Exit => Record::Exit(plain(bytes)?),
            RecordKind::SelfProbe => Record::SelfProbe(plain(bytes)?),
            RecordKind::ServerEnd => Record::ServerEnd(plain(bytes)?),
        },
    )
}

/// A `#[repr(C)]` plain-data record (any bit pattern valid) from the start of `bytes`.
fn plain<T: aya::Pod>(bytes: &[u8]) -> Result<T, DecodeError> {
    let expected = size_of::<T>();
    if bytes.len() < expected {
        return Err(DecodeError::Size {
            got: bytes.len(),
            expected,
        });
    }
    // SAFETY: `aya::Pod` (tracer_common's repr(C) records made of integers and byte arrays,
    // sizes fixed at compile time): any bit pattern is a value; the slice is long enough;
    // read_unaligned copes with any alignment.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// A failure record from the ring buffer.
pub fn failure_event(bytes: &[u8]) -> Result<FailureEvent, DecodeError> {
    match record(bytes)? {
        Record::Failure(event) => Ok(event),
        _ => Err(DecodeError::Kind(RecordKind::Failure as u32)),
    }
}

/// An endpoint as a socket address. IPv4-mapped IPv6 addresses stay IPv6 (the socket was).
pub fn socket_addr(endpoint: &Endpoint) -> Result<SocketAddr, DecodeError> {
    let ip = match endpoint.family {
        AF_INET => IpAddr::V4(Ipv4Addr::new(
            endpoint.addr[0],
            endpoint.addr[1],
            endpoint.addr[2],
            endpoint.addr[3],
        )),
        AF_INET6 => IpAddr::V6(Ipv6Addr::from(endpoint.addr)),
        other => return Err(DecodeError::Family(other)),
    };
    Ok(SocketAddr::new(ip, endpoint.port))
}

/// Where a proxy connects to: an IP socket address, or a Unix socket by its path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Upstream {
    Ip(SocketAddr),
    /// The socket's path; an abstract socket's name starts with `@`.
    Unix(String),
    /// Not chosen yet: the attempt failed before (`fd_exhausted`).
    None,
    /// Upstreams past `--max-upstreams`, counted together (see `aggregate::ledger`).
    Other,
}

impl Upstream {
    /// The IP socket address, for an IP upstream.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self {
            Upstream::Ip(addr) => Some(*addr),
            Upstream::Unix(_) | Upstream::None | Upstream::Other => None,
        }
    }
}

impl std::str::FromStr for Upstream {
    type Err = std::net::AddrParseError;

    /// What [`fmt::Display`] writes.
    fn from_str(s: &str) -> Result<Upstream, Self::Err> {
        if s == "none" {
            return Ok(Upstream::None);
        }
        if s == "other" {
            return Ok(Upstream::Other);
        }
        match s.strip_prefix("unix:") {
            Some(path) => Ok(Upstream::Unix(path.to_string())),
            None => s.parse().map(Upstream::Ip),
        }
    }
}

impl From<SocketAddr> for Upstream {
    fn from(addr: SocketAddr) -> Upstream {
        Upstream::Ip(addr)
    }
}

impl fmt::Display for Upstream {
    /// `10.0.0.5:8000`, `[2001:db8::5]:8000`, `unix:/run/php/php-fpm.sock`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Upstream::Ip(addr) => addr.fmt(f),
            Upstream::Unix(path) => write!(f, "unix:{path}"),
            Upstream::None => f.write_str("none"),
            Upstream::Other => f.write_str("other"),
        }
    }
}

/// Where the paths of Unix upstreams are found (the kernel's `UNIX_PATHS` map), by key.
pub trait UnixPaths {
    fn unix_path(&self, key: u64) -> Option<UnixPath>;
}

/// No paths known (decoding without the kernel's maps, in tests).
impl UnixPaths for () {
    fn unix_path(&self, _: u64) -> Option<UnixPath> {
        None
    }
}

/// A `sockaddr_un` path as text: up to its NUL, or `@` and the name of an abstract socket;
/// escaped ([`text::untrusted`]).
pub fn unix_path_text(path: &UnixPath) -> String {
    unix_name_text(path)
}

/// A Unix socket's name as bytes (NUL-padded; abstract when it starts with a NUL) as tracer
/// writes it: the path, or `@` and the abstract name, escaped.
pub fn unix_name_text(path: &[u8]) -> String {
    match path.split_first() {
        Some((0, name)) => {
            let end = name.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
            format!("@{}", text::untrusted(&name[..end]))
        }
        _ => {
            let end = path.iter().position(|&b| b == 0).unwrap_or(path.len());
            text::untrusted(&path[..end])
        }
    }
}

/// An endpoint as an upstream: its socket address, or its Unix socket path from `paths`
/// (`#` and the key in hex if the path is no longer known), or none (family 0).
pub fn upstream(endpoint: &Endpoint, paths: &dyn UnixPaths) -> Result<Upstream, DecodeError> {
    if endpoint.family == 0 {
        return Ok(Upstream::None);
    }
    if endpoint.family == AF_UNIX {
        let key = endpoint.unix_key();
        return Ok(Upstream::Unix(
            paths
                .unix_path(key)
                .map_or_else(|| format!("#{key:016x}"), |p| unix_path_text(&p)),
        ));
    }
    socket_addr(endpoint).map(Upstream::Ip)
}

/// A NUL-padded kernel `comm`, escaped ([`text::untrusted`]).
pub fn comm(bytes: &[u8; 16]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    text::untrusted(&bytes[..end])
}

/// Turns the kernel's CLOCK_MONOTONIC timestamps into wall-clock times.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Wall-clock time at monotonic time zero, in ns since the epoch.
    boot_wall_ns: i128,
}

impl Clock {
    pub fn new() -> Clock {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec to fill in.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let mono_ns = i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec);
        let wall_ns = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        Clock {
            boot_wall_ns: wall_ns - mono_ns,
        }
    }

    /// A clock whose monotonic zero is at `boot` (for tests).
    pub fn with_boot_time(boot: SystemTime) -> Clock {
        Clock {
            boot_wall_ns: boot
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos() as i128)
                .unwrap_or(0),
        }
    }

    pub fn wall(&self, monotonic_ns: u64) -> SystemTime {
        let ns = (self.boot_wall_ns + i128::from(monotonic_ns)).max(0);
        SystemTime::UNIX_EPOCH + Duration::from_nanos(ns as u64)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// A process (a task, as the kernel says): the proxy that made a connection, the owner of a
/// listener, a process that exited or was OOM-killed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Task {
    pub comm: String,
    pub pid: u32,
    pub tid: u32,
    pub cgroup_id: u64,
    /// The network namespace of the socket concerned (its inode number; 0 when not known).
    pub netns: u32,
}

impl Task {
    /// A process found in /proc (its pid also as the thread; no cgroup id).
    pub fn process(comm: String, pid: u32, netns: u32) -> Task {
        Task {
            comm,
            pid,
            tid: pid,
            cgroup_id: 0,
            netns,
        }
    }

    pub fn from_kernel(proxy: &KernelTask) -> Task {
        Task {
            comm: comm(&proxy.comm),
            pid: proxy.tgid,
            tid: proxy.pid,
            cgroup_id: proxy.cgroup_id,
            netns: proxy.netns,
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (pid {})", self.comm, self.pid)
    }
}

/// What the kernel saw of a failed attempt, besides its cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evidence {
    /// `sk_err` when the socket closed, or the errno connect() returned; 0 when none.
    pub errno: i32,
    /// How long the handshake took, when it completed.
    pub connect_time: Option<Duration>,
    pub syn_retransmits: u16,
    pub retransmits: u16,
    /// How many times the proxy started sending on the connection.
    pub requests: u32,
    /// Bytes of the proxy's the upstream acknowledged, and bytes the upstream sent.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// See `tracer_common::Verdict::waited_ns`.
    pub waited: Duration,
    /// What ended the connection first.
    pub ended_by: EndKind,
    pub reset_received: bool,
    pub source: Source,
    /// What the first bytes of a TLS failure (or of plaintext sent to a TLS port) said.
    pub tls: Option<TlsEvidence>,
}

/// The first bytes behind `tls_handshake_failed` and `plaintext_to_tls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsEvidence {
    /// `None` for `plaintext_to_tls`.
    pub reason: Option<TlsReason>,
    /// The alert (level, description) the upstream sent (`alert`, `plaintext_to_tls`) or the
    /// proxy sent in plaintext (`proxy_rejected` under TLS 1.2 and older; TLS 1.3 encrypts it).
    pub alert: Option<(u8, u8)>,
    /// Up to 8 first bytes the proxy sent, and the upstream.
    pub sent: Vec<u8>,
    pub received: Vec<u8>,
}

impl TlsEvidence {
    fn from_kernel(conn: &ConnTrack, cause: Outcome) -> Option<TlsEvidence> {
        if !matches!(cause, Outcome::TlsHandshakeFailed | Outcome::PlaintextToTls) {
            return None;
        }
        let p = &conn.peek;
        let end = EndKind::from_u8(conn.end);
        let upstream_ended = matches!(end, EndKind::PeerReset | EndKind::PeerFin);
        let reason = match p.verdict(upstream_ended) {
            Some((Outcome::TlsHandshakeFailed, code)) => TlsReason::from_u8(code),
            _ => None,
        };
        let received = p.received_head();
        let alert = match reason {
            Some(TlsReason::ProxyRejected) => p.proxy_alert_text(),
            _ => peek::alert(&received, p.received_len),
        };
        let bytes = |head: &[u8], len: u8| head[..usize::from(len).min(head.len())].to_vec();
        Some(TlsEvidence {
            reason,
            alert,
            sent: bytes(&p.sent, p.sent_len),
            received: bytes(&received, p.received_len),
        })
    }
}

/// Bytes as text that is safe anywhere: printable ASCII as it is, everything else (and the
/// backslash) as `\xNN`.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 4);
    for &b in bytes {
        if (0x20..0x7f).contains(&b) && b != b'\\' {
            text.push(char::from(b));
        } else {
            text.push_str(&format!("\\x{b:02x}"));
        }
    }
    text
}

/// A TLS alert's name ("unknown_ca"), or its number when it has none.
pub fn alert_text(description: u8) -> String {
    peek::alert_name(description).map_or_else(|| format!("alert_{description}"), str::to_string)
}

/// One failed upstream attempt, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub time: SystemTime,
    pub proxy: Task,
    pub upstream: Upstream,
    /// The proxy's side of the connection, when it had one.
    pub local: Option<SocketAddr>,
    pub cause: Outcome,
    pub evidence: Evidence,
}

impl Failure {
    pub fn from_event(
        event: &FailureEvent,
        clock: &Clock,
        paths: &dyn UnixPaths,
    ) -> Result<Failure, DecodeError> {
        let conn = &event.conn;
        let cause = Outcome::from_u8(event.outcome).ok_or(DecodeError::Outcome(event.outcome))?;
        let local = socket_addr(&conn.local)
            .ok()
            .filter(|addr| addr.port() != 0 || !addr.ip().is_unspecified());
        Ok(Failure {
            time: clock.wall(event.close_ns),
            proxy: Task::from_kernel(&conn.proxy),
            upstream: upstream(&conn.upstream, paths)?,
            local,
            cause,
            evidence: Evidence {
                errno: event.errno,
                connect_time: (conn.established_ns != 0).then(|| {
                    Duration::from_nanos(conn.established_ns.saturating_sub(conn.connect_ns))
                }),
                syn_retransmits: conn.syn_retransmits,
                retransmits: conn.retransmits,
                requests: conn.sends,
                bytes_sent: event.bytes_acked,
                bytes_received: event.bytes_received,
                waited: Duration::from_nanos(event.waited_ns),
                ended_by: EndKind::from_u8(conn.end),
                reset_received: conn.reset_received != 0,
                source: Source::from_u8(event.source),
                tls: TlsEvidence::from_kernel(conn, cause),
            },
        })
    }
}

/// Who connects to what: the proxy's process name and cgroup, and the upstream.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    pub proxy: String,
    pub cgroup_id: u64,
    pub upstream: Upstream,
}

impl Route {
    pub fn from_kernel(key: &RouteKey, paths: &dyn UnixPaths) -> Result<Route, DecodeError> {
        Ok(Route {
            proxy: comm(&key.comm),
            cgroup_id: key.cgroup_id,
            upstream: upstream(&key.upstream, paths)?,
        })
    }
}

/// One row of the kernel's exact counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Count {
    pub route: Route,
    pub outcome: Outcome,
    /// For `tls_handshake_failed`, its `TlsReason`; else `None`.
    pub tls_reason: Option<TlsReason>,
    pub count: u64,
    pub total_time: Duration,
}

impl Count {
    pub fn from_kernel(
        key: &CountKey,
        count: u64,
        sum_ns: u64,
        paths: &dyn UnixPaths,
    ) -> Result<Count, DecodeError> {
        let outcome = Outcome::from_u8(key.outcome).ok_or(DecodeError::Outcome(key.outcome))?;
        Ok(Count {
            route: Route::from_kernel(&key.route, paths)?,
            outcome,
            tls_reason: (outcome == Outcome::TlsHandshakeFailed)
                .then(|| TlsReason::from_u8(key.bucket))
                .flatten(),
            count,
            total_time: Duration::from_nanos(sum_ns),
        })
    }
}

/// One bucket of a route's connect-latency histogram: its successful connects that took that
/// long (`tracer_common::counts::CONNECT_BUCKETS_NS`), from the kernel's count of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencyCount {
    pub route: Route,
    pub bucket: usize,
    pub count: u64,
}

impl LatencyCount {
    pub fn from_kernel(
        key: &CountKey,
        count: u64,
        paths: &dyn UnixPaths,
    ) -> Result<LatencyCount, DecodeError> {
        Ok(LatencyCount {
            route: Route::from_kernel(&key.route, paths)?,
            bucket: usize::from(key.bucket),
            count,
        })
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::{ConnTrack, Task as KernelTask};

    use super::*;

    pub(crate) fn refused_event() -> FailureEvent {
        let mut conn = ConnTrack::connecting(
            KernelTask {
                cgroup_id: 7,
                tgid: 812,
                pid: 813,
                comm: *b"nginx\0\0\0\0\0\0\0\0\0\0\0",
                netns: 4026531840,
                _pad: 0,
            },
            Endpoint::v4([10, 0, 0, 5], 8000),
            Endpoint::v4([10, 0, 0, 1], 40_000),
            5_000_000_000,
        );
        conn.on_reset_received(5_000_200_000);
        conn.end = EndKind::PeerReset as u8;
        FailureEvent {
            kind: RecordKind::Failure as u32,
            _pad0: 0,
            conn,
            close_ns: 5_000_200_000,
            waited_ns: 200_000,
            bytes_received: 0,
            bytes_acked: 0,
            errno: 111,
            outcome: Outcome::Refused as u8,
            source: Source::SocketClosed as u8,
            _pad: [0; 2],
        }
    }

    fn as_bytes(event: &FailureEvent) -> Vec<u8> {
        // SAFETY: reading a repr(C) struct's bytes.
        unsafe {
            std::slice::from_raw_parts(
                (event as *const FailureEvent).cast::<u8>(),
                size_of::<FailureEvent>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn decodes_a_refused_connection_record() {
        let event = refused_event();
        let decoded = failure_event(&as_bytes(&event)).unwrap();
        assert_eq!(decoded, event);
        let boot = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let failure = Failure::from_event(&decoded, &Clock::with_boot_time(boot), &()).unwrap();
        assert_eq!(failure.time, boot + Duration::from_nanos(5_000_200_000));
        assert_eq!(failure.proxy.comm, "nginx");
        assert_eq!((failure.proxy.pid, failure.proxy.tid), (812, 813));
        assert_eq!(failure.upstream.to_string(), "10.0.0.5:8000");
        assert_eq!(failure.local.unwrap().to_string(), "10.0.0.1:40000");
        assert_eq!(failure.cause, Outcome::Refused);
        assert_eq!(failure.evidence.waited, Duration::from_micros(200));
        assert_eq!(failure.evidence.connect_time, None);
        assert!(failure.evidence.reset_received);
        assert_eq!(failure.evidence.ended_by, EndKind::PeerReset);
    }

    #[test]
    fn rejects_short_records_and_unknown_codes() {
        let bytes = as_bytes(&refused_event());
        assert!(matches!(
            failure_event(&bytes[..10]),
            Err(DecodeError::Size { got: 10, .. })
        ));
        let mut event = refused_event();
        event.outcome = 99;
        assert_eq!(
            Failure::from_event(&event, &Clock::new(), &()),
            Err(DecodeError::Outcome(99))
        );
        event.outcome = Outcome::Refused as u8;
        event.conn.upstream.family = 3;
        assert_eq!(
            Failure::from_event(&event, &Clock::new(), &()),
            Err(DecodeError::Family(3))
        );
    }

    #[test]
    fn unix_upstreams_are_named_by_their_path() {
        use tracer_common::net::{UNIX_PATH_MAX, unix_path_key};
        struct Paths(Vec<UnixPath>);
        impl UnixPaths for Paths {
            fn unix_path(&self, key: u64) -> Option<UnixPath> {
                self.0.iter().find(|p| unix_path_key(p) == key).copied()
            }
        }
        let path = |bytes: &[u8]| {
            let mut p = [0u8; UNIX_PATH_MAX];
            p[..bytes.len()].copy_from_slice(bytes);
            p
        };
        let file = path(b"/run/php/php-fpm.sock");
        let abstract_name = path(b"\0gunicorn");
        let paths = Paths(vec![file, abstract_name]);
        let mut event = refused_event();
        event.outcome = Outcome::UnixRefused as u8;
        event.conn.upstream = Endpoint::unix(unix_path_key(&file));
        let failure = Failure::from_event(&event, &Clock::new(), &paths).unwrap();
        assert_eq!(failure.upstream.to_string(), "unix:/run/php/php-fpm.sock");
        assert_eq!(failure.upstream.socket_addr(), None);
        assert_eq!(
            "unix:/run/php/php-fpm.sock".parse::<Upstream>(),
            Ok(failure.upstream)
        );
        event.conn.upstream = Endpoint::unix(unix_path_key(&abstract_name));
        let failure = Failure::from_event(&event, &Clock::new(), &paths).unwrap();
        assert_eq!(failure.upstream.to_string(), "unix:@gunicorn");
        event.conn.upstream = Endpoint::unix(0xabc);
        let failure = Failure::from_event(&event, &Clock::new(), &paths).unwrap();
        assert_eq!(failure.upstream.to_string(), "unix:#0000000000000abc");
    }

    #[test]
    fn ipv6_upstreams_are_bracketed() {
        let mut addr = [0u8; 16];
        addr[15] = 1;
        let v6 = socket_addr(&Endpoint::v6(addr, 443)).unwrap();
        assert_eq!(v6.to_string(), "[::1]:443");
        let mapped = socket_addr(&Endpoint::v6(
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 5],
            80,
        ))
        .unwrap();
        assert_eq!(mapped.to_string(), "[::ffff:10.0.0.5]:80");
    }

    #[test]
    fn exit_codes_say_how_a_process_ended() {
        assert_eq!(Ending::of(9), Ending::Signal(9));
        assert_eq!(Ending::of(11 | 0x80), Ending::Signal(11), "core dumped");
        assert_eq!(Ending::of(3 << 8), Ending::Exited(3));
        assert_eq!(
            Ending::of(0),
            Ending::Exited(0),
            "a thread zapped by exit() in another"
        );
    }

    #[test]
    fn records_are_told_apart_by_their_kind() {
        let bytes = as_bytes(&refused_event());
        assert!(matches!(record(&bytes), Ok(Record::Failure(_))));
        let mut other = bytes.clone();
        other[..4].copy_from_slice(&77u32.to_ne_bytes());
        assert_eq!(record(&other), Err(DecodeError::Kind(77)));
        assert!(matches!(record(&bytes[..2]), Err(DecodeError::Size { .. })));
    }

    #[test]
    fn comm_stops_at_the_first_nul() {
        assert_eq!(comm(b"nginx\0worker\0\0\0\0"), "nginx");
        assert_eq!(comm(b"0123456789abcdef"), "0123456789abcdef");
    }
}
