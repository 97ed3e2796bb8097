//! The agent's loop: capture → decode → the caller's handler (which classifies, aggregates and
//! exports), until SIGINT or SIGTERM. Dropping the agent detaches every probe.

use std::{ops::ControlFlow, time::Duration};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    aggregate::Totals,
    capture::{Capture, CaptureError, Events, Options},
    decode::{self, Clock, Count, Failure},
};

/// What the loop hands its handler.
pub enum Happening {
    /// A failed upstream attempt.
    Failure(Failure),
    /// The periodic tick asked for.
    Tick,
}

pub struct Agent {
    pub capture: Capture,
    events: Events,
    clock: Clock,
    /// Records that could not be decoded (a version mismatch between the programs and the agent).
    pub undecodable: u64,
}

impl Agent {
    /// Loads and attaches the probes, and says so on stderr.
    pub fn start(options: &Options) -> Result<Agent, CaptureError> {
        let mut capture = Capture::start(options)?;
        let events = capture.take_events()?;
        if let Some(tracefs) = capture.tracefs.as_ref().filter(|t| t.mounted_now) {
            eprintln!(
                "tracer: tracefs was not mounted; mounted it at {}",
                tracefs.path.display()
            );
        }
        eprintln!(
            "tracer: {}/{} probes attached; watching outbound TCP connections (Ctrl-C to stop)",
            capture.attached(),
            capture.probes.len()
        );
        Ok(Agent {
            capture,
            events,
            clock: Clock::new(),
            undecodable: 0,
        })
    }

    /// The kernel's exact counts, aggregated per route.
    pub fn totals(&self) -> Totals {
        let counts = self
            .capture
            .counts()
            .into_iter()
            .filter_map(|(key, tally)| Count::from_kernel(&key, tally.count, tally.sum_ns).ok());
        let mut totals = Totals::from_counts(counts);
        for (code, tally) in self.capture.overflow_counts() {
            if let Some(outcome) = tracer_common::Outcome::from_u8(code) {
                *totals.overflow.entry(outcome).or_default() += tally.count;
            }
        }
        totals
    }

    /// Runs until a signal (or the handler says stop), handing every failure and every tick
    /// to `handle`.
    pub async fn run(
        &mut self,
        tick_every: Option<Duration>,
        mut handle: impl FnMut(&Agent, Happening) -> ControlFlow<()>,
    ) -> anyhow::Result<()> {
        let mut interrupt = signal(SignalKind::interrupt()).context("handling SIGINT")?;
        let mut terminate = signal(SignalKind::terminate()).context("handling SIGTERM")?;
        let mut ticker = tokio::time::interval(tick_every.unwrap_or(Duration::from_secs(3600)));
        ticker.tick().await;
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                read = self.events.next_batch(|bytes| batch.push(decode::failure_event(bytes))) => {
                    read.context("reading the event ring buffer")?;
                }
                _ = interrupt.recv() => break,
                _ = terminate.recv() => break,
                _ = ticker.tick(), if tick_every.is_some() => {
                    if handle(self, Happening::Tick).is_break() {
                        break;
                    }
                }
            }
            for record in batch.drain(..) {
                let failure = record.and_then(|event| Failure::from_event(&event, &self.clock));
                match failure {
                    Ok(failure) => {
                        if handle(self, Happening::Failure(failure)).is_break() {
                            return Ok(());
                        }
                    }
                    Err(e) => {
                        self.undecodable += 1;
                        if self.undecodable == 1 {
                            tracing::warn!("undecodable failure record: {e}");
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let lost = self.capture.stat(tracer_common::Stat::EventsLost);
        let lost = if lost > 0 {
            format!("; {lost} failure events were lost (ring buffer full; the counts have them)")
        } else {
            String::new()
        };
        eprintln!(
            "tracer: stopping; {} probes detached{lost}",
            self.capture.attached()
        );
    }
}
