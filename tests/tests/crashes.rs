//! What a laptop does to the agent, done to the built binary: `kill -9` at
//! random points of a stream of changes (50 times), a tunnel's port taken by
//! another process while the agent was down, and the wall clock jumping as
//! it does across a suspend. Nothing is lost, nothing else moves, and the
//! hosts file is whole after every blow.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::BuildHasher;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k3s_local_agent_e2e::{
    greeting_server, read_from, wait_until, AgentProcess, PortSquatter, Sandbox, FOREIGN_HOSTS,
};
use serde_json::{json, Value};

const BEGIN: &str = "# BEGIN k3s-local-agent";
const END: &str = "# END k3s-local-agent";

/// The hosts file is whole: every foreign line kept, in order, and at most
/// one block of ours, opened and closed, naming only `names`.
fn assert_hosts_whole(text: &str, names: Option<&BTreeSet<String>>, when: &str) {
    assert!(
        text.starts_with(FOREIGN_HOSTS),
        "{when}: foreign lines lost:\n{text}"
    );
    let begins = text.lines().filter(|l| l.starts_with(BEGIN)).count();
    let ends = text.lines().filter(|l| l.starts_with(END)).count();
    assert!(
        begins <= 1 && begins == ends,
        "{when}: {begins} block starts, {ends} ends:\n{text}"
    );
    if let Some(names) = names {
        let listed: BTreeSet<String> = text
            .lines()
            .skip_while(|l| !l.starts_with(BEGIN))
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter_map(|name| name.strip_suffix("-staging.local"))
            .map(str::to_owned)
            .collect();
        // Each pod by its short name and its long one (these pods are in
        // no namespace: Kubernetes' `default`).
        let expected: BTreeSet<String> = names
            .iter()
            .flat_map(|name| [name.clone(), format!("{name}-default")])
            .collect();
        assert_eq!(listed, expected, "{when}: the block names the wrong pods");
    }
}

/// One pod as the status endpoint shows it: its port and toggle.
type Seen = BTreeMap<String, (u64, bool)>;

