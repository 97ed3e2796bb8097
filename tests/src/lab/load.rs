//! The lab's load generator: a known number of HTTP requests to each nginx route, from the proxy
//! host, counting the statuses the clients saw.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use super::Route;
use crate::netns::Netns;

/// What the clients of one route saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteLoad {
    pub route: &'static str,
    /// Responses by status code.
    pub statuses: BTreeMap<u16, usize>,
    /// Requests that got no status line at all.
    pub errors: usize,
}

/// Sends every route's requests, all routes at once, and returns what clients saw per route.
pub fn run_routes(ns: &Netns, routes: &[Route]) -> Vec<RouteLoad> {
    ns.run(|| {
        std::thread::scope(|scope| {
            let handles: Vec<_> = routes
                .iter()
                .map(|route| scope.spawn(move || run_route(route)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("load thread"))
                .collect()
        })
    })
}

fn run_route(route: &Route) -> RouteLoad {
    let next = AtomicUsize::new(0);
    let target = route.listen();
    let results: Vec<Option<u16>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..route.concurrency)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    while next.fetch_add(1, Ordering::Relaxed) < route.requests {
                        mine.push(get(target));
                    }
                    mine
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("load worker"))
            .collect()
    });
    let mut load = RouteLoad {
        route: route.name,
        ..RouteLoad::default()
    };
    for status in results {
        match status {
            Some(code) => *load.statuses.entry(code).or_default() += 1,
            None => load.errors += 1,
        }
    }
    load
}

/// How long a client waits for its response: well past every proxy's own timeouts, slowed as
/// they are under emulation (a kernel guest), so that the proxy, never its client, gives up. A
/// client that leaves first makes nginx close the upstream connection (a 499), which tracer
/// counts as `response_timeout` where nginx logs no upstream failure (docs/causes.md).
fn client_timeout() -> Duration {
    (super::proxy_timeout() * 10).max(super::apps::READ_TIMEOUT + Duration::from_secs(5))
}

/// One request; the response's status code.
fn get(target: SocketAddr) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5)).ok()?;
    stream.set_read_timeout(Some(client_timeout())).ok()?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut response = Vec::new();
    // A response cut short (reset_mid_response) still has its status line.
    let _ = stream.read_to_end(&mut response);
    let head = String::from_utf8_lossy(&response);
    head.split_whitespace().nth(1)?.parse().ok()
}
