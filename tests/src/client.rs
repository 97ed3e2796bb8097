//! What a proxy does toward its upstreams, with plain sockets: connect, send a request, read the
//! response, give up after a timeout. Run these inside a test namespace.

use std::{
    io::{self, ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _},
    time::Duration,
};

/// Makes `n` connects to `upstream` from inside `ns`, each refused (nothing listens there).
pub fn refuse(ns: &crate::netns::Netns, upstream: SocketAddr, n: usize) {
    ns.run(|| {
        for _ in 0..n {
            let error = TcpStream::connect(upstream).expect_err("nothing listens");
            assert_eq!(error.kind(), ErrorKind::ConnectionRefused, "{upstream}");
        }
    });
}

pub const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: upstream\r\n\r\n";

/// Connects, sends one request and reads the whole response (Content-Length bodies).
pub fn request(addr: SocketAddr) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    exchange(&mut stream)
}

/// Sends one request on an open connection and reads its response.
pub fn exchange(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    stream.write_all(REQUEST)?;
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(total) = complete_length(&response)
            && response.len() >= total
        {
            return Ok(response);
        }
        match stream.read(&mut buf)? {
            0 => {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "upstream closed the connection",
                ));
            }
            n => response.extend_from_slice(&buf[..n]),
        }
    }
}

/// The full length of a response whose head has arrived.
fn complete_length(response: &[u8]) -> Option<usize> {
    let head_end = response.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&response[..head_end]);
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.trim().parse::<usize>().ok())?;
    Some(head_end + length)
}

/// Sends one request and gives up (closes the connection) when no answer came in `patience`.
/// Returns whether it gave up.
pub fn request_with_timeout(addr: SocketAddr, patience: Duration) -> io::Result<bool> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.write_all(REQUEST)?;
    stream.set_read_timeout(Some(patience))?;
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(true),
        _ => Ok(false),
    }
}

/// Starts a non-blocking connect, waits `patience` for it, then closes the socket, like a proxy
/// whose connect timeout fires. Returns whether the connect was still in progress.
pub fn connect_with_timeout(addr: SocketAddr, patience: Duration) -> io::Result<bool> {
    let socket = raw_socket(addr)?;
    set_nonblocking(&socket)?;
    match raw_connect(&socket, addr) {
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
        Ok(()) => return Ok(false),
    }
    std::thread::sleep(patience);
    let mut err: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid socket and output buffer of the given length.
    unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    let still_connecting = err == 0 && socket.peer_addr().is_err();
    drop(socket);
    Ok(still_connecting)
}

/// How a proxy learns the outcome of a non-blocking connect().
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polling {
    /// connect() again on the same socket until it stops saying EALREADY (HAProxy): the
    /// attempt's error, or EISCONN once connected.
    ConnectAgain,
    /// getsockopt(SO_ERROR) until the socket is connected or has an error.
    SoError,
    /// poll() for POLLOUT, then SO_ERROR (nginx without epoll, Apache).
    Poll,
    /// epoll_wait() for EPOLLOUT, then SO_ERROR (nginx, Envoy).
    Epoll,
}

impl Polling {
    pub const ALL: [Polling; 4] = [
        Polling::ConnectAgain,
        Polling::SoError,
        Polling::Poll,
        Polling::Epoll,
    ];
}

/// Starts a non-blocking connect() to `addr` and learns how it ended the way `how` says.
/// Returns the connected socket, or the error the attempt ended with.
pub fn connect_polled(addr: SocketAddr, how: Polling) -> io::Result<TcpStream> {
    let socket = raw_socket(addr)?;
    set_nonblocking(&socket)?;
    match raw_connect(&socket, addr) {
        Ok(()) => return Ok(socket),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let fd = socket.as_raw_fd();
    let error = match how {
        Polling::ConnectAgain => loop {
            match raw_connect(&socket, addr) {
                Ok(()) => break 0,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EISCONN) => break 0,
                    Some(libc::EALREADY | libc::EINPROGRESS)
                        if std::time::Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Some(errno) => break errno,
                    None => return Err(e),
                },
            }
        },
        Polling::SoError => loop {
            let errno = so_error(fd)?;
            if errno != 0 || socket.peer_addr().is_ok() || std::time::Instant::now() > deadline {
                break errno;
            }
            std::thread::sleep(Duration::from_millis(1));
        },
        Polling::Poll => {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, 5_000) } < 0 {
                return Err(io::Error::last_os_error());
            }
            so_error(fd)?
        }
        Polling::Epoll => {
            // SAFETY: plain epoll calls on descriptors we own; the epoll one is closed below.
            unsafe {
                let epoll = libc::epoll_create1(libc::EPOLL_CLOEXEC);
                if epoll < 0 {
                    return Err(io::Error::last_os_error());
                }
                let mut event = libc::epoll_event {
                    events: libc::EPOLLOUT as u32,
                    u64: 0,
                };
                let rc = libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut event);
                let waited = if rc == 0 {
                    libc::epoll_wait(epoll, &mut event, 1, 5_000)
                } else {
                    rc
                };
                let failed = io::Error::last_os_error();
                libc::close(epoll);
                if waited < 0 {
                    return Err(failed);
                }
            }
            so_error(fd)?
        }
    };
    if error == 0 {
        Ok(socket)
    } else {
        Err(io::Error::from_raw_os_error(error))
    }
}

