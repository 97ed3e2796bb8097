//! The per-connection record the kernel keeps for every outbound TCP connection, and the state
//! machine that turns what the kernel saw into one [`Outcome`].
//!
//! The kernel programs are thin: each tracepoint looks the connection up by its `struct sock *`
//! and calls one method here. Because this is plain `no_std` Rust without loops, the same code
//! runs in the kernel and in the unit tests below, which replay recorded event sequences.
//!
//! How a request is told from its response without parsing the protocol: every time the proxy
//! starts sending on the connection (`tcp:tcp_sendmsg_locked` fires before any byte of that send
//! leaves), the record keeps the connection's `bytes_received` counter. When the connection ends,
//! `bytes_received` equal to that snapshot means no response byte arrived after the last request.
//!
//! Kernels before 6.16 have no `tcp_sendmsg_locked`. There the sends are inferred
//! ([`ConnTrack::on_write_seq`]): the proxy's `write_seq` (the end of what it has written) only
//! moves in sendmsg(), and `bytes_received` only moves while an incoming segment is processed.
//! So the record looks at `write_seq` before each incoming data segment is processed
//! (`tcp:tcp_probe`) and before the connection's end: if it moved since the last look, the proxy
//! sent in between, when `bytes_received` was what it is now. Sends between two incoming data
//! segments count as one.

use crate::{net::Endpoint, outcome::Outcome, peek::Peek};

/// TCP states as the kernel numbers them (include/net/tcp_states.h).
pub mod tcp_state {
    pub const ESTABLISHED: i32 = 1;
    pub const SYN_SENT: i32 = 2;
    pub const SYN_RECV: i32 = 3;
    pub const FIN_WAIT1: i32 = 4;
    pub const FIN_WAIT2: i32 = 5;
    pub const TIME_WAIT: i32 = 6;
    pub const CLOSE: i32 = 7;
    pub const CLOSE_WAIT: i32 = 8;
    pub const LAST_ACK: i32 = 9;
    pub const LISTEN: i32 = 10;
    pub const CLOSING: i32 = 11;
    pub const NEW_SYN_RECV: i32 = 12;
}

/// The errno values the decision looks at (asm-generic/errno.h, as on x86, arm and riscv).
pub mod errno {
    pub const EPERM: i32 = 1;
    pub const ENOENT: i32 = 2;
    pub const EINTR: i32 = 4;
    pub const EAGAIN: i32 = 11;
    pub const EACCES: i32 = 13;
    pub const ENFILE: i32 = 23;
    pub const EMFILE: i32 = 24;
    pub const EADDRNOTAVAIL: i32 = 99;
    pub const ENETDOWN: i32 = 100;
    pub const ENETUNREACH: i32 = 101;
    pub const EISCONN: i32 = 106;
    pub const ETIMEDOUT: i32 = 110;
    pub const ECONNREFUSED: i32 = 111;
    pub const EHOSTDOWN: i32 = 112;
    pub const EHOSTUNREACH: i32 = 113;
    pub const EALREADY: i32 = 114;
    pub const EINPROGRESS: i32 = 115;
}

/// A process (a task, as the kernel says): who started a connection (the proxy, taken in
/// process context when the socket went CLOSE→SYN_SENT inside connect()), or the owner of a
/// listener, or a process that exited.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Task {
    /// The cgroup (v2) the process ran in, for a container label.
    pub cgroup_id: u64,
    /// Process id (tgid) and thread id.
    pub tgid: u32,
    pub pid: u32,
    /// The process's name (its main thread's comm), NUL-padded.
    pub comm: [u8; 16],
    /// The network namespace of the socket (its inode number), to tell loopbacks apart.
    pub netns: u32,
    pub _pad: u32,
}

/// What ended the connection first.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndKind {
    /// Still open.
    Open = 0,
    /// The upstream sent a RST.
    PeerReset = 1,
    /// The upstream sent a FIN.
    PeerFin = 2,
    /// The proxy closed (or shut down) its side.
    ProxyClose = 3,
    /// The kernel gave up on the connection (retransmission timeout, ICMP error) with `sk_err` set.
    KernelError = 4,
}

impl EndKind {
    pub const fn from_u8(v: u8) -> EndKind {
        match v {
            1 => EndKind::PeerReset,
            2 => EndKind::PeerFin,
            3 => EndKind::ProxyClose,
            4 => EndKind::KernelError,
            _ => EndKind::Open,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            EndKind::Open => "open",
            EndKind::PeerReset => "upstream_reset",
            EndKind::PeerFin => "upstream_fin",
            EndKind::ProxyClose => "proxy_close",
            EndKind::KernelError => "kernel_error",
        }
    }
}

/// The per-connection record, the value of the kernel's `CONNS` map keyed by `struct sock *`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnTrack {
    pub proxy: Task,
    pub upstream: Endpoint,
    pub local: Endpoint,
    /// When connect() put the socket in SYN_SENT (CLOCK_MONOTONIC ns).
    pub connect_ns: u64,
    /// When the handshake completed; 0 if it never did.
    pub established_ns: u64,
    /// When the first end signal ([`EndKind`]) came.
    pub end_ns: u64,
    /// When the proxy last started sending, and the connection's `bytes_received` then.
    pub last_send_ns: u64,
    pub rx_at_last_send: u64,
    /// How many times the proxy started sending.
    pub sends: u32,
    /// SYNs retransmitted while connecting, and data retransmits once established.
    pub syn_retransmits: u16,
    pub retransmits: u16,
    /// An [`EndKind`].
    pub end: u8,
    /// Non-zero when a RST from the upstream was seen (`tcp:tcp_receive_reset`).
    pub reset_received: u8,
    /// Non-zero when the upstream's FIN was seen (the socket went to CLOSE_WAIT or CLOSING).
    pub fin_received: u8,
    /// The TCP state the last transition tracer looked at left the socket in
    /// ([`ConnTrack::follows`]).
    pub state: u8,
    /// Where sends are inferred ([`ConnTrack::on_write_seq`]): the proxy's `tcp_sock.write_seq`
    /// at the last look.
    pub seen_write_seq: u32,
    /// The first bytes each side sent (TLS or not), where the kernel watches reads and writes.
    pub peek: Peek,
}

