//! The `tracer` command line.

pub mod check;
pub mod events;
pub mod run;
pub mod top;

use std::{net::SocketAddr, time::Duration};

use clap::{Args, Parser, Subcommand};
use tracer_common::Config;

use crate::{
    aggregate::ledger::DEFAULT_MAX_UPSTREAMS,
    capture::{Options, skippable_probe},
    export::events::UpstreamMatch,
};

#[derive(Debug, Parser)]
#[command(
    name = "tracer",
    version,
    about = "Why your reverse proxy answers 502: every failed upstream connection, its cause \
             and its evidence, seen from inside the kernel",
    long_about = None
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: trace every outbound TCP connection and report failing upstreams.
    Run(RunArgs),
    /// Print one line per failed upstream attempt as it happens (text, or JSON with --json).
    Events(EventsArgs),
    /// The live terminal view: failing upstreams, their causes and recent failures.
    Top(TopArgs),
    /// Check that this host can run tracer: kernel, privileges, BTF, tracefs, every probe.
    Check(CaptureArgs),
}

/// How the kernel side decides.
#[derive(Debug, Clone, Args)]
pub struct CaptureArgs {
    /// A proxy that closes a connection sooner than this after connecting or after its request
    /// abandoned it (its client left) rather than timed out; such closes are not failures.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    pub min_wait: Duration,
    /// At most this many failure events per second for each upstream and cause (per CPU)
    /// reach the agent; the rest are counted exactly but not shown one by one (0: no limit).
    #[arg(long, default_value_t = Config::DEFAULT_EVENTS_PER_SECOND, value_name = "N")]
    pub event_rate: u32,
    /// Do not attach this probe (repeatable; a program name such as `tcp_retransmit_skb`, or a
    /// tracepoint as `tracer check` lists it). What it would have seen is lost; see `tracer check`.
    /// Skipping `sys_exit_connect` or `sys_enter_connect` skips both.
    #[arg(long, value_name = "PROBE", value_parser = skippable_probe)]
    pub skip_probe: Vec<&'static str>,
    /// Where to ask a container runtime for container names, images and fates (the Docker API
    /// socket that Docker and Podman's service serve): `auto` tries /var/run/docker.sock,
    /// /run/docker.sock and /run/podman/podman.sock, then the same under /host/run (the
    /// DaemonSet's mount of the host's /run), and takes the first that answers at start; a
    /// SOCKET named here is waited for; `none` asks none.
    #[arg(long, default_value = "auto", value_name = "auto|none|SOCKET")]
    pub container_runtime: String,
}

impl CaptureArgs {
    pub fn options(&self) -> Options {
        Options {
            min_wait: self.min_wait,
            events_per_second: self.event_rate,
            skip_probes: self.skip_probe.clone(),
            container_runtime: match self.container_runtime.as_str() {
                "auto" => crate::capture::ContainerRuntime::Auto,
                "none" => crate::capture::ContainerRuntime::None,
                path => crate::capture::ContainerRuntime::Socket(path.into()),
            },
            ..Options::default()
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub capture: CaptureArgs,
    /// Where to serve /metrics (Prometheus) and /healthz.
    #[arg(long, default_value = "127.0.0.1:9502", value_name = "ADDR:PORT")]
    pub listen: SocketAddr,
    /// At most this many upstreams get series of their own; the others are counted under
    /// upstream="other".
    #[arg(long, default_value_t = DEFAULT_MAX_UPSTREAMS)]
    pub max_upstreams: usize,
    /// Also export which container holds each upstream's address and which container each
    /// proxy runs in (`tracer_upstream_container_info`, `tracer_proxy_container_info`: one
    /// series per route at most, to join on `upstream` or `cgroup`).
    #[arg(long)]
    pub container_metrics: bool,
    /// How often to log a summary of failing upstreams.
    #[arg(long, default_value = "10s", value_parser = period)]
    pub summary_every: Duration,
    /// A route whose kernel counts have not changed for this long is moved into the agent's
    /// own totals and its kernel entry freed, so that the kernel's table never fills for good.
    #[arg(long, default_value = "5m", value_parser = period)]
    pub idle_after: Duration,
}

impl RunArgs {
    pub fn options(&self) -> Options {
        Options {
            max_upstreams: self.max_upstreams,
            idle_after: self.idle_after,
            ..self.capture.options()
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct EventsArgs {
    #[command(flatten)]
    pub capture: CaptureArgs,
    /// Print JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
    /// Only failures of processes with this name (repeatable).
    #[arg(long = "comm", value_name = "NAME")]
    pub comms: Vec<String>,
    /// Only failures of this process id (repeatable).
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Only failures toward this upstream: IP:PORT, [IPv6]:PORT, IP or :PORT (repeatable).
    #[arg(long = "upstream", value_name = "UPSTREAM")]
    pub upstreams: Vec<UpstreamMatch>,
}

#[derive(Debug, Clone, Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub capture: CaptureArgs,
    /// Show what a running `tracer run` sees (its --listen address, e.g. http://127.0.0.1:9502)
    /// instead of loading the probes here.
    #[arg(long, value_name = "URL")]
    pub connect: Option<String>,
    /// How often the view refreshes.
    #[arg(long, default_value = "1s", value_parser = period)]
    pub interval: Duration,
}

/// A period of something that repeats (`10s`, `500ms`): at least a millisecond.
fn period(text: &str) -> Result<Duration, String> {
    let period = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if period < Duration::from_millis(1) {
        return Err(format!(
            "`{text}` is too short for a period: give 1ms or more"
        ));
    }
    Ok(period)
}
