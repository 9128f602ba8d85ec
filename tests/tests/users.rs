//! Another user of the same machine: the agent runs as root (as CI does)
//! and a second, real user (`nobody`, through `setpriv`) calls it over
//! loopback. That user learns from `/health` only that the agent lives;
//! reading pods, pushing, retargeting and stopping all need the bearer
//! token, and with it they work. Root and the agent's own user need none.

use std::process::Command;

use k3s_local_agent_e2e::{curl, greeting_server, AgentProcess, Sandbox};
use serde_json::{json, Value};

/// `curl ARGS` as the user `nobody`: the HTTP code and the body.
fn curl_as_nobody(args: &[&str]) -> (u16, String) {
    let output = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "curl",
            "-s",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "--max-time",
            "10",
        ])
        .args(args)
        .output()
        .expect("setpriv and curl run (needs root, as CI has)");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or((&text, "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|err| panic!("not JSON ({err}): {text}"))
}

#[test]
fn another_local_user_needs_the_token_for_everything_but_health() {
    let sandbox = Sandbox::new().expect("sandbox");
    let (hosts, state) = (sandbox.hosts_str(), sandbox.state_dir());
    let agent = AgentProcess::run(&sandbox.args("22300-22319", &hosts, &state)).expect("agent");
    let agent_id = agent.agent_id().expect("agent id");
    let pod = greeting_server("the real pod").expect("pod");
    let (code, answer) = agent
        .push(&json!({"agent_id": agent_id, "action": "create",
                      "pods": [{"id": "pod-123", "name": "my-app", "ip": "127.0.0.1",
                                "port": pod.port()}]}))
        .expect("push as root");
    assert_eq!(code, 200, "{answer}");

    // /health: alive, and nothing more.
    let (code, body) = curl_as_nobody(&[&agent.url("/health")]);
    assert_eq!(code, 200, "{body}");
    let health = json_of(&body);
    assert_eq!(health["status"], "healthy");
    assert_eq!(
        health["pod_count"], 0,
        "another user sees no pods: {health}"
    );

    // Everything else is refused without the token, and changes nothing.
    for path in [
        "/api/v1/pods",
        "/api/v1/pods/status",
        "/api/v1/snapshot",
        "/metrics",
    ] {
        let (code, body) = curl_as_nobody(&[&agent.url(path)]);
        assert_eq!(code, 401, "{path}: {body}");
        assert!(json_of(&body)["error"]
            .as_str()
            .is_some_and(|e| e.contains("token")));
    }
    let retarget = json!({"agent_id": agent_id, "action": "update",
                          "pods": [{"id": "pod-123", "name": "my-app", "ip": "127.0.0.1", "port": 9}]})
    .to_string();
    let post = |path: &str, body: &str| {
        curl_as_nobody(&[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
            &agent.url(path),
        ])
    };
    let (code, body) = post("/api/v1/pods", &retarget);
    assert_eq!(code, 401, "{body}");
    let (code, body) = post("/api/v1/pods/pod-123/stop", "{}");
    assert_eq!(code, 401, "{body}");
    let status = agent
        .get_json("/api/v1/pods/status")
        .expect("status as root");
    let tunnel = &status["redirections"]["pod-123"];
    assert_eq!(tunnel["status"], "active", "{status}");
    assert_eq!(
        tunnel["staging_port"],
        pod.port(),
        "not retargeted: {tunnel}"
    );

    // With the token, the other user is a control plane like any other.
    let token = std::fs::read_to_string(std::path::Path::new(&state).join("token"))
        .expect("read the token as root");
    let bearer = format!("Authorization: Bearer {}", token.trim());
    let (code, body) = curl_as_nobody(&["-H", &bearer, &agent.url("/api/v1/pods")]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(json_of(&body)["pods"][0]["pod"]["id"], "pod-123");
    let (code, body) = curl_as_nobody(&["-H", &bearer, &agent.url("/health")]);
    assert_eq!(code, 200);
    assert_eq!(json_of(&body)["pod_count"], 1);

    // Root, as before, needs nothing.
    let (code, _) = curl(&[&agent.url("/api/v1/pods")]).expect("curl as root");
    assert_eq!(code, 200);
}
