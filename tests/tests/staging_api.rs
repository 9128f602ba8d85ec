//! Reaching staging pods through the staging cluster's API server, from the
//! built binary. A second instance of the Kubernetes API emulator plays the
//! staging cluster (the agent runs with `--no-cluster`, so no mirror cluster
//! is involved), each of its pods bridged to a test server.
//!
//! How "unroutable" is made real, per test:
//! - `api_*`, `a_replaced_*`, `credentials_*` and `doctor_*` never connect
//!   to a pod IP at all (`--staging-via api`): no network trick is needed.
//! - `auto_*` runs in a network namespace it creates (user and network
//!   namespaces, only `lo` up), where `connect` to the pod IP fails with
//!   ENETUNREACH, until the test puts that IP on `lo`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use k3s_local_agent_e2e::kube_emulator::{write_kubeconfig, KubeEmulator};
use k3s_local_agent_e2e::{
    agent_binary, cli, curl, echo_server_on, greeting_server, read_from, wait_until,
    wait_until_within, AgentProcess, Sandbox, DEADLINE,
};
use serde_json::{json, Value};

const CONTEXT: &str = "staging-ctx";
/// A GKE-style pod IP: never connected to by the `api` tests.
const POD_IP: &str = "10.0.1.100";

/// Sends `payload` and reads as many bytes back as come before the end
/// (all of them, on a good connection). No half-close: the port-forward
/// protocol carries none, so the writer just waits.
fn round_trip(port: u16, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(DEADLINE))?;
    let mut writer = stream.try_clone()?;
    let sent = payload.to_vec();
    let writing = std::thread::spawn(move || {
        let _ = writer.write_all(&sent);
    });
    let mut back = vec![0u8; payload.len()];
    let mut filled = 0;
    while filled < back.len() {
        match stream.read(&mut back[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if filled == 0 => return Err(err),
            Err(_) => break,
        }
    }
    back.truncate(filled);
    drop(stream);
    let _ = writing.join();
    Ok(back)
}

fn staging_pod(id: &str, name: &str, namespace: &str, port: u16) -> Value {
    json!({"id": id, "name": name, "namespace": namespace, "ip": POD_IP, "port": port})
}

fn push(agent: &AgentProcess, pods: Value) {
    let (code, answer) = agent
        .push(&json!({
            "agent_id": agent.agent_id().expect("agent id"),
            "action": "create",
            "pods": pods,
        }))
        .expect("push");
    assert_eq!(code, 200, "{answer}");
}

fn tunnel_of(agent: &AgentProcess, id: &str) -> Value {
    agent.get_json("/api/v1/pods/status").expect("status")["redirections"][id].clone()
}

fn range_port(agent: &AgentProcess, id: &str) -> u16 {
    let tunnel = tunnel_of(agent, id);
    tunnel["local_port"]
        .as_u64()
        .and_then(|port| u16::try_from(port).ok())
        .unwrap_or_else(|| panic!("{id} listens: {tunnel}"))
}

/// The agent with the staging context, `via`, and `extra` flags.
fn start_agent(
    sandbox: &Sandbox,
    kubeconfig: &Path,
    range: &str,
    via: &str,
    env: &[(&str, &str)],
) -> AgentProcess {
    let (hosts, state) = (sandbox.hosts_str(), sandbox.state_dir());
    let kubeconfig = kubeconfig.display().to_string();
    let mut args = sandbox.args(range, &hosts, &state);
    args.extend([
        "--staging-kube-context",
        CONTEXT,
        "--staging-kubeconfig",
        &kubeconfig,
        "--staging-via",
        via,
        "--staging-direct-retry",
        "1",
    ]);
    let mut command = Command::new(agent_binary());
    command.arg("run").args(&args);
    for (key, value) in env {
        command.env(key, value);
    }
    AgentProcess::run_command(&mut command).expect("agent runs")
}

/// The staging cluster: an emulator holding pod `team-a/name`, whose
/// port-forward reaches `backend`.
async fn staging_holding(name: &str, backend: std::net::SocketAddr) -> KubeEmulator {
    let staging = KubeEmulator::start().await.expect("staging emulator");
    staging.insert_pod("team-a", name, json!({}), json!({}));
    assert!(staging.set_backend("team-a", name, backend));
    staging
}

/// Where a test's staging kubeconfig is written.
fn staging_kubeconfig(sandbox: &Sandbox) -> std::path::PathBuf {
    sandbox.dir.path().join("staging.kubeconfig")
}

/// The agent whose staging context is `staging` (its kubeconfig written
/// into `sandbox`), on port range `range`, reaching staging pods `via`.
fn agent_of(sandbox: &Sandbox, staging: &KubeEmulator, range: &str, via: &str) -> AgentProcess {
    let kubeconfig = staging_kubeconfig(sandbox);
    staging
        .write_kubeconfig(&kubeconfig, CONTEXT)
        .expect("kubeconfig");
    start_agent(sandbox, &kubeconfig, range, via, &[])
}

