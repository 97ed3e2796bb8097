//! What became of one connection attempt: a success or a failure cause.
//!
//! The names are the label values of the metrics and the `cause` of events; each failure cause is
//! documented with its nginx error-log twin in docs/causes.md.

/// The outcome of one connection attempt. The kernel counts every attempt under exactly one
/// connect-phase outcome and, when it was established, at most one response-phase failure.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// The handshake completed.
    Connected = 1,
    /// The proxy closed the socket while still connecting, sooner than `min_wait_ns`: it gave
    /// up for its own reasons (its client went away, a parallel attempt won), not on a timeout.
    ConnectAbandoned = 2,
    /// The upstream host answered the SYN with a RST (or ICMP port unreachable): nothing listens.
    Refused = 3,
    /// SYNs went unanswered until the kernel or the proxy gave up.
    ConnectTimeout = 4,
    /// No route, or an ICMP host/network unreachable came back.
    Unreachable = 5,
    /// connect() failed with EADDRNOTAVAIL: the proxy ran out of local ports for this upstream.
    NoEphemeralPort = 6,
    /// connect() failed with another error; the event carries the errno.
    ConnectError = 7,
    /// The upstream reset the connection before any response byte to the last request.
    ResetBeforeResponse = 8,
    /// The upstream reset the connection after part of the response had arrived.
    ResetMidResponse = 9,
    /// The upstream closed (FIN) the connection while a request had no response byte yet.
    ClosedBeforeResponse = 10,
    /// The proxy closed a connection whose last request had waited at least `min_wait_ns`
    /// without a response byte: it gave up waiting.
    ResponseTimeout = 11,
    /// The proxy closed a connection with a request outstanding sooner than `min_wait_ns`.
    RequestAbandoned = 12,
    /// connect() to a Unix socket failed with ENOENT: the socket file does not exist.
    UnixMissing = 13,
    /// connect() to a Unix socket failed with ECONNREFUSED: the file exists, nobody listens.
    UnixRefused = 14,
    /// connect() to a Unix socket failed with EAGAIN: the listener's queue is full.
    UnixBacklogFull = 15,
    /// connect() to a Unix socket failed with EACCES or EPERM.
    UnixPermission = 16,
    /// socket() failed with EMFILE or ENFILE: the proxy (or the whole host) is out of file
    /// descriptors, before any upstream was chosen.
    FdExhausted = 17,
    /// The TLS handshake with the upstream failed (its reason in the count key and event:
    /// `peek::TlsReason`).
    TlsHandshakeFailed = 18,
    /// The proxy spoke plaintext to a port that answered in TLS.
    PlaintextToTls = 19,
}

impl Outcome {
    pub const ALL: [Outcome; 19] = [
        Outcome::Connected,
        Outcome::ConnectAbandoned,
        Outcome::Refused,
        Outcome::ConnectTimeout,
        Outcome::Unreachable,
        Outcome::NoEphemeralPort,
        Outcome::ConnectError,
        Outcome::ResetBeforeResponse,
        Outcome::ResetMidResponse,
        Outcome::ClosedBeforeResponse,
        Outcome::ResponseTimeout,
        Outcome::RequestAbandoned,
        Outcome::UnixMissing,
        Outcome::UnixRefused,
        Outcome::UnixBacklogFull,
        Outcome::UnixPermission,
        Outcome::FdExhausted,
        Outcome::TlsHandshakeFailed,
        Outcome::PlaintextToTls,
    ];

    pub const fn from_u8(code: u8) -> Option<Outcome> {
        Some(match code {
            1 => Outcome::Connected,
            2 => Outcome::ConnectAbandoned,
            3 => Outcome::Refused,
            4 => Outcome::ConnectTimeout,
            5 => Outcome::Unreachable,
            6 => Outcome::NoEphemeralPort,
            7 => Outcome::ConnectError,
            8 => Outcome::ResetBeforeResponse,
            9 => Outcome::ResetMidResponse,
            10 => Outcome::ClosedBeforeResponse,
            11 => Outcome::ResponseTimeout,
            12 => Outcome::RequestAbandoned,
            13 => Outcome::UnixMissing,
            14 => Outcome::UnixRefused,
            15 => Outcome::UnixBacklogFull,
            16 => Outcome::UnixPermission,
            17 => Outcome::FdExhausted,
            18 => Outcome::TlsHandshakeFailed,
            19 => Outcome::PlaintextToTls,
            _ => return None,
        })
    }

