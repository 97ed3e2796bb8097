//! `tracer events`: the failure stream on stdout.

use std::{io::Write as _, ops::ControlFlow};

use anyhow::Context as _;

use super::EventsArgs;
use crate::{
    agent::{Agent, Happening},
    export::events::{EventFilter, json_line, notice_json_line, notice_text_line, text_line},
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
            let line = match happening {
                Happening::Failure(failure) if filter.matches(&failure.failure) => {
                    if args.json {
                        json_line(&failure)
                    } else {
                        text_line(&failure)
                    }
                }
                Happening::Notice(notice) if filter.matches_notice(&notice) => {
                    if args.json {
                        notice_json_line(&notice)
                    } else {
                        notice_text_line(&notice)
                    }
                }
                _ => return ControlFlow::Continue(()),
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
