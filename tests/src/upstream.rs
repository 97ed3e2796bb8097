//! Upstream servers that fail on purpose, each the way a real one does.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::Netns;

/// What the upstream does with each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Answers every request (keep-alive), and closes a connection idle for `idle_close`.
    Answer { idle_close: Duration },
    /// Reads the request, then resets the connection (a worker killed mid-request).
    ResetBeforeAnswer,
    /// Sends the start of a response, then resets the connection.
    PartialThenReset,
    /// Reads the request, then closes the connection without a word.
    CloseAfterRequest,
    /// Reads the request and never answers (a stuck worker).
    NeverAnswer,
    /// Listens with a backlog of one and never accepts: once two connections wait in its
    /// accept queue, the kernel drops every new SYN (a server too busy to accept).
    NeverAccept,
    /// Answers the request as if keeping the connection alive, then closes it 2 ms later: a
    /// proxy that reuses the connection races with the close (an upstream keep-alive timeout
    /// shorter than the proxy's, taken to the extreme).
    AnswerThenClose,
}

/// The response `Answer` sends.
pub const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
/// The start of a response `PartialThenReset` sends before its reset.
pub const PARTIAL: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial";

/// A running upstream; stops on drop.
pub struct Upstream {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    /// Listens on `addr` inside `ns` and serves every connection with `behaviour`, from a
    /// thread that stays in the namespace, as a server process would.
    pub fn start(ns: &Netns, addr: SocketAddr, behaviour: Behaviour) -> Upstream {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let netns = ns.name.clone();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                crate::netns::enter(&netns);
                if behaviour == Behaviour::NeverAccept {
                    let _listener = listen_with_backlog(addr, 1);
                    ready_tx.send(()).expect("the test waits");
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    return;
                }
                let listener =
                    TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
                listener
                    .set_nonblocking(true)
                    .expect("nonblocking listener");
                ready_tx.send(()).expect("the test waits");
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let stop = stop.clone();
                            std::thread::spawn(move || serve(stream, behaviour, &stop));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err(e) => panic!("accept on {addr}: {e}"),
                    }
                }
            })
        };
        ready.recv().expect("the upstream listens");
        Upstream {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A listener on `addr` with the listen() backlog given (std always asks for 128).
pub fn listen_with_backlog(addr: SocketAddr, backlog: i32) -> TcpListener {
    use std::os::fd::FromRawFd as _;
    // SAFETY: zeroed sockaddr structs are valid; the socket is owned by the listener returned.
    unsafe {
        let (family, storage, len) = match addr {
            SocketAddr::V4(a) => {
                let mut sin: libc::sockaddr_in = std::mem::zeroed();
                sin.sin_family = libc::AF_INET as libc::sa_family_t;
                sin.sin_port = a.port().to_be();
                sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
                let mut storage: libc::sockaddr_storage = std::mem::zeroed();
                std::ptr::write((&raw mut storage).cast(), sin);
                (libc::AF_INET, storage, size_of::<libc::sockaddr_in>())
            }
            SocketAddr::V6(a) => {
                let mut sin6: libc::sockaddr_in6 = std::mem::zeroed();
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_port = a.port().to_be();
                sin6.sin6_addr.s6_addr = a.ip().octets();
                let mut storage: libc::sockaddr_storage = std::mem::zeroed();
                std::ptr::write((&raw mut storage).cast(), sin6);
                (libc::AF_INET6, storage, size_of::<libc::sockaddr_in6>())
            }
        };
        let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let listener = TcpListener::from_raw_fd(fd);
        let rc = libc::bind(fd, (&raw const storage).cast(), len as libc::socklen_t);
        assert_eq!(rc, 0, "bind {addr}: {}", std::io::Error::last_os_error());
        assert_eq!(libc::listen(fd, backlog), 0, "listen");
        listener
    }
}

/// Reads one request head (up to the blank line). False on EOF or error.
pub fn read_request(stream: &mut TcpStream) -> bool {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    true
}

/// Closes the connection with a RST instead of a FIN (SO_LINGER with a zero timeout).
pub fn reset(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a valid linger struct of the size given.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    drop(stream);
}

/// Serves every connection of a blocking `listener` with `behaviour`, forever.
pub fn serve_listener(listener: TcpListener, behaviour: Behaviour) {
    let never = Arc::new(AtomicBool::new(false));
    for stream in listener.incoming().flatten() {
        let never = never.clone();
        std::thread::spawn(move || serve(stream, behaviour, &never));
    }
}

fn serve(mut stream: TcpStream, behaviour: Behaviour, stop: &AtomicBool) {
    match behaviour {
        Behaviour::Answer { idle_close } => {
            let _ = stream.set_read_timeout(Some(idle_close));
            while read_request(&mut stream) {
                if stream.write_all(RESPONSE).is_err() {
                    return;
                }
            }
            // Idle (read timed out) or the client left: close with a FIN.
        }
        Behaviour::ResetBeforeAnswer => {
            if read_request(&mut stream) {
                reset(stream);
            }
        }
        Behaviour::PartialThenReset => {
            if read_request(&mut stream) && stream.write_all(PARTIAL).is_ok() {
                // Let the partial response reach the proxy before the reset does.
                std::thread::sleep(Duration::from_millis(20));
                reset(stream);
            }
        }
        Behaviour::AnswerThenClose => {
            if read_request(&mut stream) && stream.write_all(RESPONSE).is_ok() {
                // Long enough for the proxy to put the connection back in its pool and pick it
                // for the next request.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        Behaviour::CloseAfterRequest => {
            if read_request(&mut stream) {
                drop(stream);
            }
        }
        Behaviour::NeverAccept => unreachable!("nothing is accepted"),
        Behaviour::NeverAnswer => {
            if read_request(&mut stream) {
                let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    match stream.read(&mut buf) {
                        Ok(0) => return,
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        _ => return,
                    }
                }
            }
        }
    }
}

/// What a Unix-socket upstream (php-fpm, gunicorn on a socket) is like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnixState {
    /// Nothing: the socket file does not exist.
    Missing,
    /// The file left behind by a listener that is gone: connects are refused.
    Stale,
    /// A listener whose queue is full and that never accepts (every worker busy).
    Busy,
    /// A listener that answers every request and closes the connection.
    Answer,
    /// A listener whose socket file has mode 000: only root may connect.
    Denied,
}

