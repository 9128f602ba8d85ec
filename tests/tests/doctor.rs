//! `k3s-local-agent doctor` against a running agent: a tunnel's port taken
//! by another process is named with its pid, a control plane that is down is
//! said to be, and either makes the doctor exit non-zero; `--json` carries
//! the same checks for machines. It finds the agent as `status` does
//! (`--agent-url`, `K3S_LOCAL_AGENT_URL`, then the run settings), and when
//! what answers there is not the agent, it names the process holding the port.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};

use k3s_local_agent_e2e::{
    agent_binary, cli, greeting_server, wait_until, AgentProcess, PortSquatter, Sandbox,
};
use serde_json::{json, Value};

#[test]
fn doctor_names_who_holds_a_tunnel_port_and_a_control_plane_that_is_down() {
    let sandbox = Sandbox::new().expect("sandbox");
    let (hosts, state) = (sandbox.hosts_str(), sandbox.state_dir());
    let (_down, down_port) = k3s_local_agent_e2e::refusing_port();
    let control_plane = format!("http://127.0.0.1:{down_port}");
    let range = "21920-21939";
    let mut args = sandbox.args(range, &hosts, &state);
    args.extend([
        "--control-plane-url",
        &control_plane,
        "--sync-interval",
        "1",
    ]);
    let agent = AgentProcess::run(&args).expect("agent runs");
    let agent_id = agent.agent_id().expect("agent id");
    let pod = greeting_server("hello").expect("pod");
    let (code, _) = agent
        .push(&json!({"agent_id": agent_id, "action": "create", "pods": [
            {"id": "a", "name": "app-a", "ip": "127.0.0.1", "port": pod.port()},
            {"id": "b", "name": "app-b", "ip": "127.0.0.1", "port": pod.port()},
        ]}))
        .expect("push");
    assert_eq!(code, 200);
    let agent_port = agent.base_url.rsplit(':').next().expect("port").to_owned();
    let doctor = |extra: &[&str]| {
        let mut command = vec![
            "doctor",
            "--agent-port",
            &agent_port,
            "--state-dir",
            &state,
            "--hosts-file",
            &hosts,
            "--port-range",
            range,
            "--control-plane-url",
            &control_plane,
            "--no-cluster",
        ];
        command.extend_from_slice(extra);
        cli(&command).expect("doctor runs")
    };

    // Pod b's forwarding goes off and another program takes its port.
    let (ok, _, _) =
        cli(&["forward", "b", "off", "--agent-url", &agent.base_url]).expect("forward");
    assert!(ok);
    let status = agent.get_json("/api/v1/pods/status").expect("status");
    let port_b = status["redirections"]["b"]["local_port"]
        .as_u64()
        .expect("port")
        .to_string();
    let squatter = PortSquatter::on(port_b.parse().expect("port")).expect("squatter");
    wait_until("the control plane outage to be noticed", || {
        agent
            .get_json("/health")
            .is_ok_and(|h| h["control_plane"]["reachable"] == false)
    })
    .expect("outage noticed");

    let (ok, out, err) = doctor(&[]);
    assert!(!ok, "the doctor must fail:\n{out}{err}");
    let squatter_pid = squatter.pid().to_string();
    let tunnel_line = out
        .lines()
        .find(|l| l.starts_with("tunnel") && l.contains(" FAIL "))
        .unwrap_or_else(|| panic!("no failing tunnel line:\n{out}"));
    assert!(
        tunnel_line.contains(&format!("pid {squatter_pid} (python3)")),
        "{tunnel_line}"
    );
    assert!(tunnel_line.contains(&port_b), "{tunnel_line}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("control plane FAIL") && l.contains(&control_plane)),
        "{out}"
    );
    for healthy in ["agent        ok", "port range   ok", "open files   ok"] {
        assert!(out.contains(healthy), "missing {healthy:?}:\n{out}");
    }

    // The same, for machines.
    let (ok, out, _) = doctor(&["--json"]);
    assert!(!ok);
    let checks: Vec<Value> = serde_json::from_str(&out).expect("JSON checks");
    assert!(checks.iter().any(|c| c["name"] == "tunnel"
        && c["ok"] == false
        && c["detail"]
            .as_str()
            .is_some_and(|d| d.contains(&squatter_pid))));

    // With the port free again and the toggle back on, only the control plane fails.
    drop(squatter);
    let (ok, _, _) = cli(&["forward", "b", "on", "--agent-url", &agent.base_url]).expect("forward");
    assert!(ok);
    let (_, out, _) = doctor(&[]);
    let failing: Vec<&str> = out.lines().filter(|l| l.contains(" FAIL ")).collect();
    assert_eq!(failing.len(), 1, "{out}");
    assert!(failing[0].starts_with("control plane"), "{out}");
}

