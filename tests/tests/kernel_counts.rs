//! The kernel's exact counts: every attempt counted once where it is decided, successes too,
//! read through the agent library in this process.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use tracer_common::Outcome;
use tracer_tests::{
    client::{Polling, connect_polled, connect_to_itself, request},
    kernel_tests_enabled,
    netns::Netns,
    own_comm,
    upstream::{Behaviour, Upstream},
};
use tracer_user::{
    agent::Agent,
    aggregate::{RouteTotals, Totals},
    capture::Options,
};

fn count(totals: &Totals, upstream: SocketAddr, outcome: Outcome) -> u64 {
    let comm = own_comm();
    totals
        .routes
        .iter()
        .filter(|(route, _)| route.upstream.socket_addr() == Some(upstream) && route.proxy == comm)
        .map(|(_, t)| t.count(outcome))
        .sum()
}

/// Waits until the kernel's counts are `expected` (upstream, outcome, count), and returns
/// them, with whether they are exactly that: connections end asynchronously (the last ACK), so
/// they get a moment to settle. Where the kernel skipped runs of tracer's programs (one that
/// preempts programs, under emulation: the 7.x guest), counts may fall short by as many as
/// the runs skipped, and no more; none may ever be over.
async fn counts_settle_to(
    agent: &Agent,
    expected: &[(SocketAddr, Outcome, u64)],
) -> (Totals, bool) {
    let want: Vec<u64> = expected.iter().map(|(_, _, n)| *n).collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let totals = agent.totals();
        let got: Vec<u64> = expected
            .iter()
            .map(|(u, o, _)| count(&totals, *u, *o))
            .collect();
        if got == want {
            return (totals, true);
        }
        if Instant::now() >= deadline {
            let skipped = tracer_tests::bpf::program_misses(std::process::id());
            let skipped_runs: u64 = skipped.values().sum();
            let short: u64 = want
                .iter()
                .zip(&got)
                .map(|(w, g)| w.saturating_sub(*g))
                .sum();
            let over = got.iter().zip(&want).any(|(g, w)| g > w);
            assert!(
                !over && short <= skipped_runs,
                "counts {got:?}, expected {want:?} for {expected:?}; runs of tracer's programs the kernel skipped: {skipped:?}"
            );
            println!(
                "counts {got:?} are short of {want:?} by {short}: the kernel skipped {skipped_runs} runs of tracer's programs ({skipped:?})"
            );
            return (totals, false);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The agent, in this process, counting this process's attempts (the agent's own are left out
/// otherwise).
fn agent_counting_this_process() -> Agent {
    agent_counting_this_process_with(Options::default())
}

/// [`agent_counting_this_process`], with `options` otherwise.
fn agent_counting_this_process_with(options: Options) -> Agent {
    Agent::start(&Options {
        ignore_own_process: false,
        ..options
    })
    .expect("tracer starts")
}

/// What the kernel counted on a route toward `upstream` (this process's only one).
fn route_to(totals: &Totals, upstream: SocketAddr) -> &RouteTotals {
    totals
        .routes
        .iter()
        .find(|(r, _)| r.upstream.socket_addr() == Some(upstream))
        .unwrap_or_else(|| panic!("no route to {upstream}"))
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_counts_every_attempt_exactly() {
    if !kernel_tests_enabled("kernel_counts_every_attempt_exactly") {
        return;
    }
    let agent = agent_counting_this_process();
    assert!(
        agent.syscall_fields_direct(),
        "the usual layout, on every kernel since 4.x"
    );
    counts_every_attempt(&agent, "counts", 8020).await;
}

/// The same, with the syscall tracepoints' fields read at their format files' offsets, as on
/// a kernel whose records are laid out otherwise (everywhere else they are loaded directly).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_counts_the_same_with_syscall_fields_read_at_the_format_offsets() {
    if !kernel_tests_enabled(
        "kernel_counts_the_same_with_syscall_fields_read_at_the_format_offsets",
    ) {
        return;
    }
    let agent = agent_counting_this_process_with(Options {
        syscall_fields_from_format: true,
        ..Options::default()
    });
    assert!(!agent.syscall_fields_direct());
    counts_every_attempt(&agent, "countsfmt", 8030).await;
}

/// Refused, answered and unanswered attempts from a namespace of its own, toward ports
/// `port`, `port + 1` and `port + 2`, counted exactly.
async fn counts_every_attempt(agent: &Agent, tag: &str, port: u16) {
    let ns = Netns::new(tag);
    let at = |port: u16| -> SocketAddr { format!("127.77.20.1:{port}").parse().unwrap() };
    let closed = at(port);
    let healthy = Upstream::start(
        &ns,
        at(port + 1),
        Behaviour::Answer {
            idle_close: Duration::from_millis(100),
        },
    );
    let mute = Upstream::start(&ns, at(port + 2), Behaviour::CloseAfterRequest);
    let (refused, answered, unanswered) = (30, 10, 5);
    ns.run(|| {
        for _ in 0..refused {
            TcpStream::connect(closed).expect_err("refused");
        }
        for _ in 0..answered {
            request(healthy.addr).expect("answered");
        }
        for _ in 0..unanswered {
            request(mute.addr).expect_err("closed before answering");
        }
    });
    let expected = [
        (closed, Outcome::Refused, refused),
        (closed, Outcome::Connected, 0),
        (healthy.addr, Outcome::Connected, answered),
        (mute.addr, Outcome::Connected, unanswered),
        (mute.addr, Outcome::ClosedBeforeResponse, unanswered),
    ];
    let (totals, exact) = counts_settle_to(agent, &expected).await;
    let route = route_to(&totals, healthy.addr);
    assert_eq!(route.failures(), 0);
    if exact {
        assert_eq!(route.attempts(), answered);
    }
    assert_eq!(agent.shared.stat(tracer_common::Stat::EventsLost), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_a_connect_counts_it_once_whichever_way() {
    if !kernel_tests_enabled("polling_a_connect_counts_it_once_whichever_way") {
        return;
    }
    let agent = agent_counting_this_process();
    let ns = Netns::new("pollcounts");
    let (refused, connected) = (25, 15);
    let mut expected = Vec::new();
    let mut listeners = Vec::new();
    for (i, how) in Polling::ALL.iter().enumerate() {
        let port = 8040 + 2 * i as u16;
        let closed: SocketAddr = format!("127.77.21.1:{port}").parse().unwrap();
        let open: SocketAddr = format!("127.77.21.1:{}", port + 1).parse().unwrap();
        listeners.push(Upstream::start(
            &ns,
            open,
            Behaviour::Answer {
                idle_close: Duration::from_millis(100),
            },
        ));
        ns.run(|| {
            for _ in 0..refused {
                connect_polled(closed, *how).expect_err("refused");
            }
            for _ in 0..connected {
                drop(connect_polled(open, *how).expect("connected"));
            }
        });
        expected.push((closed, Outcome::Refused, refused));
        expected.push((closed, Outcome::ConnectError, 0));
        expected.push((open, Outcome::Connected, connected));
    }
    // Per way (refused, connect_error, connected): Polling::ALL's order.
    counts_settle_to(&agent, &expected).await;
    drop(listeners);
}

/// A connection that never goes from SYN_SENT to ESTABLISHED (a simultaneous open, which a
/// socket connected to itself makes: SYN_SENT→SYN_RECV→ESTABLISHED) is counted as connected and
/// judged as an established connection when it closes, not as an attempt that failed. The same
/// path takes a handshake whose program run the kernel skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simultaneous_open_counts_as_a_connect_not_as_a_failed_attempt() {
    if !kernel_tests_enabled("a_simultaneous_open_counts_as_a_connect_not_as_a_failed_attempt") {
        return;
    }
    let agent = agent_counting_this_process();
    let ns = Netns::new("selfconnect");
    // Each open binds the same address: no TIME_WAIT left to hold it.
    ns.sysctl("net.ipv4.tcp_max_tw_buckets", "0");
    let addr: SocketAddr = "127.77.22.1:8060".parse().unwrap();
    let opens = 5;
    ns.run(|| {
        for _ in 0..opens {
            let mut socket = connect_to_itself(addr).expect("connected to itself");
            socket.write_all(b"ping").expect("sent");
            let mut echo = [0u8; 4];
            socket.read_exact(&mut echo).expect("read back");
            assert_eq!(&echo, b"ping");
        }
    });
    let (totals, _) = counts_settle_to(
        &agent,
        &[
            (addr, Outcome::Connected, opens),
            (addr, Outcome::ConnectAbandoned, 0),
            (addr, Outcome::ConnectTimeout, 0),
        ],
    )
    .await;
    let route = route_to(&totals, addr);
    assert_eq!(route.failures(), 0, "{route:?}");
}

/// A process that exits with a followed connection open never calls close() on it: its
/// first-bytes watch slot is forgotten when the agent next reclaims, while a live process's
/// stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watches_of_processes_that_exited_are_forgotten() {
    if !kernel_tests_enabled("the_watches_of_processes_that_exited_are_forgotten") {
        return;
    }
    let agent = agent_counting_this_process();
    let ns = Netns::new("watches");
    let upstream = Upstream::start(
        &ns,
        "127.77.23.1:8070".parse().unwrap(),
        Behaviour::Answer {
            idle_close: Duration::from_secs(30),
        },
    );
    // bash connects (descriptor 3) and prints its pid; one exits at once, one sleeps.
    let connect = "exec 3<>/dev/tcp/127.77.23.1/8070 && echo $$";
    let bash = |script: String| {
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.name, "bash", "-c", &script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("bash runs");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .expect("bash says its pid");
        let pid: u32 = line.trim().parse().expect("a pid");
        (child, pid)
    };
    let (mut exited, exited_pid) = bash(connect.to_string());
    exited.wait().expect("bash exits");
    let (mut living, living_pid) = bash(format!("{connect} && sleep 30"));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let watching = agent.shared.counters.watching_processes();
        if watching.contains(&exited_pid) && watching.contains(&living_pid) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no watch slots for {exited_pid} and {living_pid}: {watching:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.shared.reclaim();
    let watching = agent.shared.counters.watching_processes();
    let _ = living.kill();
    let _ = living.wait();
    drop(upstream);
    assert!(!watching.contains(&exited_pid), "{watching:?}");
    assert!(watching.contains(&living_pid), "{watching:?}");
}