/// The decision about a connection that reached TCP_CLOSE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// `None`: ended normally (or an outcome not worth counting again).
    pub outcome: Option<Outcome>,
    /// What the failure waited: the connect attempt's duration for connect-phase outcomes; how
    /// long the last request went without an answer for response-phase ones.
    pub waited_ns: u64,
    /// What the count key's `bucket` holds for the outcome: a `TlsReason` code for
    /// `tls_handshake_failed`, else 0.
    pub detail: u8,
}

/// What the kernel reads off the socket when it reaches TCP_CLOSE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseFacts {
    pub now_ns: u64,
    /// The state the socket left for TCP_CLOSE.
    pub old_state: i32,
    /// `sk->sk_err`: the error the kernel ended the connection with (0 when the proxy closed).
    pub sk_err: i32,
    /// `tcp_sock->bytes_received`: sequence space received, so a FIN counts one.
    pub bytes_received: u64,
    /// [`crate::Config::min_wait_ns`].
    pub min_wait_ns: u64,
    /// Whether the send probe is attached (else requests are invisible and fewer causes can be
    /// told apart).
    pub sends_tracked: bool,
}

impl ConnTrack {
    /// A connection the proxy starts: CLOSE→SYN_SENT, in connect().
    pub const fn connecting(proxy: Task, upstream: Endpoint, local: Endpoint, now_ns: u64) -> Self {
        ConnTrack {
            proxy,
            upstream,
            local,
            connect_ns: now_ns,
            established_ns: 0,
            end_ns: 0,
            last_send_ns: 0,
            rx_at_last_send: 0,
            sends: 0,
            syn_retransmits: 0,
            retransmits: 0,
            end: EndKind::Open as u8,
            reset_received: 0,
            fin_received: 0,
            state: tcp_state::SYN_SENT as u8,
            seen_write_seq: 0,
            peek: Peek::EMPTY,
        }
    }

    /// Makes this record a new attempt toward `upstream` started at `now_ns`, in place (the
    /// kernel builds records in scratch memory, not on its small stack); the caller fills in
    /// `proxy`.
    #[inline(always)]
    pub fn begin(&mut self, upstream: &Endpoint, local: &Endpoint, now_ns: u64) {
        self.upstream = *upstream;
        self.local = *local;
        self.connect_ns = now_ns;
        self.established_ns = 0;
        self.end_ns = 0;
        self.last_send_ns = 0;
        self.rx_at_last_send = 0;
        self.sends = 0;
        self.syn_retransmits = 0;
        self.retransmits = 0;
        self.end = EndKind::Open as u8;
        self.reset_received = 0;
        self.fin_received = 0;
        self.state = tcp_state::SYN_SENT as u8;
        self.seen_write_seq = 0;
        self.peek = Peek::EMPTY;
    }

    /// SYN_SENT→ESTABLISHED. Returns how long the connect took.
    pub fn on_established(&mut self, now_ns: u64) -> u64 {
        self.established_ns = now_ns;
        now_ns.saturating_sub(self.connect_ns)
    }

    /// Whether the socket, reaching TCP_CLOSE from `old_state`, was established though its
    /// SYN_SENT→ESTABLISHED was not seen: the kernel skipped the program there (one was already
    /// running on the CPU, which kernels that preempt programs make happen), or a simultaneous
    /// open went through SYN_RECV. Its close must not be judged as an attempt that never
    /// connected.
    pub const fn established_unseen(&self, old_state: i32) -> bool {
        self.established_ns == 0 && old_state != tcp_state::SYN_SENT
    }

    /// Whether a transition out of `old_state` can be this record's socket's next: `old_state`
    /// is the state the last transition looked at left it in, or one tracer never looks up on
    /// the way from there (FIN_WAIT1→FIN_WAIT2, →TIME_WAIT). One that cannot is either this
    /// socket after a transition the kernel skipped the program for, or another socket that
    /// took the address of a record whose close went unseen (a skipped run too): the caller
    /// tells them apart by the peer's port.
    pub const fn follows(&self, old_state: i32) -> bool {
        use tcp_state::*;
        let last = self.state as i32;
        old_state == last
            || (matches!(last, FIN_WAIT1 | CLOSING) && matches!(old_state, FIN_WAIT2 | TIME_WAIT))
    }

    /// The transition to `new_state` was looked at ([`ConnTrack::follows`]).
    pub fn seen_state(&mut self, new_state: i32) {
        self.state = new_state as u8;
    }

    /// `tcp:tcp_retransmit_skb` on this connection.
    pub fn on_retransmit(&mut self) {
        if self.established_ns == 0 {
            self.syn_retransmits = self.syn_retransmits.saturating_add(1);
        } else {
            self.retransmits = self.retransmits.saturating_add(1);
        }
    }

    /// `tcp:tcp_sendmsg_locked`: the proxy starts sending; `bytes_received` is the connection's
    /// counter before any byte of this send left.
    pub fn on_send(&mut self, now_ns: u64, bytes_received: u64) {
        if self.peek.alert_sending != 0 {
            // A TLS alert (the proxy's close_notify), seen at its syscall: no request.
            self.peek.alert_sending = 0;
            return;
        }
        self.sends = self.sends.saturating_add(1);
        self.last_send_ns = now_ns;
        self.rx_at_last_send = bytes_received;
    }

    /// Where no probe sees sends (before Linux 6.16): the proxy's `write_seq` now, the
    /// connection's `bytes_received` now, and when the kernel last sent or received on it
    /// (`tcp_sock.tcp_clock_cache`). Called at SYN_SENT→ESTABLISHED (which only notes where
    /// `write_seq` starts), before each incoming data segment is processed, and before the
    /// connection ends. A `write_seq` that moved since the last look means the proxy sent in
    /// between: before any byte of the segment being processed arrived.
    pub fn on_write_seq(&mut self, write_seq: u32, bytes_received: u64, sent_ns: u64) {
        if write_seq != self.seen_write_seq {
            let sent = write_seq.wrapping_sub(self.seen_write_seq);
            self.seen_write_seq = write_seq;
            if self.peek.alert_sending != 0 && sent != u32::from(self.peek.alert_sending) {
                // More than the alert went out since the last look: a request too.
                self.peek.alert_sending = 0;
            }
            self.on_send(sent_ns, bytes_received);
        }
    }

