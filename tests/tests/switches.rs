//! The seed's two remaining switches, from the binary: with `--forwarding
//! off` pods are received, held and reported but no tunnel port listens;
//! with `--names off` no name is written anywhere (the hosts file is left
//! byte for byte) and addresses fall back to `localhost:<range port>`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use k3s_local_agent_e2e::{
    cli, curl, greeting_server, read_from, refuses, wait_until, AgentProcess, Sandbox, DEADLINE,
    FOREIGN_HOSTS,
};
use serde_json::{json, Value};

/// A control plane stand-in that keeps the body of every report it takes.
fn recording_control_plane() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let kept = Arc::clone(&bodies);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let mut reader = BufReader::new(stream);
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((name, value)) = line.split_once(':') {
                    if name.eq_ignore_ascii_case("content-length") {
                        length = value.trim().parse().unwrap_or(0);
                    }
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_ok() {
                kept.lock()
                    .expect("lock")
                    .push(String::from_utf8_lossy(&body).into_owned());
            }
            let _ = reader
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
        }
    });
    (url, bodies)
}

fn create(agent: &AgentProcess, pods: Value) {
    let agent_id = agent.agent_id().expect("agent id");
    let (status, body) = agent
        .push(&json!({"agent_id": agent_id, "action": "create", "pods": pods}))
        .expect("push");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn with_forwarding_off_pods_are_held_and_reported_but_no_port_listens() {
    let sandbox = Sandbox::new().expect("sandbox");
    let (hosts, state) = (sandbox.hosts_str(), sandbox.state_dir());
    let (control_plane, reports) = recording_control_plane();
    let mut args = sandbox.args("21500-21509", &hosts, &state);
    args.extend([
        "--forwarding",
        "off",
        "--control-plane-url",
        &control_plane,
        "--sync-interval",
        "1",
    ]);
    let agent = AgentProcess::run(&args).expect("agent runs");
    let pod = greeting_server("never reached").expect("pod");
    create(
        &agent,
        json!([
            {"id": "web-1", "name": "web", "ip": "127.0.0.1", "port": pod.port()},
            {"id": "api-1", "name": "api", "ip": "127.0.0.1", "port": pod.port()},
        ]),
    );

    // Said once, by the agent; each tunnel simply stopped, with no error.
    let health = agent.get_json("/health").expect("health");
    assert_eq!(health["forwarding"], json!(false), "{health}");
    let status = agent.get_json("/api/v1/pods/status").expect("status");
    for id in ["web-1", "api-1"] {
        let tunnel = &status["redirections"][id];
        assert_eq!(tunnel["status"], json!("stopped"), "{tunnel}");
        assert_eq!(tunnel["error"], Value::Null, "{tunnel}");
    }
    // No port of the range listens.
    for port in 21500..=21509 {
        assert!(refuses(port), "port {port} listens with forwarding off");
    }
    // Every pod still goes to the control plane.
    wait_until("a report with both pods", || {
        reports.lock().expect("lock").iter().any(|body| {
            serde_json::from_str::<Value>(body).is_ok_and(|report| {
                ["web-1", "api-1"]
                    .iter()
                    .all(|id| report["staging_pods"].get(id).is_some())
            })
        })
    })
    .expect("reported");
    // Turning a tunnel on cannot work here, and says so.
    let (code, body) = curl(&[
        "-X",
        "POST",
        &agent.url("/api/v1/pods/web-1/forwarding"),
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"enabled": true}"#,
    ])
    .expect("curl");
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("--forwarding off"), "{body}");
    // The CLI says it once.
    let (ok, out, err) = cli(&["status", "--agent-url", &agent.base_url]).expect("status");
    assert!(ok, "{out}{err}");
    assert_eq!(out.matches("forwarding: off").count(), 1, "{out}");
    agent.terminate().expect("stop");
}

#[test]
fn with_names_off_no_name_is_written_and_addresses_are_localhost() {
    let sandbox = Sandbox::new().expect("sandbox");
    let (hosts, state) = (sandbox.hosts_str(), sandbox.state_dir());
    let mut args = sandbox.args("21510-21519", &hosts, &state);
    args.extend(["--names", "off"]);
    let mut agent = AgentProcess::run(&args).expect("agent runs");
    let pod = greeting_server("by its range port").expect("pod");
    create(
        &agent,
        json!([{"id": "web-1", "name": "web", "ip": "127.0.0.1", "port": pod.port()}]),
    );
    let status = agent.get_json("/api/v1/pods/status").expect("status");
    let tunnel = &status["redirections"]["web-1"];
    let port = u16::try_from(tunnel["local_port"].as_u64().expect("a range port")).expect("port");
    assert_eq!(read_from(port).expect("tunnel"), "by its range port");
    // Addresses fall back to the local host; no name is claimed.
    assert_eq!(tunnel["dns_name"], json!("localhost"), "{tunnel}");
    assert_eq!(tunnel["name_url"], Value::Null, "{tunnel}");
    assert_eq!(tunnel["names"], json!([]), "{tunnel}");
    let health = agent.get_json("/health").expect("health");
    assert_eq!(health["names"]["mode"], json!("off"), "{health}");
    let (ok, out, _) = cli(&["pods", "--agent-url", &agent.base_url]).expect("pods");
    assert!(ok && out.contains(&format!("localhost:{port}")), "{out}");
    assert!(!out.contains("web-staging"), "{out}");

    // Neither while running nor on the way out is the hosts file touched.
    assert_eq!(sandbox.hosts_text(), FOREIGN_HOSTS);
    agent.terminate().expect("stop");
    agent.wait_exit(DEADLINE).expect("the agent stops");
    assert_eq!(sandbox.hosts_text(), FOREIGN_HOSTS, "byte for byte");
}
