//! The local mirror against a real cluster (Kind, k3s, any kubeconfig):
//! ignored by default, since no cluster runs on CI machines. Run with
//!
//! ```text
//! kind create cluster --name staging-cluster
//! K3S_LOCAL_AGENT_E2E_KUBECONFIG=~/.kube/config \
//!   cargo test -p k3s-local-agent-e2e --test real_cluster -- --ignored
//! ```
//!
//! (`K3S_LOCAL_AGENT_E2E_CONTEXT` picks a context other than
//! `kind-staging-cluster`.) The same scenarios run against the emulator in
//! `cluster.rs` on every CI run.

use std::time::Duration;

use k3s_local_agent_e2e::{cli, wait_until_within, AgentProcess, Sandbox};
use serde_json::json;

#[test]
#[ignore = "needs a real cluster: set K3S_LOCAL_AGENT_E2E_KUBECONFIG and pass --ignored (see README)"]
fn a_real_cluster_runs_the_mirror_and_carries_a_local_tunnel() {
    let kubeconfig = std::env::var("K3S_LOCAL_AGENT_E2E_KUBECONFIG").expect(
        "K3S_LOCAL_AGENT_E2E_KUBECONFIG names the kubeconfig of the cluster to test against",
    );
    let context = std::env::var("K3S_LOCAL_AGENT_E2E_CONTEXT")
        .unwrap_or_else(|_| "kind-staging-cluster".to_owned());
    let namespace = format!("k3s-local-agent-e2e-{}", std::process::id());
    let sandbox = Sandbox::new().expect("sandbox");
    let (hosts, state) = (sandbox.hosts_str(), sandbox.state_dir());
    let mut args = sandbox.args_with_cluster("21700-21719", &hosts, &state);
    args.extend([
        "--agent-id",
        "real-cluster-test",
        "--kubeconfig",
        &kubeconfig,
        "--kube-context",
        &context,
        "--namespace",
        &namespace,
    ]);
    let agent = AgentProcess::run(&args).expect("agent runs");
    let (ok, out, err) = cli(&[
        "doctor",
        "--kubeconfig",
        &kubeconfig,
        "--kube-context",
        &context,
        "--namespace",
        &namespace,
    ])
    .expect("doctor");
    assert!(ok, "doctor: {out}{err}");

    let push = |action: &str, pods: serde_json::Value| {
        agent
            .push(&json!({"agent_id": "real-cluster-test", "action": action, "pods": pods}))
            .expect("push")
    };
    let (code, _) = push(
        "create",
        json!([{"id": "web-1", "name": "web", "image": "nginx:alpine",
        "ip": "127.0.0.1", "port": 80}]),
    );
    assert_eq!(code, 200);
    // Pulling an image takes a while on a real cluster.
    let mut status = serde_json::Value::Null;
    wait_until_within(Duration::from_secs(180), "the mirror to run", || {
        status = agent.get_json("/api/v1/pods/status").expect("status");
        status["redirections"]["web-1"]["mirror"]["phase"] == "Running"
    })
    .unwrap_or_else(|err| panic!("{err}: {status}"));
    let (ok, _, err) =
        cli(&["target", "web-1", "local", "--agent-url", &agent.base_url]).expect("cli");
    assert!(ok, "{err}");
    let status = agent.get_json("/api/v1/pods/status").expect("status");
    let port = status["redirections"]["web-1"]["local_port"]
        .as_u64()
        .expect("port");
    let (code, page) =
        k3s_local_agent_e2e::curl(&[&format!("http://127.0.0.1:{port}/")]).expect("curl");
    assert_eq!(code, 200);
    assert!(page.contains("nginx"), "{page}");

    push("sync", json!([]));
    wait_until_within(Duration::from_secs(60), "the pods to be removed", || {
        agent.get_json("/api/v1/pods/status").expect("status")["redirections"]
            .as_object()
            .is_some_and(|r| r.is_empty())
    })
    .expect("pods removed");
    eprintln!(
        "the namespace {namespace} is left in the cluster: kubectl delete namespace {namespace}"
    );
}