    /// SYN_SENT→ESTABLISHED where sends are inferred: the proxy's `write_seq` then (after the
    /// SYN) is where its requests start.
    pub fn start_write_seq(&mut self, write_seq: u32) {
        self.seen_write_seq = write_seq;
    }

    /// `tcp:tcp_receive_reset`.
    pub fn on_reset_received(&mut self, now_ns: u64) {
        self.reset_received = 1;
        self.mark_end(EndKind::PeerReset, now_ns);
    }

    /// A state change other than the first (SYN_SENT) and the last (CLOSE).
    pub fn on_state_change(&mut self, old: i32, new: i32, now_ns: u64) {
        use tcp_state::*;
        if new == CLOSE_WAIT || new == CLOSING {
            self.fin_received = 1;
        }
        match (old, new) {
            (ESTABLISHED, CLOSE_WAIT) => self.mark_end(EndKind::PeerFin, now_ns),
            (ESTABLISHED, FIN_WAIT1) | (CLOSE_WAIT, LAST_ACK) => {
                self.mark_end(EndKind::ProxyClose, now_ns)
            }
            _ => {}
        }
    }

    fn mark_end(&mut self, kind: EndKind, now_ns: u64) {
        if self.end == EndKind::Open as u8 {
            self.end = kind as u8;
            self.end_ns = now_ns;
        }
    }

    /// The socket reached TCP_CLOSE: decide what became of the connection.
    pub fn on_close(&mut self, facts: CloseFacts) -> Verdict {
        if self.established_ns == 0 {
            return self.decide_connect(facts);
        }
        if self.end == EndKind::Open as u8 {
            // Nothing announced the end: the kernel aborted the connection (sk_err says why) or
            // the proxy closed it abortively (unread data, SO_LINGER 0), which sends a RST.
            let kind = if facts.sk_err != 0 {
                EndKind::KernelError
            } else {
                EndKind::ProxyClose
            };
            self.mark_end(kind, facts.now_ns);
        }
        self.decide_response(facts)
    }

    /// The data bytes received, from the kernel's `bytes_received` at the CLOSE transition
    /// from `old_state`. That counter is sequence space, where the upstream's FIN takes one
    /// number: subtract it when the FIN was seen, or may just have come (FIN_WAIT2 goes straight
    /// to CLOSE when it arrives).
    pub fn data_received(&self, old_state: i32, bytes_received: u64) -> u64 {
        let fin = self.fin_received != 0 || old_state == tcp_state::FIN_WAIT2;
        bytes_received.saturating_sub(u64::from(fin))
    }

    fn decide_connect(&mut self, facts: CloseFacts) -> Verdict {
        let waited_ns = facts.now_ns.saturating_sub(self.connect_ns);
        self.mark_end(
            if self.reset_received != 0 {
                EndKind::PeerReset
            } else if facts.sk_err != 0 {
                EndKind::KernelError
            } else {
                EndKind::ProxyClose
            },
            facts.now_ns,
        );
        let outcome = if self.reset_received != 0 {
            Outcome::Refused
        } else {
            match facts.sk_err {
                0 if waited_ns < facts.min_wait_ns => Outcome::ConnectAbandoned,
                // The proxy closed the socket while SYNs were unanswered: its connect timeout.
                0 => Outcome::ConnectTimeout,
                other => match connect_errno_outcome(other) {
                    Some(outcome) => outcome,
                    None => Outcome::ConnectError,
                },
            }
        };
        Verdict {
            outcome: Some(outcome),
            waited_ns,
            detail: 0,
        }
    }

    fn decide_response(&self, facts: CloseFacts) -> Verdict {
        let end = EndKind::from_u8(self.end);
        let since_request = self.end_ns.saturating_sub(self.last_send_ns);
        if !facts.sends_tracked {
            // Without the send probe only resets can be told, by whether any byte ever came.
            let outcome = match (end, facts.bytes_received) {
                (EndKind::PeerReset, 0) => Some(Outcome::ResetBeforeResponse),
                (EndKind::PeerReset, _) => Some(Outcome::ResetMidResponse),
                _ => None,
            };
            return Verdict {
                outcome,
                waited_ns: self.end_ns.saturating_sub(self.established_ns),
                detail: 0,
            };
        }
        let waited_ns = if self.sends == 0 { 0 } else { since_request };
        // A TLS handshake that failed, or plaintext sent to a TLS port, before the rest: the
        // exchange's bytes were never a request and its response.
        let upstream_ended = matches!(end, EndKind::PeerReset | EndKind::PeerFin);
        if let Some((outcome, detail)) = self.peek.verdict(upstream_ended) {
            return Verdict {
                outcome: Some(outcome),
                waited_ns,
                detail,
            };
        }
        // A request is outstanding when the proxy sent and no data byte came back since.
        let answer_bytes = self
            .data_received(facts.old_state, facts.bytes_received)
            .saturating_sub(self.rx_at_last_send);
        let outstanding = self.sends > 0 && answer_bytes == 0;
        let outcome = match end {
            // A slow connect the proxy gave up on just as it completed: SYNs went unanswered,
            // then the proxy closed the connection soon after it was established, without a
            // byte sent. Its connect timer fired with the SYN-ACK to a retransmitted SYN (a
            // 3 s timeout meets the kernel's second SYN retransmit): HAProxy logs `sC`.
            EndKind::ProxyClose
                if self.sends == 0
                    && self.syn_retransmits > 0
                    && self.end_ns.saturating_sub(self.established_ns)
                        < GAVE_UP_AS_CONNECTED_NS =>
            {
                return Verdict {
                    outcome: Some(Outcome::ConnectTimeout),
                    waited_ns: self.end_ns.saturating_sub(self.connect_ns),
                    detail: 0,
                };
            }
            EndKind::PeerReset if self.sends == 0 || outstanding => {
                Some(Outcome::ResetBeforeResponse)
            }
            EndKind::PeerReset => Some(Outcome::ResetMidResponse),
            EndKind::PeerFin if outstanding => Some(Outcome::ClosedBeforeResponse),
            EndKind::ProxyClose if outstanding && since_request < facts.min_wait_ns => {
                Some(Outcome::RequestAbandoned)
            }
            EndKind::ProxyClose | EndKind::KernelError if outstanding => {
                Some(Outcome::ResponseTimeout)
            }
            // An idle keep-alive connection closed by either side, a response that ended with
            // the connection, a half-close: not failures.
            _ => None,
        };
        Verdict {
            outcome,
            waited_ns,
            detail: 0,
        }
    }
}

