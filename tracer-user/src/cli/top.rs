//! `tracer top`: the live view, fed by this process's own agent or, with `--connect`, by a
//! running `tracer run` (`/api/snapshot` each refresh, `/api/events` as a stream).

use std::{
    net::SocketAddr,
    ops::ControlFlow,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    task::JoinHandle,
};

use super::TopArgs;
use crate::{
    agent::{Agent, Happening, Shared},
    export::{
        api::Snapshot,
        events::EventRecord,
        http,
        live::{
            model::{Action, App},
            terminal::{Input, Screen, read_input},
            view,
        },
    },
};

/// How many failure events may wait for the view; past that they are dropped (and counted).
const EVENT_QUEUE: usize = 65_536;

enum Source {
    Local {
        shared: Arc<Shared>,
        stop: Arc<AtomicBool>,
        agent: JoinHandle<anyhow::Result<()>>,
    },
    Remote {
        addr: SocketAddr,
        stream: JoinHandle<()>,
    },
}

impl Source {
    fn local(
        args: &TopArgs,
        tx: mpsc::Sender<EventRecord>,
        dropped: Arc<AtomicU64>,
    ) -> anyhow::Result<Source> {
        let mut agent = Agent::start(&args.capture.options()).context("starting tracer")?;
        let shared = agent.shared.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let agent = tokio::spawn(async move {
            agent
                .run(
                    Some(Duration::from_millis(100)),
                    |_, happening| match happening {
                        Happening::Failure(failure) => {
                            if tx.try_send(EventRecord::from(&*failure)).is_err() {
                                dropped.fetch_add(1, Ordering::Relaxed);
                            }
                            ControlFlow::Continue(())
                        }
                        Happening::Tick if stopping.load(Ordering::Relaxed) => {
                            ControlFlow::Break(())
                        }
                        Happening::Tick | Happening::Notice(_) => ControlFlow::Continue(()),
                    },
                )
                .await
            // The agent is dropped here: every probe detached.
        });
        Ok(Source::Local {
            shared,
            stop,
            agent,
        })
    }

    async fn remote(
        url: &str,
        tx: mpsc::Sender<EventRecord>,
        dropped: Arc<AtomicU64>,
    ) -> anyhow::Result<Source> {
        let addr = http::resolve(url).await.map_err(anyhow::Error::msg)?;
        // Fail now, before the screen is taken, when nothing answers there.
        http::get(addr, "/api/snapshot").await.with_context(|| {
            format!("no tracer agent answers at {url} (is `tracer run` running there?)")
        })?;
        let stream = tokio::spawn(async move {
            loop {
                if let Ok(mut lines) = http::get_stream(addr, "/api/events").await {
                    while let Ok(Some(line)) = lines.next_line().await {
                        if let Ok(event) = serde_json::from_str::<EventRecord>(&line)
                            && tx.try_send(event).is_err()
                        {
                            dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        Ok(Source::Remote { addr, stream })
    }

    async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        match self {
            Source::Local { shared, .. } => Ok(Snapshot::capture(shared)),
            Source::Remote { addr, .. } => {
                let body = http::get(*addr, "/api/snapshot").await?;
                Ok(serde_json::from_str(&body).context("the agent's snapshot")?)
            }
        }
    }

    /// Stops the source; for a local one, waits until its probes are detached.
    async fn stop(self) -> anyhow::Result<()> {
        match self {
            Source::Local { stop, agent, .. } => {
                stop.store(true, Ordering::Relaxed);
                agent.await.context("the agent task")?
            }
            Source::Remote { stream, .. } => {
                stream.abort();
                Ok(())
            }
        }
    }
}

pub async fn top(args: TopArgs) -> anyhow::Result<()> {
    let (tx, mut events) = mpsc::channel(EVENT_QUEUE);
    let dropped = Arc::new(AtomicU64::new(0));
    let (source, label) = match &args.connect {
        Some(url) => (Source::remote(url, tx, dropped.clone()).await?, url.clone()),
        None => (
            Source::local(&args, tx, dropped.clone())?,
            "local".to_string(),
        ),
    };
    let mut app = App::new(&label);
    let result = {
        let mut screen = Screen::enter().context("taking the terminal")?;
        show(
            &mut screen,
            &mut app,
            &source,
            &mut events,
            &dropped,
            args.interval,
        )
        .await
        // The screen is given back here, before anything else is printed.
    };
    let stopped = source.stop().await;
    result.and(stopped)
}

async fn show(
    screen: &mut Screen,
    app: &mut App,
    source: &Source,
    events: &mut mpsc::Receiver<EventRecord>,
    dropped: &AtomicU64,
    interval: Duration,
) -> anyhow::Result<()> {
    let stop_input = Arc::new(AtomicBool::new(false));
    let mut input = read_input(stop_input.clone());
    let mut terminate = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    let mut hangup = signal(SignalKind::hangup()).context("handling SIGHUP")?;
    let mut ticker = tokio::time::interval(interval);
    let result = loop {
        while let Ok(event) = events.try_recv() {
            app.on_event(event);
        }
        app.events_dropped = dropped.load(Ordering::Relaxed);
        if let Err(e) = screen.terminal.draw(|frame| view::render(frame, app)) {
            break Err(e.into());
        }
        tokio::select! {
            _ = ticker.tick() => match source.snapshot().await {
                Ok(snapshot) => {
                    app.problem = None;
                    app.on_snapshot(snapshot);
                }
                Err(e) => app.problem = Some(format!("{e:#}")),
            },
            Some(input) = input.recv() => {
                if let Input::Key(key) = input
                    && app.on_key(key) == Action::Quit
                {
                    break Ok(());
                }
            }
            _ = terminate.recv() => break Ok(()),
            _ = interrupt.recv() => break Ok(()),
            _ = hangup.recv() => break Ok(()),
        }
    };
    stop_input.store(true, Ordering::Relaxed);
    result
}
