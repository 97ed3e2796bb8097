//! The agent's loop: capture → decode → the caller's handler (which classifies, aggregates and
//! exports), until SIGINT or SIGTERM. Dropping the agent detaches every probe.
//!
//! What other tasks (the metrics endpoint, the live view) need is in [`Shared`].

use std::{
    ops::ControlFlow,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracer_common::{Outcome, Stat};

use crate::{
    aggregate::Totals,
    capture::{Capture, CaptureError, Counters, Events, Options, ProbeStatus},
    decode::{self, Clock, Count, Failure, LatencyCount},
};

/// What a handler is given.
pub enum Happening {
    /// A failed upstream attempt.
    Failure(Failure),
    /// The periodic tick asked for.
    Tick,
}

/// The agent's state that other tasks read: the kernel's counters and the agent's health.
pub struct Shared {
    pub counters: Arc<Counters>,
    pub probes: Vec<ProbeStatus>,
    pub started: SystemTime,
    /// Failure records read from the ring buffer, and those that could not be decoded.
    pub events_received: AtomicU64,
    pub events_undecodable: AtomicU64,
}

impl Shared {
    /// The kernel's exact counts, aggregated per route.
    pub fn totals(&self) -> Totals {
        let counts = self
            .counters
            .counts()
            .into_iter()
            .filter_map(|(key, tally)| Count::from_kernel(&key, tally.count, tally.sum_ns).ok());
        let latency = self
            .counters
            .latency()
            .into_iter()
            .filter_map(|(key, n)| LatencyCount::from_kernel(&key, n).ok());
        let mut totals = Totals::from_counts(counts, latency);
        for (code, tally) in self.counters.overflow_counts() {
            if let Some(outcome) = Outcome::from_u8(code) {
                *totals.overflow.entry(outcome).or_default() += tally.count;
            }
        }
        totals
    }

    pub fn stat(&self, which: Stat) -> u64 {
        self.counters.stat(which)
    }

    pub fn attached(&self) -> usize {
        self.probes.iter().filter(|p| p.attached()).count()
    }
}

pub struct Agent {
    capture: Capture,
    events: Events,
    clock: Clock,
    pub shared: Arc<Shared>,
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
        let shared = Arc::new(Shared {
            counters: capture.counters.clone(),
            probes: capture.probes.clone(),
            started: SystemTime::now(),
            events_received: AtomicU64::new(0),
            events_undecodable: AtomicU64::new(0),
        });
        Ok(Agent {
            capture,
            events,
            clock: Clock::new(),
            shared,
        })
    }

    /// The kernel's exact counts, aggregated per route.
    pub fn totals(&self) -> Totals {
        self.shared.totals()
    }

    /// Runs until a signal (or the handler says stop), handing every failure and every tick
    /// to `handle`.
    pub async fn run(
        &mut self,
        tick_every: Option<Duration>,
        mut handle: impl FnMut(&Shared, Happening) -> ControlFlow<()>,
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
                    if handle(&self.shared, Happening::Tick).is_break() {
                        break;
                    }
                }
            }
            for record in batch.drain(..) {
                self.shared.events_received.fetch_add(1, Ordering::Relaxed);
                let failure = record.and_then(|event| Failure::from_event(&event, &self.clock));
                match failure {
                    Ok(failure) => {
                        if handle(&self.shared, Happening::Failure(failure)).is_break() {
                            return Ok(());
                        }
                    }
                    Err(e) => {
                        let before = self
                            .shared
                            .events_undecodable
                            .fetch_add(1, Ordering::Relaxed);
                        if before == 0 {
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
        let lost = self.shared.stat(Stat::EventsLost);
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
