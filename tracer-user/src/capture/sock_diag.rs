//! The kernel's socket diagnostics (NETLINK_SOCK_DIAG, what `ss -lnt` and `ss -lx` use): for
//! every TCP and Unix stream listener of a network namespace, its accept queue and its listen()
//! backlog, which /proc/net/tcp does not show and /proc/net/unix does not either.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_LISTEN: u32 = 10;
/// `struct nlmsghdr` and `struct inet_diag_req_v2`.
const HEADER: usize = 16;
const REQUEST: usize = 56;
/// `struct inet_diag_msg`: family, state, timer, retrans, the 48-byte socket id, expires, then
/// rqueue (a listener's accept queue) and wqueue (its backlog), uid, inode.
const MESSAGE: usize = 72;

/// A TCP listener as the kernel describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    pub local: SocketAddr,
    /// Connections waiting in its accept queue.
    pub queued: u32,
    /// Its listen() backlog: the queue is full when it holds more.
    pub backlog: u32,
}

/// A Unix stream listener as the kernel describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixListener {
    /// Its name as bytes (NUL-padded, or starting with a NUL for an abstract one).
    pub name: Vec<u8>,
    pub inode: u64,
    /// Connections waiting to be accepted, and its listen() backlog.
    pub queued: u32,
    pub backlog: u32,
}

/// The TCP listeners of the network namespace of task directory `task` (`/proc/PID` or
/// `/proc/PID/task/TID`). Entering another namespace takes CAP_SYS_ADMIN; without it, only the
/// agent's own namespace can be read.
pub fn listeners_of(task: &Path) -> io::Result<Vec<Listener>> {
    in_namespace_of(task, dump_listeners)
}

/// The Unix stream listeners of the network namespace of task directory `task`.
pub fn unix_listeners_of(task: &Path) -> io::Result<Vec<UnixListener>> {
    in_namespace_of(task, dump_unix_listeners)
}

/// Runs `dump` in the network namespace of task directory `task`.
fn in_namespace_of<T: Send>(
    task: &Path,
    dump: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    let target = std::fs::File::open(task.join("ns/net"))?;
    let own = std::fs::metadata("/proc/thread-self/ns/net")?;
    if std::os::unix::fs::MetadataExt::ino(&target.metadata()?)
        == std::os::unix::fs::MetadataExt::ino(&own)
    {
        return dump();
    }
    // A thread of its own enters the namespace, so the rest of the agent stays where it is.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on a namespace file we opened; this thread only.
                if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                dump()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("sock_diag thread panicked")))
    })
}

/// A NETLINK_SOCK_DIAG socket.
fn diag_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `struct unix_diag_req` and `struct unix_diag_msg`; the attributes asked for and read.
const UNIX_REQUEST: usize = 24;
const UNIX_MESSAGE: usize = 16;
const UDIAG_SHOW_NAME: u32 = 0x01;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_RQLEN: u16 = 4;

/// The Unix stream listeners of the calling thread's network namespace.
fn dump_unix_listeners() -> io::Result<Vec<UnixListener>> {
    let socket = diag_socket()?;
    let mut m = [0u8; HEADER + UNIX_REQUEST];
    m[0..4].copy_from_slice(&((HEADER + UNIX_REQUEST) as u32).to_ne_bytes());
    m[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // unix_diag_req: family, protocol, pad, states, ino (0: all), show, cookie.
    m[HEADER] = libc::AF_UNIX as u8;
    m[HEADER + 4..HEADER + 8].copy_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    m[HEADER + 12..HEADER + 16]
        .copy_from_slice(&(UDIAG_SHOW_NAME | UDIAG_SHOW_RQLEN).to_ne_bytes());
    send(&socket, &m)?;
    let mut found = Vec::new();
    receive(&socket, &mut found, parse_unix)?;
    Ok(found)
}

/// One `struct unix_diag_msg` and its attributes (a listener without a name is left out).
fn parse_unix(message: &[u8]) -> Option<UnixListener> {
    if message.len() < UNIX_MESSAGE || i32::from(message[0]) != libc::AF_UNIX {
        return None;
    }
    let inode = u64::from(u32::from_ne_bytes(message[4..8].try_into().ok()?));
    let (mut name, mut queue) = (None, None);
    let mut rest = message.get(UNIX_MESSAGE..)?;
    while rest.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let kind = u16::from_ne_bytes([rest[2], rest[3]]);
        let payload = rest.get(4..len)?;
        match kind {
            UNIX_DIAG_NAME => name = Some(payload.to_vec()),
            UNIX_DIAG_RQLEN if payload.len() >= 8 => {
                let word =
                    |at: usize| u32::from_ne_bytes(payload[at..at + 4].try_into().expect("4"));
                queue = Some((word(0), word(4)));
            }
            _ => {}
        }
        rest = rest.get((len + 3) & !3..).unwrap_or_default();
    }
    let (queued, backlog) = queue?;
    Some(UnixListener {
        name: name?,
        inode,
        queued,
        backlog,
    })
}

/// The TCP listeners of the calling thread's network namespace.
fn dump_listeners() -> io::Result<Vec<Listener>> {
    let socket = diag_socket()?;
    let mut found = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        send(&socket, &request(family))?;
        receive(&socket, &mut found, parse)?;
    }
    Ok(found)
}

