//! The first bytes each side of a followed connection sends, and what they say about TLS.
//!
//! A proxy that speaks TLS to a plaintext upstream (or plaintext to a TLS one) gets an answer
//! and a normal-looking close: only the bytes tell the mismatch. The kernel keeps, per
//! connection, the first bytes of the proxy's first send, the first bytes the upstream sent
//! (gathered over the proxy's reads: OpenSSL reads a record's 5-byte header apart from its
//! body), and the first bytes of the proxy's first send after it received (its second
//! handshake flight: a Finished, or an alert when it rejected the upstream's certificate).
//! Whether the upstream sent anything after that flight tells a handshake that went on from one
//! the proxy ended.
//!
//! A TLS record starts with its content type (20 change_cipher_spec, 21 alert, 22 handshake,
//! 23 application_data), the version's major byte 3, its minor byte and a 2-byte length; a
//! handshake record's body starts with its message type (1 ClientHello, 2 ServerHello), an
//! alert's with its level and description.

/// How many leading bytes are kept of each.
pub const PEEK_BYTES: usize = 8;

/// TLS record content types.
pub mod record {
    pub const CHANGE_CIPHER_SPEC: u8 = 20;
    pub const ALERT: u8 = 21;
    pub const HANDSHAKE: u8 = 22;
    pub const APPLICATION_DATA: u8 = 23;
}

/// What the first bytes of a connection said about TLS (the `tls_reason` of
/// `tls_handshake_failed`, kept in the count key's `bucket`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TlsReason {
    /// The proxy sent a ClientHello; the upstream answered in plaintext (`HTTP/1.1 400`…).
    PlaintextUpstream = 1,
    /// The upstream answered the ClientHello with a TLS alert.
    Alert = 2,
    /// The proxy ended the handshake itself after the upstream's first flight (certificate
    /// verification failed, no common parameters): its own alert, or a close.
    ProxyRejected = 3,
    /// The upstream closed or reset the connection during the handshake.
    Closed = 4,
}

impl TlsReason {
    pub const ALL: [TlsReason; 4] = [
        TlsReason::PlaintextUpstream,
        TlsReason::Alert,
        TlsReason::ProxyRejected,
        TlsReason::Closed,
    ];

    pub const fn from_u8(v: u8) -> Option<TlsReason> {
        Some(match v {
            1 => TlsReason::PlaintextUpstream,
            2 => TlsReason::Alert,
            3 => TlsReason::ProxyRejected,
            4 => TlsReason::Closed,
            _ => return None,
        })
    }

    pub const fn name(self) -> &'static str {
        match self {
            TlsReason::PlaintextUpstream => "plaintext_upstream",
            TlsReason::Alert => "alert",
            TlsReason::ProxyRejected => "proxy_rejected",
            TlsReason::Closed => "closed",
        }
    }
}

/// The name of a TLS alert description (RFC 8446 §6, RFC 5246 §7.2), `None` if unknown.
pub const fn alert_name(description: u8) -> Option<&'static str> {
    Some(match description {
        0 => "close_notify",
        10 => "unexpected_message",
        20 => "bad_record_mac",
        22 => "record_overflow",
        40 => "handshake_failure",
        42 => "bad_certificate",
        43 => "unsupported_certificate",
        44 => "certificate_revoked",
        45 => "certificate_expired",
        46 => "certificate_unknown",
        47 => "illegal_parameter",
        48 => "unknown_ca",
        49 => "access_denied",
        50 => "decode_error",
        51 => "decrypt_error",
        70 => "protocol_version",
        71 => "insufficient_security",
        80 => "internal_error",
        86 => "inappropriate_fallback",
        90 => "user_canceled",
        109 => "missing_extension",
        110 => "unsupported_extension",
        112 => "unrecognized_name",
        113 => "bad_certificate_status_response",
        115 => "unknown_psk_identity",
        116 => "certificate_required",
        120 => "no_application_protocol",
        _ => return None,
    })
}

