//! The agent's HTTP listener: `/metrics` for Prometheus, `/healthz`, and what other exports
//! register; and the client `tracer top --connect` reads it with. HTTP itself is hyper's
//! (keep-alive, HEAD, query strings, chunked streams, header timeouts). What is ours is the
//! bounds: the connections served at once, the event streams at once, how long a stream may
//! stall, and what the accept loop does when the process is out of file descriptors.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::{Method, Request, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use thiserror::Error;
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{Notify, Semaphore, broadcast, mpsc},
};

/// Connections served at once; past it a new one gets 503 and is closed.
pub const MAX_CLIENTS: usize = 256;
/// Event streams (`/api/events`) at once; past it 503.
pub const MAX_STREAMS: usize = 16;
/// A client must send its request head within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A stream whose client reads nothing for this long is closed.
pub const STALL_TIMEOUT: Duration = if cfg!(test) {
    Duration::from_secs(1)
} else {
    Duration::from_secs(10)
};
/// Lines a stream may hold for its client before the client counts as stalled.
const STREAM_BUFFER: usize = 256;
/// The kernel's send buffer for each client: bounds what a client that stops reading pins.
const SEND_BUFFER: u32 = 256 * 1024;
/// How long the accept loop waits when the process is out of file descriptors (or memory).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, Error)]
pub enum ListenError {
    #[error(
        "cannot listen on {addr}: {error}{hint}",
        hint = if error.kind() == std::io::ErrorKind::AddrInUse {
            " (another tracer, or another exporter, uses that port: pick one with --listen)"
        } else {
            ""
        }
    )]
    Bind {
        addr: SocketAddr,
        // Not `source`: the message says it already, and a chain would say it twice.
        error: std::io::Error,
    },
}

/// Binds the listener: done first, so that a bad address fails before any probe is attached.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ListenError> {
    let bind = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        // Accepted connections inherit it.
        socket.set_send_buffer_size(SEND_BUFFER)?;
        socket.bind(addr)?;
        socket.listen(1024)
    };
    bind().map_err(|error| ListenError::Bind { addr, error })
}

/// What a handler answers.
pub enum Response {
    /// A whole body, with its content type.
    Body {
        content_type: &'static str,
        body: String,
    },
    /// Lines as they come from `source`, until the client leaves or stalls.
    Lines {
        content_type: &'static str,
        source: broadcast::Receiver<Bytes>,
    },
    NotFound,
}

/// Routes a request path (without its query string) to a response.
pub type Handler = Arc<dyn Fn(&str) -> Response + Send + Sync>;

/// Serves requests until the task is dropped.
pub async fn serve(listener: TcpListener, handler: Handler) {
    let clients = Arc::new(Semaphore::new(MAX_CLIENTS));
    let streams = Arc::new(Semaphore::new(MAX_STREAMS));
    let mut out_of_resources = false;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                out_of_resources = false;
                stream
            }
            Err(error) => {
                // Out of descriptors (or memory), the listener stays readable and accept()
                // fails at once: without a pause the loop would spin a whole core.
                if is_out_of_resources(&error) {
                    if !out_of_resources {
                        tracing::warn!(
                            "cannot accept HTTP clients: {error}; retrying every {} ms",
                            ACCEPT_BACKOFF.as_millis()
                        );
                    }
                    out_of_resources = true;
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
                continue;
            }
        };
        let Ok(permit) = clients.clone().try_acquire_owned() else {
            refuse(stream);
            continue;
        };
        let handler = handler.clone();
        let streams = streams.clone();
        tokio::spawn(async move {
            connection(stream, handler, streams).await;
            drop(permit);
        });
    }
}