/// How soon after a slow connect completed the proxy's close without a byte sent means it gave
/// up on that connect (its timer and the late SYN-ACK met); longer, and it was a connection
/// opened ahead and left unused.
pub const GAVE_UP_AS_CONNECTED_NS: u64 = 2_000_000_000;

/// What a failed connect() (or a connection aborted with `sk_err` before it was established)
/// means, by errno. `None` for results that are not failures of the attempt (EINPROGRESS…).
pub const fn connect_errno_outcome(errno: i32) -> Option<Outcome> {
    use errno::*;
    match errno {
        0 | EINPROGRESS | EALREADY | EISCONN | EINTR => None,
        ECONNREFUSED => Some(Outcome::Refused),
        ETIMEDOUT => Some(Outcome::ConnectTimeout),
        EHOSTUNREACH | ENETUNREACH | EHOSTDOWN | ENETDOWN => Some(Outcome::Unreachable),
        EADDRNOTAVAIL => Some(Outcome::NoEphemeralPort),
        _ => Some(Outcome::ConnectError),
    }
}

/// A connect() in flight, the value of the kernel's `CONNECTS` map keyed by thread.
///
/// connect() can fail before the socket ever reaches SYN_SENT (no route: EHOSTUNREACH) or go
/// SYN_SENT→CLOSE inside the call without sending a SYN (no local port: EADDRNOTAVAIL). Those
/// failures are decided at the syscall's exit from its return value; everything that happens
/// after a SYN left is decided by [`ConnTrack`]. The destination is read from the caller's
/// memory at exit, and only for such failures, to keep every connect() cheap.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingConnect {
    /// The caller's `struct sockaddr *` and its length.
    pub uservaddr: u64,
    pub addrlen: u64,
    pub start_ns: u64,
    /// The socket, once it went CLOSE→SYN_SENT inside this call (0 before).
    pub sk: u64,
    /// Non-zero when the socket went SYN_SENT→CLOSE inside this call with no error of its own:
    /// connect() itself failed after choosing a route, and its return value says why.
    pub closed_in_call: u8,
    /// Non-zero from the call's entry to its exit. The record stays in the map between a
    /// thread's calls (written over in place by the next one: cheaper than an insert and a
    /// delete per call), so this says whether it is about a call under way.
    pub active: u8,
    pub _pad: [u8; 2],
    /// The socket's file descriptor.
    pub fd: u32,
}

impl PendingConnect {
    /// What connect()'s return value means for a Unix socket: each call is a whole attempt,
    /// decided here (there is no TCP state to follow). `None` when the call did not finish
    /// (interrupted, or already connected).
    pub const fn on_unix_exit(&self, ret: i64) -> Option<Outcome> {
        use errno::*;
        if ret >= 0 {
            return Some(Outcome::Connected);
        }
        Some(match (-ret) as i32 {
            EINTR | EISCONN | EINPROGRESS | EALREADY => return None,
            ENOENT => Outcome::UnixMissing,
            ECONNREFUSED => Outcome::UnixRefused,
            EAGAIN => Outcome::UnixBacklogFull,
            EACCES | EPERM => Outcome::UnixPermission,
            _ => Outcome::ConnectError,
        })
    }

    /// What connect()'s return value means for this attempt.
    pub const fn on_exit(&self, ret: i64) -> Option<Outcome> {
        if ret >= 0 {
            return None;
        }
        if self.sk != 0 && self.closed_in_call == 0 {
            // The SYN left: the connection's own record decides, whatever connect() returned.
            return None;
        }
        connect_errno_outcome((-ret) as i32)
    }
}

#[cfg(test)]
mod tests {
    //! Recorded sequences of what the kernel programs see, replayed through the state machine.
    //! `bytes_received` is the kernel's counter: sequence space, so each FIN counts one.

    use super::{errno::*, tcp_state::*, *};
    use crate::net::Endpoint;

    const MS: u64 = 1_000_000;
    const MIN_WAIT: u64 = 50 * MS;

    /// A connect() that starts an attempt on a socket not yet connecting.
    const FRESH: PendingConnect = PendingConnect {
        uservaddr: 0x7ffd_0000_1000,
        addrlen: 16,
        start_ns: 0,
        sk: 0,
        closed_in_call: 0,
        active: 1,
        _pad: [0; 2],
        fd: 3,
    };

    #[test]
    fn unix_connects_are_decided_by_their_return_value() {
        let e = |errno: i32| -i64::from(errno);
        assert_eq!(FRESH.on_unix_exit(0), Some(Outcome::Connected));
        assert_eq!(FRESH.on_unix_exit(e(ENOENT)), Some(Outcome::UnixMissing));
        assert_eq!(
            FRESH.on_unix_exit(e(ECONNREFUSED)),
            Some(Outcome::UnixRefused)
        );
        assert_eq!(
            FRESH.on_unix_exit(e(EAGAIN)),
            Some(Outcome::UnixBacklogFull)
        );
        assert_eq!(FRESH.on_unix_exit(e(EACCES)), Some(Outcome::UnixPermission));
        assert_eq!(FRESH.on_unix_exit(e(EPERM)), Some(Outcome::UnixPermission));
        assert_eq!(FRESH.on_unix_exit(e(EINTR)), None);
        assert_eq!(
            FRESH.on_unix_exit(e(ETIMEDOUT)),
            Some(Outcome::ConnectError)
        );
    }