/// Whether `head` starts like a TLS record of any content type.
pub const fn is_tls_record(head: &[u8; PEEK_BYTES], len: u8) -> bool {
    len >= 2
        && head[0] >= record::CHANGE_CIPHER_SPEC
        && head[0] <= record::APPLICATION_DATA
        && head[1] == 3
}

/// Whether `head` starts a handshake record holding a ClientHello.
pub const fn is_client_hello(head: &[u8; PEEK_BYTES], len: u8) -> bool {
    len >= 6 && head[0] == record::HANDSHAKE && head[1] == 3 && head[5] == 1
}

/// The alert a record starting with `head` carries: `Some((level, description))` for a
/// plaintext alert record.
pub const fn alert(head: &[u8; PEEK_BYTES], len: u8) -> Option<(u8, u8)> {
    if len >= 7 && head[0] == record::ALERT && head[1] == 3 && head[3] == 0 && head[4] == 2 {
        Some((head[5], head[6]))
    } else {
        None
    }
}

/// Whether a send of `size` bytes starting with `head` is a lone alert record: a plaintext or
/// TLS 1.2 one (content type 21), or a TLS 1.3 one (encrypted as application data: 2 bytes of
/// alert, 1 of inner type and a 16-byte tag, 24 bytes in all with the header).
pub const fn is_alert_shaped(head: &[u8; PEEK_BYTES], len: u8, size: u64) -> bool {
    if len < 5 || head[1] != 3 {
        return false;
    }
    let record = ((head[3] as u64) << 8 | head[4] as u64) + 5;
    // TLS 1.2 and older keep the alert type on an encrypted alert (2 bytes, with an explicit
    // nonce, a MAC or padding: at most 64 in all); TLS 1.3 hides it in application data
    // (2 bytes of alert, 1 of inner type, a tag of at most 16: at most 24 in all).
    record == size
        && ((head[0] == record::ALERT && size <= ALERT_MAX_BYTES)
            || (head[0] == record::APPLICATION_DATA && size <= 24))
}

/// The largest send that may be a lone alert record (see [`is_alert_shaped`]).
pub const ALERT_MAX_BYTES: u64 = 64;

/// Whether a send of `size` bytes is a lone change_cipher_spec record (TLS 1.3's
/// compatibility one, which a client may send apart right after the ServerHello).
pub const fn is_lone_change_cipher_spec(head: &[u8; PEEK_BYTES], len: u8, size: u64) -> bool {
    len >= 1 && head[0] == record::CHANGE_CIPHER_SPEC && size == 6
}

/// What the close of a connection whose verdict waits for the proxy's read had decided
/// (`Peek::CLOSED`), by `struct sock *` in the kernel's `DEFERRED` map: the outcome counted
/// then (0: none), and what its report will show.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeferredClose {
    pub close_ns: u64,
    pub waited_ns: u64,
    pub bytes_received: u64,
    pub bytes_acked: u64,
    pub errno: i32,
    /// The outcome counted at the close (an `Outcome` code, 0 for none).
    pub outcome: u8,
    /// Whether its event fits the events-per-second budget.
    pub send: u8,
    /// Whether the upstream's FIN or RST ended the connection.
    pub upstream_ended: u8,
    /// The counted outcome's detail (its count key's `bucket`: a `TlsReason`, or 0).
    pub detail: u8,
}

