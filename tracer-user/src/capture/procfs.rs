//! Listeners that existed before tracer started, from /proc: the kernel programs only see
//! sockets that start listening while they are attached.
//!
//! `/proc/<pid>/net/tcp{,6}` lists the sockets of that process's network namespace (read once per
//! namespace); `/proc/<pid>/fd` says which processes hold each listening socket.

use std::{
    collections::{BTreeMap, HashMap},
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use crate::decode::text::untrusted;

/// A socket that was listening when tracer started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExistingListener {
    pub local: SocketAddr,
    /// The network namespace's inode number.
    pub netns: u32,
    /// Every process holding it (a master and its workers), lowest pid first.
    pub pids: Vec<u32>,
    /// The name of the first of them.
    pub comm: String,
}

/// TCP state LISTEN in /proc/net/tcp.
const LISTEN: &str = "0A";

/// Every listening TCP socket on this host, in every network namespace a process is in.
pub fn listeners() -> Vec<ExistingListener> {
    listeners_in(Path::new("/proc"))
}

pub fn listeners_in(proc: &Path) -> Vec<ExistingListener> {
    let pids: Vec<u32> = std::fs::read_dir(proc)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    let namespaces = namespace_tasks(proc, &pids);
    let mut by_inode: HashMap<u64, (SocketAddr, u32)> = HashMap::new();
    for (netns, task) in &namespaces {
        for table in ["tcp", "tcp6"] {
            // Read line by line: after a connection storm the table holds hundreds of
            // thousands of TIME_WAIT sockets, which must not all sit in memory at once.
            let Ok(file) = std::fs::File::open(task.join("net").join(table)) else {
                continue;
            };
            for socket in listening_sockets(BufReader::new(file)) {
                by_inode.insert(socket.inode, (socket.local, *netns));
            }
        }
    }
    let mut owners: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for pid in &pids {
        let Ok(fds) = std::fs::read_dir(proc.join(pid.to_string()).join("fd")) else {
            continue;
        };
        for fd in fds.filter_map(Result::ok) {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let inode = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok());
            if let Some(inode) = inode.filter(|i| by_inode.contains_key(i)) {
                owners.entry(inode).or_default().push(*pid);
            }
        }
    }
    owners
        .into_iter()
        .filter_map(|(inode, mut pids)| {
            let (local, netns) = by_inode.get(&inode)?;
            pids.sort_unstable();
            pids.dedup();
            let comm = std::fs::read(proc.join(pids[0].to_string()).join("comm"))
                .map(|c| untrusted(c.strip_suffix(b"\n").unwrap_or(&c)))
                .unwrap_or_default();
            Some(ExistingListener {
                local: *local,
                netns: *netns,
                pids,
                comm,
            })
        })
        .collect()
}

/// Addresses a namespace's own interfaces have, at most this many (a host may have many).
const MAX_LOCAL_ADDRESSES: usize = 256;

/// The addresses of the network namespace process `pid` is in: its interfaces' own (IPv4 from
/// `/proc/PID/net/fib_trie`'s local routes, IPv6 from `/proc/PID/net/if_inet6`). Empty when
/// the process is gone.
pub fn local_addresses(pid: u32) -> Vec<IpAddr> {
    let net = PathBuf::from(format!("/proc/{pid}/net"));
    let mut all =
        fib_trie_locals(&std::fs::read_to_string(net.join("fib_trie")).unwrap_or_default());
    all.extend(if_inet6_addresses(
        &std::fs::read_to_string(net.join("if_inet6")).unwrap_or_default(),
    ));
    all.truncate(MAX_LOCAL_ADDRESSES);
    all
}

/// The IPv4 addresses with a `/32 host LOCAL` route in a fib_trie dump (each once).
fn fib_trie_locals(fib_trie: &str) -> Vec<IpAddr> {
    let mut found: Vec<IpAddr> = Vec::new();
    let mut last = None;
    for line in fib_trie.lines() {
        let line = line.trim_start_matches([' ', '|', '+', '-']);
        if let Ok(ip) = line.trim().parse::<Ipv4Addr>() {
            last = Some(IpAddr::V4(ip));
        } else if line.trim() == "/32 host LOCAL"
            && let Some(ip) = last
            && !found.contains(&ip)
            && found.len() < MAX_LOCAL_ADDRESSES
        {
            found.push(ip);
        }
    }
    found
}

