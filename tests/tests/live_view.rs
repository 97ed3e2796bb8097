//! `tracer top` in a real terminal (tmux): the failing upstream shows up with its cause, keys work,
//! the terminal is given back and the programs detached on `q` and on SIGTERM.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use tracer_tests::{
    bpf::{program_loaded, programs_held_by},
    client::refuse,
    kernel_tests_enabled,
    netns::Netns,
    own_comm,
    tracer_process::{Tracer, tracer_bin},
};

/// A tmux session running `tracer top` under a shell that reports its exit.
struct Session {
    name: String,
}

impl Session {
    fn start(tag: &str, width: u16, height: u16, args: &str) -> Session {
        let name = format!("tracer-top-{tag}-{}", std::process::id());
        let command = format!(
            "{} top {args}; echo EXITED $?; sleep 60",
            tracer_bin().display()
        );
        let status = Command::new("tmux")
            .args([
                "new-session",
                "-d",
                "-s",
                &name,
                "-x",
                &width.to_string(),
                "-y",
                &height.to_string(),
            ])
            .arg(command)
            .status()
            .expect("tmux (cargo xtask setup installs it)");
        assert!(status.success());
        let session = Session { name };
        session.wait_for(Duration::from_secs(30), |screen| {
            screen.contains("probes ·")
        });
        session
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.name])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until the screen satisfies `ready`, and returns it.
    fn wait_for(&self, timeout: Duration, ready: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen();
            if ready(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "timed out; the screen shows:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn keys(&self, keys: &str) {
        let status = Command::new("tmux")
            .args(["send-keys", "-t", &self.name, keys])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// The pid of `tracer top` (the shell's child).
    fn tracer_pid(&self) -> u32 {
        let out = Command::new("tmux")
            .args(["list-panes", "-t", &self.name, "-F", "#{pane_pid}"])
            .output()
            .unwrap();
        let shell = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let children =
            std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children")).unwrap();
        children
            .split_whitespace()
            .next()
            .expect("tracer runs")
            .parse()
            .unwrap()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.name])
            .status();
    }
}

#[test]
fn top_shows_the_refused_upstream_within_two_seconds_and_q_detaches() {
    if !kernel_tests_enabled("top_shows_the_refused_upstream_within_two_seconds_and_q_detaches") {
        return;
    }
    let session = Session::start("refused", 160, 40, "");
    let pid = session.tracer_pid();
    let held = programs_held_by(pid);
    assert!(
        held.len() >= tracer_user::capture::PROBES_IN_USE,
        "tracer top holds its programs: {held:?}"
    );

    let ns = Netns::new("top");
    refuse(&ns, "127.77.50.1:8050".parse().unwrap(), 20);
    let refused_at = Instant::now();
    let screen = session.wait_for(Duration::from_secs(2), |screen| {
        screen
            .lines()
            .any(|l| l.contains("127.77.50.1:8050") && l.contains("refused") && l.contains("100%"))
    });
    assert!(refused_at.elapsed() <= Duration::from_secs(2));
    assert!(screen.contains("20 connections refused"), "{screen}");
    assert!(
        screen.contains("nothing is listening on 127.77.50.1:8050"),
        "{screen}"
    );
    let all = tracer_user::capture::PROBES_IN_USE;
    assert!(screen.contains(&format!("{all}/{all} probes")), "{screen}");

    // The filter narrows the table to what matches.
    session.keys("/");
    session.keys("77.50");
    session.keys("Enter");
    session.wait_for(Duration::from_secs(2), |s| s.contains("filter \"77.50\""));

    session.keys("q");
    let after = session.wait_for(Duration::from_secs(10), |s| s.contains("EXITED"));
    assert!(after.contains("EXITED 0"), "{after}");
    assert!(after.contains("probes detached"), "{after}");
    assert!(
        !after.contains("UPSTREAM"),
        "the terminal is back to normal:\n{after}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while held.iter().any(|id| program_loaded(*id)) {
        assert!(
            Instant::now() < deadline,
            "programs still loaded after q: {held:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn top_gives_the_terminal_back_on_sigterm_and_fits_a_narrow_window() {
    if !kernel_tests_enabled("top_gives_the_terminal_back_on_sigterm_and_fits_a_narrow_window") {
        return;
    }
    let session = Session::start("narrow", 160, 40, "--interval 500ms");
    let ns = Netns::new("topnarrow");
    refuse(&ns, "127.77.51.1:8051".parse().unwrap(), 5);
    session.wait_for(Duration::from_secs(5), |s| s.contains("127.77.51.1:8051"));
    let status = Command::new("tmux")
        .args(["resize-window", "-t", &session.name, "-x", "56", "-y", "14"])
        .status()
        .unwrap();
    assert!(status.success());
    let narrow = session.wait_for(Duration::from_secs(5), |s| {
        s.contains("FAIL/S") && !s.contains("PROXY") && s.contains("127.77.51.1:8051")
    });
    assert!(narrow.lines().all(|l| l.chars().count() <= 56), "{narrow}");

    let pid = session.tracer_pid();
    // SAFETY: signalling the process under test.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let after = session.wait_for(Duration::from_secs(10), |s| s.contains("EXITED"));
    assert!(after.contains("EXITED 0"), "{after}");
    assert!(
        !after.contains("FAIL/S"),
        "the terminal is back to normal:\n{after}"
    );
}

#[test]
fn top_connected_to_a_running_agent_shows_its_counts_and_its_event_stream() {
    if !kernel_tests_enabled(
        "top_connected_to_a_running_agent_shows_its_counts_and_its_event_stream",
    ) {
        return;
    }
    let (agent, addr) = Tracer::agent(&[]);
    let session = Session::start("remote", 160, 40, &format!("--connect http://{addr}"));
    // It reads the agent over HTTP and loads nothing itself.
    assert!(programs_held_by(session.tracer_pid()).is_empty());
    let ns = Netns::new("topremote");
    refuse(&ns, "127.77.52.1:8052".parse().unwrap(), 10);
    // The table comes from /api/snapshot; the recent failures pane from the /api/events
    // stream, a line per failure.
    let line = format!(
        "{}[{}] 127.77.52.1:8052 refused",
        own_comm(),
        std::process::id()
    );
    let screen = session.wait_for(Duration::from_secs(10), |screen| {
        screen
            .lines()
            .any(|l| l.contains("127.77.52.1:8052") && l.contains("100%"))
            && screen.contains(&line)
    });
    assert!(screen.contains("10 connections refused"), "{screen}");
    session.keys("q");
    let after = session.wait_for(Duration::from_secs(10), |s| s.contains("EXITED"));
    assert!(after.contains("EXITED 0"), "{after}");
    agent.stop();
}