fn is_out_of_resources(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Too many clients: a 503 if the socket takes it at once, then close.
fn refuse(stream: TcpStream) {
    let _ = stream.try_write(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
}

async fn connection(stream: TcpStream, handler: Handler, streams: Arc<Semaphore>) {
    // Told when a stream's client stopped reading: the connection is then dropped (closed).
    let stalled = Arc::new(Notify::new());
    let service = {
        let stalled = stalled.clone();
        service_fn(move |request: Request<Incoming>| {
            let response = route(&handler, &streams, &stalled, &request);
            async move { Ok::<_, Infallible>(response) }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let served = builder.serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = served => {}
        _ = stalled.notified() => {}
    }
}

fn route(
    handler: &Handler,
    streams: &Arc<Semaphore>,
    stalled: &Arc<Notify>,
    request: &Request<Incoming>,
) -> hyper::Response<Body> {
    let method = request.method();
    if method != Method::GET && method != Method::HEAD {
        let mut response = simple(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n");
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match handler(request.uri().path()) {
        Response::Body { content_type, body } => {
            with_type(StatusCode::OK, content_type, Body::Full(Some(body.into())))
        }
        Response::Lines {
            content_type,
            source,
        } => {
            if method == Method::HEAD {
                return with_type(StatusCode::OK, content_type, Body::Full(None));
            }
            let Ok(permit) = streams.clone().try_acquire_owned() else {
                return simple(StatusCode::SERVICE_UNAVAILABLE, "too many event streams\n");
            };
            let (lines, body) = mpsc::channel(STREAM_BUFFER);
            tokio::spawn(forward(source, lines, stalled.clone(), permit));
            let mut response = with_type(StatusCode::OK, content_type, Body::Lines(body));
            response.headers_mut().insert(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("no-cache"),
            );
            response
        }
        Response::NotFound => simple(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Passes lines from `source` to a stream's body until the client leaves, or stalls (its body
/// full for [`STALL_TIMEOUT`]: then `stalled` closes the connection).
async fn forward(
    mut source: broadcast::Receiver<Bytes>,
    lines: mpsc::Sender<Bytes>,
    stalled: Arc<Notify>,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    loop {
        let line = tokio::select! {
            line = source.recv() => line,
            () = lines.closed() => return,
        };
        let line = match line {
            Ok(line) => line,
            // A client that fell behind misses lines rather than holding the agent's memory.
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        match lines.send_timeout(line, STALL_TIMEOUT).await {
            Ok(()) => {}
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                stalled.notify_one();
                return;
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => return,
        }
    }
}

fn with_type(status: StatusCode, content_type: &'static str, body: Body) -> hyper::Response<Body> {
    let mut response = hyper::Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

/// A plain-text response.
fn simple(status: StatusCode, text: &'static str) -> hyper::Response<Body> {
    with_type(
        status,
        "text/plain",
        Body::Full(Some(Bytes::from_static(text.as_bytes()))),
    )
}

/// A response (or request) body: whole, or lines as they come.
pub enum Body {
    Full(Option<Bytes>),
    Lines(mpsc::Receiver<Bytes>),
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(body) => Poll::Ready(body.take().map(|b| Ok(Frame::data(b)))),
            Body::Lines(lines) => lines.poll_recv(cx).map(|l| l.map(|l| Ok(Frame::data(l)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(body) => SizeHint::with_exact(body.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Lines(_) => SizeHint::default(),
        }
    }
}

/// Where `--connect` points: `http://host:port` (the path is ignored).
pub async fn resolve(url: &str) -> Result<SocketAddr, String> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or(rest);
    tokio::net::lookup_host(authority)
        .await
        .map_err(|e| format!("cannot resolve {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority} resolves to no address"))
}

/// The most a response body read whole may hold.
const MAX_BODY: usize = 64 << 20;

/// Where a client request goes: an agent's TCP address, or a local API's Unix socket (a
/// container runtime's).
#[derive(Debug, Clone, Copy)]
pub enum Server<'a> {
    Tcp(SocketAddr),
    Unix(&'a std::path::Path),
}

impl From<SocketAddr> for Server<'_> {
    fn from(addr: SocketAddr) -> Self {
        Server::Tcp(addr)
    }
}

/// GET `path` from `server`: the body of a 200 response.
pub async fn get<'a>(server: impl Into<Server<'a>>, path: &str) -> std::io::Result<String> {
    let mut body = request(server.into(), path).await?;
    let mut whole = Vec::new();
    while let Some(chunk) = next_data(&mut body).await? {
        if whole.len() + chunk.len() > MAX_BODY {
            return Err(std::io::Error::other(format!(
                "GET {path}: the answer is larger than {} MB",
                MAX_BODY >> 20
            )));
        }
        whole.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&whole).into_owned())
}

/// A streamed GET's body, read a line at a time.
pub struct LineStream {
    body: Incoming,
    pending: Vec<u8>,
}

impl LineStream {
    /// The next whole line (without its newline), or `None` when the stream ended.
    pub async fn next_line(&mut self) -> std::io::Result<Option<String>> {
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return Ok(Some(String::from_utf8_lossy(&line[..end]).into_owned()));
            }
            if self.pending.len() > MAX_BODY {
                return Err(std::io::Error::other("a line longer than the body limit"));
            }
            match next_data(&mut self.body).await? {
                Some(chunk) => self.pending.extend_from_slice(&chunk),
                None => return Ok(None),
            }
        }
    }
}

/// Opens a streamed GET of `path`.
pub async fn get_stream<'a>(
    server: impl Into<Server<'a>>,
    path: &str,
) -> std::io::Result<LineStream> {
    Ok(LineStream {
        body: request(server.into(), path).await?,
        pending: Vec::new(),
    })
}

async fn next_data(body: &mut Incoming) -> std::io::Result<Option<Bytes>> {
    loop {
        let frame =
            std::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut *body), cx)).await;
        match frame {
            None => return Ok(None),
            Some(Err(e)) => return Err(std::io::Error::other(e)),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    return Ok(Some(data));
                }
            }
        }
    }
}

/// Sends `GET path` to `server` on a connection of its own; the body of a 200 response.
async fn request(server: Server<'_>, path: &str) -> std::io::Result<Incoming> {
    let timed_out =
        |what: String| move |_| std::io::Error::other(format!("connecting to {what} timed out"));
    let (mut sender, host) = match server {
        Server::Tcp(addr) => {
            let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
                .await
                .map_err(timed_out(addr.to_string()))??;
            (handshake(stream).await?, addr.to_string())
        }
        Server::Unix(socket) => {
            let stream = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::net::UnixStream::connect(socket),
            )
            .await
            .map_err(timed_out(socket.display().to_string()))??;
            (handshake(stream).await?, "localhost".to_string())
        }
    };
    let request = Request::get(path)
        .header(header::HOST, host)
        .body(Body::Full(None))
        .map_err(std::io::Error::other)?;
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .map_err(|_| std::io::Error::other(format!("GET {path}: no answer in 10 s")))?
        .map_err(std::io::Error::other)?;
    if response.status() != StatusCode::OK {
        return Err(std::io::Error::other(format!(
            "GET {path}: {}",
            response.status()
        )));
    }
    Ok(response.into_body())
}