/// Makes `attempts` non-blocking attempts to `addr` one after the other on the same socket,
/// each learnt by calling connect() again (after an error, the next connect() starts anew).
/// Returns the errno each attempt ended with (0 when it connected).
pub fn attempts_on_one_socket(addr: SocketAddr, attempts: usize) -> io::Result<Vec<i32>> {
    let socket = raw_socket(addr)?;
    set_nonblocking(&socket)?;
    let mut ended = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while ended.len() < attempts && std::time::Instant::now() < deadline {
        match raw_connect(&socket, addr).map_err(|e| e.raw_os_error()) {
            Ok(()) | Err(Some(libc::EISCONN)) => {
                ended.push(0);
                break;
            }
            // A new attempt began, or the last one is still under way.
            Err(Some(libc::EINPROGRESS | libc::EALREADY)) => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(Some(errno)) => ended.push(errno),
            Err(None) => return Err(io::Error::other("connect() failed without an errno")),
        }
    }
    Ok(ended)
}

/// The socket's pending error (getsockopt SO_ERROR), which reading clears.
fn so_error(fd: std::os::fd::RawFd) -> io::Result<i32> {
    let mut err: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid output buffer of the given length.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(err)
}

/// A blocking connect that lets the kernel retransmit the SYN only `syn_count` times (TCP_SYNCNT),
/// so that the kernel itself gives up quickly.
pub fn connect_with_syn_count(addr: SocketAddr, syn_count: i32) -> io::Result<TcpStream> {
    let socket = raw_socket(addr)?;
    // SAFETY: valid socket and option value of the given size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_SYNCNT,
            (&syn_count as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    raw_connect(&socket, addr)?;
    Ok(socket)
}

/// A TCP socket bound to `addr` and connected to it: a simultaneous open with itself
/// (SYN_SENT→SYN_RECV→ESTABLISHED, never SYN_SENT→ESTABLISHED).
pub fn connect_to_itself(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = raw_socket(addr)?;
    with_sockaddr(&socket, addr, libc::bind)?;
    raw_connect(&socket, addr)?;
    Ok(socket)
}

/// A TCP socket for `addr`'s family, not connected yet.
fn raw_socket(addr: SocketAddr) -> io::Result<TcpStream> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { TcpStream::from_raw_fd(fd) })
}

fn set_nonblocking(socket: &TcpStream) -> io::Result<()> {
    socket.set_nonblocking(true)
}

fn raw_connect(socket: &TcpStream, addr: SocketAddr) -> io::Result<()> {
    with_sockaddr(socket, addr, libc::connect)
}

/// Calls `call` (connect(2), bind(2)) on `socket` with `addr` as a `struct sockaddr`.
fn with_sockaddr(
    socket: &TcpStream,
    addr: SocketAddr,
    call: unsafe extern "C" fn(libc::c_int, *const libc::sockaddr, libc::socklen_t) -> libc::c_int,
) -> io::Result<()> {
    let (storage, len) = sockaddr(addr);
    // SAFETY: a valid socket and a sockaddr of the length given.
    let rc = unsafe {
        call(
            socket.as_raw_fd(),
            (&storage as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Connects to a Unix stream socket without blocking, the way nginx does: a full listen queue
/// is `EAGAIN` at once rather than a wait. The socket is closed when the result is dropped.
pub fn unix_connect(path: &std::path::Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    // SAFETY: plain socket(2); the descriptor is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let socket = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::from(ErrorKind::InvalidInput));
    }
    for (to, from) in addr.sun_path.iter_mut().zip(bytes) {
        *to = *from as libc::c_char;
    }
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_un of at least len bytes.
    let rc = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}
