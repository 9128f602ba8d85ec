//! The local staging mirror against the Kubernetes API emulator: the agent
//! binary applies, updates, deletes and garbage-collects its mirrors (and only
//! its own), shows what the watch says of them, and rides out the cluster
//! going away. Real-cluster runs: see README ("Against a real cluster").

use std::path::PathBuf;

use k3s_local_agent_e2e::kube_emulator::KubeEmulator;
use k3s_local_agent_e2e::{
    echo_server_on, greeting_server, read_from, wait_until, AgentProcess, Sandbox,
};
use serde_json::{json, Value};

const AGENT_ID: &str = "test-agent";
const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
const AGENT_LABEL: &str = "k3s-local-agent.dev/agent";
const POD_ID: &str = "k3s-local-agent.dev/staging-pod-id";

/// Runs the agent binary against `emulator` in `namespace`.
fn start_agent(
    sandbox: &Sandbox,
    emulator: &KubeEmulator,
    namespace: &str,
    range: &str,
) -> AgentProcess {
    let kubeconfig = sandbox.dir.path().join("kubeconfig");
    emulator
        .write_kubeconfig(&kubeconfig, "kind-staging-cluster")
        .expect("kubeconfig");
    let (hosts, state) = (sandbox.hosts_str(), sandbox.state_dir());
    let kubeconfig = kubeconfig.display().to_string();
    let mut args = sandbox.args_with_cluster(range, &hosts, &state);
    args.extend([
        "--agent-id",
        AGENT_ID,
        "--kubeconfig",
        &kubeconfig,
        "--namespace",
        namespace,
    ]);
    AgentProcess::run(&args).expect("agent runs")
}

fn pod(id: &str, name: &str, image: &str, port: u16) -> Value {
    json!({"id": id, "name": name, "namespace": "staging", "image": image,
           "status": "running", "ip": "127.0.0.1", "port": port, "labels": {"app": name}})
}

fn push(agent: &AgentProcess, action: &str, pods: Value) -> (u16, Value) {
    agent
        .push(&json!({"agent_id": AGENT_ID, "action": action, "pods": pods}))
        .expect("push")
}

fn mirror_of(agent: &AgentProcess, id: &str) -> Value {
    agent.get_json("/api/v1/pods/status").expect("status")["redirections"][id]["mirror"].clone()
}

