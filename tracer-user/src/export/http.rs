//! The agent's HTTP listener: `/metrics` for Prometheus, `/healthz`, and what other exports
//! register. A deliberately small HTTP/1.1 server: GET only, one request per connection.

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use thiserror::Error;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

#[derive(Debug, Error)]
pub enum ListenError {
    #[error(
        "cannot listen on {addr}: {source}{hint}",
        hint = if source.kind() == std::io::ErrorKind::AddrInUse {
            " (another tracer, or another exporter, uses that port: pick one with --listen)"
        } else {
            ""
        }
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Binds the listener: done first, so that a bad address fails before any probe is attached.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ListenError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError::Bind { addr, source })
}

/// Writes a streamed body to the client's connection until it is done or the client leaves.
pub type StreamWriter =
    Box<dyn FnOnce(TcpStream) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// What a handler answers.
pub enum Response {
    /// A whole body, with its content type.
    Body {
        content_type: &'static str,
        body: String,
    },
    /// A body written as it comes (a stream), until the client leaves.
    Stream {
        content_type: &'static str,
        write: StreamWriter,
    },
    NotFound,
}

/// Routes a request path (query string included) to a response.
pub type Handler = Arc<dyn Fn(&str) -> Response + Send + Sync>;

/// Serves requests until the task is dropped.
pub async fn serve(listener: TcpListener, handler: Handler) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _ = respond(stream, &handler).await;
        });
    }
}

async fn respond(mut stream: TcpStream, handler: &Handler) -> std::io::Result<()> {
    let Some(path) = read_request_path(&mut stream).await? else {
        return write_simple(
            &mut stream,
            "400 Bad Request",
            "text/plain",
            "bad request\n",
        )
        .await;
    };
    match handler(&path) {
        Response::Body { content_type, body } => {
            write_simple(&mut stream, "200 OK", content_type, &body).await
        }
        Response::Stream {
            content_type,
            write,
        } => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nCache-Control: no-cache\r\n\
                 Connection: close\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await?;
            write(stream).await;
            Ok(())
        }
        Response::NotFound => {
            write_simple(&mut stream, "404 Not Found", "text/plain", "not found\n").await
        }
    }
}

/// The path of a GET request, or `None` for anything else.
async fn read_request_path(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .is_err()
    {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&head);
    let mut parts = text.lines().next().unwrap_or_default().split_whitespace();
    Ok(match (parts.next(), parts.next()) {
        (Some("GET"), Some(path)) => Some(path.to_string()),
        _ => None,
    })
}

async fn write_simple(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
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

/// GET `path` from the agent at `addr`: the body of a 200 response.
pub async fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = request(addr, path).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.1 200") {
        let status = head.lines().next().unwrap_or_default();
        return Err(std::io::Error::other(format!("GET {path}: {status}")));
    }
    Ok(body.to_string())
}

/// Opens a streamed GET of `path` and returns the connection, positioned after the headers.
pub async fn get_stream(
    addr: SocketAddr,
    path: &str,
) -> std::io::Result<tokio::io::BufReader<TcpStream>> {
    use tokio::io::AsyncBufReadExt as _;
    let stream = request(addr, path).await?;
    let mut reader = tokio::io::BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    if !line.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!(
            "GET {path}: {}",
            line.trim()
        )));
    }
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 || line == "\r\n" {
            return Ok(reader);
        }
    }
}

async fn request(addr: SocketAddr, path: &str) -> std::io::Result<TcpStream> {
    let mut stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::other(format!("connecting to {addr} timed out")))??;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn routes_get_requests_and_refuses_the_rest() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler: Handler = Arc::new(|path| match path {
            "/healthz" => Response::Body {
                content_type: "text/plain",
                body: "ok\n".into(),
            },
            _ => Response::NotFound,
        });
        let server = tokio::spawn(serve(listener, handler));
        let ok = get(addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("Content-Length: 3\r\n") && ok.ends_with("\r\n\r\nok\n"),
            "{ok}"
        );
        let missing = get(addr, "GET /nope HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = get(addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 400"), "{post}");
        server.abort();
    }

    #[tokio::test]
    async fn a_port_in_use_is_a_clear_error() {
        let taken = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = taken.local_addr().unwrap();
        let error = bind(addr).await.unwrap_err().to_string();
        assert!(
            error.contains(&format!("cannot listen on {addr}")),
            "{error}"
        );
        assert!(error.contains("pick one with --listen"), "{error}");
    }
}