/// The addresses in `/proc/net/if_inet6` (32 hex digits first on each line).
fn if_inet6_addresses(if_inet6: &str) -> Vec<IpAddr> {
    if_inet6
        .lines()
        .filter_map(|l| u128::from_str_radix(l.split_whitespace().next()?, 16).ok())
        .map(|bits| IpAddr::V6(Ipv6Addr::from(bits)))
        .take(MAX_LOCAL_ADDRESSES)
        .collect()
}

/// The children of process `pid`: those of every one of its threads
/// (`/proc/PID/task/TID/children`, CONFIG_PROC_CHILDREN, which distributions enable).
pub fn children(pid: u32) -> Vec<u32> {
    children_in(Path::new("/proc"), pid)
}

fn children_in(proc: &Path, pid: u32) -> Vec<u32> {
    let tasks = std::fs::read_dir(proc.join(pid.to_string()).join("task"));
    tasks
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|children| {
            children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The process that holds socket `inode` open, among `near` and their children (a server's
/// master and its workers); with its name. Reads only those processes' descriptors.
pub fn socket_holder(inode: u64, near: &[u32]) -> Option<(u32, String)> {
    socket_holder_in(Path::new("/proc"), inode, near)
}

/// The process that holds socket `inode` open, among every process (a full /proc walk: for
/// the rare lookups that have nothing nearer to start from).
pub fn socket_holder_anywhere(inode: u64) -> Option<(u32, String)> {
    let all: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    socket_holder_in(Path::new("/proc"), inode, &all)
}

pub fn socket_holder_in(proc: &Path, inode: u64, near: &[u32]) -> Option<(u32, String)> {
    let wanted = format!("socket:[{inode}]");
    let mut candidates: Vec<u32> = near.to_vec();
    // (A full walk has every process already.)
    let expand = if near.len() <= 16 { near } else { &[] };
    for pid in expand {
        candidates.extend(children_in(proc, *pid));
    }
    candidates.sort_unstable();
    candidates.dedup();
    let pid = candidates.into_iter().find(|pid| {
        std::fs::read_dir(proc.join(pid.to_string()).join("fd"))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == wanted.as_str()))
    })?;
    let comm = std::fs::read(proc.join(pid.to_string()).join("comm"))
        .map(|c| untrusted(c.strip_suffix(b"\n").unwrap_or(&c)))
        .unwrap_or_default();
    Some((pid, comm))
}

/// The network namespace (inode number) of a process or task directory.
fn netns_of(task: &Path) -> Option<u32> {
    let link = std::fs::read_link(task.join("ns/net")).ok()?;
    link.to_str()?
        .strip_prefix("net:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// One task per network namespace (enough to read its tables), from the tasks of `pids`.
/// Threads count: a thread can be in another namespace than its process (setns).
fn namespace_tasks(proc: &Path, pids: &[u32]) -> BTreeMap<u32, PathBuf> {
    let mut namespaces: BTreeMap<u32, PathBuf> = BTreeMap::new();
    for pid in pids {
        let tasks = std::fs::read_dir(proc.join(pid.to_string()).join("task"));
        for task in tasks.into_iter().flatten().filter_map(Result::ok) {
            if let Some(netns) = netns_of(&task.path()) {
                namespaces.entry(netns).or_insert(task.path());
            }
        }
    }
    namespaces
}

/// A listening socket of a /proc/net/tcp or tcp6 table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListeningSocket {
    pub inode: u64,
    pub local: SocketAddr,
    /// Connections in its accept queue, waiting for the process to accept them.
    pub queued: u32,
}

/// The listening sockets of a /proc/net/tcp or tcp6 table.
pub fn listening_sockets(mut table: impl BufRead) -> Vec<ListeningSocket> {
    let mut found = Vec::new();
    let mut line = String::new();
    let mut header = true;
    while table.read_line(&mut line).is_ok_and(|n| n > 0) {
        if !std::mem::take(&mut header) {
            found.extend(listening_socket(&line));
        }
        line.clear();
    }
    found
}

/// One line of the table, if it is a listening socket.
fn listening_socket(line: &str) -> Option<ListeningSocket> {
    // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
    // (for a listener, rx_queue is its accept queue's length)
    let mut fields = line.split_whitespace();
    let local = fields.nth(1)?;
    if fields.nth(1)? != LISTEN {
        return None;
    }
    let (_, rx_queue) = fields.next()?.split_once(':')?;
    let inode = fields.nth(4)?.parse().ok()?;
    Some(ListeningSocket {
        inode,
        local: parse_address(local)?,
        queued: u32::from_str_radix(rx_queue, 16).ok()?,
    })
}

/// The accept queues of a network namespace's listeners, and how often its kernel dropped a
/// connection because one was full.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AcceptQueues {
    pub queued: HashMap<SocketAddr, u32>,
    /// Their listen() backlogs, when the kernel's socket diagnostics could be read (in
    /// another namespace that takes CAP_SYS_ADMIN).
    pub backlogs: HashMap<SocketAddr, u32>,
    /// `TcpExt: ListenOverflows` of the namespace, since it was created.
    pub overflows: u64,
}

/// The accept queues of network namespace `netns`, read through one of its tasks; `None` when
/// no process is in it. Main threads are tried first: a thread may be gone by the time its
/// tables are read.
pub fn accept_queues(netns: u32) -> Option<AcceptQueues> {
    let proc = Path::new("/proc");
    let pids: Vec<u32> = std::fs::read_dir(proc)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    let leaders = pids.iter().map(|pid| proc.join(pid.to_string()));
    let threads = pids.iter().flat_map(|pid| {
        std::fs::read_dir(proc.join(pid.to_string()).join("task"))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|task| task.path())
    });
    leaders
        .chain(threads)
        .filter(|task| netns_of(task) == Some(netns))
        .find_map(|task| read_accept_queues(&task))
}