#[tokio::test(flavor = "multi_thread")]
async fn api_carries_bytes_both_ways_fifty_at_once_and_a_reset_breaks_one_connection() {
    let staging = staging_holding("web", echo_server_on("127.0.0.1:0").expect("echo")).await;
    let sandbox = Sandbox::new().expect("sandbox");
    let agent = agent_of(&sandbox, &staging, "22600-22619", "api");
    push(&agent, json!([staging_pod("web-1", "web", "team-a", 8080)]));
    let tunnel = tunnel_of(&agent, "web-1");
    assert_eq!(tunnel["via"], "api", "{tunnel}");
    assert_eq!(tunnel["way"], "api");
    assert_eq!(tunnel["way_label"], "via staging API");
    let port = range_port(&agent, "web-1");

    // Bytes both ways, through the staging API.
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let back = round_trip(port, &payload).expect("round trip");
    assert!(
        back == payload,
        "{} of {} bytes came back intact",
        back.len(),
        payload.len()
    );

    // Fifty connections at once, each its own stream.
    let workers: Vec<_> = (0..50u8)
        .map(|n| {
            std::thread::spawn(move || {
                let payload = vec![n; 20_000];
                round_trip(port, &payload).map(|back| back == payload)
            })
        })
        .collect();
    for worker in workers {
        assert!(
            worker.join().expect("worker").expect("round trip"),
            "bytes intact"
        );
    }

    // They shared SPDY sessions (at most 32 connections each), rather
    // than paying an upgrade apiece: 51 connections, at most 3 sessions.
    let sessions = staging.spdy_sessions();
    assert!(
        (1..=3).contains(&sessions),
        "{sessions} SPDY sessions for 51 connections"
    );

    // A stream reset mid-transfer breaks that one connection: one opened
    // before it carries on, and the listener takes new ones.
    let mut before = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    before.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let ping = |stream: &mut TcpStream, what: &str| {
        stream.write_all(b"ping").expect(what);
        let mut answer = [0u8; 4];
        stream.read_exact(&mut answer).expect(what);
        assert_eq!(&answer, b"ping", "{what}");
    };
    ping(&mut before, "the connection opened before the reset");
    staging.cut_next_stream_after(100_000);
    let big = vec![7u8; 1_000_000];
    let cut = round_trip(port, &big).unwrap_or_default();
    assert!(
        cut.len() < big.len(),
        "the cut connection ended early ({} bytes)",
        cut.len()
    );
    ping(&mut before, "the earlier connection, after another's reset");
    assert_eq!(
        round_trip(port, b"after").expect("a new connection"),
        b"after"
    );
    let tunnel = tunnel_of(&agent, "web-1");
    assert_eq!(tunnel["status"], "active", "{tunnel}");
    drop(before);
    // Every connection ends once its client has gone: none is left
    // holding the pod's connection.
    wait_until("every connection through the API to end", || {
        tunnel_of(&agent, "web-1")["open_connections"] == 0
    })
    .expect("no stream left open");

    // A pod whose port refuses: the tunnel says so, as its current error.
    staging.insert_pod("team-a", "down", json!({}), json!({}));
    push(
        &agent,
        json!([staging_pod("down-1", "down", "team-a", 8080)]),
    );
    let down = range_port(&agent, "down-1");
    let _ = read_from(down);
    wait_until("the refusal in the status", || {
        tunnel_of(&agent, "down-1")["error"]
            .as_str()
            .is_some_and(|error| error.contains("connection refused"))
    })
    .expect("a refused pod port is the tunnel's error");

    // The way shows in /metrics and in the CLI.
    let metrics = reqwest::get(agent.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains(
            "k3s_local_agent_tunnel_way{pod_id=\"web-1\",pod=\"web\",port=\"8080\",way=\"api\"} 1"
        ),
        "{metrics}"
    );
    let (ok, out, err) = cli(&["pods", "--agent-url", &agent.base_url]).expect("pods");
    assert!(ok, "{err}");
    assert!(out.contains("team-a/web:8080 via staging API"), "{out}");
    agent.terminate().expect("stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replaced_pod_gets_a_clear_404_and_the_listener_stays() {
    let staging = staging_holding("api", greeting_server("first").expect("server")).await;
    let sandbox = Sandbox::new().expect("sandbox");
    let agent = agent_of(&sandbox, &staging, "22620-22639", "api");
    push(&agent, json!([staging_pod("api-1", "api", "team-a", 9000)]));
    let port = range_port(&agent, "api-1");
    assert_eq!(read_from(port).expect("first"), "first");

    // The pod is replaced in staging: the connection fails with the reason.
    staging.delete_pod("team-a", "api");
    wait_until("the reason in the status", || {
        let _ = read_from(port);
        tunnel_of(&agent, "api-1")["error"]
            .as_str()
            .is_some_and(|error| error.contains("team-a/api is not in the staging cluster"))
    })
    .expect("a clear 404");
    assert_eq!(tunnel_of(&agent, "api-1")["status"], "active");
    // The new pod comes (the control plane would push it): same listener.
    staging.insert_pod("team-a", "api", json!({}), json!({}));
    assert!(staging.set_backend("team-a", "api", greeting_server("second").expect("server")));
    wait_until("the listener reaching the new pod", || {
        read_from(port).is_ok_and(|text| text == "second")
    })
    .expect("same port, new pod");
    agent.terminate().expect("stop");
}

/// Writes an executable file.
fn write_script(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_come_from_an_exec_plugin_on_the_login_path_and_are_refreshed() {
    let mut staging = KubeEmulator::start().await.expect("staging emulator");
    staging.insert_pod("team-a", "web", json!({}), json!({}));
    assert!(staging.set_backend(
        "team-a",
        "web",
        greeting_server("signed in").expect("server")
    ));
    staging.accept_only_tokens(&["tok-alpha"]);
    let sandbox = Sandbox::new().expect("sandbox");
    let root = sandbox.dir.path();
    // The plugin lives where only a login shell's profile looks.
    let tools = root.join("tools/bin");
    let home = root.join("home");
    std::fs::create_dir_all(&tools).expect("tools");
    std::fs::create_dir_all(&home).expect("home");
    std::fs::write(
        home.join(".profile"),
        format!("PATH=\"{}:$PATH\"\nexport PATH\n", tools.display()),
    )
    .expect("profile");
    // The identity provider's current secret: the plugin's token is made
    // from it, and expires a minute and a second after it is issued (kube
    // asks again when less than a minute is left: here, after a second).
    let secret = root.join("secret");
    std::fs::write(&secret, "alpha").expect("secret");
    write_script(
        &tools.join("staging-auth"),
        &format!(
            "#!/bin/sh\n\
             expires=$(date -u -d '+61 seconds' +%Y-%m-%dT%H:%M:%SZ)\n\
             printf '{{\"apiVersion\":\"client.authentication.k8s.io/v1\",\"kind\":\"ExecCredential\",\
             \"status\":{{\"token\":\"tok-%s\",\"expirationTimestamp\":\"%s\"}}}}' \"$(cat '{secret}')\" \"$expires\"\n",
            secret = secret.display()
        ),
    );
    let kubeconfig = root.join("staging.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: staging\n  cluster:\n    server: {}\n\
             users:\n- name: dev\n  user:\n    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      \
             command: staging-auth\n      interactiveMode: Never\n\
             contexts:\n- name: {CONTEXT}\n  context:\n    cluster: staging\n    user: dev\n\
             current-context: {CONTEXT}\n",
            staging.url()
        ),
    )
    .expect("kubeconfig");
    let home_text = home.display().to_string();
    // A bare PATH, as a desktop menu gives: the plugin is not on it.
    let agent = start_agent(
        &sandbox,
        &kubeconfig,
        "22640-22659",
        "api",
        &[
            ("PATH", "/usr/bin:/bin"),
            ("HOME", &home_text),
            ("SHELL", "/bin/sh"),
        ],
    );
    push(&agent, json!([staging_pod("web-1", "web", "team-a", 80)]));
    let port = range_port(&agent, "web-1");
    assert_eq!(read_from(port).expect("through the API"), "signed in");
    assert!(staging.tokens_seen().contains(&"tok-alpha".to_owned()));

    // The token expires and a new one is issued, and the API server
    // restarts, ending the session the connections shared: the agent,
    // never restarted, asks the plugin again for the next session.
    std::fs::write(&secret, "beta").expect("secret");
    staging.accept_only_tokens(&["tok-beta"]);
    staging.stop().await;
    staging.restart().await.expect("the API server back");
    wait_until_within(Duration::from_secs(30), "a refreshed token", || {
        read_from(port).is_ok_and(|text| text == "signed in")
            && staging.tokens_seen().contains(&"tok-beta".to_owned())
    })
    .unwrap_or_else(|err| {
        panic!(
            "refreshed without a restart: {err}; tokens seen {:?}; agent log:\n{}",
            staging.tokens_seen(),
            agent.log_lines().join("\n")
        )
    });
    assert!(staging.tokens_seen().contains(&"tok-beta".to_owned()));
    agent.terminate().expect("stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn doctor_reports_the_staging_cluster_allowed_and_forbidden() {
    let staging = KubeEmulator::start().await.expect("staging emulator");
    staging.deny_in("create", "pods/portforward", "team-b");
    let sandbox = Sandbox::new().expect("sandbox");
    let agent = agent_of(&sandbox, &staging, "22660-22679", "api");
    push(
        &agent,
        json!([
            staging_pod("a-1", "a", "team-a", 80),
            staging_pod("b-1", "b", "team-b", 80)
        ]),
    );
    let port = agent.base_url.rsplit(':').next().expect("port").to_owned();
    let (hosts, state) = (sandbox.hosts_str(), sandbox.state_dir());
    let kubeconfig_text = staging_kubeconfig(&sandbox).display().to_string();
    // `doctor` for this agent, with the staging context `context`.
    let doctor = |context: &str, more: &[&str]| {
        let mut args = vec![
            "doctor",
            "--agent-port",
            &port,
            "--hosts-file",
            &hosts,
            "--state-dir",
            &state,
            "--no-cluster",
            "--staging-kube-context",
            context,
            "--staging-kubeconfig",
            &kubeconfig_text,
        ];
        args.extend_from_slice(more);
        cli(&args).expect("doctor")
    };
    let (_, out, err) = doctor(CONTEXT, &["--staging-via", "api", "--json"]);
    let checks: Vec<Value> =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    let find = |name: &str, text: &str| {
        checks
            .iter()
            .find(|c| c["name"] == name && c["detail"].as_str().is_some_and(|d| d.contains(text)))
            .unwrap_or_else(|| panic!("no {name} check saying {text:?}: {checks:#?}"))
            .clone()
    };
    assert_eq!(find("staging", CONTEXT)["ok"], true);
    // The way each pod goes, counted.
    assert_eq!(find("tunnels", "2 via staging API")["ok"], true);
    assert_eq!(find("staging api", "reachable")["ok"], true);
    assert_eq!(find("port-forward", "allowed in team-a")["ok"], true);
    let forbidden = find("port-forward", "forbidden in team-b");
    assert_eq!(forbidden["ok"], false);
    assert!(
        forbidden["detail"]
            .as_str()
            .is_some_and(|d| d.contains("pods/portforward")),
        "the fix is named: {forbidden}"
    );

    // A context that is not there: said, with the fix.
    let (ok, out, _) = doctor("nope", &[]);
    assert!(!ok);
    assert!(
        out.contains("\"nope\" is not in") && out.contains("--staging-kube-context"),
        "{out}"
    );
    agent.terminate().expect("stop");
}

/// Runs this test's body in a network namespace of its own (user and
/// network namespaces, only `lo` up): true in there, false in the parent,
/// which waits for the child and fails with it.
fn in_private_network(test: &str) -> bool {
    if std::env::var_os("K3S_LOCAL_AGENT_TEST_NETNS").is_some() {
        return true;
    }
    let exe = std::env::current_exe().expect("test binary");
    let output = Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "--", "sh", "-c"])
        .arg("ip link set lo up && exec \"$0\" \"$@\"")
        .arg(&exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("K3S_LOCAL_AGENT_TEST_NETNS", "1")
        .output()
        .expect("unshare runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "in its network namespace:\n{text}");
    assert!(text.contains("1 passed"), "the test ran in there:\n{text}");
    false
}

#[test]
fn auto_falls_back_to_the_api_when_the_pod_ip_is_unroutable_and_comes_back() {
    if !in_private_network(
        "auto_falls_back_to_the_api_when_the_pod_ip_is_unroutable_and_comes_back",
    ) {
        return;
    }
    // In here only `lo` is up: 10.0.1.100 has no route (ENETUNREACH).
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let staging = runtime.block_on(staging_holding(
        "web",
        greeting_server("via api").expect("server"),
    ));
    // The pod itself, on every address of this namespace: reached directly
    // once its IP is routable.
    let direct = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
    let pod_port = direct.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in direct.incoming() {
            let Ok(mut stream) = stream else { return };
            let _ = stream.write_all(b"direct");
        }
    });
    let sandbox = Sandbox::new().expect("sandbox");
    let agent = agent_of(&sandbox, &staging, "22680-22699", "auto");
    push(
        &agent,
        json!([staging_pod("web-1", "web", "team-a", pod_port)]),
    );
    let port = range_port(&agent, "web-1");
    assert_eq!(tunnel_of(&agent, "web-1")["via"], "auto");

    assert_eq!(read_from(port).expect("fell back"), "via api");
    assert_eq!(tunnel_of(&agent, "web-1")["way"], "api", "remembered");
    assert_eq!(read_from(port).expect("again"), "via api");

    // The pod IP becomes routable (on lo here): direct again, once tried.
    let added = Command::new("ip")
        .args(["addr", "add", &format!("{POD_IP}/32"), "dev", "lo"])
        .status()
        .expect("ip runs");
    assert!(added.success());
    wait_until("direct again", || {
        read_from(port).is_ok_and(|text| text == "direct")
    })
    .expect("back to direct");
    assert_eq!(tunnel_of(&agent, "web-1")["way"], "direct");
    assert_eq!(
        tunnel_of(&agent, "web-1")["way_label"],
        "via staging (direct)"
    );
    agent.terminate().expect("stop");
}