/// A dump request for the TCP listeners of one address family.
fn request(family: u8) -> [u8; HEADER + REQUEST] {
    let mut m = [0u8; HEADER + REQUEST];
    m[0..4].copy_from_slice(&((HEADER + REQUEST) as u32).to_ne_bytes());
    m[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // inet_diag_req_v2: family, protocol, ext, pad, states, then the socket id (zero: all).
    m[HEADER] = family;
    m[HEADER + 1] = libc::IPPROTO_TCP as u8;
    m[HEADER + 4..HEADER + 8].copy_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    m
}

fn send(socket: &OwnedFd, message: &[u8]) -> io::Result<()> {
    // SAFETY: a valid buffer of the length given.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            message.as_ptr().cast(),
            message.len(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads the dump's answers until its end.
fn receive<T>(
    socket: &OwnedFd,
    found: &mut Vec<T>,
    parse: fn(&[u8]) -> Option<T>,
) -> io::Result<()> {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: a valid buffer of the length given.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if walk(&buf[..n as usize], found, parse)? {
            return Ok(());
        }
    }
}

/// The netlink messages of one reply, their listeners added to `found`: whether the dump ended.
fn walk<T>(reply: &[u8], found: &mut Vec<T>, parse: fn(&[u8]) -> Option<T>) -> io::Result<bool> {
    let mut rest = reply;
    while rest.len() >= HEADER {
        let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(rest[4..6].try_into().expect("2 bytes"));
        if len < HEADER || len > rest.len() {
            return Err(io::Error::other("a truncated netlink message"));
        }
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = rest
                    .get(HEADER..HEADER + 4)
                    .map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("4 bytes")));
                return Err(io::Error::from_raw_os_error(-errno));
            }
            _ => found.extend(parse(&rest[HEADER..len])),
        }
        // Messages are aligned to 4 bytes; the last one of a reply may not be padded.
        rest = rest.get((len + 3) & !3..).unwrap_or_default();
    }
    Ok(false)
}

/// One `struct inet_diag_msg`.
fn parse(message: &[u8]) -> Option<Listener> {
    if message.len() < MESSAGE {
        return None;
    }
    let port = u16::from_be_bytes([message[4], message[5]]);
    let src = &message[8..24];
    let ip = match i32::from(message[0]) {
        libc::AF_INET => IpAddr::V4(Ipv4Addr::new(src[0], src[1], src[2], src[3])),
        libc::AF_INET6 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(src).ok()?)),
        _ => return None,
    };
    let word = |at: usize| u32::from_ne_bytes(message[at..at + 4].try_into().expect("4 bytes"));
    Some(Listener {
        local: SocketAddr::new(ip, port),
        queued: word(56),
        backlog: word(60),
    })
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    #[test]
    fn a_reply_that_ends_unpadded_or_truncated_is_no_panic() {
        // A message of 17 bytes, the last of its reply, with no padding after it.
        let mut reply = vec![0u8; 17];
        reply[0..4].copy_from_slice(&17u32.to_ne_bytes());
        reply[4..6].copy_from_slice(&20u16.to_ne_bytes());
        let mut found = Vec::new();
        assert!(!walk(&reply, &mut found, parse).unwrap());
        assert!(found.is_empty());
        // A length past the reply's end.
        reply[0..4].copy_from_slice(&64u32.to_ne_bytes());
        assert!(walk(&reply, &mut found, parse).is_err());
    }

    use super::*;

    #[test]
    fn a_message_gives_the_address_queue_and_backlog() {
        let mut m = [0u8; MESSAGE];
        m[0] = libc::AF_INET as u8;
        m[1] = TCP_LISTEN as u8;
        m[4..6].copy_from_slice(&8000u16.to_be_bytes());
        m[8..12].copy_from_slice(&[127, 0, 0, 1]);
        m[56..60].copy_from_slice(&129u32.to_ne_bytes());
        m[60..64].copy_from_slice(&128u32.to_ne_bytes());
        assert_eq!(
            parse(&m),
            Some(Listener {
                local: "127.0.0.1:8000".parse().unwrap(),
                queued: 129,
                backlog: 128,
            })
        );
        assert_eq!(parse(&m[..40]), None);
    }

    #[test]
    fn finds_this_process_listening_with_its_backlog() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let local = listener.local_addr().unwrap();
        let found = listeners_of(Path::new("/proc/self")).expect("sock_diag");
        let mine = found.iter().find(|l| l.local == local).expect("listed");
        // std asks for 128.
        assert_eq!((mine.queued, mine.backlog), (0, 128));
    }

    #[test]
    fn finds_a_unix_listener_with_its_queue_and_backlog() {
        let dir = std::env::temp_dir().join(format!("tracer-diag-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // SAFETY: listen(2) again on our own socket, to set a backlog of our choosing.
        assert_eq!(
            unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 5) },
            0
        );
        // Two connections wait, not accepted.
        let _a = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let _b = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let found = unix_listeners_of(Path::new("/proc/self")).expect("sock_diag");
        let wanted = path.as_os_str().as_encoded_bytes();
        let mine = found
            .iter()
            .find(|l| l.name.strip_suffix(&[0]).unwrap_or(&l.name) == wanted)
            .unwrap_or_else(|| panic!("{} not among {found:?}", path.display()));
        assert_eq!((mine.queued, mine.backlog), (2, 5));
        assert!(mine.inode > 0);
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