/// The accept queues and overflow count as task directory `task` sees them: from the socket
/// diagnostics (with the backlogs), or else from /proc/net/tcp (without).
fn read_accept_queues(task: &Path) -> Option<AcceptQueues> {
    let netstat = std::fs::read_to_string(task.join("net").join("netstat")).ok()?;
    let mut queues = AcceptQueues {
        queued: HashMap::new(),
        backlogs: HashMap::new(),
        overflows: netstat_value(&netstat, "TcpExt", "ListenOverflows")?,
    };
    if let Ok(listeners) = super::sock_diag::listeners_of(task) {
        for l in listeners {
            queues.queued.insert(l.local, l.queued);
            queues.backlogs.insert(l.local, l.backlog);
        }
        return Some(queues);
    }
    for table in ["tcp", "tcp6"] {
        let file = std::fs::File::open(task.join("net").join(table)).ok()?;
        for socket in listening_sockets(BufReader::new(file)) {
            queues.queued.insert(socket.local, socket.queued);
        }
    }
    Some(queues)
}

/// A counter of /proc/net/netstat: a line of names, then a line of values, per group.
fn netstat_value(netstat: &str, group: &str, name: &str) -> Option<u64> {
    let prefix = format!("{group}:");
    let mut lines = netstat.lines().filter(|l| l.starts_with(&prefix));
    let names = lines.next()?.split_whitespace().skip(1);
    let values = lines.next()?.split_whitespace().skip(1);
    names.zip(values).find(|(n, _)| *n == name)?.1.parse().ok()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): each 32-bit word is printed as