/// One agent, two clusters from one kubeconfig, as a developer has them: a
/// local mirror cluster (Kind's context, the agent's default) and the staging cluster (a
/// context of its own), each an emulator instance. A pod is reached three
/// ways in turn and each way is what answers: through the staging API,
/// through its local mirror, and straight to its IP. No pod IP is dialled
/// but loopback ones (`api` for the unroutable one), so no network trick.
#[tokio::test(flavor = "multi_thread")]
async fn the_staging_cluster_runs_beside_the_mirror_cluster_and_each_way_is_the_one_answering() {
    let mirror = KubeEmulator::start().await.expect("mirror emulator");
    let staging = KubeEmulator::start().await.expect("staging emulator");
    staging.insert_pod("team-a", "web", json!({"app": "web"}), json!({}));
    assert!(staging.set_backend(
        "team-a",
        "web",
        greeting_server("staging, through its API").expect("server")
    ));
    let sandbox = Sandbox::new().expect("sandbox");
    let kubeconfig = sandbox.dir.path().join("config");
    write_kubeconfig(
        &kubeconfig,
        &[(&mirror, "kind-staging-cluster"), (&staging, CONTEXT)],
    )
    .expect("kubeconfig");
    let kubeconfig = kubeconfig.display().to_string();
    let (hosts, state) = (sandbox.hosts_str(), sandbox.state_dir());
    let mut args = sandbox.args_with_cluster("22680-22699", &hosts, &state);
    args.extend([
        "--kubeconfig",
        &kubeconfig,
        "--namespace",
        "mirror-ns",
        "--staging-kubeconfig",
        &kubeconfig,
        "--staging-kube-context",
        CONTEXT,
        "--staging-via",
        "api",
    ]);
    let agent = AgentProcess::run(&args).expect("agent runs");
    let direct = greeting_server("staging, straight to its IP").expect("server");
    push(
        &agent,
        json!([
            {"id": "web-1", "name": "web", "namespace": "team-a", "image": "nginx",
             "status": "running", "ip": POD_IP, "port": 8080},
            {"id": "docs-1", "name": "docs", "namespace": "team-a", "image": "nginx",
             "status": "running", "ip": "127.0.0.1", "port": direct.port()},
        ]),
    );
    // Each cluster gets what is its own: the mirrors go to the local one,
    // and nothing is created in the staging one.
    wait_until("both mirrors in the local cluster", || {
        mirror.pod_names("mirror-ns") == vec!["docs".to_owned(), "web".to_owned()]
    })
    .expect("mirrored");
    assert!(mirror.set_backend(
        "mirror-ns",
        "web",
        greeting_server("the local mirror").expect("server")
    ));
    assert!(
        staging.requests().is_empty(),
        "the staging cluster is only read: {:?}",
        staging.requests()
    );

    let web = range_port(&agent, "web-1");
    let docs = range_port(&agent, "docs-1");
    let way_of = |id: &str| tunnel_of(&agent, id)["way_label"].clone();
    assert_eq!(read_from(web).expect("web"), "staging, through its API");
    assert_eq!(way_of("web-1"), "via staging API");

    // To the local mirror, through the local cluster's port-forward.
    let url = agent.base_url.clone();
    let (ok, out, err) = cli(&["target", "web-1", "local", "--agent-url", &url]).expect("cli");
    assert!(ok, "{out}{err}");
    assert_eq!(read_from(web).expect("web"), "the local mirror");
    assert_eq!(way_of("web-1"), "via mirror");

    // Back to staging, the pod alone switched to its IP: docs, routable
    // here, goes straight there while web still goes through the API.
    let (ok, out, err) = cli(&[
        "target",
        "docs-1",
        "staging",
        "--via",
        "direct",
        "--agent-url",
        &url,
    ])
    .expect("cli");
    assert!(ok, "{out}{err}");
    assert_eq!(
        read_from(docs).expect("docs"),
        "staging, straight to its IP"
    );
    assert_eq!(way_of("docs-1"), "via staging (direct)");
    let (ok, out, err) = cli(&["target", "web-1", "staging", "--agent-url", &url]).expect("cli");
    assert!(ok, "{out}{err}");
    assert_eq!(read_from(web).expect("web"), "staging, through its API");
    assert_eq!(way_of("web-1"), "via staging API");

    // The status names both clusters' parts at once.
    let (ok, out, err) = cli(&["pods", "--agent-url", &url]).expect("pods");
    assert!(ok, "{err}");
    assert!(out.contains("via staging API"), "{out}");
    assert!(out.contains("via staging (direct)"), "{out}");
    agent.terminate().expect("stop");
}