/// Runs the doctor with `env` added to its environment.
fn doctor_with_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let output = Command::new(agent_binary())
        .arg("doctor")
        .args(args)
        .env_remove("K3S_LOCAL_AGENT_URL")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("doctor runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The doctor's `agent` line.
fn agent_line(out: &str) -> &str {
    out.lines()
        .find(|l| l.starts_with("agent "))
        .unwrap_or_else(|| panic!("no agent line:\n{out}"))
}

#[test]
fn doctor_finds_the_agent_by_flag_then_environment_then_run_settings() {
    let sandbox = Sandbox::new().expect("sandbox");
    let (hosts, state) = (sandbox.hosts_str(), sandbox.state_dir());
    let range = "21940-21949";
    let args = sandbox.args(range, &hosts, &state);
    let agent = AgentProcess::run(&args).expect("agent runs");
    let agent_port = agent.base_url.rsplit(':').next().expect("port").to_owned();
    // Nothing listens here: bound, never listening.
    let (_dead, dead_port) = k3s_local_agent_e2e::refusing_port();
    let dead_port = dead_port.to_string();
    let dead_url = format!("http://127.0.0.1:{dead_port}");
    let settings = |port: &str| -> Vec<String> {
        [
            "--agent-port",
            port,
            "--state-dir",
            &state,
            "--hosts-file",
            &hosts,
            "--port-range",
            range,
            "--no-cluster",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let run = |port: &str, extra: &[&str], env: &[(&str, &str)]| {
        let mut all = settings(port);
        all.extend(extra.iter().map(|a| (*a).to_owned()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        doctor_with_env(&all, env)
    };

    // The run settings alone: the agent's port.
    let (_, out, _) = run(&agent_port, &[], &[]);
    assert!(agent_line(&out).contains("agent        ok"), "{out}");
    // The environment beats the run settings.
    let (_, out, _) = run(&dead_port, &[], &[("K3S_LOCAL_AGENT_URL", &agent.base_url)]);
    assert!(agent_line(&out).contains("agent        ok"), "{out}");
    // The flag beats the environment.
    let (ok, out, _) = run(
        &agent_port,
        &["--agent-url", &dead_url],
        &[("K3S_LOCAL_AGENT_URL", &agent.base_url)],
    );
    assert!(!ok, "{out}");
    let line = agent_line(&out);
    assert!(
        line.contains(" FAIL ") && line.contains(&dead_url),
        "the flag's address was asked: {out}"
    );
    // And the flag alone, on the agent's address, over dead run settings.
    let (_, out, _) = run(&dead_port, &["--agent-url", &agent.base_url], &[]);
    assert!(agent_line(&out).contains("agent        ok"), "{out}");
}

/// An HTTP server of this user's that is not the agent, on a port of its
/// choosing; killed on drop.
struct NotTheAgent {
    child: Child,
    port: u16,
}

impl NotTheAgent {
    fn start(dir: &std::path::Path) -> Self {
        let mut child = Command::new("python3")
            .args([
                "-c",
                "import http.server; \
                 s = http.server.HTTPServer(('127.0.0.1', 0), http.server.SimpleHTTPRequestHandler); \
                 print(s.server_address[1], flush=True); s.serve_forever()",
            ])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("the server says its port");
        let port = line.trim().parse().expect("a port");
        Self { child, port }
    }
}

impl Drop for NotTheAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn doctor_names_the_process_on_the_agents_port_when_it_is_not_the_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n").expect("hosts");
    let state = dir.path().join("state");
    let server = NotTheAgent::start(dir.path());
    let port = server.port.to_string();
    let (ok, out, err) = doctor_with_env(
        &[
            "--agent-port",
            &port,
            "--state-dir",
            state.to_str().expect("utf-8"),
            "--hosts-file",
            hosts.to_str().expect("utf-8"),
            "--control-plane-url",
            "http://127.0.0.1:9",
            "--no-cluster",
        ],
        &[],
    );
    assert!(!ok, "the doctor must fail:\n{out}{err}");
    let line = agent_line(&out);
    assert!(line.contains(" FAIL "), "{out}");
    assert!(
        line.contains(&format!("pid {} (python3)", server.child.id())),
        "the holder is named: {out}"
    );
    assert!(line.contains(&port) && line.contains("404"), "{out}");
    assert!(!line.contains("not answering"), "{out}");
}