/// A Unix-socket upstream in the state asked for; stops and removes its file on drop.
pub struct UnixUpstream {
    pub path: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// What keeps a busy listener busy: the listener and the connection filling its queue.
    _held: Vec<std::os::fd::OwnedFd>,
}

impl UnixUpstream {
    pub fn start(path: &std::path::Path, state: UnixState) -> UnixUpstream {
        use std::os::unix::{fs::PermissionsExt as _, net::UnixListener};
        let _ = std::fs::remove_file(path);
        let stop = Arc::new(AtomicBool::new(false));
        let mut held = Vec::new();
        let mut thread = None;
        match state {
            UnixState::Missing => {}
            UnixState::Stale => drop(UnixListener::bind(path).expect("bind")),
            UnixState::Busy => {
                let listener = UnixListener::bind(path).expect("bind");
                // SAFETY: listen(2) on our own socket: a queue of one connection.
                assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
                held.push(crate::client::unix_connect(path).expect("fills the queue"));
                held.push(listener.into());
            }
            UnixState::Answer | UnixState::Denied => {
                let listener = UnixListener::bind(path).expect("bind");
                let stop = stop.clone();
                thread = Some(std::thread::spawn(move || {
                    for stream in listener.incoming().flatten() {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        std::thread::spawn(move || answer_once(stream));
                    }
                }));
            }
        }
        if path.exists() {
            // Whoever the proxy's workers run as may connect, unless denied.
            let mode = if state == UnixState::Denied {
                0o000
            } else {
                0o666
            };
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        }
        UnixUpstream {
            path: path.to_path_buf(),
            stop,
            thread,
            _held: held,
        }
    }
}

/// Reads one request head and answers it, closing the connection.
fn answer_once(mut stream: std::os::unix::net::UnixStream) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let _ =
        stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello");
}

impl Drop for UnixUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // Wake the accept loop so it sees the flag.
            let _ = std::os::unix::net::UnixStream::connect(&self.path);
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
