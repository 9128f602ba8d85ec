//! A restart with many pods on disk: the API listens before the pods come
//! back (its log says so in that order), and answers meanwhile, `restoring`
//! until every tunnel is back, then `healthy` with every pod.

use k3s_local_agent_e2e::{wait_until, AgentProcess, Sandbox};
use serde_json::{json, Value};

#[test]
fn the_api_listens_before_the_restore_and_says_so() {
    let sandbox = Sandbox::new().expect("sandbox");
    let (hosts, state) = (sandbox.hosts_str(), sandbox.state_dir());
    let mut args = sandbox.args("22500-22519", &hosts, &state);
    args.extend(["--name-ports", "off"]);
    let agent = AgentProcess::run(&args).expect("agent");
    let agent_id = agent.agent_id().expect("agent id");
    let pods: Vec<Value> = (0..2_000)
        .map(|i| json!({"id": format!("p{i}"), "name": format!("p{i}"), "ip": "10.1.2.3", "port": 80}))
        .collect();
    let (code, answer) = agent
        .push(&json!({"agent_id": agent_id, "action": "create", "pods": pods}))
        .expect("push");
    assert_eq!(code, 200, "{answer}");
    agent.terminate().expect("stop");
    drop(agent);

    let agent = AgentProcess::run(&args).expect("agent restarts");
    // AgentProcess returns once the API listens: it answers at once.
    let first = agent
        .get_json("/health")
        .expect("health during the restore");
    assert!(
        ["restoring", "healthy"].contains(&first["status"].as_str().unwrap_or_default()),
        "{first}"
    );
    let mut health = first;
    wait_until("every pod back", || {
        health = agent.get_json("/health").unwrap_or_default();
        health["status"] == "healthy" && health["pod_count"] == 2_000
    })
    .expect("restored");
    let log = agent.log_lines();
    let at = |needle: &str| {
        log.iter()
            .position(|line| line.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in the log:\n{}", log.join("\n")))
    };
    assert!(
        at("listening on http://") < at("restored pods from the state dir"),
        "the API listens first:\n{}",
        log.join("\n")
    );
}
