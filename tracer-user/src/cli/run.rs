//! `tracer run`: the agent. Serves Prometheus metrics on `--listen`, and the JSON API the live
//! view reads (`/api/snapshot`, `/api/events`); logs each failure at debug level and a summary of
//! failing upstreams at a fixed interval.

use std::{collections::BTreeMap, ops::ControlFlow, sync::Arc};

use anyhow::Context as _;
use bytes::Bytes;
use tokio::sync::broadcast;

use super::RunArgs;
use crate::{
    agent::{Agent, Happening, give_memory_back},
    aggregate::Route,
    export::{
        events::{json_line, notice_json_line},
        http::{self, Handler, Response},
        metrics::Exporter,
    },
};

/// At most this many routes are logged one by one in each summary; the rest in one line.
const SUMMARY_LINES: usize = 10;

/// How many failures a slow `/api/events` client may fall behind before it misses some.
const EVENT_BACKLOG: usize = 4096;

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    // Bind first: a bad address or a port in use fails before any probe is attached.
    let listener = http::bind(args.listen).await?;
    let mut agent = Agent::start(&args.options()).context("starting tracer")?;
    let exporter =
        Arc::new(Exporter::new(agent.shared.clone()).with_container_info(args.container_metrics));
    let (failures, _) = broadcast::channel::<Bytes>(EVENT_BACKLOG);
    let handler: Handler = {
        let failures = failures.clone();
        Arc::new(move |path| match path {
            "/metrics" => {
                let body = exporter.render();
                give_memory_back();
                Response::Body {
                    content_type: "text/plain; version=0.0.4; charset=utf-8",
                    body,
                }
            }
            "/healthz" => Response::Body {
                content_type: "text/plain",
                body: "ok\n".into(),
            },
            "/api/snapshot" => {
                let body = serde_json::to_string(&exporter.snapshot()).unwrap_or_default();
                give_memory_back();
                Response::Body {
                    content_type: "application/json",
                    body,
                }
            }
            "/api/events" => Response::Lines {
                content_type: "application/x-ndjson",
                source: failures.subscribe(),
            },
            _ => Response::NotFound,
        })
    };
    // The port it got, when --listen asked for any (port 0).
    let listening = listener.local_addr().unwrap_or(args.listen);
    let server = tokio::spawn(http::serve(listener, handler));
    eprintln!("tracer: serving http://{listening}/metrics");

    // Failures per route at the last summary, to log what is new.
    let mut last: BTreeMap<Route, u64> = BTreeMap::new();
    let result = agent
        .run(Some(args.summary_every), |shared, happening| {
            match happening {
                Happening::Failure(failure) => {
                    tracing::debug!("{}", failure.explain());
                    if failures.receiver_count() > 0 {
                        let _ = failures.send(Bytes::from(format!("{}\n", json_line(&failure))));
                    }
                }
                Happening::Notice(notice) => {
                    tracing::info!("{}", notice.explain());
                    if failures.receiver_count() > 0 {
                        let _ =
                            failures.send(Bytes::from(format!("{}\n", notice_json_line(&notice))));
                    }
                }
                Happening::Tick => {
                    let totals = shared.totals();
                    let failing = totals.failing();
                    let mut new: Vec<_> = failing
                        .iter()
                        .map(|(route, t)| {
                            let before = last.get(*route).copied().unwrap_or(0);
                            (*route, *t, t.failures().saturating_sub(before))
                        })
                        .filter(|(_, _, new)| *new > 0)
                        .collect();
                    new.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(b.0)));
                    for (route, t, n) in new.iter().take(SUMMARY_LINES) {
                        tracing::info!(
                            proxy = %route.proxy,
                            upstream = %route.upstream,
                            "{n} new failure(s) ({} of {} attempts in all); leading cause: {}",
                            t.failures(),
                            t.attempts(),
                            t.leading_cause().map_or("none", |c| c.name()),
                        );
                    }
                    if new.len() > SUMMARY_LINES {
                        let rest = &new[SUMMARY_LINES..];
                        tracing::info!(
                            "and {} more routes with {} new failure(s) between them (see /metrics)",
                            rest.len(),
                            rest.iter().map(|(_, _, n)| n).sum::<u64>()
                        );
                    }
                    // Only the routes there are now: retired ones are gone or under `other`.
                    last = failing
                        .iter()
                        .map(|(route, t)| ((*route).clone(), t.failures()))
                        .collect();
                    let lost = shared.stat(tracer_common::Stat::EventsLost);
                    if lost > 0 {
                        tracing::warn!("{lost} failure events lost so far (counts stay exact)");
                    }
                }
            }
            ControlFlow::Continue(())
        })
        .await;
    server.abort();
    result
}