fn cluster_status(agent: &AgentProcess) -> (String, Option<String>) {
    let health = agent.get_json("/health").expect("health");
    (
        health["cluster_status"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        health["cluster_reason"].as_str().map(str::to_owned),
    )
}

fn applies_of(emulator: &KubeEmulator, namespace: &str, name: &str) -> usize {
    let wanted = format!("APPLY {namespace}/{name}");
    emulator.requests().iter().filter(|r| **r == wanted).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn mirrors_follow_pushes_with_our_labels_and_the_watch_shows_them() {
    let emulator = KubeEmulator::start().await.expect("emulator");
    let sandbox = Sandbox::new().expect("sandbox");
    let agent = start_agent(&sandbox, &emulator, "mirror-ns", "21500-21519");
    wait_until("the namespace to be created", || {
        emulator.has_namespace("mirror-ns")
    })
    .expect("namespace");
    wait_until("the cluster to be ready", || {
        cluster_status(&agent).0 == "ready"
    })
    .expect("ready");

    let upstream = greeting_server("hi").expect("pod server");
    let (code, _) = push(
        &agent,
        "create",
        json!([
            pod("web-1", "web", "nginx:1.27", upstream.port()),
            pod("api-1", "api", "ghcr.io/acme/api:2", upstream.port()),
        ]),
    );
    assert_eq!(code, 200);
    wait_until("both mirrors", || {
        emulator.pod_names("mirror-ns").len() == 2
    })
    .expect("mirrors");
    let web = emulator.pod("mirror-ns", "web").expect("web mirror");
    assert_eq!(web["metadata"]["labels"]["app"], "web");
    assert_eq!(web["metadata"]["labels"][MANAGED_BY], "k3s-local-agent");
    assert_eq!(web["metadata"]["labels"][AGENT_LABEL], AGENT_ID);
    assert_eq!(web["metadata"]["annotations"][POD_ID], "web-1");
    assert_eq!(web["spec"]["containers"][0]["image"], "nginx:1.27");

    // The watch puts the local phase, IP and restarts next to the tunnel.
    emulator.set_pod_status("mirror-ns", "web", "Running", 3);
    wait_until("the restarts to show", || {
        mirror_of(&agent, "web-1")["restarts"] == 3
    })
    .expect("watch");
    let mirror = mirror_of(&agent, "web-1");
    assert_eq!(mirror["phase"], "Running");
    assert!(
        mirror["pod_ip"]
            .as_str()
            .is_some_and(|ip| ip.starts_with("10.244.")),
        "{mirror}"
    );
    assert_eq!(mirror["name"], "web");

    // What the kubelet says of a stuck container shows as the last event.
    emulator.set_container_waiting(
        "mirror-ns",
        "api",
        "ImagePullBackOff",
        "Back-off pulling image",
    );
    wait_until("the last event to show", || {
        mirror_of(&agent, "api-1")["last_event"] == "ImagePullBackOff: Back-off pulling image"
    })
    .expect("last event");
    assert_eq!(mirror_of(&agent, "api-1")["phase"], "Pending");

    // Pushing the same pods again applies nothing: the mirror is unchanged.
    push(
        &agent,
        "update",
        json!([pod("web-1", "web", "nginx:1.27", upstream.port())]),
    );
    let (code, _) = push(
        &agent,
        "update",
        json!([pod("web-1", "web", "nginx:1.28", upstream.port())]),
    );
    assert_eq!(code, 200);
    wait_until("the new image", || {
        emulator
            .pod("mirror-ns", "web")
            .is_some_and(|p| p["spec"]["containers"][0]["image"] == "nginx:1.28")
    })
    .expect("update applied");
    assert_eq!(
        applies_of(&emulator, "mirror-ns", "web"),
        2,
        "{:?}",
        emulator.requests()
    );

    // A pod the cluster refuses shows its error on that pod only.
    push(
        &agent,
        "create",
        json!([pod("bad-1", "bad", "", upstream.port())]),
    );
    wait_until("the refusal to show", || {
        mirror_of(&agent, "bad-1")["error"]
            .as_str()
            .is_some_and(|e| e.contains("image"))
    })
    .expect("rejected pod");
    assert!(mirror_of(&agent, "web-1")["error"].is_null());
    assert_eq!(
        read_from(agent_port(&agent, "bad-1")).expect("its tunnel still works"),
        "hi"
    );

    // Delete removes the mirror; sync removes every mirror not listed.
    push(&agent, "delete", json!([{"id": "api-1"}]));
    wait_until("the api mirror to go", || {
        emulator.pod("mirror-ns", "api").is_none()
    })
    .expect("deleted");
    push(
        &agent,
        "sync",
        json!([pod("web-1", "web", "nginx:1.28", upstream.port())]),
    );
    wait_until("only web to stay", || {
        emulator.pod_names("mirror-ns") == vec!["web".to_owned()]
    })
    .expect("sync collected");
    let report_status = cluster_status(&agent);
    assert_eq!(report_status.0, "ready");
}

fn agent_port(agent: &AgentProcess, id: &str) -> u16 {
    let status = agent.get_json("/api/v1/pods/status").expect("status");
    status["redirections"][id]["local_port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .expect("port")
}

#[tokio::test(flavor = "multi_thread")]
async fn at_start_stale_mirrors_go_and_foreign_pods_stay() {
    let emulator = KubeEmulator::start().await.expect("emulator");
    emulator.create_namespace("staging");
    emulator.insert_pod(
        "staging",
        "someone-else",
        json!({"app": "theirs"}),
        json!({}),
    );
    emulator.insert_pod(
        "staging",
        "not-our-agent",
        json!({MANAGED_BY: "k3s-local-agent", AGENT_LABEL: "another-agent"}),
        json!({POD_ID: "x"}),
    );
    emulator.insert_pod(
        "staging",
        "ghost",
        json!({MANAGED_BY: "k3s-local-agent", AGENT_LABEL: AGENT_ID}),
        json!({POD_ID: "ghost-1"}),
    );
    let sandbox = Sandbox::new().expect("sandbox");
    let agent = start_agent(&sandbox, &emulator, "staging", "21520-21539");
    wait_until("the stale mirror to go", || {
        emulator.pod("staging", "ghost").is_none()
    })
    .expect("collected");
    assert!(
        emulator.pod("staging", "someone-else").is_some(),
        "a foreign pod is never touched"
    );
    assert!(
        emulator.pod("staging", "not-our-agent").is_some(),
        "another agent's mirror is never touched"
    );
    assert!(
        !emulator
            .requests()
            .iter()
            .any(|r| r.contains("someone-else") || r.contains("not-our-agent")),
        "{:?}",
        emulator.requests()
    );
    assert_eq!(cluster_status(&agent).0, "ready");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cluster_going_away_stops_nothing_and_is_caught_up() {
    let mut emulator = KubeEmulator::start().await.expect("emulator");
    let sandbox = Sandbox::new().expect("sandbox");
    let agent = start_agent(&sandbox, &emulator, "staging", "21540-21559");
    let upstream = greeting_server("still here").expect("pod server");
    push(
        &agent,
        "create",
        json!([pod("one", "one", "nginx", upstream.port())]),
    );
    wait_until("the first mirror", || {
        emulator.pod("staging", "one").is_some()
    })
    .expect("mirrored");

    emulator.stop().await;
    wait_until("the outage to show", || {
        cluster_status(&agent).0 == "unavailable"
    })
    .expect("unavailable");
    let (_, reason) = cluster_status(&agent);
    assert!(reason.is_some_and(|r| !r.is_empty()), "the status says why");
    // Everything else keeps working.
    let (code, _) = push(
        &agent,
        "create",
        json!([pod("two", "two", "nginx", upstream.port())]),
    );
    assert_eq!(code, 200);
    assert_eq!(
        read_from(agent_port(&agent, "two")).expect("tunnel"),
        "still here"
    );

    // Its history is gone too (a watch resuming from before would get 410
    // Gone): the agent lists afresh and catches up.
    emulator.compact();
    emulator.restart().await.expect("emulator back");
    wait_until("the agent to catch up", || {
        emulator.pod("staging", "two").is_some()
    })
    .expect("caught up");
    wait_until("ready again", || cluster_status(&agent).0 == "ready").expect("ready");
}

#[test]
fn without_a_cluster_the_status_says_why() {
    let sandbox = Sandbox::new().expect("sandbox");
    let kubeconfig: PathBuf = sandbox.dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: []\nusers: []\ncontexts: []\n",
    )
    .expect("kubeconfig");
    let (hosts, state) = (sandbox.hosts_str(), sandbox.state_dir());
    let kubeconfig = kubeconfig.display().to_string();
    let mut args = sandbox.args_with_cluster("21560-21579", &hosts, &state);
    args.extend(["--kubeconfig", &kubeconfig]);
    let agent = AgentProcess::run(&args).expect("agent runs");
    wait_until("the missing context to be reported", || {
        cluster_status(&agent)
            .1
            .is_some_and(|r| r.contains("kind create cluster --name staging-cluster"))
    })
    .expect("reason names the fix");
    assert_eq!(cluster_status(&agent).0, "unavailable");

    let sandbox = Sandbox::new().expect("sandbox");
    let (hosts, state) = (sandbox.hosts_str(), sandbox.state_dir());
    let mut args = sandbox.args_with_cluster("21580-21599", &hosts, &state);
    args.push("--no-cluster");
    let agent = AgentProcess::run(&args).expect("agent runs");
    assert_eq!(cluster_status(&agent), ("disabled".to_owned(), None));
}

/// Sends `payload` through a tunnel and reads the same number of bytes back.
fn round_trip(port: u16, payload: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(k3s_local_agent_e2e::DEADLINE))
        .expect("timeout");
    stream.write_all(payload).expect("write");
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back).expect("read back");
    back
}

#[tokio::test(flavor = "multi_thread")]
async fn a_local_tunnel_reaches_the_mirror_and_follows_its_replacement() {
    let emulator = KubeEmulator::start().await.expect("emulator");
    let sandbox = Sandbox::new().expect("sandbox");
    let mut agent = start_agent(&sandbox, &emulator, "staging", "21600-21619");
    let staging = greeting_server("staging pod").expect("staging stand-in");
    push(
        &agent,
        "create",
        json!([pod("web-1", "web", "nginx", staging.port())]),
    );
    wait_until("the mirror", || emulator.pod("staging", "web").is_some()).expect("mirrored");
    assert!(emulator.set_backend(
        "staging",
        "web",
        echo_server_on("127.0.0.1:0").expect("echo")
    ));
    let port = agent_port(&agent, "web-1");
    assert_eq!(read_from(port).expect("staging first"), "staging pod");

    let url = agent.base_url.clone();
    let (ok, out, err) =
        k3s_local_agent_e2e::cli(&["target", "web-1", "local", "--agent-url", &url]).expect("cli");
    assert!(ok, "{out}{err}");
    assert!(out.contains("local mirror"), "{out}");
    assert_eq!(
        agent.get_json("/api/v1/pods/status").expect("status")["redirections"]["web-1"]["target"],
        "local"
    );
    // Bytes both ways through the Kubernetes API port-forward.
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    assert_eq!(round_trip(port, &payload), payload);

    // The mirror is replaced (deleted, re-applied with a new uid): the next
    // connection reaches the new one, with no change to the listener.
    let old_uid = emulator.uid("staging", "web").expect("uid");
    emulator.delete_pod("staging", "web");
    wait_until("a new mirror", || {
        emulator
            .uid("staging", "web")
            .is_some_and(|uid| uid != old_uid)
    })
    .expect("re-applied");
    let replacement = greeting_server("the new mirror").expect("server");
    assert!(emulator.set_backend("staging", "web", replacement));
    wait_until("the new mirror to answer", || {
        read_from(port).is_ok_and(|text| text == "the new mirror")
    })
    .expect("reached the replacement");

    // The choice survives a restart.
    agent.kill_hard().expect("kill -9");
    let agent = start_agent(&sandbox, &emulator, "staging", "21600-21619");
    assert_eq!(
        agent.get_json("/api/v1/pods/status").expect("status")["redirections"]["web-1"]["target"],
        "local"
    );
    wait_until("the local tunnel after restart", || {
        read_from(port).is_ok_and(|text| text == "the new mirror")
    })
    .expect("local after restart");
    let (ok, _, _) =
        k3s_local_agent_e2e::cli(&["target", "web-1", "staging", "--agent-url", &agent.base_url])
            .expect("cli");
    assert!(ok);
    assert_eq!(read_from(port).expect("staging again"), "staging pod");
}

#[tokio::test(flavor = "multi_thread")]
async fn doctor_says_what_it_found_and_what_to_fix() {
    let emulator = KubeEmulator::start().await.expect("emulator");
    let sandbox = Sandbox::new().expect("sandbox");
    let kubeconfig = sandbox.dir.path().join("kubeconfig");
    emulator
        .write_kubeconfig(&kubeconfig, "kind-staging-cluster")
        .expect("kubeconfig");
    let kubeconfig = kubeconfig.display().to_string();
    let state = sandbox.state_dir();
    let doctor = |extra: &[&str]| {
        let mut args = vec!["doctor", "--kubeconfig", &kubeconfig, "--state-dir", &state];
        args.extend_from_slice(extra);
        k3s_local_agent_e2e::cli(&args).expect("doctor runs")
    };

    // No agent runs here, so the doctor says so (and fails on it alone).
    let (ok, out, err) = doctor(&[]);
    assert!(!ok, "{out}{err}");
    let failing: Vec<&str> = out.lines().filter(|l| l.contains(" FAIL ")).collect();
    assert!(
        failing.len() == 1
            && failing[0].starts_with("agent")
            && failing[0].contains("k3s-local-agent run"),
        "{out}"
    );
    for line in [
        "kubeconfig   ok",
        "context      ok",
        "api          ok",
        "namespace    ok",
        "permissions  ok",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    assert!(out.contains("v1.33.0-emulator"), "{out}");
    assert!(out.contains("the agent creates it"), "{out}");

    emulator.deny("delete", "pods");
    let (ok, out, _) = doctor(&[]);
    assert!(!ok, "a missing permission fails the doctor");
    assert!(
        out.contains("permissions  FAIL") && out.contains("delete pods"),
        "{out}"
    );

    let (ok, out, _) = doctor(&["--kube-context", "kind-other"]);
    assert!(!ok);
    assert!(out.contains("kind create cluster --name other"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_that_share_a_name_get_a_mirror_each_and_every_port_is_mirrored() {
    let emulator = KubeEmulator::start().await.expect("emulator");
    let sandbox = Sandbox::new().expect("sandbox");
    let agent = start_agent(&sandbox, &emulator, "shared-ns", "21180-21199");
    wait_until("the cluster to be ready", || {
        cluster_status(&agent).0 == "ready"
    })
    .expect("ready");
    let upstream = greeting_server("hi").expect("pod server");
    let port = upstream.port();
    let (code, answer) = push(
        &agent,
        "create",
        json!([
            {"id": "web-a", "name": "web", "namespace": "team-a", "image": "nginx:1",
             "ip": "127.0.0.1", "port": port},
            {"id": "web-b", "name": "web", "namespace": "team-b", "image": "nginx:1",
             "ip": "127.0.0.1", "port": port},
            {"id": "app-1", "name": "app", "namespace": "staging", "image": "app:1",
             "ip": "127.0.0.1", "ports": [
                port,
                {"name": "metrics", "port": 9090},
                {"name": "dns", "port": 53, "protocol": "UDP"},
             ]},
        ]),
    );
    assert_eq!(code, 200, "{answer}");
    wait_until("three mirrors", || {
        emulator.pod_names("shared-ns").len() == 3
    })
    .expect("mirrors");

    // Two pods named `web`: two mirrors, each with its staging id.
    let names = emulator.pod_names("shared-ns");
    let webs: Vec<&String> = names.iter().filter(|n| n.starts_with("web-")).collect();
    assert_eq!(webs.len(), 2, "{names:?}");
    let mut ids: Vec<String> = webs
        .iter()
        .filter_map(|name| emulator.pod("shared-ns", name))
        .map(|pod| {
            pod["metadata"]["annotations"][POD_ID]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, ["web-a", "web-b"]);
    for id in ["web-a", "web-b"] {
        wait_until("the mirror beside its tunnel", || {
            mirror_of(&agent, id)["name"]
                .as_str()
                .is_some_and(|name| name.starts_with("web-"))
        })
        .expect("mirror view");
    }

    // A unique name stays as it is, with all three ports, named.
    let app = emulator.pod("shared-ns", "app").expect("app mirror");
    let ports: Vec<(i64, String, String)> = app["spec"]["containers"][0]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                p["containerPort"].as_i64().unwrap_or_default(),
                p["name"].as_str().unwrap_or_default().to_owned(),
                p["protocol"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        [
            (i64::from(port), String::new(), "TCP".to_owned()),
            (9090, "metrics".to_owned(), "TCP".to_owned()),
            (53, "dns".to_owned(), "UDP".to_owned()),
        ]
    );

    // Through the mirror, every TCP port reaches its own port of it.
    let app_http = greeting_server("app http").expect("server");
    let app_metrics = greeting_server("app metrics").expect("server");
    assert!(emulator.set_port_backend("shared-ns", "app", port, app_http));
    assert!(emulator.set_port_backend("shared-ns", "app", 9090, app_metrics));
    let url = agent.base_url.clone();
    let (ok, out, err) =
        k3s_local_agent_e2e::cli(&["target", "app-1", "local", "--agent-url", &url]).expect("cli");
    assert!(ok, "{out}{err}");
    let tunnel = &agent.get_json("/api/v1/pods/status").expect("status")["redirections"]["app-1"];
    let range_of = |staging: u16| {
        tunnel["ports"]
            .as_array()
            .and_then(|ports| ports.iter().find(|p| p["staging_port"] == staging))
            .and_then(|p| p["local_port"].as_u64())
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or_else(|| panic!("port {staging} has a range port: {tunnel}"))
    };
    assert_eq!(
        read_from(range_of(port)).expect("http via mirror"),
        "app http"
    );
    assert_eq!(
        read_from(range_of(9090)).expect("metrics via mirror"),
        "app metrics"
    );
    agent.terminate().expect("stop");
}