fn seen(status: &Value) -> Seen {
    status["redirections"]
        .as_object()
        .map(|map| {
            map.iter()
                .map(|(id, r)| {
                    let port = r["local_port"].as_u64().unwrap_or(0);
                    (id.clone(), (port, r["forwarding"] == true))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A blocking request over std (no runtime, so the kill can cut it at any
/// byte); the status code and body, or `None` once the agent is gone.
fn http(base: &str, method: &str, path: &str, body: Option<&Value>) -> Option<(u16, String)> {
    let addr = base.strip_prefix("http://")?;
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let code = answer.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, answer.split_once("\r\n\r\n")?.1.to_owned()))
}

/// A random number from the process's random hasher keys (no extra crate).
fn random(seed: u64) -> u64 {
    std::collections::hash_map::RandomState::new().hash_one(seed)
}

#[test]
fn kill_9_at_random_points_fifty_times_loses_nothing() {
    const KILLS: usize = 50;
    let sandbox = Sandbox::new().expect("sandbox");
    let (hosts, state) = (sandbox.hosts_str(), sandbox.state_dir());
    let args = sandbox.args("21800-21839", &hosts, &state);
    let pod = greeting_server("alive").expect("pod");
    // What the agent had confirmed before each kill, and the pods a change
    // was still in flight for (either outcome is right for those).
    let mut confirmed = Seen::new();
    let mut uncertain: BTreeSet<String> = BTreeSet::new();
    let mut checked = 0;
    for kill in 0..KILLS {
        let mut agent = AgentProcess::run(&args)
            .unwrap_or_else(|err| panic!("restart {kill}: {err}\n{}", sandbox.hosts_text()));
        let agent_id = agent.agent_id().expect("agent id");
        let restored = seen(&agent.get_json("/api/v1/pods/status").expect("status"));
        for (id, before) in &confirmed {
            if uncertain.contains(id) {
                continue;
            }
            assert_eq!(
                restored.get(id),
                Some(before),
                "restart {kill}: pod {id} came back different"
            );
            checked += 1;
        }
        for id in restored.keys() {
            assert!(
                confirmed.contains_key(id) || uncertain.contains(id),
                "restart {kill}: pod {id} came back from the dead"
            );
        }
        // A paused pod's names are withdrawn (its ports on its address are
        // not held, so nobody's name may lead there).
        let names: BTreeSet<String> = restored
            .iter()
            .filter(|(_, (_, forwarding))| *forwarding)
            .map(|(id, _)| format!("app-{id}"))
            .collect();
        assert_hosts_whole(&sandbox.hosts_text(), Some(&names), "after a restart");
        if let Some((id, (port, true))) = restored.iter().next() {
            let port = u16::try_from(*port).expect("port");
            assert_eq!(read_from(port).expect("tunnel"), "alive", "pod {id}");
        }

        // A stream of changes in another thread, cut by the kill at a random
        // moment; the stream notes what the agent confirmed.
        let stop = Arc::new(AtomicBool::new(false));
        let steps = Arc::new(AtomicU64::new(0));
        let state = Arc::new(Mutex::new((restored.clone(), BTreeSet::<String>::new())));
        let stream = {
            let (stop, state, steps) = (Arc::clone(&stop), Arc::clone(&state), Arc::clone(&steps));
            let base = agent.base_url.clone();
            let upstream = pod.port();
            std::thread::spawn(move || {
                let mut step = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    step += 1;
                    let roll = random(step);
                    let id = format!("p{}", roll % 24);
                    let (path, body) = match roll % 5 {
                        0 | 1 => (
                            "/api/v1/pods".to_owned(),
                            json!({"agent_id": agent_id, "action": "create", "pods": [
                                {"id": id, "name": format!("app-{id}"), "ip": "127.0.0.1", "port": upstream}]}),
                        ),
                        2 => (
                            "/api/v1/pods".to_owned(),
                            json!({"agent_id": agent_id, "action": "delete", "pods": [{"id": id}]}),
                        ),
                        _ => (
                            format!("/api/v1/pods/{id}/forwarding"),
                            json!({"enabled": roll.is_multiple_of(2)}),
                        ),
                    };
                    if let Ok(mut guard) = state.lock() {
                        guard.1.insert(id.clone());
                    }
                    if http(&base, "POST", &path, Some(&body)).is_none() {
                        return;
                    }
                    let Some((200, status)) = http(&base, "GET", "/api/v1/pods/status", None)
                    else {
                        return;
                    };
                    let Ok(status) = serde_json::from_str::<Value>(&status) else {
                        return;
                    };
                    if let Ok(mut guard) = state.lock() {
                        *guard = (seen(&status), BTreeSet::new());
                    }
                    steps.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        // The kill lands after a random number of confirmed changes, wherever
        // the next one happens to be by then (in the handler, the database,
        // the hosts file or the answer).
        let changes = 1 + random(kill as u64) % 12;
        wait_until("changes to flow", || {
            steps.load(Ordering::SeqCst) >= changes
        })
        .expect("the agent takes changes");
        agent.kill_hard().expect("kill -9");
        stop.store(true, Ordering::SeqCst);
        let _ = stream.join();
        assert_hosts_whole(&sandbox.hosts_text(), None, "right after kill -9");
        let (last_seen, in_flight) = state.lock().map(|g| g.clone()).expect("state");
        confirmed = last_seen;
        uncertain = in_flight;
    }
    assert!(
        checked > KILLS,
        "too few pods were there to check ({checked})"
    );
    println!("survived {KILLS} kill -9s; {checked} pods came back with the same port and toggle");
}

/// A control plane stand-in that keeps every report, in a thread.
fn recording_control_plane() -> (String, Arc<Mutex<Vec<Value>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let reports = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&reports);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let mut reader = std::io::BufReader::new(stream);
            let mut length = 0;
            loop {
                let mut line = String::new();
                if std::io::BufRead::read_line(&mut reader, &mut line).unwrap_or(0) == 0 {
                    break;
                }
                if let Some((name, value)) = line.split_once(':') {
                    if name.eq_ignore_ascii_case("content-length") {
                        length = value.trim().parse().unwrap_or(0);
                    }
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_ok() {
                if let Ok(report) = serde_json::from_slice::<Value>(&body) {
                    if let Ok(mut reports) = sink.lock() {
                        reports.push(report);
                    }
                }
            }
            let _ = reader
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
        }
    });
    (url, reports)
}

fn port_of(status: &Value, id: &str) -> u16 {
    u16::try_from(
        status["redirections"][id]["local_port"]
            .as_u64()
            .unwrap_or(0),
    )
    .unwrap_or(0)
}

#[test]
fn a_port_taken_while_the_agent_was_down_moves_only_that_pod() {
    let sandbox = Sandbox::new().expect("sandbox");
    let (hosts, state) = (sandbox.hosts_str(), sandbox.state_dir());
    let (control_plane, reports) = recording_control_plane();
    let mut args = sandbox.args("21840-21859", &hosts, &state);
    args.extend(["--control-plane-url", &control_plane]);
    let pod = greeting_server("moved").expect("pod");
    let mut agent = AgentProcess::run(&args).expect("agent runs");
    let agent_id = agent.agent_id().expect("agent id");
    let pods: Vec<Value> = ["a", "b", "c"]
        .iter()
        .map(|id| json!({"id": id, "name": format!("app-{id}"), "ip": "127.0.0.1", "port": pod.port()}))
        .collect();
    let (code, _) = agent
        .push(&json!({"agent_id": agent_id, "action": "create", "pods": pods}))
        .expect("push");
    assert_eq!(code, 200);
    let before = agent.get_json("/api/v1/pods/status").expect("status");
    agent.terminate().expect("SIGTERM");
    agent.wait_exit(Duration::from_secs(10)).expect("exits");

    // Another program takes pod a's port while the agent is down.
    let taken = port_of(&before, "a");
    let _squatter = PortSquatter::on(taken).expect("another program takes the port");

    let agent = AgentProcess::run(&args).expect("agent restarts");
    let after = agent.get_json("/api/v1/pods/status").expect("status");
    let moved = port_of(&after, "a");
    assert_ne!(moved, taken, "pod a kept a port another program holds");
    assert!((21840..=21859).contains(&moved));
    let note = after["redirections"]["a"]["port_note"]
        .as_str()
        .unwrap_or_default();
    assert!(
        note.contains(&taken.to_string()),
        "no note of the move: {after}"
    );
    for id in ["b", "c"] {
        assert_eq!(port_of(&after, id), port_of(&before, id), "{id} moved");
    }
    assert_eq!(read_from(moved).expect("tunnel on its new port"), "moved");
    wait_until("the move to be reported", || {
        reports.lock().is_ok_and(|reports| {
            reports.iter().any(|report| {
                report["staging_pods"]["a"]["local_port"] == json!(moved)
                    && report["staging_pods"]["b"]["local_port"] == json!(port_of(&before, "b"))
            })
        })
    })
    .expect("reported");
}

/// libfaketime, which shifts the wall clock of one process (Debian's
/// `faketime` package).
fn libfaketime() -> PathBuf {
    std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("faketime/libfaketimeMT.so.1"))
        .find(|path| path.exists())
        .expect("libfaketime is missing: apt-get install faketime (scripts/test does)")
}

fn report_times(reports: &Mutex<Vec<Value>>) -> Vec<chrono_free::Seconds> {
    reports
        .lock()
        .map(|reports| {
            reports
                .iter()
                .filter_map(|r| r["timestamp"].as_str().and_then(chrono_free::parse))
                .collect()
        })
        .unwrap_or_default()
}

mod chrono_free {
    //! Enough RFC 3339 to compare report times, in seconds since the epoch,
    //! via `date` so the test needs no date crate.
    pub type Seconds = i64;

    pub fn parse(text: &str) -> Option<Seconds> {
        let output = std::process::Command::new("date")
            .args(["-u", "-d", text, "+%s"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&output.stdout).trim().parse().ok()
    }

    pub fn now() -> Seconds {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }
}

#[test]
fn the_wall_clock_jumping_and_a_suspend_stop_nothing() {
    let sandbox = Sandbox::new().expect("sandbox");
    let (hosts, state) = (sandbox.hosts_str(), sandbox.state_dir());
    let (control_plane, reports) = recording_control_plane();
    let mut args = sandbox.args("21860-21879", &hosts, &state);
    args.extend([
        "--control-plane-url",
        &control_plane,
        "--sync-interval",
        "1",
    ]);
    let clock = sandbox.dir.path().join("clock");
    std::fs::write(&clock, "+0\n").expect("clock file");
    let mut command = Command::new(k3s_local_agent_e2e::agent_binary());
    command
        .arg("run")
        .args(&args)
        .env("LD_PRELOAD", libfaketime())
        .env("FAKETIME_TIMESTAMP_FILE", &clock)
        .env("FAKETIME_NO_CACHE", "1")
        // A suspend moves the wall clock only; monotonic time, which every
        // timer of the agent runs on, stays true.
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    let agent = AgentProcess::run_command(&mut command).expect("agent runs under libfaketime");
    let agent_id = agent.agent_id().expect("agent id");
    let pod = greeting_server("ticking").expect("pod");
    let push = |id: &str| {
        agent
            .push(&json!({"agent_id": agent_id, "action": "create", "pods": [
                {"id": id, "name": format!("app-{id}"), "ip": "127.0.0.1", "port": pod.port()}]}))
            .expect("push")
            .0
    };
    assert_eq!(push("first"), 200);
    let status = agent.get_json("/api/v1/pods/status").expect("status");
    let port = port_of(&status, "first");
    assert_eq!(read_from(port).expect("tunnel"), "ticking");

    let report_near = |offset: i64, what: &str| {
        let seen_before = report_times(&reports).len();
        wait_until(what, || {
            let times = report_times(&reports);
            times.len() > seen_before
                && times[seen_before..]
                    .iter()
                    .any(|t| (t - (chrono_free::now() + offset)).abs() < 600)
        })
        .unwrap_or_else(|err| panic!("{err}: reports {:?}", report_times(&reports)));
    };
    report_near(0, "a report at the true time");

    // Forward three hours, as after a long suspend.
    std::fs::write(&clock, "+3h\n").expect("jump");
    report_near(3 * 3600, "a report three hours ahead");
    assert_eq!(read_from(port).expect("tunnel after the jump"), "ticking");

    // A real suspend: the process stops, the clock moves (backwards, this
    // time, as when NTP corrects it), and it resumes.
    let pid = agent.pid().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .expect("kill")
        .success());
    std::fs::write(&clock, "-2h\n").expect("jump back");
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .expect("kill")
        .success());
    report_near(-2 * 3600, "a report two hours behind");
    report_near(-2 * 3600, "reports still coming");
    assert_eq!(
        read_from(port).expect("tunnel after the suspend"),
        "ticking"
    );
    assert_eq!(push("second"), 200);
    let status = agent.get_json("/api/v1/pods/status").expect("status");
    assert_eq!(
        read_from(port_of(&status, "second")).expect("new tunnel"),
        "ticking"
    );
    assert_eq!(
        agent.get_json("/health").expect("health")["status"],
        "healthy"
    );
}
