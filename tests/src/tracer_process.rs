//! The real `tracer` binary, run as users run it, as a separate process.

use std::{
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        mpsc::{Receiver, RecvTimeoutError, channel},
    },
    time::{Duration, Instant},
};

use serde_json::Value;

/// The tracer binary: `$TRACER_BIN`, or the workspace's debug build.
pub fn tracer_bin() -> PathBuf {
    let path = std::env::var_os("TRACER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/tracer")
        });
    assert!(
        path.exists(),
        "no tracer binary at {}: build it first (cargo xtask test does)",
        path.display()
    );
    path
}

/// A running `tracer events --json`.
pub struct Tracer {
    child: Child,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Tracer {
    /// Starts `tracer events --json <args>` and waits until its probes are attached.
    pub fn events(args: &[&str]) -> Tracer {
        let mut all = vec!["events", "--json"];
        all.extend_from_slice(args);
        Tracer::start(&all)
    }

    /// Starts `tracer <args>` and waits until its probes are attached. `$TRACER_TEST_SKIP_PROBES`
    /// (probes separated by commas) adds a `--skip-probe` for each: the tests then run on the
    /// path of a kernel that lacks them (`tcp_sendmsg_locked`: every kernel before 6.16).
    pub fn start(args: &[&str]) -> Tracer {
        let mut command = Command::new(tracer_bin());
        command.args(args);
        for probe in skipped_probes() {
            command.args(["--skip-probe", &probe]);
        }
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe. If this process dies, tracer gets SIGTERM and
        // detaches itself, so no run leaves a tracer behind.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = command.spawn().expect("starting tracer");
        let (line_tx, lines) = channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            // Byte lines, so that a line that is not UTF-8 is seen rather than ending the read.
            for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
                if line_tx
                    .send(String::from_utf8_lossy(&line).into_owned())
                    .is_err()
                {
                    return;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready) = channel();
        {
            let stderr_text = stderr.clone();
            let pipe = child.stderr.take().expect("stderr");
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if line.contains("probes attached") {
                        let _ = ready_tx.send(());
                    }
                    let mut text = stderr_text.lock().expect("stderr lock");
                    text.push_str(&line);
                    text.push('\n');
                }
            });
        }
        let mut tracer = Tracer {
            child,
            lines,
            stderr,
        };
        // Loading and verifying the programs takes seconds under emulation (a kernel guest),
        // more when the guest is busy.
        let attach_within = if std::env::var_os("TRACER_TEST_GUEST").is_some() {
            Duration::from_secs(120)
        } else {
            Duration::from_secs(30)
        };
        let deadline = Instant::now() + attach_within;
        loop {
            match ready.recv_timeout(Duration::from_millis(100)) {
                Ok(()) => return tracer,
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                    if let Ok(Some(status)) = tracer.child.try_wait() {
                        panic!(
                            "tracer exited ({status}) before attaching:\n{}",
                            tracer.stderr()
                        );
                    }
                }
                Err(_) => panic!(
                    "tracer did not attach in {} s:\n{}",
                    attach_within.as_secs(),
                    tracer.stderr()
                ),
            }
        }
    }

    /// Starts `tracer run <extra>` listening on a loopback port of the kernel's choosing
    /// (`--listen 127.0.0.1:0`: a port picked in advance may be taken by then), and returns it
    /// with the address it says it serves on.
    pub fn agent(extra: &[&str]) -> (Tracer, std::net::SocketAddr) {
        let mut args = vec!["run", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let tracer = Tracer::start(&args);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let addr = tracer.stderr().lines().find_map(|l| {
                l.strip_prefix("tracer: serving http://")?
                    .strip_suffix("/metrics")?
                    .parse()
                    .ok()
            });
            if let Some(addr) = addr {
                return (tracer, addr);
            }
            assert!(
                Instant::now() < deadline,
                "tracer did not say where it serves:\n{}",
                tracer.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr lock").clone()
    }

    /// Events until `want` of them arrived or `timeout` passed, then anything else that
    /// arrives within `settle` (so that extra events are caught too).
    pub fn collect(&self, want: usize, timeout: Duration, settle: Duration) -> Vec<Value> {
        self.collect_lines(want, timeout, settle)
            .iter()
            .map(|line| parse(line))
            .collect()
    }

    /// Like [`Tracer::collect`], for the lines as printed (bytes that are not UTF-8 become
    /// U+FFFD).
    pub fn collect_lines(&self, want: usize, timeout: Duration, settle: Duration) -> Vec<String> {
        let mut lines = Vec::new();
        let deadline = Instant::now() + timeout;
        while lines.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => lines.push(line),
                Err(_) => break,
            }
        }
        let settle_until = Instant::now() + settle;
        while let Ok(line) = self
            .lines
            .recv_timeout(settle_until.saturating_duration_since(Instant::now()))
        {
            lines.push(line);
        }
        lines
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops tracer with SIGINT, as Ctrl-C does, and checks that it exits cleanly.
    pub fn stop(self) -> String {
        self.stop_with(libc::SIGINT)
    }

    /// Stops tracer with `signal` and checks that it exits cleanly; returns its stderr.
    pub fn stop_with(mut self, signal: i32) -> String {
        self.terminate(signal)
    }

    /// Stops tracer with SIGINT; returns every event it printed that was not collected yet, and
    /// its stderr.
    pub fn stop_collecting(mut self) -> (Vec<Value>, String) {
        let stderr = self.terminate(libc::SIGINT);
        let mut events = Vec::new();
        // The reader thread ends (and the channel with it) at tracer's end of output.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            events.push(parse(&line));
        }
        (events, stderr)
    }

    fn terminate(&mut self, signal: i32) -> String {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for tracer") {
                // Let the reader threads take the last lines.
                std::thread::sleep(Duration::from_millis(50));
                let stderr = self.stderr();
                assert!(status.success(), "tracer exited with {status}:\n{stderr}");
                return stderr;
            }
            assert!(
                Instant::now() < deadline,
                "tracer did not stop on signal {signal}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The probes `$TRACER_TEST_SKIP_PROBES` names.
pub fn skipped_probes() -> Vec<String> {
    std::env::var("TRACER_TEST_SKIP_PROBES")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

fn parse(line: &str) -> Value {
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("tracer printed a non-JSON line ({e}): {line}"))
}
