//! The built agent binary, driven as a user and a control plane would: the
//! seed's curl examples, the CLI, signals, `kill -9` and restart, the demo,
//! and settings from a file and the environment.

use std::time::Duration;

use k3s_local_agent_e2e::{
    cli, curl, greeting_server, read_from, refuses, wait_until, AgentProcess, Sandbox,
    FOREIGN_HOSTS,
};
use serde_json::{json, Value};

const SEED_AGENT_ID: &str = "staging-agent-hostname-1234567890";

/// The seed's push body, byte for byte.
const SEED_BODY: &str = r#"{
  "agent_id": "staging-agent-hostname-1234567890",
  "pods": [
    {
      "id": "pod-123",
      "name": "my-app",
      "namespace": "staging",
      "image": "nginx:latest",
      "status": "running",
      "ip": "10.0.1.100",
      "node_name": "gke-node-1",
      "labels": {"app": "my-app"},
      "created_at": "2024-01-15T10:30:00Z",
      "updated_at": "2024-01-15T10:30:00Z"
    }
  ],
  "action": "create"
}"#;

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|err| panic!("not JSON ({err}): {text}"))
}

fn count_blocks(text: &str) -> usize {
    text.lines()
        .filter(|l| l.starts_with("# BEGIN k3s-local-agent"))
        .count()
}

#[test]
fn the_seed_examples_work_with_curl() {
    let sandbox = Sandbox::new().expect("sandbox");
    let (hosts, state) = (sandbox.hosts_str(), sandbox.state_dir());
    // On the seed's port, so the URLs are exactly the seed's: only this test
    // uses 8082 (stop any agent you run by hand before the tests).
    let agent = AgentProcess::run(&[
        "--agent-port",
        "8082",
        "--agent-id",
        SEED_AGENT_ID,
        "--port-range",
        "21000-21019",
        "--hosts-file",
        &hosts,
        "--state-dir",
        &state,
        "--no-cluster",
    ])
    .expect("agent runs on port 8082");
    assert!(agent.base_url.ends_with(":8082"), "{}", agent.base_url);

    let (code, body) = curl(&["http://localhost:8082/health"]).expect("curl health");
    assert_eq!(code, 200);
    let health = json_of(&body);
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["agent_id"], SEED_AGENT_ID);
    assert_eq!(health["pod_count"], 0);

    let body_file = sandbox.dir.path().join("pod-update.json");
    std::fs::write(&body_file, SEED_BODY).expect("write body");
    let data = format!("@{}", body_file.display());
    let (code, body) = curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "-d",
        &data,
        "http://localhost:8082/api/v1/pods",
    ])
    .expect("curl push");
    assert_eq!(code, 200, "{body}");

    let (code, body) = curl(&["http://localhost:8082/api/v1/pods/status"]).expect("curl status");
    assert_eq!(code, 200);
    let status = json_of(&body);
    assert_eq!(status["total_redirections"], 1);
    let tunnel = &status["redirections"]["pod-123"];
    assert_eq!(tunnel["dns_name"], "my-app-staging.local");
    assert_eq!(tunnel["staging_pod_ip"], "10.0.1.100");
    let port = tunnel["local_port"].as_u64().expect("port");
    assert!((21000..=21019).contains(&port));
    let address = tunnel["address"].as_str().expect("the pod's own address");
    assert!(sandbox.hosts_text().contains(&format!(
        "{address} my-app-staging.local my-app-staging.localhost"
    )));

    // Another agent's id is refused, as in the seed.
    let wrong = SEED_BODY.replace(SEED_AGENT_ID, "staging-agent-other-1");
    let (code, body) =
        curl(&["-X", "POST", "-d", &wrong, &agent.url("/api/v1/pods")]).expect("curl");
    assert_eq!(code, 401);
    assert_eq!(json_of(&body)["error"], "Invalid agent ID");
}

