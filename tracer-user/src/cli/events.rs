//! `tracer events`: the failure stream on stdout.

use std::{io::Write as _, ops::ControlFlow};

use anyhow::Context as _;

use super::EventsArgs;
use crate::{
    agent::{Agent, Happening},
    export::events::{EventFilter, json_line, text_line},
};

pub async fn events(args: EventsArgs) -> anyhow::Result<()> {
    let filter = EventFilter {
        comms: args.comms,
        pids: args.pids,
        upstreams: args.upstreams,
    };
    let mut agent = Agent::start(&args.capture.options()).context("starting tracer")?;
    let stdout = std::io::stdout();
    let mut broken_pipe = false;
    agent
        .run(None, |_, happening| {
            let Happening::Failure(failure) = happening else {
                return ControlFlow::Continue(());
            };
            if !filter.matches(&failure) {
                return ControlFlow::Continue(());
            }
            let line = if args.json {
                json_line(&failure)
            } else {
                text_line(&failure)
            };
            let mut out = stdout.lock();
            // Each line goes out at once, also into a pipe.
            if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                broken_pipe = true;
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        })
        .await?;
    if broken_pipe {
        tracing::debug!("stdout closed; stopping");
    }
    Ok(())
}