    #[test]
    fn a_close_after_an_unseen_handshake_is_judged_as_an_established_connection() {
        // The proxy sent, the upstream answered and closed, the proxy closed: nothing failed,
        // though SYN_SENT→ESTABLISHED was skipped.
        let mut c = conn();
        c.on_send(1_002 * MS, 0);
        upstream_closes(&mut c, 1_010);
        assert!(c.established_unseen(LAST_ACK));
        // What the kernel program does then: the handshake's time is not known, so the
        // connection counts as established at its close.
        c.on_established(1_011 * MS);
        assert!(!c.established_unseen(LAST_ACK));
        assert_eq!(close_from(&mut c, LAST_ACK, 1_011, 0, 501).outcome, None);
        // Left as it was, the close would be taken for an attempt that never connected.
        let mut c = conn();
        c.on_send(1_002 * MS, 0);
        upstream_closes(&mut c, 1_010);
        assert!(
            close_from(&mut c, LAST_ACK, 1_011, 0, 501)
                .outcome
                .is_some_and(|o| o != Outcome::Connected)
        );
        // A connect that fails is not one.
        assert!(!conn().established_unseen(SYN_SENT));
    }

    #[test]
    fn a_transition_follows_the_last_one_seen_or_the_states_never_looked_at() {
        // Each life the kernel shows a followed socket, transition by transition.
        let lives: [&[(i32, i32)]; 5] = [
            // The proxy closes first: FIN_WAIT2 (and TIME_WAIT) are never looked up.
            &[
                (SYN_SENT, ESTABLISHED),
                (ESTABLISHED, FIN_WAIT1),
                (FIN_WAIT2, CLOSE),
            ],
            &[
                (SYN_SENT, ESTABLISHED),
                (ESTABLISHED, FIN_WAIT1),
                (TIME_WAIT, CLOSE),
            ],
            // The upstream closes first.
            &[
                (SYN_SENT, ESTABLISHED),
                (ESTABLISHED, CLOSE_WAIT),
                (CLOSE_WAIT, LAST_ACK),
                (LAST_ACK, CLOSE),
            ],
            // Both at once.
            &[
                (SYN_SENT, ESTABLISHED),
                (ESTABLISHED, FIN_WAIT1),
                (FIN_WAIT1, CLOSING),
                (CLOSING, CLOSE),
            ],
            // Refused.
            &[(SYN_SENT, CLOSE)],
        ];
        for life in lives {
            let mut c = conn();
            for &(old, new) in life {
                assert!(c.follows(old), "{life:?}: {old}→{new}");
                c.seen_state(new);
            }
        }
        // A transition skipped (SYN_SENT→ESTABLISHED), or another socket at the address of a
        // record whose close went unseen (a local upstream's side, ESTABLISHED→CLOSE_WAIT, at a
        // record left in FIN_WAIT1): neither follows, and the peer's port tells them apart.
        assert!(!conn().follows(ESTABLISHED));
        let mut stale = conn();
        stale.seen_state(ESTABLISHED);
        stale.seen_state(FIN_WAIT1);
        assert!(!stale.follows(ESTABLISHED));
        assert!(!stale.follows(CLOSE_WAIT));
        // A new connection's own start unseen too: no record goes back to SYN_SENT.
        assert!(!stale.follows(SYN_SENT));
        // begin() starts a record over.
        stale.begin(&Endpoint::v4([10, 0, 0, 6], 80), &Endpoint::default(), 0);
        assert!(stale.follows(SYN_SENT));
    }

    fn conn() -> ConnTrack {
        let proxy = Task {
            cgroup_id: 1,
            tgid: 812,
            pid: 812,
            comm: *b"nginx\0\0\0\0\0\0\0\0\0\0\0",
            netns: 4026531840,
            _pad: 0,
        };
        ConnTrack::connecting(
            proxy,
            Endpoint::v4([10, 0, 0, 5], 8000),
            Endpoint::v4([10, 0, 0, 1], 0),
            1_000 * MS,
        )
    }

    /// The socket goes from `old` to CLOSE at `at_ms`.
    fn close_from(
        c: &mut ConnTrack,
        old: i32,
        at_ms: u64,
        sk_err: i32,
        bytes_received: u64,
    ) -> Verdict {
        c.on_close(CloseFacts {
            now_ns: at_ms * MS,
            old_state: old,
            sk_err,
            bytes_received,
            min_wait_ns: MIN_WAIT,
            sends_tracked: true,
        })
    }

    fn established() -> ConnTrack {
        let mut c = conn();
        assert_eq!(c.on_established(1_001 * MS), MS);
        c
    }

    /// The upstream's FIN, then the proxy's close: ESTABLISHED→CLOSE_WAIT→LAST_ACK.
    fn upstream_closes(c: &mut ConnTrack, at_ms: u64) {
        c.on_state_change(ESTABLISHED, CLOSE_WAIT, at_ms * MS);
        c.on_state_change(CLOSE_WAIT, LAST_ACK, at_ms * MS);
    }

    /// The proxy's close: ESTABLISHED→FIN_WAIT1→FIN_WAIT2.
    fn proxy_closes(c: &mut ConnTrack, at_ms: u64) {
        c.on_state_change(ESTABLISHED, FIN_WAIT1, at_ms * MS);
        c.on_state_change(FIN_WAIT1, FIN_WAIT2, at_ms * MS);
    }

    #[track_caller]
    fn assert_outcome(v: Verdict, outcome: Option<Outcome>, waited_ms: u64) {
        assert_eq!(v.outcome, outcome);
        assert_eq!(v.waited_ns, waited_ms * MS, "waited");
    }

    #[test]
    fn rst_to_syn_is_refused() {
        let mut c = conn();
        c.on_reset_received(1_000 * MS);
        let v = close_from(&mut c, SYN_SENT, 1_000, ECONNREFUSED, 0);
        assert_outcome(v, Some(Outcome::Refused), 0);
        assert_eq!(EndKind::from_u8(c.end), EndKind::PeerReset);
    }

    #[test]
    fn icmp_port_unreachable_is_refused() {
        let mut c = conn();
        let v = close_from(&mut c, SYN_SENT, 1_002, ECONNREFUSED, 0);
        assert_outcome(v, Some(Outcome::Refused), 2);
    }

    #[test]
    fn kernel_giving_up_on_syns_is_connect_timeout() {
        let mut c = conn();
        c.on_retransmit();
        c.on_retransmit();
        let v = close_from(&mut c, SYN_SENT, 4_000, ETIMEDOUT, 0);
        assert_outcome(v, Some(Outcome::ConnectTimeout), 3_000);
        assert_eq!(c.syn_retransmits, 2);
    }