/// An API server behind a proxy that passes WebSockets but not SPDY: the
/// first refusal switches the agent to a WebSocket per connection, and
/// nothing the user sees changes. No pod IP is dialled (`api`).
#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_refuses_spdy_is_reached_by_websocket() {
    let staging = staging_holding("web", echo_server_on("127.0.0.1:0").expect("echo")).await;
    staging.refuse_spdy();
    let sandbox = Sandbox::new().expect("sandbox");
    let agent = agent_of(&sandbox, &staging, "22700-22719", "api");
    push(&agent, json!([staging_pod("web-1", "web", "team-a", 8080)]));
    let port = range_port(&agent, "web-1");
    for round in 0..3u8 {
        let payload = vec![round; 50_000];
        assert_eq!(
            round_trip(port, &payload).expect("round trip"),
            payload,
            "connection {round}"
        );
    }
    assert_eq!(staging.spdy_sessions(), 0, "no SPDY session was upgraded");
    let tunnel = tunnel_of(&agent, "web-1");
    assert_eq!(tunnel["status"], "active", "{tunnel}");
    assert_eq!(tunnel["way_label"], "via staging API");
    assert!(
        agent
            .log_lines()
            .iter()
            .any(|line| line.contains("refused SPDY")),
        "the switch is logged"
    );
    agent.terminate().expect("stop");
}

