//! Decode: what the kernel sent, as bytes and kernel-side structs, into typed values: socket
//! addresses, process names, wall-clock times.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, SystemTime},
};

use thiserror::Error;
pub mod cgroup;

use tracer_common::{
    CountKey, Endpoint, FailureEvent, LatencyKey, Outcome, RouteKey, Source,
    conn::EndKind,
    net::{AF_INET, AF_INET6},
};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("a failure record of {got} bytes, expected {expected}")]
    Size { got: usize, expected: usize },
    #[error("unknown outcome code {0}")]
    Outcome(u8),
    #[error("unknown address family {0}")]
    Family(u16),
}

/// A failure record from the ring buffer.
pub fn failure_event(bytes: &[u8]) -> Result<FailureEvent, DecodeError> {
    let expected = size_of::<FailureEvent>();
    if bytes.len() < expected {
        return Err(DecodeError::Size {
            got: bytes.len(),
            expected,
        });
    }
    // SAFETY: FailureEvent is repr(C) plain data (any bit pattern is valid) and the slice is long
    // enough; read_unaligned copes with the ring buffer's 8-byte alignment or less.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<FailureEvent>()) })
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

/// A NUL-padded kernel `comm`.
pub fn comm(bytes: &[u8; 16]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
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

/// The process that made the connection: the proxy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProxyProcess {
    pub comm: String,
    pub pid: u32,
    pub tid: u32,
    pub cgroup_id: u64,
}

impl fmt::Display for ProxyProcess {
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
}

/// One failed upstream attempt, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub time: SystemTime,
    pub proxy: ProxyProcess,
    pub upstream: SocketAddr,
    /// The proxy's side of the connection, when it had one.
    pub local: Option<SocketAddr>,
    pub cause: Outcome,
    pub evidence: Evidence,
}

impl Failure {
    pub fn from_event(event: &FailureEvent, clock: &Clock) -> Result<Failure, DecodeError> {
        let conn = &event.conn;
        let cause = Outcome::from_u8(event.outcome).ok_or(DecodeError::Outcome(event.outcome))?;
        let local = socket_addr(&conn.local)
            .ok()
            .filter(|addr| addr.port() != 0 || !addr.ip().is_unspecified());
        Ok(Failure {
            time: clock.wall(event.close_ns),
            proxy: ProxyProcess {
                comm: comm(&conn.proxy.comm),
                pid: conn.proxy.tgid,
                tid: conn.proxy.pid,
                cgroup_id: conn.proxy.cgroup_id,
            },
            upstream: socket_addr(&conn.upstream)?,
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
                source: if event.source == Source::ConnectCall as u8 {
                    Source::ConnectCall
                } else {
                    Source::SocketClosed
                },
            },
        })
    }
}

/// Who connects to what: the proxy's process name and cgroup, and the upstream.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    pub proxy: String,
    pub cgroup_id: u64,
    pub upstream: SocketAddr,
}

impl Route {
    pub fn from_kernel(key: &RouteKey) -> Result<Route, DecodeError> {
        Ok(Route {
            proxy: comm(&key.comm),
            cgroup_id: key.cgroup_id,
            upstream: socket_addr(&key.upstream)?,
        })
    }
}

/// One row of the kernel's exact counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Count {
    pub route: Route,
    pub outcome: Outcome,
    pub count: u64,
    pub total_time: Duration,
}

impl Count {
    pub fn from_kernel(key: &CountKey, count: u64, sum_ns: u64) -> Result<Count, DecodeError> {
        Ok(Count {
            route: Route::from_kernel(&key.route)?,
            outcome: Outcome::from_u8(key.outcome).ok_or(DecodeError::Outcome(key.outcome))?,
            count,
            total_time: Duration::from_nanos(sum_ns),
        })
    }
}

/// One row of the kernel's connect-latency histogram: successful connects of a route in one
/// bucket (`tracer_common::counts::CONNECT_BUCKETS_NS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencyCount {
    pub route: Route,
    pub bucket: usize,
    pub count: u64,
}

impl LatencyCount {
    pub fn from_kernel(key: &LatencyKey, count: u64) -> Result<LatencyCount, DecodeError> {
        Ok(LatencyCount {
            route: Route::from_kernel(&key.route)?,
            bucket: usize::from(key.bucket),
            count,
        })
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::{ConnTrack, Proxy};

    use super::*;

    pub(crate) fn refused_event() -> FailureEvent {
        let mut conn = ConnTrack::connecting(
            Proxy {
                cgroup_id: 7,
                tgid: 812,
                pid: 813,
                comm: *b"nginx\0\0\0\0\0\0\0\0\0\0\0",
            },
            Endpoint::v4([10, 0, 0, 5], 8000),
            Endpoint::v4([10, 0, 0, 1], 40_000),
            5_000_000_000,
        );
        conn.on_reset_received(5_000_200_000);
        conn.end = EndKind::PeerReset as u8;
        FailureEvent {
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
        let failure = Failure::from_event(&decoded, &Clock::with_boot_time(boot)).unwrap();
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
            Failure::from_event(&event, &Clock::new()),
            Err(DecodeError::Outcome(99))
        );
        event.outcome = Outcome::Refused as u8;
        event.conn.upstream.family = 1;
        assert_eq!(
            Failure::from_event(&event, &Clock::new()),
            Err(DecodeError::Family(1))
        );
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
    fn comm_stops_at_the_first_nul() {
        assert_eq!(comm(b"nginx\0worker\0\0\0\0"), "nginx");
        assert_eq!(comm(b"0123456789abcdef"), "0123456789abcdef");
    }
}