    #[test]
    fn proxy_closing_a_connecting_socket_after_its_timeout_is_connect_timeout() {
        let mut c = conn();
        c.on_retransmit();
        let v = close_from(&mut c, SYN_SENT, 2_000, 0, 0);
        assert_outcome(v, Some(Outcome::ConnectTimeout), 1_000);
        assert_eq!(EndKind::from_u8(c.end), EndKind::ProxyClose);
    }

    #[test]
    fn proxy_closing_a_connecting_socket_at_once_abandoned_it() {
        let mut c = conn();
        let v = close_from(&mut c, SYN_SENT, 1_003, 0, 0);
        assert_outcome(v, Some(Outcome::ConnectAbandoned), 3);
    }

    #[test]
    fn icmp_host_unreachable_is_unreachable() {
        let mut c = conn();
        let v = close_from(&mut c, SYN_SENT, 1_100, EHOSTUNREACH, 0);
        assert_outcome(v, Some(Outcome::Unreachable), 100);
        let mut c = conn();
        let v = close_from(&mut c, SYN_SENT, 1_100, ENETUNREACH, 0);
        assert_outcome(v, Some(Outcome::Unreachable), 100);
    }

    #[test]
    fn other_errors_while_connecting_are_connect_error() {
        let mut c = conn();
        let v = close_from(&mut c, SYN_SENT, 1_001, 13, 0);
        assert_eq!(v.outcome, Some(Outcome::ConnectError));
    }

    #[test]
    fn healthy_request_then_upstream_close_is_not_a_failure() {
        let mut c = established();
        c.on_send(1_002 * MS, 0);
        upstream_closes(&mut c, 1_003);
        // 512 response bytes and the FIN.
        assert_eq!(close_from(&mut c, LAST_ACK, 1_004, 0, 513).outcome, None);
    }

    #[test]
    fn keep_alive_connection_closed_while_idle_is_not_a_failure() {
        let mut c = established();
        c.on_send(1_002 * MS, 0); // request 1
        c.on_send(1_010 * MS, 300); // request 2, after response 1 (300 bytes)
        c.on_send(1_020 * MS, 600); // request 3, after response 2
        // Response 3 arrives (900 bytes in all), then the upstream's keep-alive timeout fires.
        upstream_closes(&mut c, 6_020);
        assert_eq!(close_from(&mut c, LAST_ACK, 6_021, 0, 901).outcome, None);
    }

    #[test]
    fn proxy_closing_after_a_complete_response_is_not_a_failure() {
        let mut c = established();
        c.on_send(1_002 * MS, 0);
        proxy_closes(&mut c, 1_005);
        // 4096 response bytes and the upstream's FIN, which sends FIN_WAIT2 to CLOSE.
        assert_eq!(close_from(&mut c, FIN_WAIT2, 1_006, 0, 4_097).outcome, None);
    }

    /// HAProxy closes an idle TLS connection with a close_notify, and the upstream's FIN follows
    /// at once: the alert (seen at its syscall) is no request, so nothing is outstanding.
    #[test]
    fn a_tls_close_notify_is_no_request() {
        let mut c = established();
        c.on_send(1_002 * MS, 0);
        c.peek.alert_sending = 31;
        c.on_send(2_000 * MS, 324);
        upstream_closes(&mut c, 2_000);
        assert_eq!(close_from(&mut c, LAST_ACK, 2_001, 0, 325).outcome, None);
        // Where sends are inferred: the alert alone moved write_seq.
        let mut c = established();
        c.start_write_seq(1000);
        c.on_write_seq(1100, 0, 1_002 * MS);
        c.peek.alert_sending = 31;
        c.on_write_seq(1131, 324, 2_000 * MS);
        assert_eq!(c.sends, 1);
        // A request and the alert between two looks: the request counts.
        c.peek.alert_sending = 31;
        c.on_write_seq(1231, 324, 2_100 * MS);
        assert_eq!(c.sends, 2);
        assert_eq!(c.peek.alert_sending, 0);
    }

    #[test]
    fn connection_never_used_and_closed_by_upstream_is_not_a_failure() {
        let mut c = established();
        upstream_closes(&mut c, 9_000);
        assert_eq!(close_from(&mut c, LAST_ACK, 9_001, 0, 1).outcome, None);
    }

    #[test]
    fn rst_after_the_request_and_before_any_answer_is_reset_before_response() {
        let mut c = established();
        c.on_send(1_002 * MS, 0);
        c.on_reset_received(1_012 * MS);
        let v = close_from(&mut c, ESTABLISHED, 1_012, 104, 0);
        assert_outcome(v, Some(Outcome::ResetBeforeResponse), 10);
    }

    #[test]
    fn rst_on_a_reused_keep_alive_connection_before_the_answer_is_reset_before_response() {
        let mut c = established();
        c.on_send(1_002 * MS, 0);
        c.on_send(1_500 * MS, 300); // second request after a 300-byte response
        c.on_reset_received(1_501 * MS);
        let v = close_from(&mut c, ESTABLISHED, 1_501, 104, 300);
        assert_eq!(v.outcome, Some(Outcome::ResetBeforeResponse));
    }

    #[test]
    fn rst_before_the_proxy_sent_anything_is_reset_before_response() {
        let mut c = established();
        c.on_reset_received(1_002 * MS);
        let v = close_from(&mut c, ESTABLISHED, 1_002, 104, 0);
        assert_eq!(v.outcome, Some(Outcome::ResetBeforeResponse));
    }

    #[test]
    fn rst_after_part_of_the_response_is_reset_mid_response() {
        let mut c = established();
        c.on_send(1_002 * MS, 0);
        c.on_reset_received(1_052 * MS);
        let v = close_from(&mut c, ESTABLISHED, 1_052, 104, 40);
        assert_outcome(v, Some(Outcome::ResetMidResponse), 50);
    }