/// the kernel holds it, in host byte order.
fn parse_address(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_le_bytes(),
        )
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000081 00:00000000 00000000     0        0 31337 1 0000000000000000 100 0 0 10 0
   1: 0100007F:C350 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 31338 1 0000000000000000 20 4 30 10 -1
   2: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:01BB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 999 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn a_namespaces_own_addresses_are_its_local_routes_and_ipv6_addresses() {
        let fib_trie = "Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 10.244.1.0/24 2 0 2
        |-- 10.244.1.0
           /24 link UNICAST
        |-- 10.244.1.5
           /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 10.244.1.5
        /32 host LOCAL
";
        assert_eq!(
            fib_trie_locals(fib_trie),
            ["127.0.0.1", "10.244.1.5"]
                .map(|ip| ip.parse::<IpAddr>().unwrap())
                .to_vec()
        );
        let if_inet6 = "00000000000000000000000000000001 01 80 10 80       lo
fd000000000000000000000000000005 02 40 00 80     eth0
";
        assert_eq!(
            if_inet6_addresses(if_inet6),
            ["::1", "fd00::5"]
                .map(|ip| ip.parse::<IpAddr>().unwrap())
                .to_vec()
        );
        // This process's own namespace has at least its loopback.
        let own = local_addresses(std::process::id());
        assert!(own.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)), "{own:?}");
    }

    #[test]
    fn finds_listening_sockets_only() {
        let found = |table: &str| -> Vec<(u64, SocketAddr, u32)> {
            listening_sockets(table.as_bytes())
                .into_iter()
                .map(|s| (s.inode, s.local, s.queued))
                .collect()
        };
        assert_eq!(
            found(TCP),
            vec![
                (31337, "127.0.0.1:8080".parse().unwrap(), 0x81),
                (4242, "0.0.0.0:22".parse().unwrap(), 0)
            ]
        );
        assert_eq!(found(TCP6), vec![(999, "[::1]:443".parse().unwrap(), 0)]);
    }

    #[test]
    fn reads_netstat_counters_by_name() {
        let netstat = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\n\
                       TcpExt: 0 24 25\n\
                       IpExt: InNoRoutes ListenOverflows\n\
                       IpExt: 1 99\n";
        assert_eq!(
            netstat_value(netstat, "TcpExt", "ListenOverflows"),
            Some(24)
        );
        assert_eq!(netstat_value(netstat, "TcpExt", "Nothing"), None);
    }

    #[test]
    fn finds_a_thread_listening_in_another_namespace() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            crate::skip("it needs root to make a network namespace");
            return;
        }
        // A thread of this process, in a namespace of its own, listening there.
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            // SAFETY: unshare affects only this thread.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            // A child of this thread starts in its namespace.
            let _ = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status();
            let listener = std::net::TcpListener::bind("127.0.0.1:0");
            tx.send(listener.as_ref().ok().and_then(|l| l.local_addr().ok()))
                .unwrap();
            let _ = done_rx.recv();
            drop(listener);
        });
        let Some(addr) = rx.recv().unwrap() else {
            crate::skip("the new namespace has no loopback");
            return;
        };
        let found = listeners();
        done_tx.send(()).unwrap();
        assert!(
            found
                .iter()
                .any(|l| l.local == addr && l.pids.contains(&std::process::id())),
            "{addr} not in {found:?}"
        );
    }

    #[test]
    fn finds_this_process_listening() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let found = listeners();
        let mine = found
            .iter()
            .find(|l| l.local == addr)
            .unwrap_or_else(|| panic!("{addr} not found among {found:?}"));
        assert!(mine.pids.contains(&std::process::id()));
        assert!(mine.netns > 0);
    }

    #[test]
    fn finds_the_process_holding_a_socket_among_a_parent_s_children() {
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let link = std::fs::read_link(format!("/proc/self/fd/{}", accepted.as_raw_fd())).unwrap();
        let inode: u64 = link.to_str().unwrap()["socket:[".len()..]
            .trim_end_matches(']')
            .parse()
            .unwrap();
        let me = std::process::id();
        // SAFETY: getppid has no preconditions.
        let parent = unsafe { libc::getppid() } as u32;
        assert_eq!(socket_holder(inode, &[me]).map(|(pid, _)| pid), Some(me));
        assert_eq!(
            socket_holder(inode, &[parent]).map(|(pid, _)| pid),
            Some(me)
        );
        drop(accepted);
        assert_eq!(
            socket_holder(inode, &[me]),
            None,
            "closed, it is held by nobody"
        );
    }
}