#[test]
fn the_cli_drives_a_running_agent() {
    let sandbox = Sandbox::new().expect("sandbox");
    let (hosts, state) = (sandbox.hosts_str(), sandbox.state_dir());
    let agent =
        AgentProcess::run(&sandbox.args("21020-21039", &hosts, &state)).expect("agent runs");
    let pod = greeting_server("from the pod").expect("pod server");

    // A push file without an agent id goes to whatever agent we talk to.
    let file = sandbox.dir.path().join("push.json");
    let request = json!({"action": "create", "pods": [
        {"id": "web-1", "name": "web", "ip": pod.ip().to_string(), "port": pod.port()}
    ]});
    std::fs::write(&file, request.to_string()).expect("write");
    let url = agent.base_url.clone();
    let file_arg = file.display().to_string();
    let (ok, out, err) = cli(&["push", &file_arg, "--agent-url", &url]).expect("push");
    assert!(ok, "push failed: {out}{err}");
    assert_eq!(json_of(&out)["applied"], json!(["web-1"]));

    let (ok, out, _) = cli(&["pods", "--agent-url", &url]).expect("pods");
    assert!(ok);
    assert!(
        out.contains("web-1") && out.contains("http://web-staging.localhost:"),
        "{out}"
    );
    let (ok, out, _) = cli(&["pods", "--agent-url", &url, "--json"]).expect("pods json");
    assert!(ok);
    let port = json_of(&out)["pods"][0]["tunnel"]["local_port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .expect("port");
    assert_eq!(read_from(port).expect("tunnel"), "from the pod");

    let (ok, out, _) = cli(&["forward", "web-1", "off", "--agent-url", &url]).expect("forward off");
    assert!(ok);
    assert!(out.contains("stopped"), "{out}");
    assert!(refuses(port));
    let (ok, out, _) = cli(&["status", "--agent-url", &url]).expect("status");
    assert!(ok);
    assert!(
        out.contains("1 total, 0 active, 1 stopped, 0 failed"),
        "{out}"
    );
    let (ok, _, _) = cli(&["forward", "web-1", "on", "--agent-url", &url]).expect("forward on");
    assert!(ok);
    assert_eq!(read_from(port).expect("tunnel again"), "from the pod");
    // The status table: a row per pod with its port, state, connections and
    // the last minute's connect latency; the same figures as JSON.
    let (ok, out, _) = cli(&["status", "--agent-url", &url]).expect("status");
    assert!(ok);
    assert!(out.contains("ports 1/20 in use"), "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("web "))
        .unwrap_or_else(|| panic!("no row for web:\n{out}"));
    assert!(
        row.contains(&port.to_string()) && row.contains("active"),
        "{row}"
    );
    assert!(row.contains("0/2"), "two connections so far: {row}");
    assert!(row.contains(" ms"), "{row}");
    // Columns as wide as their longest cell: the state under its heading;
    // bytes in binary units, whole bytes below a KiB.
    let header = out
        .lines()
        .find(|l| l.starts_with("POD "))
        .unwrap_or_else(|| panic!("no table heading:\n{out}"));
    assert_eq!(header.find("STATE"), row.find("active"), "{header}\n{row}");
    assert!(row.contains(" B/") && !row.contains("KB"), "{row}");
    let (ok, out, _) = cli(&["status", "--agent-url", &url, "--json"]).expect("status --json");
    assert!(ok);
    let figures = json_of(&out);
    assert_eq!(figures["ports"]["used"], 1);
    assert_eq!(figures["activity"]["web-1"]["connections"], 2);

    // A second TCP port and a UDP one: a row each under the pod, and the
    // second port toggled alone.
    let metrics = greeting_server("metrics").expect("metrics server");
    let request = json!({"action": "update", "pods": [
        {"id": "web-1", "name": "web", "ip": pod.ip().to_string(), "ports": [
            pod.port(),
            {"name": "metrics", "port": metrics.port()},
            {"name": "dns", "port": 53, "protocol": "UDP"},
        ]}
    ]});
    std::fs::write(&file, request.to_string()).expect("write");
    let (ok, out, err) = cli(&["push", &file_arg, "--agent-url", &url]).expect("push");
    assert!(ok, "{out}{err}");
    let (ok, out, _) = cli(&["status", "--agent-url", &url]).expect("status");
    assert!(ok);
    assert!(out.contains("ports 2/20 in use"), "{out}");
    let metrics_row = out
        .lines()
        .find(|l| {
            l.trim_start()
                .starts_with(&format!(":{} metrics", metrics.port()))
        })
        .unwrap_or_else(|| panic!("no row for the metrics port:\n{out}"));
    assert!(metrics_row.contains("active"), "{metrics_row}");
    let dns_row = out
        .lines()
        .find(|l| l.trim_start().starts_with(":53/UDP dns"))
        .unwrap_or_else(|| panic!("no row for the UDP port:\n{out}"));
    assert!(dns_row.contains("not fwd"), "{dns_row}");
    let metrics_port: u16 = metrics_row
        .split_whitespace()
        .nth(2)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("a range port in {metrics_row}"));
    assert_eq!(read_from(metrics_port).expect("metrics tunnel"), "metrics");
    let (ok, out, err) = cli(&[
        "forward",
        "web-1",
        "off",
        "--port",
        &metrics.port().to_string(),
        "--agent-url",
        &url,
    ])
    .expect("forward one port off");
    assert!(ok, "{out}{err}");
    assert!(refuses(metrics_port), "the metrics port is off");
    assert_eq!(
        read_from(port).expect("the first port carries on"),
        "from the pod"
    );
    let (ok, out, _) = cli(&["pods", "--agent-url", &url]).expect("pods");
    assert!(ok);
    assert!(
        out.contains("metrics") && out.contains("not forwarded"),
        "{out}"
    );

    let (ok, _, err) =
        cli(&["forward", "ghost", "on", "--agent-url", &url]).expect("forward ghost");
    assert!(!ok);
    assert!(err.contains("ghost"), "{err}");

    let (ok, token, _) = cli(&["token", "--state-dir", &state]).expect("token");
    assert!(ok);
    let stored = std::fs::read_to_string(format!("{state}/token")).expect("token file");
    assert_eq!(token.trim(), stored.trim());
    assert_eq!(token.trim().len(), 64);

    // A bad push file is a clear error, and the agent is untouched.
    std::fs::write(&file, "{\"action\":").expect("write");
    let (ok, _, err) = cli(&["push", &file_arg, "--agent-url", &url]).expect("bad push");
    assert!(!ok);
    assert!(err.contains("not valid JSON"), "{err}");
    let (ok, _, err) = cli(&["status", "--agent-url", "http://127.0.0.1:1"]).expect("no agent");
    assert!(!ok);
    assert!(err.contains("cannot reach the agent"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_cleanly_and_says_so() {
    let sandbox = Sandbox::new().expect("sandbox");
    let (hosts, state) = (sandbox.hosts_str(), sandbox.state_dir());
    let reports = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let recorder = std::sync::Arc::clone(&reports);
    let app = axum::Router::new().route(
        "/api/v1/staging/status",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let recorder = std::sync::Arc::clone(&recorder);
            async move {
                recorder.lock().expect("lock").push(body);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let control_plane = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut args = sandbox.args("21040-21059", &hosts, &state);
    args.extend(["--control-plane-url", &control_plane]);
    let mut agent = AgentProcess::run(&args).expect("agent runs");
    let pod = greeting_server("hi").expect("pod");
    let agent_id = agent.agent_id().expect("agent id");
    let body = json!({"agent_id": agent_id, "action": "create", "pods": [
        {"id": "p", "name": "app", "ip": "127.0.0.1", "port": pod.port()}]});
    let (code, _) = agent.push(&body).expect("push");
    assert_eq!(code, 200);
    let port = 21040;
    assert_eq!(read_from(port).expect("tunnel"), "hi");
    assert_eq!(count_blocks(&sandbox.hosts_text()), 1);

    agent.terminate().expect("SIGTERM");
    let status = agent
        .wait_exit(Duration::from_secs(5))
        .expect("exits within 5 s");
    assert!(status.success(), "exit status {status}");
    assert!(refuses(port), "listener closed");
    assert_eq!(
        sandbox.hosts_text(),
        FOREIGN_HOSTS,
        "our block removed, the rest intact"
    );
    wait_until("the stopped report", || {
        reports
            .lock()
            .map(|r| r.iter().any(|b| b["status"] == "stopped"))
            .unwrap_or(false)
    })
    .expect("stopped report");
}

#[test]
fn kill_9_and_restart_keep_ports_toggles_and_the_hosts_file() {
    let sandbox = Sandbox::new().expect("sandbox");
    let (hosts, state) = (sandbox.hosts_str(), sandbox.state_dir());
    let args = sandbox.args("21060-21079", &hosts, &state);
    let pod = greeting_server("survivor").expect("pod");
    let mut agent = AgentProcess::run(&args).expect("agent runs");
    let agent_id = agent.agent_id().expect("agent id");
    let pods: Vec<Value> = (0..6)
        .map(|i| json!({"id": format!("p{i}"), "name": format!("app-{i}"), "ip": "127.0.0.1", "port": pod.port()}))
        .collect();
    let body = json!({"agent_id": agent_id, "action": "create", "pods": pods});
    agent.push(&body).expect("push");
    let delete = json!({"agent_id": agent_id, "action": "delete", "pods": [{"id": "p1"}]});
    agent.push(&delete).expect("delete");
    let (ok, _, _) =
        cli(&["forward", "p3", "off", "--agent-url", &agent.base_url]).expect("toggle");
    assert!(ok);
    let before = agent.get_json("/api/v1/pods/status").expect("status");

    agent.kill_hard().expect("kill -9");
    let crashed = sandbox.hosts_text();
    assert!(
        crashed.starts_with(FOREIGN_HOSTS),
        "foreign lines intact after a crash"
    );
    assert_eq!(count_blocks(&crashed), 1);

    let agent = AgentProcess::run(&args).expect("agent restarts");
    let after = agent.get_json("/api/v1/pods/status").expect("status");
    assert_eq!(after["total_redirections"], 5);
    for (id, old) in before["redirections"].as_object().expect("map") {
        let new = &after["redirections"][id];
        assert_eq!(new["local_port"], old["local_port"], "{id} kept its port");
        assert_eq!(new["forwarding"], old["forwarding"], "{id} kept its toggle");
    }
    assert_eq!(after["redirections"]["p3"]["status"], "stopped");
    let port0 = u16::try_from(
        after["redirections"]["p0"]["local_port"]
            .as_u64()
            .expect("port"),
    )
    .expect("u16");
    assert_eq!(read_from(port0).expect("tunnel back"), "survivor");
    let text = sandbox.hosts_text();
    assert!(text.starts_with(FOREIGN_HOSTS));
    assert_eq!(count_blocks(&text), 1);
    assert!(text.contains("app-5-staging.local") && !text.contains("app-1-staging.local"));
}

#[test]
fn the_demo_shows_three_working_tunnels() {
    let sandbox = Sandbox::new().expect("sandbox");
    let (hosts, state) = (sandbox.hosts_str(), sandbox.state_dir());
    let mut args = sandbox.args("21080-21099", &hosts, &state);
    args.push("--demo");
    let agent = AgentProcess::run(&args).expect("demo runs");
    let status = agent.get_json("/api/v1/pods/status").expect("status");
    assert_eq!(status["total_redirections"], 3, "{status}");
    assert_eq!(status["active_redirections"], 3);
    assert_eq!(status["demo"], true, "the demo is labelled in the status");
    for tunnel in status["redirections"].as_object().expect("map").values() {
        let port = tunnel["local_port"].as_u64().expect("port");
        let name = tunnel["staging_pod_name"].as_str().expect("name");
        let (code, page) = curl(&[&format!("http://127.0.0.1:{port}/")]).expect("page");
        assert_eq!(code, 200);
        assert!(page.contains(&format!("<h1>{name}</h1>")), "{page}");
        assert!(sandbox
            .hosts_text()
            .contains(&format!("{name}-staging.local")));
    }
    let health = agent.get_json("/health").expect("health");
    assert_eq!(health["demo"], true, "the demo is labelled in /health");
    assert!(agent.log_lines().iter().any(|l| l.contains("DEMO MODE")));
    wait_until("the demo banner", || {
        agent
            .stdout_lines()
            .iter()
            .filter(|l| l.contains("-staging.localhost:"))
            .count()
            == 3
    })
    .expect("banner lists three tunnels");
    wait_until("the stand-in control plane to take a report", || {
        agent
            .get_json("/health")
            .is_ok_and(|health| health["control_plane"]["reachable"] == true)
    })
    .expect("demo control plane reachable");
}

#[test]
fn settings_come_from_file_env_and_flags_in_that_order() {
    let sandbox = Sandbox::new().expect("sandbox");
    let (hosts, state) = (sandbox.hosts_str(), sandbox.state_dir());
    let config = sandbox.dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "agent_id = \"from-file\"\nport_range = \"21100-21119\"\nhosts_file = \"{hosts}\"\n\
             state_dir = \"{state}\"\nagent_port = 0\n"
        ),
    )
    .expect("config");
    let config_arg = config.display().to_string();
    let agent = AgentProcess::run_command(
        std::process::Command::new(k3s_local_agent_e2e::agent_binary())
            .args([
                "run",
                "--config",
                &config_arg,
                "--agent-id",
                "from-flag",
                "--no-cluster",
            ])
            .env("K3S_LOCAL_AGENT_PORT_RANGE", "21120-21139"),
    )
    .expect("agent runs");
    let health = agent.get_json("/health").expect("health");
    assert_eq!(health["agent_id"], "from-flag", "a flag beats the file");
    let pod = greeting_server("x").expect("pod");
    let body = json!({"agent_id": "from-flag", "action": "create", "pods": [
        {"id": "p", "name": "app", "ip": "127.0.0.1", "port": pod.port()}]});
    agent.push(&body).expect("push");
    let status = agent.get_json("/api/v1/pods/status").expect("status");
    assert_eq!(
        status["redirections"]["p"]["local_port"], 21120,
        "env beats the file"
    );

    // A typo in the file is named, and the agent does not start.
    std::fs::write(&config, "agent_prot = 1\n").expect("config");
    let (ok, _, err) = cli(&["run", "--config", &config_arg]).expect("bad config");
    assert!(!ok);
    assert!(err.contains("agent_prot"), "{err}");
}

#[test]
fn beyond_loopback_every_call_but_health_needs_the_token() {
    let sandbox = Sandbox::new().expect("sandbox");
    let (hosts, state) = (sandbox.hosts_str(), sandbox.state_dir());
    let mut args = sandbox.args("21140-21159", &hosts, &state);
    args.extend(["--bind", "0.0.0.0"]);
    let agent = AgentProcess::run(&args).expect("agent runs");
    let port = agent.base_url.rsplit(':').next().expect("port").to_owned();
    let url = format!("http://127.0.0.1:{port}");
    let (code, _) = curl(&[&format!("{url}/health")]).expect("health");
    assert_eq!(code, 200, "health stays open for liveness checks");
    let (code, body) = curl(&[&format!("{url}/api/v1/pods/status")]).expect("status");
    assert_eq!(code, 401);
    assert!(json_of(&body)["error"]
        .as_str()
        .expect("error")
        .contains("bearer token"));
    let token = std::fs::read_to_string(format!("{state}/token")).expect("token");
    let header = format!("Authorization: Bearer {}", token.trim());
    let (code, _) = curl(&["-H", &header, &format!("{url}/api/v1/pods/status")]).expect("status");
    assert_eq!(code, 200);
    // The CLI finds the token in the state dir by itself.
    let (ok, out, err) = cli(&["status", "--agent-url", &url, "--state-dir", &state]).expect("cli");
    assert!(ok, "{out}{err}");
    assert!(out.contains("0 total"), "{out}");
}

#[test]
fn a_control_plane_outage_is_logged_once_and_recovery_is_noticed() {
    let sandbox = Sandbox::new().expect("sandbox");
    let (hosts, state) = (sandbox.hosts_str(), sandbox.state_dir());
    // An address nothing serves yet (held, so it is still ours later).
    let (reserved, port) = k3s_local_agent_e2e::refusing_port();
    let control_plane = format!("http://127.0.0.1:{port}");
    let mut args = vec!["run"];
    args.extend(sandbox.args("21160-21179", &hosts, &state));
    args.extend([
        "--control-plane-url",
        &control_plane,
        "--sync-interval",
        "1",
    ]);
    let agent = AgentProcess::run_command(
        std::process::Command::new(k3s_local_agent_e2e::agent_binary())
            .args(&args)
            .env("RUST_LOG", "k3s_local_agent=debug"),
    )
    .expect("agent runs");
    let count = |needle: &str| {
        agent
            .log_lines()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    };
    wait_until("two retries", || count("status report failed again") >= 2).expect("retries");
    assert_eq!(
        count("control plane unreachable"),
        1,
        "one warning per outage"
    );

    // The control plane comes up: the agent notices and reports.
    reserved.listen(128).expect("control plane listens");
    k3s_local_agent_e2e::serve_control_plane(reserved.into());
    wait_until("recovery to be logged", || {
        count("control plane reachable again") == 1
    })
    .expect("recovery noticed");
    let health = agent.get_json("/health").expect("health");
    assert_eq!(health["control_plane"]["reachable"], true);
    assert!(health["control_plane"]["last_sync"].is_string());
}