    #[test]
    fn fin_after_the_request_and_before_any_answer_is_closed_before_response() {
        let mut c = established();
        c.on_send(1_002 * MS, 0);
        upstream_closes(&mut c, 1_003);
        // Only the FIN came back.
        let v = close_from(&mut c, LAST_ACK, 1_004, 0, 1);
        assert_outcome(v, Some(Outcome::ClosedBeforeResponse), 1);
    }

    #[test]
    fn request_sent_on_a_connection_the_upstream_already_closed_is_closed_before_response() {
        // The keep-alive race: the upstream's idle FIN arrives, then the proxy reuses the
        // connection; the upstream answers the request with a RST (EPIPE in CLOSE_WAIT).
        let mut c = established();
        c.on_send(1_002 * MS, 0);
        c.on_state_change(ESTABLISHED, CLOSE_WAIT, 6_000 * MS);
        c.on_send(6_000 * MS, 301);
        c.on_reset_received(6_001 * MS);
        let v = close_from(&mut c, CLOSE_WAIT, 6_001, 32, 301);
        assert_eq!(v.outcome, Some(Outcome::ClosedBeforeResponse));
    }

    #[test]
    fn proxy_giving_up_on_a_slow_connect_as_it_completes_is_connect_timeout() {
        // SYNs at 1 000 ms, 2 000 ms and 4 000 ms; the last one answered at 4 001 ms, as the
        // proxy's 3 s connect timer fires: it closes without sending anything.
        let mut c = conn();
        c.on_retransmit();
        c.on_retransmit();
        c.on_established(4_001 * MS);
        proxy_closes(&mut c, 4_020);
        let v = close_from(&mut c, FIN_WAIT2, 4_021, 0, 1);
        assert_outcome(v, Some(Outcome::ConnectTimeout), 3_020);
    }

    #[test]
    fn a_connection_opened_ahead_and_closed_unused_is_no_failure() {
        // The same connect answered at once, or answered late and then kept unused for
        // longer than a connect timer's lag: the proxy chose to close it.
        let mut c = established();
        proxy_closes(&mut c, 1_020);
        assert_eq!(close_from(&mut c, FIN_WAIT2, 1_021, 0, 1).outcome, None);
        let mut c = conn();
        c.on_retransmit();
        c.on_established(2_001 * MS);
        proxy_closes(&mut c, 62_001);
        assert_eq!(close_from(&mut c, FIN_WAIT2, 62_002, 0, 1).outcome, None);
    }

    #[test]
    fn proxy_closing_after_waiting_for_an_answer_is_response_timeout() {
        let mut c = established();
        c.on_send(1_002 * MS, 0);
        proxy_closes(&mut c, 2_002);
        // The upstream's own close comes afterwards: its FIN sends FIN_WAIT2 to CLOSE.
        let v = close_from(&mut c, FIN_WAIT2, 2_500, 0, 1);
        assert_outcome(v, Some(Outcome::ResponseTimeout), 1_000);
    }

    #[test]
    fn proxy_closing_after_waiting_then_reset_is_still_response_timeout() {
        let mut c = established();
        c.on_send(1_002 * MS, 0);
        proxy_closes(&mut c, 2_002);
        c.on_reset_received(2_500 * MS);
        let v = close_from(&mut c, FIN_WAIT2, 2_500, 104, 0);
        assert_outcome(v, Some(Outcome::ResponseTimeout), 1_000);
    }

    #[test]
    fn proxy_closing_at_once_after_its_request_abandoned_it() {
        let mut c = established();
        c.on_send(1_002 * MS, 0);
        proxy_closes(&mut c, 1_004);
        let v = close_from(&mut c, FIN_WAIT2, 1_005, 0, 1);
        assert_outcome(v, Some(Outcome::RequestAbandoned), 2);
    }

    #[test]
    fn proxy_abort_with_rst_after_waiting_is_response_timeout() {
        let mut c = established();
        c.on_send(1_002 * MS, 0);
        let v = close_from(&mut c, ESTABLISHED, 3_002, 0, 0);
        assert_outcome(v, Some(Outcome::ResponseTimeout), 2_000);
    }

    #[test]
    fn half_close_then_answer_is_not_a_failure() {
        let mut c = established();
        c.on_send(1_002 * MS, 0);
        proxy_closes(&mut c, 1_002);
        // 100 response bytes and the FIN.
        assert_eq!(close_from(&mut c, FIN_WAIT2, 1_200, 0, 101).outcome, None);
    }

    #[test]
    fn kernel_retransmission_timeout_with_a_request_outstanding_is_response_timeout() {
        let mut c = established();
        c.on_send(1_002 * MS, 0);
        c.on_retransmit();
        let v = close_from(&mut c, ESTABLISHED, 16_002, ETIMEDOUT, 0);
        assert_outcome(v, Some(Outcome::ResponseTimeout), 15_000);
        assert_eq!(c.retransmits, 1);
    }

    #[test]
    fn the_upstreams_fin_is_not_counted_as_data() {
        let mut c = established();
        assert_eq!(c.data_received(ESTABLISHED, 40), 40);
        assert_eq!(c.data_received(FIN_WAIT2, 41), 40);
        upstream_closes(&mut c, 1_100);
        assert_eq!(c.data_received(LAST_ACK, 41), 40);
        assert_eq!(c.data_received(LAST_ACK, 0), 0);
    }

    /// Where sends are inferred: established with the proxy's `write_seq` at 1,000 after its SYN.
    fn established_inferring() -> ConnTrack {
        let mut c = established();
        c.start_write_seq(1_000);
        c
    }

    #[test]
    fn inferred_request_then_upstream_fin_is_closed_before_response() {
        let mut c = established_inferring();
        // The 78-byte request left at 1,002 ms; its ACK (no data) is not looked at. The FIN
        // arrives at 1,500 ms: before it is processed, write_seq has moved.
        c.on_write_seq(1_078, 0, 1_002 * MS);
        upstream_closes(&mut c, 1_500);
        // At the proxy's close, before its FIN: nothing more was sent.
        c.on_write_seq(1_078, 1, 1_500 * MS);
        let v = close_from(&mut c, LAST_ACK, 1_500, 0, 1);
        assert_outcome(v, Some(Outcome::ClosedBeforeResponse), 498);
        assert_eq!(c.sends, 1);
    }

