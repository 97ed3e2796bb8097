//! Which container listens behind a local upstream's address, from the listeners themselves.
//!
//! The runtime's address leases name upstreams on Docker's and Podman's bridge networks. They
//! say nothing of a container on the host's network, of a Kubernetes pod on a node without a
//! Docker API, or of a container whose start the runtime has not reported yet. Those have
//! listeners, and tracer sees every listen(): the listening process's cgroup names its
//! container, and its network namespace's own addresses (`/proc/PID/net/fib_trie`,
//! `/proc/PID/net/if_inet6`) say which upstream addresses a wildcard listener there serves.
//! Both are read once per listen() by a process in a container, while it is alive, so a
//! container that dies afterwards is still named by the failures toward it.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::SystemTime,
};

/// Listeners remembered (those of processes in containers, open or closed since).
const MAX_HOMES: usize = 4096;

/// One listener of a process in a container.
#[derive(Debug, Clone)]
struct Home {
    bound: IpAddr,
    netns: u32,
    /// Its network namespace's own addresses, for a wildcard listener.
    local: Vec<IpAddr>,
    full_id: String,
    since: SystemTime,
}

/// The listeners of processes in containers, by port.
#[derive(Debug, Default)]
pub struct ListenerHomes {
    by_port: HashMap<u16, Vec<Home>>,
    len: usize,
}

impl ListenerHomes {
    /// Something started listening on `local` in namespace `netns`: in container `full_id`
    /// (none for a process in no container), whose namespace has the addresses `local_ips`.
    /// A listener in no container replaces what listened there before.
    pub fn opened(
        &mut self,
        local: SocketAddr,
        netns: u32,
        full_id: Option<String>,
        local_ips: Vec<IpAddr>,
        at: SystemTime,
    ) {
        let homes = self.by_port.entry(local.port()).or_default();
        let before = homes.len();
        homes.retain(|h| !(h.bound == local.ip() && h.netns == netns));
        self.len -= before - homes.len();
        let Some(full_id) = full_id else {
            if homes.is_empty() {
                self.by_port.remove(&local.port());
            }
            return;
        };
        homes.push(Home {
            bound: local.ip(),
            netns,
            local: if local.ip().is_unspecified() {
                local_ips
            } else {
                Vec::new()
            },
            full_id,
            since: at,
        });
        self.len += 1;
        if self.len > MAX_HOMES {
            self.forget_oldest();
        }
    }

    /// The full id of the container whose process listens (or last listened) on `upstream`, as
    /// a proxy in namespace `proxy_netns` reaches it.
    pub fn of(&self, upstream: SocketAddr, proxy_netns: u32) -> Option<&str> {
        let ip = upstream.ip();
        self.by_port
            .get(&upstream.port())?
            .iter()
            .filter(|h| {
                if ip.is_loopback() {
                    // Another namespace's loopback is not this one's.
                    h.netns != 0
                        && h.netns == proxy_netns
                        && (h.bound == ip || h.bound.is_unspecified())
                } else {
                    h.bound == ip || h.bound.is_unspecified() && h.local.contains(&ip)
                }
            })
            .max_by_key(|h| h.since)
            .map(|h| h.full_id.as_str())
    }

    fn forget_oldest(&mut self) {
        let oldest = self
            .by_port
            .iter()
            .flat_map(|(port, homes)| {
                homes
                    .iter()
                    .enumerate()
                    .map(move |(i, h)| (h.since, *port, i))
            })
            .min();
        if let Some((_, port, i)) = oldest
            && let Some(homes) = self.by_port.get_mut(&port)
        {
            homes.remove(i);
            self.len -= 1;
            if homes.is_empty() {
                self.by_port.remove(&port);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_pods_wildcard_listener_serves_its_namespaces_addresses_only() {
        let mut homes = ListenerHomes::default();
        let pod_ip: IpAddr = "10.244.1.5".parse().unwrap();
        homes.opened(
            addr("0.0.0.0:8000"),
            4001,
            Some("a".repeat(64)),
            vec!["127.0.0.1".parse().unwrap(), pod_ip],
            at(0),
        );
        assert_eq!(
            homes.of(addr("10.244.1.5:8000"), 4000),
            Some(&*"a".repeat(64))
        );
        // Another pod's address, another port, and the proxy's own loopback are not its.
        assert_eq!(homes.of(addr("10.244.1.6:8000"), 4000), None);
        assert_eq!(homes.of(addr("10.244.1.5:8001"), 4000), None);
        assert_eq!(homes.of(addr("127.0.0.1:8000"), 4000), None);
    }

    #[test]
    fn a_host_network_container_serves_loopback_in_its_namespace() {
        let mut homes = ListenerHomes::default();
        homes.opened(
            addr("127.0.0.1:9000"),
            4000,
            Some("b".repeat(64)),
            vec![],
            at(0),
        );
        assert_eq!(
            homes.of(addr("127.0.0.1:9000"), 4000),
            Some(&*"b".repeat(64))
        );
        assert_eq!(homes.of(addr("127.0.0.1:9000"), 4001), None);
        // Not known which namespace: not named.
        assert_eq!(homes.of(addr("127.0.0.1:9000"), 0), None);
    }

    #[test]
    fn a_dead_containers_listener_names_it_until_something_else_listens_there() {
        let mut homes = ListenerHomes::default();
        homes.opened(
            addr("0.0.0.0:9000"),
            4000,
            Some("c".repeat(64)),
            vec![],
            at(0),
        );
        assert_eq!(
            homes.of(addr("127.0.0.1:9000"), 4000),
            Some(&*"c".repeat(64))
        );
        // A process in no container listens there now.
        homes.opened(addr("0.0.0.0:9000"), 4000, None, vec![], at(5));
        assert_eq!(homes.of(addr("127.0.0.1:9000"), 4000), None);
        assert!(homes.by_port.is_empty());
        // The address moved to a new pod: the newest listener names it.
        let ip: IpAddr = "10.244.1.5".parse().unwrap();
        homes.opened(
            addr("0.0.0.0:80"),
            5001,
            Some("d".repeat(64)),
            vec![ip],
            at(6),
        );
        homes.opened(
            addr("0.0.0.0:80"),
            5002,
            Some("e".repeat(64)),
            vec![ip],
            at(7),
        );
        assert_eq!(
            homes.of(addr("10.244.1.5:80"), 4000),
            Some(&*"e".repeat(64))
        );
    }

    #[test]
    fn the_oldest_listener_goes_first_when_full() {
        let mut homes = ListenerHomes::default();
        for i in 0..=MAX_HOMES as u64 {
            let port = 1000 + i as u16;
            homes.opened(
                SocketAddr::from(([127, 0, 0, 1], port)),
                1,
                Some(format!("{i:064}")),
                vec![],
                at(i),
            );
        }
        assert_eq!(homes.len, MAX_HOMES);
        assert_eq!(homes.of(addr("127.0.0.1:1000"), 1), None);
        assert!(homes.of(addr("127.0.0.1:1001"), 1).is_some());
    }
}