/// An HTTP/1.1 client connection on `stream`, driven by a task of its own.
async fn handshake<S>(stream: S) -> std::io::Result<hyper::client::conn::http1::SendRequest<Body>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(connection);
    Ok(sender)
}

/// Writes raw bytes to a connection: the tests' way to send what no well-behaved client does.
#[cfg(test)]
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handler(events: Option<broadcast::Sender<Bytes>>) -> Handler {
        Arc::new(move |path| match path {
            "/healthz" => Response::Body {
                content_type: "text/plain",
                body: "ok\n".into(),
            },
            "/api/events" => match &events {
                Some(events) => Response::Lines {
                    content_type: "application/x-ndjson",
                    source: events.subscribe(),
                },
                None => Response::NotFound,
            },
            _ => Response::NotFound,
        })
    }

    async fn server(events: Option<broadcast::Sender<Bytes>>) -> SocketAddr {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, handler(events)));
        addr
    }

    #[tokio::test]
    async fn routes_get_and_head_with_any_query_and_refuses_other_methods() {
        let addr = server(None).await;
        let ok = raw(
            addr,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.to_ascii_lowercase().contains("content-length: 3\r\n"),
            "{ok}"
        );
        assert!(ok.ends_with("\r\n\r\nok\n"), "{ok}");
        // A Prometheus job with `params` adds a query string.
        let query = raw(
            addr,
            b"GET /healthz?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(query.starts_with("HTTP/1.1 200 OK\r\n"), "{query}");
        let head = raw(
            addr,
            b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "no body for HEAD: {head}");
        let missing = raw(
            addr,
            b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = raw(
            addr,
            b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        let garbage = raw(
            addr,
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        )
        .await;
        assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
    }

    #[tokio::test]
    async fn keep_alive_serves_several_requests_on_one_connection() {
        let addr = server(None).await;
        let two = raw(
            addr,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(two.matches("HTTP/1.1 200 OK").count(), 2, "{two}");
    }

    #[tokio::test]
    async fn the_client_reads_bodies_and_streams() {
        let (events, _) = broadcast::channel(16);
        let addr = server(Some(events.clone())).await;
        assert_eq!(get(addr, "/healthz").await.unwrap(), "ok\n");
        assert!(
            get(addr, "/nope")
                .await
                .unwrap_err()
                .to_string()
                .contains("404")
        );
        let mut stream = get_stream(addr, "/api/events").await.unwrap();
        // The subscription exists once the response started.
        events.send(Bytes::from_static(b"{\"a\":1}\n")).unwrap();
        events.send(Bytes::from_static(b"{\"b\":2}\n")).unwrap();
        assert_eq!(
            stream.next_line().await.unwrap().as_deref(),
            Some("{\"a\":1}")
        );
        assert_eq!(
            stream.next_line().await.unwrap().as_deref(),
            Some("{\"b\":2}")
        );
    }

    #[tokio::test]
    async fn event_streams_are_capped() {
        let (events, _) = broadcast::channel(16);
        let addr = server(Some(events.clone())).await;
        let mut open = Vec::new();
        for _ in 0..MAX_STREAMS {
            open.push(get_stream(addr, "/api/events").await.unwrap());
        }
        let one_more = get_stream(addr, "/api/events").await.map(drop).unwrap_err();
        assert!(one_more.to_string().contains("503"), "{one_more}");
        // Leaving frees a place.
        drop(open.pop());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            // A line wakes the stream whose client left, so that it notices.
            let _ = events.send(Bytes::from_static(b"x\n"));
            if get_stream(addr, "/api/events").await.is_ok() {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "no place freed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn a_stream_whose_client_stopped_reading_is_closed() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (events, _) = broadcast::channel(1024);
        let addr = server(Some(events.clone())).await;
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut client = socket.connect(addr).await.unwrap();
        client
            .write_all(b"GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // Lines pour in while the client reads nothing, for longer than a stall may last.
        let line = Bytes::from(format!("{}\n", "x".repeat(1023)));
        let flood_until = tokio::time::Instant::now() + STALL_TIMEOUT * 3;
        while tokio::time::Instant::now() < flood_until {
            for _ in 0..64 {
                let _ = events.send(line.clone());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The server closed it: what it had sent, then the end (a live stream never ends).
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest));
        assert!(read.await.is_ok(), "the stalled stream is still open");
        // Its place among the streams is free again.
        assert!(get_stream(addr, "/api/events").await.is_ok());
    }

    #[tokio::test]
    async fn a_port_in_use_is_a_clear_error_said_once() {
        let taken = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = taken.local_addr().unwrap();
        let error = anyhow::Error::from(bind(addr).await.unwrap_err());
        let text = format!("{error:#}");
        assert!(text.contains(&format!("cannot listen on {addr}")), "{text}");
        assert!(text.contains("pick one with --listen"), "{text}");
        assert_eq!(text.matches("in use").count(), 1, "{text}");
    }
}
