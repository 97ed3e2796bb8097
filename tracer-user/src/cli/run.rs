//! `tracer run`: the agent. Serves Prometheus metrics on `--listen`, logs each failure at debug
//! level and a summary of failing upstreams at a fixed interval.

use std::{collections::BTreeMap, ops::ControlFlow, sync::Arc};

use anyhow::Context as _;

use super::RunArgs;
use crate::{
    agent::{Agent, Happening},
    aggregate::Route,
    classify::explain,
    export::{
        http::{self, Handler, Response},
        metrics::Exporter,
    },
};

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    // Bind first: a bad address or a port in use fails before any probe is attached.
    let listener = http::bind(args.listen).await?;
    let mut agent = Agent::start(&args.capture.options()).context("starting tracer")?;
    let exporter = Arc::new(Exporter::new(agent.shared.clone(), args.max_upstreams));
    let handler: Handler = Arc::new(move |path| match path {
        "/metrics" => Response::Body {
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: exporter.render(),
        },
        "/healthz" => Response::Body {
            content_type: "text/plain",
            body: "ok\n".into(),
        },
        _ => Response::NotFound,
    });
    let server = tokio::spawn(http::serve(listener, handler));
    eprintln!("tracer: serving http://{}/metrics", args.listen);

    // Failures per route at the last summary, to log what is new.
    let mut last: BTreeMap<Route, u64> = BTreeMap::new();
    let result = agent
        .run(Some(args.summary_every), |shared, happening| {
            match happening {
                Happening::Failure(failure) => tracing::debug!("{}", explain(&failure)),
                Happening::Tick => {
                    let totals = shared.totals();
                    for (route, t) in totals.failing() {
                        let failures = t.failures();
                        let before = last.insert(route.clone(), failures).unwrap_or(0);
                        if failures > before {
                            tracing::info!(
                                proxy = %route.proxy,
                                upstream = %route.upstream,
                                "{} new failure(s) ({} of {} attempts in all); leading cause: {}",
                                failures - before,
                                failures,
                                t.attempts(),
                                t.leading_cause().map_or("none", |c| c.name()),
                            );
                        }
                    }
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