/// The first bytes of a connection, kept in its record (`ConnTrack::peek`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peek {
    /// The first bytes of the proxy's first send.
    pub sent: [u8; PEEK_BYTES],
    /// The first bytes the upstream sent, gathered over the proxy's reads. 16 bytes so that a
    /// read of up to 8 more bytes at any offset below 8 stays inside (what the verifier checks).
    pub received: [u8; 2 * PEEK_BYTES],
    /// The first bytes of the proxy's second flight: its first send after it had received (a
    /// lone TLS 1.3 change_cipher_spec aside).
    pub second: [u8; PEEK_BYTES],
    /// The first bytes of the proxy's latest send after its second flight, and its size
    /// (capped).
    pub last: [u8; PEEK_BYTES],
    pub last_size: u16,
    /// How many of each are filled (at most [`PEEK_BYTES`]).
    pub sent_len: u8,
    pub received_len: u8,
    pub second_len: u8,
    pub last_len: u8,
    /// The proxy's sends after its second flight (capped at 255).
    pub after_second: u8,
    /// [`Peek::ANSWERED`] and the others.
    pub flags: u8,
    /// The size of an alert the proxy is sending on an established TLS connection (its
    /// close_notify as it closes), seen at the syscall before the kernel's send path: that send
    /// is no request (`ConnTrack::on_send` and `on_write_seq` skip it). 0: none.
    pub alert_sending: u8,
    pub _pad: [u8; 7],
}

impl Peek {
    /// The upstream sent data after the proxy's second flight.
    pub const ANSWERED: u8 = 1;
    /// The kernel follows this connection's reads and writes (the agent attached the probes).
    pub const WATCHED: u8 = 2;
    /// The socket closed before the proxy read what the upstream sent (an upstream that
    /// answered and reset at once): the record waits in `CONNS` for that read, with its
    /// [`DeferredClose`], and only the first-bytes programs look at it.
    pub const CLOSED: u8 = 4;

    /// Whether the verdict at the socket's close must wait for the proxy's read: the upstream
    /// sent `data_received` bytes of which the proxy read none yet, and they may be what tells
    /// a TLS failure. Only when the upstream (or the kernel) ended the connection
    /// (`proxy_holds_it`): the proxy still holds the socket and will read it, or close() it.
    /// A connection the proxy closed itself will see no read.
    pub const fn must_wait_for_read(&self, data_received: u64, proxy_holds_it: bool) -> bool {
        self.flags & Peek::WATCHED != 0
            && self.sent_len > 0
            && self.received_len == 0
            && data_received > 0
            && proxy_holds_it
    }

    pub const EMPTY: Peek = Peek {
        sent: [0; PEEK_BYTES],
        received: [0; 2 * PEEK_BYTES],
        second: [0; PEEK_BYTES],
        last: [0; PEEK_BYTES],
        last_size: 0,
        sent_len: 0,
        received_len: 0,
        second_len: 0,
        last_len: 0,
        after_second: 0,
        flags: 0,
        alert_sending: 0,
        _pad: [0; 7],
    };