    /// The snake_case name used as the `cause` label and in events.
    pub const fn name(self) -> &'static str {
        match self {
            Outcome::Connected => "connected",
            Outcome::ConnectAbandoned => "connect_abandoned",
            Outcome::Refused => "refused",
            Outcome::ConnectTimeout => "connect_timeout",
            Outcome::Unreachable => "unreachable",
            Outcome::NoEphemeralPort => "no_ephemeral_port",
            Outcome::ConnectError => "connect_error",
            Outcome::ResetBeforeResponse => "reset_before_response",
            Outcome::ResetMidResponse => "reset_mid_response",
            Outcome::ClosedBeforeResponse => "closed_before_response",
            Outcome::ResponseTimeout => "response_timeout",
            Outcome::RequestAbandoned => "request_abandoned",
            Outcome::UnixMissing => "unix_missing",
            Outcome::UnixRefused => "unix_refused",
            Outcome::UnixBacklogFull => "unix_backlog_full",
            Outcome::UnixPermission => "unix_permission",
            Outcome::FdExhausted => "fd_exhausted",
            Outcome::TlsHandshakeFailed => "tls_handshake_failed",
            Outcome::PlaintextToTls => "plaintext_to_tls",
        }
    }

    /// A failed upstream attempt, one the proxy would log as an error (and may answer 502/504).
    pub const fn is_failure(self) -> bool {
        !matches!(
            self,
            Outcome::Connected | Outcome::ConnectAbandoned | Outcome::RequestAbandoned
        )
    }

    /// The outcome ends a connection attempt (every attempt gets exactly one of these).
    pub const fn is_connect_outcome(self) -> bool {
        matches!(
            self,
            Outcome::Connected
                | Outcome::ConnectAbandoned
                | Outcome::Refused
                | Outcome::ConnectTimeout
                | Outcome::Unreachable
                | Outcome::NoEphemeralPort
                | Outcome::ConnectError
                | Outcome::UnixMissing
                | Outcome::UnixRefused
                | Outcome::UnixBacklogFull
                | Outcome::UnixPermission
                | Outcome::FdExhausted
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_names_are_unique() {
        let mut names = std::vec::Vec::new();
        for outcome in Outcome::ALL {
            assert_eq!(Outcome::from_u8(outcome as u8), Some(outcome));
            assert!(!names.contains(&outcome.name()), "{} twice", outcome.name());
            names.push(outcome.name());
        }
        assert_eq!(Outcome::from_u8(0), None);
        assert_eq!(Outcome::from_u8(200), None);
    }

    #[test]
    fn every_attempt_has_one_connect_outcome() {
        // What is not a connect-phase outcome happens after Connected, on the same attempt: so
        // counting connect-phase outcomes counts attempts, each once.
        let after_connected: std::vec::Vec<_> = Outcome::ALL
            .into_iter()
            .filter(|o| !o.is_connect_outcome())
            .collect();
        assert_eq!(
            after_connected,
            [
                Outcome::ResetBeforeResponse,
                Outcome::ResetMidResponse,
                Outcome::ClosedBeforeResponse,
                Outcome::ResponseTimeout,
                Outcome::RequestAbandoned,
                Outcome::TlsHandshakeFailed,
                Outcome::PlaintextToTls,
            ]
        );
        assert!(!Outcome::ResetMidResponse.is_connect_outcome());
        assert!(!Outcome::Connected.is_failure());
        assert!(Outcome::Refused.is_failure());
    }
}
