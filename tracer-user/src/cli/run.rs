//! `tracer run`: the agent. Logs each failure at debug level and a summary of failing upstreams
//! at a fixed interval.

use std::{collections::BTreeMap, ops::ControlFlow};

use anyhow::Context as _;

use super::RunArgs;
use crate::{
    agent::{Agent, Happening},
    aggregate::Route,
    classify::explain,
};

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut agent = Agent::start(&args.capture.options()).context("starting tracer")?;
    // Failures per route at the last summary, to log what is new.
    let mut last: BTreeMap<Route, u64> = BTreeMap::new();
    agent
        .run(Some(args.summary_every), |agent, happening| {
            match happening {
                Happening::Failure(failure) => tracing::debug!("{}", explain(&failure)),
                Happening::Tick => {
                    let totals = agent.totals();
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
                    let lost = agent.capture.stat(tracer_common::Stat::EventsLost);
                    if lost > 0 {
                        tracing::warn!("{lost} failure events lost so far (counts stay exact)");
                    }
                }
            }
            ControlFlow::Continue(())
        })
        .await
}
