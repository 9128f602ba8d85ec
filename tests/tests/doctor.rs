//! `k3s-local-agent doctor` against a running agent: a tunnel's port taken
//! by another process is named with its pid, a control plane that is down is
//! said to be, and either makes the doctor exit non-zero; `--json` carries
//! the same checks for machines.

use k3s_local_agent_e2e::{cli, greeting_server, wait_until, AgentProcess, PortSquatter, Sandbox};
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