/// A pod replaced under its own name (a StatefulSet's): once the control
/// plane pushes it with its new IP, the very next connection reaches it,
/// on a session of its own rather than the old pod's. `api` only: no pod
/// IP is dialled.
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_replaced_under_its_name_is_reached_at_once_after_the_push() {
    let staging = staging_holding("db-0", greeting_server("old").expect("server")).await;
    let sandbox = Sandbox::new().expect("sandbox");
    let agent = agent_of(&sandbox, &staging, "22720-22739", "api");
    push(&agent, json!([staging_pod("db-0", "db-0", "team-a", 5432)]));
    let port = range_port(&agent, "db-0");
    assert_eq!(read_from(port).expect("the old pod"), "old");

    staging.delete_pod("team-a", "db-0");
    staging.insert_pod("team-a", "db-0", json!({}), json!({}));
    assert!(staging.set_backend("team-a", "db-0", greeting_server("new").expect("server")));
    let (code, answer) = agent
        .push(&json!({
            "agent_id": agent.agent_id().expect("agent id"),
            "action": "update",
            "pods": [{"id": "db-0", "name": "db-0", "namespace": "team-a",
                      "ip": "10.0.1.101", "port": 5432}],
        }))
        .expect("push");
    assert_eq!(code, 200, "{answer}");
    assert_eq!(
        read_from(port).expect("the first connection after the push"),
        "new"
    );
    assert_eq!(staging.spdy_sessions(), 2, "one session per pod");
    agent.terminate().expect("stop");
}