    #[test]
    fn inferred_request_answered_then_idle_close_is_not_a_failure() {
        let mut c = established_inferring();
        // The response's first segment: the request was sent before it, with nothing received.
        c.on_write_seq(1_078, 0, 1_002 * MS);
        // Its second segment: nothing new was sent.
        c.on_write_seq(1_078, 1_448, 1_003 * MS);
        // Keep-alive: 60 s later the upstream closes the idle connection (its FIN).
        c.on_write_seq(1_078, 2_000, 61_000 * MS);
        upstream_closes(&mut c, 61_000);
        c.on_write_seq(1_078, 2_001, 61_000 * MS);
        assert_eq!(close_from(&mut c, LAST_ACK, 61_000, 0, 2_001).outcome, None);
        assert_eq!(c.sends, 1);
    }

    #[test]
    fn inferred_second_request_without_answer_is_response_timeout() {
        let mut c = established_inferring();
        c.on_write_seq(1_078, 0, 1_002 * MS);
        // 2,000 response bytes came; the second request left at 5,000 ms and only its ACK came.
        // The proxy gives up at 6,000 ms: its close transition looks at write_seq first.
        c.on_write_seq(1_156, 2_000, 5_000 * MS);
        proxy_closes(&mut c, 6_000);
        let v = close_from(&mut c, FIN_WAIT2, 6_000, 0, 2_000);
        assert_outcome(v, Some(Outcome::ResponseTimeout), 1_000);
        assert_eq!(c.sends, 2);
    }

    #[test]
    fn inferred_request_then_rst_is_reset_before_response_and_mid_response_after_bytes() {
        let mut before = established_inferring();
        // The RST's segment is looked at before it is processed.
        before.on_write_seq(1_078, 0, 1_002 * MS);
        before.on_reset_received(1_300 * MS);
        let v = close_from(&mut before, ESTABLISHED, 1_300, 104, 0);
        assert_outcome(v, Some(Outcome::ResetBeforeResponse), 298);

        let mut mid = established_inferring();
        mid.on_write_seq(1_078, 0, 1_002 * MS);
        mid.on_write_seq(1_078, 1_448, 1_010 * MS);
        mid.on_reset_received(1_020 * MS);
        let v = close_from(&mut mid, ESTABLISHED, 1_020, 104, 1_448);
        assert_eq!(v.outcome, Some(Outcome::ResetMidResponse));
    }

    #[test]
    fn inferred_sends_between_two_answers_count_as_one_and_wrap_around() {
        let mut c = established();
        c.start_write_seq(u32::MAX - 10);
        // Two pipelined requests before any answer: one send, seen once.
        c.on_write_seq(50, 0, 1_002 * MS);
        c.on_write_seq(50, 0, 1_003 * MS);
        assert_eq!(c.sends, 1);
        assert_eq!(c.last_send_ns, 1_002 * MS);
    }

    #[test]
    fn without_the_send_probe_only_resets_count() {
        let facts = |bytes_received| CloseFacts {
            now_ns: 2_000 * MS,
            old_state: ESTABLISHED,
            sk_err: 104,
            bytes_received,
            min_wait_ns: MIN_WAIT,
            sends_tracked: false,
        };
        let mut c = established();
        c.on_reset_received(2_000 * MS);
        assert_eq!(
            c.on_close(facts(0)).outcome,
            Some(Outcome::ResetBeforeResponse)
        );
        let mut c = established();
        c.on_reset_received(2_000 * MS);
        assert_eq!(
            c.on_close(facts(10)).outcome,
            Some(Outcome::ResetMidResponse)
        );
        let mut c = established();
        upstream_closes(&mut c, 2_000);
        let v = c.on_close(CloseFacts {
            sk_err: 0,
            old_state: LAST_ACK,
            ..facts(1)
        });
        assert_eq!(v.outcome, None);
    }

    #[test]
    fn connect_failing_before_any_syn_is_decided_by_its_return_value() {
        let pending = |sk, closed_in_call| PendingConnect {
            sk,
            closed_in_call,
            ..FRESH
        };
        // No route: connect() fails before SYN_SENT.
        let no_route = pending(0, 0).on_exit(-i64::from(EHOSTUNREACH));
        assert_eq!(no_route, Some(Outcome::Unreachable));
        // No local port: SYN_SENT→CLOSE inside the call.
        let no_port = pending(0xffff_8880_0000_1000, 1).on_exit(-i64::from(EADDRNOTAVAIL));
        assert_eq!(no_port, Some(Outcome::NoEphemeralPort));
        // A SYN left: the connection's own record decides (a blocking connect's ECONNREFUSED).
        let refused = pending(0xffff_8880_0000_1000, 0).on_exit(-i64::from(ECONNREFUSED));
        assert_eq!(refused, None);
        // Non-blocking connects in progress and successes are not failures.
        assert_eq!(pending(0, 0).on_exit(-i64::from(EINPROGRESS)), None);
        assert_eq!(
            pending(0, 0).on_exit(-i64::from(EAGAIN)),
            Some(Outcome::ConnectError)
        );
        assert_eq!(pending(0, 0).on_exit(0), None);
    }

    #[test]
    fn connect_called_again_on_a_connecting_socket_is_decided_by_the_socket() {
        // HAProxy learns how a non-blocking connect() ended by calling connect() again: the
        // second call returns the attempt's error, or EISCONN, or EALREADY while it is still
        // under way. The return value alone reads like a failure before any SYN; the kernel
        // program tells the two apart by the socket (one that had an attempt already has a
        // send sequence number), so a repeated call is not counted twice
        // (tests/tests/tcp_failures.rs does it for real).
        for errno in [EISCONN, EALREADY] {
            assert_eq!(FRESH.on_exit(-i64::from(errno)), None, "errno {errno}");
            assert_eq!(FRESH.on_unix_exit(-i64::from(errno)), None, "errno {errno}");
        }
        assert_eq!(
            FRESH.on_exit(-i64::from(EHOSTUNREACH)),
            Some(Outcome::Unreachable)
        );
        assert_eq!(
            FRESH.on_unix_exit(-i64::from(ECONNREFUSED)),
            Some(Outcome::UnixRefused)
        );
    }
}
