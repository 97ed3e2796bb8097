//! Servers that probe their own socket before listening on it. php-fpm, as it starts, connects
//! to each pool's socket path ("is another FPM already listening here?"), gets ENOENT or
//! ECONNREFUSED, then binds the path. That connect() is no upstream attempt: the kernel takes
//! its count back when the same process binds the path within half a second and sends a
//! `SelfProbe` record. The failure event of such a connect() is held back here for
//! [`SelfProbes::HOLD`] and dropped when its `SelfProbe` comes (before or after it).

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use tracer_common::Outcome;

use super::Classified;
use crate::decode::Upstream;

/// Unix-socket failures held back, and self-probes seen.
#[derive(Default)]
pub struct SelfProbes {
    held: VecDeque<(Instant, Classified)>,
    /// (when, process, socket path) of self-probes whose failure has not come yet.
    seen: VecDeque<(Instant, u32, Upstream)>,
}

impl SelfProbes {
    /// How long a failure that may be a self-probe is held (the kernel's window is 500 ms, and
    /// the agent collects records every 100 ms).
    pub const HOLD: Duration = Duration::from_secs(1);
    /// At most this many failures are held; past it the oldest go out at once.
    const MAX_HELD: usize = 10_000;
    const MAX_SEEN: usize = 1024;

    /// The causes a self-probe has.
    fn may_be_a_probe(cause: Outcome) -> bool {
        matches!(cause, Outcome::UnixMissing | Outcome::UnixRefused)
    }

    /// A failure: returned to report now, or held (`None`), or dropped when its process
    /// already said it was probing its own socket.
    pub fn on_failure(&mut self, failure: Classified, now: Instant) -> Option<Classified> {
        if !Self::may_be_a_probe(failure.failure.cause) {
            return Some(failure);
        }
        let its_probe = self
            .seen
            .iter()
            .position(|(_, pid, path)| is_of(&failure, *pid, path));
        if let Some(i) = its_probe {
            self.seen.remove(i);
            return None;
        }
        self.held.push_back((now, failure));
        None
    }

    /// Process `pid` bound Unix socket `path` right after failing to connect to it: drops
    /// that failure. Returns whether it was held here.
    pub fn on_self_probe(&mut self, pid: u32, path: Upstream, now: Instant) -> bool {
        if let Some(i) = self.held.iter().position(|(_, f)| is_of(f, pid, &path)) {
            self.held.remove(i);
            return true;
        }
        if self.seen.len() >= Self::MAX_SEEN {
            self.seen.pop_front();
        }
        self.seen.push_back((now, pid, path));
        false
    }

    /// Failures held for [`SelfProbes::HOLD`] (or crowded out): theirs to report now.
    pub fn due(&mut self, now: Instant) -> Vec<Classified> {
        let mut due = Vec::new();
        while let Some((at, _)) = self.held.front() {
            if now.duration_since(*at) < Self::HOLD && self.held.len() <= Self::MAX_HELD {
                break;
            }
            if let Some((_, failure)) = self.held.pop_front() {
                due.push(failure);
            }
        }
        while self
            .seen
            .front()
            .is_some_and(|(at, _, _)| now.duration_since(*at) >= Self::HOLD)
        {
            self.seen.pop_front();
        }
        due
    }

    /// Everything held, when the agent stops.
    pub fn flush(&mut self) -> Vec<Classified> {
        self.held.drain(..).map(|(_, failure)| failure).collect()
    }
}

fn is_of(failure: &Classified, pid: u32, path: &Upstream) -> bool {
    failure.failure.proxy.pid == pid && failure.failure.upstream == *path
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::decode::{Evidence, Failure, Task};

    fn failure(pid: u32, path: &str, cause: Outcome) -> Classified {
        Classified {
            failure: Failure {
                time: SystemTime::now(),
                proxy: Task {
                    comm: "php-fpm8.2".into(),
                    pid,
                    tid: pid,
                    cgroup_id: 1,
                    netns: 1,
                },
                upstream: Upstream::Unix(path.into()),
                local: None,
                cause,
                evidence: Evidence {
                    source: tracer_common::Source::ConnectCall,
                    ..crate::classify::tests::evidence()
                },
            },
            root_cause: None,
            proxy_container: None,
            upstream_container: None,
        }
    }

    const SOCK: &str = "/run/php/php8.2-fpm.sock";

    #[test]
    fn a_probe_is_dropped_whichever_record_comes_first() {
        let t0 = Instant::now();
        let mut probes = SelfProbes::default();
        assert!(
            probes
                .on_failure(failure(42, SOCK, Outcome::UnixMissing), t0)
                .is_none()
        );
        assert!(probes.on_self_probe(42, Upstream::Unix(SOCK.into()), t0));
        assert!(probes.due(t0 + Duration::from_secs(2)).is_empty());
        // Its record first, then the failure.
        assert!(!probes.on_self_probe(43, Upstream::Unix(SOCK.into()), t0));
        assert!(
            probes
                .on_failure(failure(43, SOCK, Outcome::UnixRefused), t0)
                .is_none()
        );
        assert!(probes.due(t0 + Duration::from_secs(2)).is_empty());
        assert!(probes.flush().is_empty());
    }

    #[test]
    fn other_failures_go_out_at_once_or_after_the_hold() {
        let t0 = Instant::now();
        let mut probes = SelfProbes::default();
        let refused = failure(7, SOCK, Outcome::Refused);
        assert!(probes.on_failure(refused, t0).is_some(), "not a Unix one");
        assert!(
            probes
                .on_failure(failure(8, SOCK, Outcome::UnixMissing), t0)
                .is_none()
        );
        // Another process's, or another path's, self-probe is not its.
        assert!(!probes.on_self_probe(9, Upstream::Unix(SOCK.into()), t0));
        assert!(!probes.on_self_probe(8, Upstream::Unix("/other.sock".into()), t0));
        assert!(probes.due(t0 + Duration::from_millis(500)).is_empty());
        let due = probes.due(t0 + SelfProbes::HOLD);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].failure.proxy.pid, 8);
    }
}