/// A kubeconfig whose only user gets its credentials from `command`.
fn exec_kubeconfig(path: &Path, staging: &KubeEmulator, command: &str) {
    std::fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: staging\n  cluster:\n    server: {}\n\
             users:\n- name: dev\n  user:\n    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      \
             command: {command}\n      interactiveMode: Never\n\
             contexts:\n- name: {CONTEXT}\n  context:\n    cluster: staging\n    user: dev\n\
             current-context: {CONTEXT}\n",
            staging.url()
        ),
    )
    .expect("kubeconfig");
}

/// The lines of a file the test's scripts append to (none yet: empty).
fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Whether process `pid` still runs (a zombie waiting for its parent to
/// reap it runs no more).
fn alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// `doctor --json` for `agent`'s staging context, killed if it takes more
/// than `limit`: (its checks, how long it took).
fn doctor_within(
    agent: &AgentProcess,
    sandbox: &Sandbox,
    kubeconfig: &Path,
    env: &[(&str, &str)],
    limit: Duration,
) -> (Vec<Value>, Duration) {
    let port = agent.base_url.rsplit(':').next().expect("port").to_owned();
    let (hosts, state) = (sandbox.hosts_str(), sandbox.state_dir());
    let kubeconfig = kubeconfig.display().to_string();
    let mut command = Command::new(agent_binary());
    command
        .args([
            "doctor",
            "--agent-port",
            &port,
            "--hosts-file",
            &hosts,
            "--state-dir",
            &state,
            "--no-cluster",
            "--staging-kube-context",
            CONTEXT,
            "--staging-kubeconfig",
            &kubeconfig,
            "--json",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    let started = std::time::Instant::now();
    let mut child = command.spawn().expect("doctor runs");
    let mut stdout = child.stdout.take().expect("stdout");
    let reading = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let finished = wait_until_within(limit, "doctor to finish", || {
        child.try_wait().ok().flatten().is_some()
    });
    if finished.is_err() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("doctor still running after {limit:?}");
    }
    let took = started.elapsed();
    let out = reading.join().expect("doctor's output");
    let checks = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    (checks, took)
}

/// The detail of the check `name` in `checks`, and whether it passed.
fn check_of(checks: &[Value], name: &str) -> (bool, String) {
    let check = checks
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} check: {checks:#?}"));
    (
        check["ok"].as_bool().unwrap_or(true),
        check["detail"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_from_a_plugin_that_never_answers_hold_neither_the_api_nor_the_exit() {
    let staging = staging_holding("web", greeting_server("signed in").expect("server")).await;
    let sandbox = Sandbox::new().expect("sandbox");
    let root = sandbox.dir.path();
    let home = root.join("home");
    std::fs::create_dir_all(&home).expect("home");
    // The plugin waits for a login that never comes, with a helper of its
    // own holding its output open; each run notes both processes' ids.
    let runs = root.join("plugin-runs");
    let plugin = root.join("hanging-auth");
    write_script(
        &plugin,
        &format!(
            "#!/bin/sh\nsleep 1000 &\necho \"$$ $!\" >> '{}'\nwait\n",
            runs.display()
        ),
    );
    let kubeconfig = staging_kubeconfig(&sandbox);
    exec_kubeconfig(&kubeconfig, &staging, &plugin.display().to_string());
    let home_text = home.display().to_string();
    let env = [
        ("HOME", home_text.as_str()),
        ("SHELL", "/bin/sh"),
        // One runtime worker and one forwarding thread: a plugin run on
        // either would stop everything on it.
        ("TOKIO_WORKER_THREADS", "1"),
        ("K3S_LOCAL_AGENT_FORWARD_THREADS", "1"),
    ];
    let mut agent = start_agent(&sandbox, &kubeconfig, "22740-22759", "api", &env);
    wait_until("the plugin to start", || !lines_of(&runs).is_empty()).expect("plugin started");

    // While it hangs, the API answers at once, every time.
    for _ in 0..5 {
        let started = std::time::Instant::now();
        let (code, body) = curl(&["--max-time", "2", &agent.url("/health")]).expect("curl runs");
        assert_eq!(code, 200, "/health while the plugin hangs: {body}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    push(&agent, json!([staging_pod("web-1", "web", "team-a", 80)]));
    let port = range_port(&agent, "web-1");
    // A connection meanwhile waits for the plugin's deadline at most, then
    // ends without the pod's bytes.
    let started = std::time::Instant::now();
    let answer = read_from(port).unwrap_or_default();
    assert_ne!(answer, "signed in");
    assert!(
        started.elapsed() < Duration::from_secs(18),
        "{:?}",
        started.elapsed()
    );

    // After its deadline: said in /health, and the plugin is gone with
    // the helper it started.
    let problem = || {
        agent
            .get_json("/health")
            .ok()
            .and_then(|health| health["staging"]["problem"].as_str().map(str::to_owned))
    };
    wait_until_within(Duration::from_secs(30), "health to name the plugin", || {
        problem().is_some_and(|p| p.contains("credential plugin did not answer in 10 s"))
    })
    .unwrap_or_else(|err| panic!("{err}: {:?}", problem()));
    let first: Vec<String> = lines_of(&runs)[0]
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(first.len(), 2, "{first:?}");
    wait_until("the timed-out plugin and its helper to be killed", || {
        first.iter().all(|pid| !alive(pid))
    })
    .expect("killed with its process group");

    // doctor says so too, and itself gives up on the plugin in time.
    let (checks, took) = doctor_within(
        &agent,
        &sandbox,
        &kubeconfig,
        &env[..2],
        Duration::from_secs(40),
    );
    assert!(took < Duration::from_secs(30), "doctor took {took:?}");
    let (ok, detail) = check_of(&checks, "credentials");
    assert!(
        !ok && detail.contains("credential plugin did not answer in 10 s"),
        "{detail}"
    );
    let (ok, detail) = check_of(&checks, "staging now");
    assert!(
        !ok && detail.contains("credential plugin did not answer in 10 s"),
        "{detail}"
    );

    // A connection starts the plugin again (its backoff is over); the
    // agent told to stop meanwhile exits at once and kills it.
    let before = lines_of(&runs).len();
    std::thread::spawn(move || {
        let _ = read_from(port);
    });
    wait_until("the plugin to run again", || lines_of(&runs).len() > before).expect("a new run");
    let last: Vec<String> = lines_of(&runs)
        .last()
        .map(|line| line.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    assert!(last.iter().all(|pid| alive(pid)), "{last:?} runs");
    agent.terminate().expect("SIGTERM");
    let exit = agent.wait_exit(Duration::from_secs(8));
    assert!(
        exit.is_ok(),
        "the agent did not exit on SIGTERM: {exit:?}; its log:\n{}",
        agent.log_lines().join("\n")
    );
    wait_until("the running plugin and its helper to be killed", || {
        last.iter().all(|pid| !alive(pid))
    })
    .expect("killed as the agent stopped");
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_refused_are_not_asked_for_again_per_connection() {
    let staging = staging_holding("web", greeting_server("signed in").expect("server")).await;
    // The plugin's token is not (yet) one the API server takes: 401.
    staging.accept_only_tokens(&["tok-other"]);
    let sandbox = Sandbox::new().expect("sandbox");
    let root = sandbox.dir.path();
    let (tools, home) = (root.join("tools/bin"), root.join("home"));
    std::fs::create_dir_all(&tools).expect("tools");
    std::fs::create_dir_all(&home).expect("home");
    std::fs::write(
        home.join(".profile"),
        format!("PATH=\"{}:$PATH\"\nexport PATH\n", tools.display()),
    )
    .expect("profile");
    // Every login shell and every plugin run leaves a line.
    let (shells, runs) = (root.join("shell-runs"), root.join("plugin-runs"));
    let shell = root.join("login-shell");
    write_script(
        &shell,
        &format!(
            "#!/bin/sh\necho run >> '{}'\nexec /bin/sh \"$@\"\n",
            shells.display()
        ),
    );
    write_script(
        &tools.join("staging-auth"),
        &format!(
            "#!/bin/sh\necho run >> '{}'\n\
             printf '{{\"apiVersion\":\"client.authentication.k8s.io/v1\",\"kind\":\"ExecCredential\",\
             \"status\":{{\"token\":\"tok-stale\"}}}}'\n",
            runs.display()
        ),
    );
    let kubeconfig = staging_kubeconfig(&sandbox);
    exec_kubeconfig(&kubeconfig, &staging, "staging-auth");
    let (home_text, shell_text) = (home.display().to_string(), shell.display().to_string());
    let agent = start_agent(
        &sandbox,
        &kubeconfig,
        "22760-22779",
        "api",
        &[
            ("PATH", "/usr/bin:/bin"),
            ("HOME", &home_text),
            ("SHELL", &shell_text),
        ],
    );
    push(&agent, json!([staging_pod("web-1", "web", "team-a", 80)]));
    let port = range_port(&agent, "web-1");
    wait_until("the client to be built", || !lines_of(&runs).is_empty()).expect("built");

    // Ten connections, each refused: the credentials are not read again
    // for each (a login shell and the plugins apiece), but backed off.
    let started = std::time::Instant::now();
    for n in 0..10 {
        let answer = read_from(port).unwrap_or_default();
        assert_ne!(answer, "signed in", "connection {n}");
    }
    let took = started.elapsed();
    let (shell_runs, plugin_runs) = (lines_of(&shells).len(), lines_of(&runs).len());
    assert!(
        shell_runs <= 1,
        "{shell_runs} login shells for 10 connections"
    );
    assert!(
        plugin_runs <= 1 + usize::try_from(took.as_secs() / 5).unwrap_or(usize::MAX),
        "{plugin_runs} plugin runs for 10 connections in {took:?}"
    );
    let staging_health = agent.get_json("/health").expect("health")["staging"].clone();
    assert_eq!(staging_health["status"], "unavailable", "{staging_health}");
    assert!(
        staging_health["problem"]
            .as_str()
            .is_some_and(|p| p.contains("credentials refused")),
        "{staging_health}"
    );

    // Once the API server takes the token, a connection after the backoff
    // gets through, with no login shell run again, and health clears.
    staging.accept_only_tokens(&["tok-stale"]);
    wait_until_within(Duration::from_secs(30), "a connection through", || {
        read_from(port).is_ok_and(|text| text == "signed in")
    })
    .unwrap_or_else(|err| panic!("{err}; agent log:\n{}", agent.log_lines().join("\n")));
    assert!(lines_of(&shells).len() <= 1, "{:?}", lines_of(&shells));
    let staging_health = agent.get_json("/health").expect("health")["staging"].clone();
    assert_eq!(staging_health["status"], "ready", "{staging_health}");
    assert!(staging_health.get("problem").is_none(), "{staging_health}");
    agent.terminate().expect("stop");
}