    /// The first bytes the upstream sent, as far as they are known.
    pub const fn received_head(&self) -> [u8; PEEK_BYTES] {
        let r = &self.received;
        [r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]]
    }

    const fn tls_handshake_started(&self) -> bool {
        is_client_hello(&self.sent, self.sent_len)
            && self.received_len > 0
            && is_tls_record(&self.received_head(), self.received_len)
            && self.received[0] != record::ALERT
    }

    /// Whether the connection is TLS past its first bytes: the kernel keeps looking at the
    /// proxy's sends, for the alerts that are no requests (a close_notify).
    pub const fn tls_established(&self) -> bool {
        self.done() && self.tls_handshake_started()
    }

    /// Whether the first bytes are all known: the kernel stops reading the connection's bytes
    /// (and, but for a TLS one, stops looking at its reads and writes).
    pub const fn done(&self) -> bool {
        if self.sent_len == 0 || (self.received_len as usize) < PEEK_BYTES {
            return false;
        }
        // A plaintext exchange is told by its first bytes, and so is a ClientHello answered
        // in plaintext or with an alert. A handshake is over for tracer once the proxy sent
        // after its second flight and the upstream answered, or sent twice.
        !self.tls_handshake_started()
            || self.after_second >= 2
            || (self.after_second >= 1 && self.flags & Peek::ANSWERED != 0)
    }

    /// Whether the next send's first bytes are still wanted.
    pub const fn wants_send(&self) -> bool {
        !self.done()
    }

    /// Whether what the next read returns is still wanted: not before the proxy's first send.
    /// Every verdict starts from what the proxy sent first (a TLS client speaks first, and so
    /// does a proxy speaking plaintext to a TLS port); what a server that speaks first (a
    /// greeting) sends before it tells nothing, and a connection the proxy only opens and
    /// closes (a TCP health check) then costs no read's bookkeeping.
    pub const fn wants_receive(&self) -> bool {
        self.sent_len > 0 && !self.done()
    }

    /// The proxy sends `size` bytes starting with `head` (`head` filled up to `size`, at most
    /// [`PEEK_BYTES`]).
    pub fn on_send(&mut self, head: &[u8; PEEK_BYTES], size: u64) {
        let n = if size < PEEK_BYTES as u64 {
            size as u8
        } else {
            PEEK_BYTES as u8
        };
        if n == 0 {
            return;
        }
        if self.sent_len == 0 {
            self.sent = *head;
            self.sent_len = n;
        } else if self.second_len == 0 {
            if self.received_len > 0 && !is_lone_change_cipher_spec(head, n, size) {
                self.second = *head;
                self.second_len = n;
            }
        } else {
            self.last = *head;
            self.last_len = n;
            self.last_size = if size > u16::MAX as u64 {
                u16::MAX
            } else {
                size as u16
            };
            self.after_second = self.after_second.saturating_add(1);
        }
    }

    /// The proxy read `len` bytes; the kernel wrote up to the first [`PEEK_BYTES`] missing of
    /// them into `received` at `received_len` already (when that was below `PEEK_BYTES`).
    pub fn on_receive(&mut self, len: u64) {
        if len == 0 {
            return;
        }
        if self.second_len > 0 {
            self.flags |= Peek::ANSWERED;
        }
        let have = self.received_len as u64;
        if have < PEEK_BYTES as u64 {
            let total = have + len;
            self.received_len = if total < PEEK_BYTES as u64 {
                total as u8
            } else {
                PEEK_BYTES as u8
            };
        }
    }

    /// The proxy's alert that ended the handshake, when it sent one: its second flight, or
    /// its one send after it.
    const fn proxy_alert(&self) -> Option<([u8; PEEK_BYTES], u8)> {
        if self.after_second == 1
            && is_alert_shaped(&self.last, self.last_len, self.last_size as u64)
        {
            return Some((self.last, self.last_len));
        }
        if self.after_second == 0 && self.second_len > 0 && self.second[0] == record::ALERT {
            return Some((self.second, self.second_len));
        }
        None
    }

    /// The alert the proxy ended the handshake with, when it was sent in plaintext:
    /// `(level, description)`.
    pub const fn proxy_alert_text(&self) -> Option<(u8, u8)> {
        match self.proxy_alert() {
            Some((head, len)) => alert(&head, len),
            None => None,
        }
    }

    /// What the first bytes say about a connection that ended (`upstream_ended`: the upstream's
    /// FIN or RST came first): a TLS failure and its reason (0 for `plaintext_to_tls`), or
    /// `None` when they say nothing against it.
    pub fn verdict(&self, upstream_ended: bool) -> Option<(crate::Outcome, u8)> {
        use crate::Outcome;
        if self.flags & Peek::WATCHED == 0 || self.sent_len == 0 {
            return None;
        }
        let received = self.received_head();
        if is_client_hello(&self.sent, self.sent_len) {
            let reason = if self.received_len == 0 {
                // Nothing came back: a timeout is the proxy's to tell (response_timeout).
                if !upstream_ended {
                    return None;
                }
                TlsReason::Closed
            } else if !is_tls_record(&received, self.received_len) {
                TlsReason::PlaintextUpstream
            } else if received[0] == record::ALERT {
                TlsReason::Alert
            } else if self.proxy_alert().is_some() {
                // The proxy's alert (fatal, or the close_notify it sends in its place) came
                // where its request should have: it refused the upstream (nginx checks the
                // certificate once the handshake is done).
                TlsReason::ProxyRejected
            } else if self.flags & Peek::ANSWERED != 0 {
                // The handshake went past the proxy's second flight: what follows is the
                // usual exchange, judged as any other.
                return None;
            } else if upstream_ended {
                TlsReason::Closed
            } else {
                // The upstream's first flight came, and the proxy ended the connection without
                // anything more from the upstream: it rejected what it got.
                TlsReason::ProxyRejected
            };
            return Some((Outcome::TlsHandshakeFailed, reason as u8));
        }
        if !is_tls_record(&self.sent, self.sent_len)
            && is_tls_record(&received, self.received_len)
            && (received[0] == record::ALERT || received[0] == record::HANDSHAKE)
        {
            return Some((Outcome::PlaintextToTls, 0));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Outcome;

    const HELLO: &[u8] = &[22, 3, 1, 2, 0, 1, 0, 1, 252];
    const SERVER_HELLO: &[u8] = &[22, 3, 3, 0, 122];
    const SERVER_HELLO_BODY: &[u8] = &[2, 0, 0, 118, 3, 3];
    const ALERT_PROTOCOL_VERSION: &[u8] = &[21, 3, 3, 0, 2, 2, 70];
    const FINISHED_13: &[u8] = &[23, 3, 3, 0, 53, 1, 2, 3];

    fn head(bytes: &[u8]) -> [u8; PEEK_BYTES] {
        let mut h = [0; PEEK_BYTES];
        let n = bytes.len().min(PEEK_BYTES);
        h[..n].copy_from_slice(&bytes[..n]);
        h
    }

    fn send(p: &mut Peek, bytes: &[u8]) {
        if p.wants_send() {
            p.on_send(&head(bytes), bytes.len() as u64);
        }
    }

    #[test]
    fn alert_shapes() {
        assert!(is_alert_shaped(&head(ALERT_PROTOCOL_VERSION), 7, 7));
        assert!(is_alert_shaped(&head(&[23, 3, 3, 0, 19]), 5, 24));
        assert!(
            !is_alert_shaped(&head(&[23, 3, 3, 0, 19]), 5, 120),
            "more than one record"
        );
        assert!(!is_alert_shaped(&head(FINISHED_13), 8, 58));
    }

    /// What the kernel does for a read: copy the missing first bytes, then note the length.
    fn receive(p: &mut Peek, bytes: &[u8]) {
        if !p.wants_receive() {
            return;
        }
        let at = p.received_len as usize;
        if at < PEEK_BYTES {
            let n = bytes.len().min(PEEK_BYTES);
            p.received[at..at + n].copy_from_slice(&bytes[..n]);
        }
        p.on_receive(bytes.len() as u64);
    }

    fn watched() -> Peek {
        Peek {
            flags: Peek::WATCHED,
            ..Peek::EMPTY
        }
    }

    #[test]
    fn a_plaintext_answer_to_a_client_hello() {
        let mut p = watched();
        send(&mut p, HELLO);
        receive(&mut p, b"HTTP/1.1 400 Bad Request\r\n");
        assert!(p.done());
        assert_eq!(
            p.verdict(true),
            Some((
                Outcome::TlsHandshakeFailed,
                TlsReason::PlaintextUpstream as u8
            ))
        );
    }

    #[test]
    fn an_alert_read_as_header_then_body() {
        let mut p = watched();
        send(&mut p, HELLO);
        receive(&mut p, &ALERT_PROTOCOL_VERSION[..5]);
        receive(&mut p, &ALERT_PROTOCOL_VERSION[5..]);
        assert_eq!(alert(&p.received_head(), p.received_len), Some((2, 70)));
        assert_eq!(
            p.verdict(true),
            Some((Outcome::TlsHandshakeFailed, TlsReason::Alert as u8))
        );
        assert_eq!(alert_name(70), Some("protocol_version"));
    }

    #[test]
    fn the_proxy_rejecting_the_first_flight() {
        let mut p = watched();
        send(&mut p, HELLO);
        receive(&mut p, SERVER_HELLO);
        receive(&mut p, SERVER_HELLO_BODY);
        // TLS 1.2: a plaintext alert (unknown_ca), then the proxy closes.
        send(&mut p, &[21, 3, 3, 0, 2, 2, 48]);
        assert_eq!(p.proxy_alert_text(), Some((2, 48)));
        assert!(!p.done());
        assert_eq!(
            p.verdict(false),
            Some((Outcome::TlsHandshakeFailed, TlsReason::ProxyRejected as u8))
        );
    }

    /// nginx checks the certificate once the handshake is done: the proxy's alert comes where
    /// its request would have.
    #[test]
    fn the_proxy_rejecting_after_the_handshake() {
        // TLS 1.2 resumed: SH+CCS+Finished in; CCS+Finished out; an encrypted alert (26 bytes
        // of record).
        let mut p = watched();
        send(&mut p, HELLO);
        receive(&mut p, &[22, 3, 3, 0, 85, 2, 0, 0]);
        send(&mut p, &[20, 3, 3, 0, 1, 1, 22, 3]);
        send(
            &mut p,
            &[
                21, 3, 3, 0, 26, 0x39, 0xb6, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                0, 0, 0, 0, 0, 0, 0,
            ],
        );
        assert_eq!(
            p.verdict(false),
            Some((Outcome::TlsHandshakeFailed, TlsReason::ProxyRejected as u8))
        );
        assert_eq!(p.proxy_alert_text(), None, "encrypted");
        // TLS 1.2 full: the upstream's Finished answers the proxy's, then the alert.
        let mut p = watched();
        send(&mut p, HELLO);
        receive(&mut p, SERVER_HELLO);
        send(&mut p, &[22, 3, 3, 0, 37, 16, 0, 0]);
        receive(&mut p, &[20, 3, 3, 0, 1, 1]);
        send(
            &mut p,
            &[
                21, 3, 3, 0, 26, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                0, 0, 0, 0,
            ],
        );
        assert!(p.done());
        assert_eq!(
            p.verdict(false),
            Some((Outcome::TlsHandshakeFailed, TlsReason::ProxyRejected as u8))
        );
        // TLS 1.3: a lone compatibility CCS, the Finished, then an encrypted alert (24 bytes).
        let mut p = watched();
        send(&mut p, HELLO);
        receive(&mut p, SERVER_HELLO);
        send(&mut p, &[20, 3, 3, 0, 1, 1]);
        send(&mut p, FINISHED_13);
        receive(&mut p, &[23, 3, 3, 0, 200]);
        send(
            &mut p,
            &[
                23, 3, 3, 0, 19, 9, 9, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
        );
        assert_eq!(
            p.verdict(false),
            Some((Outcome::TlsHandshakeFailed, TlsReason::ProxyRejected as u8))
        );
    }

    /// A request, a response, and the close_notify the proxy ends with: no failure.
    #[test]
    fn a_close_notify_after_an_exchange_is_no_failure() {
        let mut p = watched();
        send(&mut p, HELLO);
        receive(&mut p, SERVER_HELLO);
        receive(&mut p, SERVER_HELLO_BODY);
        send(&mut p, &[20, 3, 3, 0, 1, 1, 23, 3]);
        send(&mut p, &[23, 3, 3, 0, 80, 1, 2, 3]);
        receive(&mut p, &[23, 3, 3, 1, 0, 4, 5, 6]);
        send(
            &mut p,
            &[
                23, 3, 3, 0, 19, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
        );
        assert!(p.done());
        assert_eq!(p.verdict(false), None);
        assert_eq!(p.verdict(true), None);
    }

    #[test]
    fn a_handshake_that_went_on_is_judged_as_usual() {
        let mut p = watched();
        send(&mut p, HELLO);
        receive(&mut p, SERVER_HELLO);
        receive(&mut p, SERVER_HELLO_BODY);
        send(&mut p, FINISHED_13);
        send(&mut p, b"GET / HTTP/1.1");
        receive(&mut p, &[23, 3, 3, 1, 0]);
        assert!(p.done());
        assert_eq!(p.verdict(true), None);
        assert_eq!(p.verdict(false), None);
    }

    #[test]
    fn the_upstream_closing_during_the_handshake() {
        let mut p = watched();
        send(&mut p, HELLO);
        assert_eq!(
            p.verdict(true),
            Some((Outcome::TlsHandshakeFailed, TlsReason::Closed as u8))
        );
        // The proxy giving up on a silent upstream is its timeout, not this.
        assert_eq!(p.verdict(false), None);
        receive(&mut p, SERVER_HELLO);
        send(&mut p, FINISHED_13);
        assert_eq!(
            p.verdict(true),
            Some((Outcome::TlsHandshakeFailed, TlsReason::Closed as u8))
        );
    }

    #[test]
    fn plaintext_to_a_tls_port() {
        let mut p = watched();
        send(&mut p, b"GET / HTTP/1.0\r\n");
        receive(&mut p, ALERT_PROTOCOL_VERSION);
        assert_eq!(p.verdict(true), Some((Outcome::PlaintextToTls, 0)));
        // A TLS server answering in plaintext (nginx's "400 The plain HTTP request was sent to
        // HTTPS port") is an HTTP answer: the proxy passes it on.
        let mut p = watched();
        send(&mut p, b"GET / HTTP/1.0\r\n");
        receive(&mut p, b"HTTP/1.1 400 Bad Request\r\n");
        assert_eq!(p.verdict(true), None);
    }

    #[test]
    fn unwatched_or_plain_connections_say_nothing() {
        let mut p = Peek::EMPTY;
        send(&mut p, HELLO);
        receive(&mut p, b"HTTP/1.1 400");
        assert_eq!(p.verdict(true), None);
        let mut p = watched();
        send(&mut p, b"GET / HTTP/1.1\r\n");
        receive(&mut p, b"HTTP/1.1 200 OK\r\n");
        assert_eq!(p.verdict(true), None);
        assert_eq!(p.verdict(false), None);
    }

    #[test]
    fn reads_before_the_first_send_are_not_wanted() {
        // A server that greets first: its greeting is not what the first send is answered by.
        let mut p = watched();
        assert!(!p.wants_receive(), "nothing sent yet");
        receive(&mut p, b"220 mail ESMTP\r\n");
        assert_eq!(p.received_len, 0);
        send(&mut p, b"EHLO a\r\n");
        assert!(p.wants_receive());
        receive(&mut p, b"250-mail\r\n");
        assert_eq!(&p.received_head(), b"250-mail");
        assert_eq!(p.verdict(true), None);
    }

    #[test]
    fn short_reads_gather_up_to_eight_bytes() {
        let mut p = watched();
        send(&mut p, HELLO);
        receive(&mut p, b"HT");
        receive(&mut p, b"TP/1.1 400");
        assert_eq!(&p.received_head(), b"HTTP/1.1");
        assert_eq!(p.received_len as usize, PEEK_BYTES);
    }

    #[test]
    fn only_a_socket_the_proxy_still_holds_waits_for_its_read() {
        let mut p = watched();
        send(&mut p, b"GET / HTTP/1.0\r\n");
        assert!(p.must_wait_for_read(7, true));
        assert!(
            !p.must_wait_for_read(7, false),
            "the proxy closed it: no read will come"
        );
        assert!(!p.must_wait_for_read(0, true), "nothing to read");
        receive(&mut p, b"HTTP/1.1 200 OK\r\n");
        assert!(!p.must_wait_for_read(7, true), "read already");
        assert!(!Peek::EMPTY.must_wait_for_read(7, true), "not watched");
    }

    #[test]
    fn reasons_round_trip() {
        for r in TlsReason::ALL {
            assert_eq!(TlsReason::from_u8(r as u8), Some(r));
        }
    }
}
