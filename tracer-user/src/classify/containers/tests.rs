//! The container model on made-up runtime reports and failures.

use tracer_common::Outcome;

use super::*;
use crate::decode::{Evidence, Task};

fn at(s: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_763_769_600 + s)
}

fn id(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

fn web(n: u8, name: &str, ip: &str, started: u64) -> Observed {
    Observed {
        full_id: id(n),
        who: ContainerId {
            id: id(n)[..12].to_string(),
            name: name.into(),
            image: "shop:1.4".into(),
            pod: None,
        },
        running: true,
        restarting: false,
        oom_killed: false,
        exit_code: 0,
        started_at: Some(at(started)),
        finished_at: None,
        restart_count: 0,
        memory_limit: None,
        addresses: vec![ip.parse().unwrap()],
    }
}

fn stopped(mut o: Observed, finished: u64, exit_code: i64) -> Observed {
    o.running = false;
    o.finished_at = Some(at(finished));
    o.exit_code = exit_code;
    o
}

fn failure(t: u64, upstream: &str, cause: Outcome) -> Failure {
    Failure {
        time: at(t),
        proxy: Task {
            comm: "nginx".into(),
            pid: 812,
            tid: 812,
            cgroup_id: 1,
            netns: 1,
        },
        upstream: upstream.parse().unwrap(),
        local: None,
        cause,
        evidence: Evidence {
            errno: 110,
            ..crate::classify::tests::evidence()
        },
    }
}

#[test]
fn finds_the_container_id_in_every_runtimes_cgroup_path() {
    let id = id(0xab);
    for path in [
        format!("/docker/{id}"),
        format!("/system.slice/docker-{id}.scope"),
        format!("/machine.slice/libpod-{id}.scope/container"),
        format!("/kubepods/burstable/pod1234-5678/{id}"),
        format!("/kubepods.slice/kubepods-pod12.slice/cri-containerd-{id}.scope"),
        format!("/kubepods.slice/kubepods-besteffort.slice/crio-{id}.scope"),
    ] {
        assert_eq!(container_id_in(&path), Some(id.as_str()), "{path}");
    }
    assert_eq!(
        container_id_in(&format!("/machine.slice/libpod-conmon-{id}.scope")),
        None
    );
    assert_eq!(
        container_id_in("/user.slice/user-0.slice/session-1.scope"),
        None
    );
    assert_eq!(container_id_in("/"), None);
}

#[test]
fn a_recreated_container_leaves_a_stale_address_behind() {
    let mut c = Containers::default();
    c.observe(web(1, "web-1", "172.31.77.5", 0), at(1));
    assert_eq!(
        c.holder("172.31.77.5".parse().unwrap()).unwrap().name,
        "web-1"
    );
    c.died(&id(1), at(100), 137);
    c.removed(&id(1), at(100));
    c.observe(web(2, "web-1", "172.31.77.9", 101), at(101));
    let cause = c
        .root_cause(&failure(110, "172.31.77.5:8000", Outcome::ConnectTimeout))
        .expect("a root cause");
    assert_eq!(cause.name(), "stale_address");
    assert_eq!(
        cause.explain(),
        "172.31.77.5 belonged to container web-1 (image shop:1.4) until 00:01:40; web-1 now \
         runs at 172.31.77.9 (recreated with a new address: the proxy still uses the old one)"
    );
    // Toward the new address, nothing to say; before the change, nothing either.
    assert_eq!(
        c.root_cause(&failure(110, "172.31.77.9:8000", Outcome::Refused)),
        None
    );
    assert_eq!(
        c.root_cause(&failure(50, "172.31.77.5:8000", Outcome::Refused)),
        None
    );
    // Addresses no container ever had are not the runtime's business.
    assert_eq!(
        c.root_cause(&failure(110, "172.31.77.6:8000", Outcome::ConnectTimeout)),
        None
    );
}

#[test]
fn an_oom_killed_container_is_named_with_its_limit() {
    let mut c = Containers::default();
    let mut o = web(3, "api", "172.31.77.7", 0);
    o.memory_limit = Some(32 << 20);
    c.observe(o.clone(), at(1));
    c.oom(&id(3), at(20));
    c.died(&id(3), at(20), 137);
    let mut after = stopped(o, 20, 137);
    after.oom_killed = true;
    c.observe(after, at(21));
    let cause = c
        .root_cause(&failure(25, "172.31.77.7:8000", Outcome::ConnectTimeout))
        .unwrap();
    assert_eq!(cause.name(), "container_oom_killed");
    assert_eq!(
        cause.explain(),
        "container api (image shop:1.4) was OOM-killed at its memory limit (32 MiB) at \
         00:00:20; it has not run since"
    );
}

#[test]
fn an_oom_kill_told_only_by_the_inspect_is_kept_when_the_death_comes() {
    let mut c = Containers::default();
    let o = web(6, "api", "172.31.77.17", 0);
    c.observe(o.clone(), at(1));
    // No `oom` event: the inspect after the death says OOMKilled, the `die` event follows
    // with its own (slightly later) time.
    let mut after = stopped(o, 20, 137);
    after.oom_killed = true;
    c.observe(after, at(20));
    c.died(&id(6), at(20) + Duration::from_millis(3), 137);
    let cause = c
        .root_cause(&failure(25, "172.31.77.17:8000", Outcome::ConnectTimeout))
        .unwrap();
    assert_eq!(cause.name(), "container_oom_killed");
}

#[test]
fn a_container_restarted_again_and_again_is_a_crash_loop() {
    let mut c = Containers::default();
    let mut o = web(4, "worker", "172.31.77.8", 0);
    for (n, t) in [0u64, 2, 4, 6].iter().enumerate() {
        o.started_at = Some(at(*t));
        o.restart_count = n as u32;
        o.running = true;
        c.observe(o.clone(), at(*t));
        c.died(&id(4), at(t + 1), 1);
        o.running = false;
        o.restarting = true;
        o.finished_at = Some(at(t + 1));
        o.exit_code = 1;
        c.observe(o.clone(), at(t + 1));
    }
    let cause = c
        .root_cause(&failure(8, "172.31.77.8:8000", Outcome::Unreachable))
        .unwrap();
    assert_eq!(cause.name(), "container_crash_loop");
    assert_eq!(
        cause.explain(),
        "container worker (image shop:1.4) is in a crash loop: restarted 3 times, one start \
         every 2.0 s, last exiting with code 1 at 00:00:07"
    );
}

#[test]
fn a_stopped_container_and_a_healthy_one() {
    let mut c = Containers::default();
    let o = web(5, "db", "172.31.77.10", 0);
    c.observe(o.clone(), at(1));
    assert_eq!(
        c.root_cause(&failure(5, "172.31.77.10:5432", Outcome::Refused)),
        None,
        "a running container with no story"
    );
    c.died(&id(5), at(30), 0);
    c.observe(stopped(o, 30, 0), at(30));
    let cause = c
        .root_cause(&failure(40, "172.31.77.10:5432", Outcome::Unreachable))
        .unwrap();
    assert_eq!(cause.name(), "container_stopped");
    assert_eq!(
        cause.explain(),
        "container db (image shop:1.4) stopped at 00:00:30 (exit code 0); its address has had \
         no owner since"
    );
}

#[test]
fn memory_stays_bounded() {
    let mut c = Containers::default();
    for n in 0..(MAX_CONTAINERS + 100) {
        let full = format!("{n:064x}");
        let mut o = web(
            0,
            "x",
            &format!("10.{}.{}.{}", n >> 16, (n >> 8) & 255, n & 255),
            0,
        );
        o.full_id = full.clone();
        c.observe(o.clone(), at(1));
        c.died(&full, at(2), 0);
        c.removed(&full, at(2));
    }
    assert!(c.known.len() <= MAX_CONTAINERS);
    assert!(c.leases.len() <= MAX_LEASES);
}
