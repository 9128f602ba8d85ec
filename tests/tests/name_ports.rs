//! Names that work without a port: every pod on its own loopback address,
//! its names pointing there, and the pod's own port listening there. As root
//! (CI) in a private mount namespace with the agent's hosts file bound over
//! /etc/hosts, `curl http://<name>-staging.local/` reaches the pod; as an
//! unprivileged user the agent keeps the range port and says how to enable
//! the name port.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output};
use std::time::Duration;

use k3s_local_agent_e2e::{agent_binary, http_pod, wait_until, AgentProcess, FOREIGN_HOSTS};
use serde_json::{json, Value};

/// A TCP server on `addr` that greets every connection, in a thread.
fn tcp_pod(addr: SocketAddr, greeting: &'static str) {
    let listener = TcpListener::bind(addr).unwrap_or_else(|err| panic!("bind {addr}: {err}"));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let _ = stream.write_all(greeting.as_bytes());
        }
    });
}

/// Runs `program` in the agent's mount namespace (where /etc/hosts is ours).
fn in_namespace(agent: &AgentProcess, program: &[&str]) -> Output {
    Command::new("nsenter")
        .args(["--mount", "--target", &agent.pid().to_string()])
        .args(program)
        .output()
        .expect("nsenter runs")
}

fn curl_in(agent: &AgentProcess, url: &str) -> String {
    let output = in_namespace(agent, &["curl", "-s", "--max-time", "10", url]);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn resolve_in(agent: &AgentProcess, name: &str) -> Option<String> {
    let output = in_namespace(agent, &["getent", "hosts", name]);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.split_whitespace().next().map(str::to_owned)
}

/// Starts the agent as root in a private mount namespace with `hosts` bound
/// over /etc/hosts.
fn agent_in_namespace(dir: &std::path::Path, range: &str) -> AgentProcess {
    let script = format!(
        "mount --bind '{}' /etc/hosts && exec '{}' run --no-cluster --agent-port 0 --port-range {range} \
         --state-dir '{}' --hosts-file /etc/hosts",
        dir.join("hosts").display(),
        agent_binary().display(),
        dir.join("state").display()
    );
    AgentProcess::run_command(Command::new("unshare").args(["--mount", "sh", "-c", &script]))
        .expect("agent runs in its namespace (needs root, as CI has)")
}

fn redirection(agent: &AgentProcess, id: &str) -> Value {
    agent.get_json("/api/v1/pods/status").expect("status")["redirections"][id].clone()
}

fn address_of(agent: &AgentProcess, id: &str) -> String {
    redirection(agent, id)["address"]
        .as_str()
        .unwrap_or_else(|| panic!("pod {id} has no address"))
        .to_owned()
}

#[test]
fn names_reach_pods_on_their_own_ports_without_a_port_in_the_url() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("hosts"), FOREIGN_HOSTS).expect("hosts");
    // Two web pods both on port 80, and a database on 5432.
    http_pod(SocketAddr::from(([127, 0, 10, 1], 80)), "pod a");
    http_pod(SocketAddr::from(([127, 0, 10, 2], 80)), "pod b");
    tcp_pod(SocketAddr::from(([127, 0, 10, 3], 5432)), "db ready");
    let mut agent = agent_in_namespace(dir.path(), "21880-21899");
    let agent_id = agent.agent_id().expect("agent id");
    let pods = json!([
        {"id": "a", "name": "web-a", "ip": "127.0.10.1", "port": 80},
        {"id": "b", "name": "web-b", "ip": "127.0.10.2", "port": 80},
        {"id": "db", "name": "db", "ip": "127.0.10.3", "port": 5432},
    ]);
    let (code, answer) = agent
        .push(&json!({"agent_id": agent_id, "action": "create", "pods": pods}))
        .expect("push");
    assert_eq!(code, 200, "{answer}");

    // Each pod has its own address; its names point there and nowhere else.
    let addresses: Vec<String> = ["a", "b", "db"]
        .iter()
        .map(|id| address_of(&agent, id))
        .collect();
    for address in &addresses {
        // Root's own block under the default layout: 127.128.0.0/24.
        let ip: Ipv4Addr = address.parse().expect("an IPv4 address");
        assert_eq!(ip.octets()[..3], [127, 128, 0], "{address}");
    }
    assert!(addresses[0] != addresses[1] && addresses[1] != addresses[2]);
    for (name, address) in ["web-a", "web-b", "db"].iter().zip(&addresses) {
        for suffix in ["-staging.local", "-staging.localhost"] {
            let resolved = resolve_in(&agent, &format!("{name}{suffix}"));
            assert_eq!(resolved.as_ref(), Some(address), "{name}{suffix}");
        }
    }
    let a = redirection(&agent, "a");
    assert_eq!(a["name_port"], 80, "{a}");
    assert_eq!(a["name_url"], "http://web-a-staging.local/");
    assert_eq!(a["name_port_error"], Value::Null);

    // No port in the URL, two pods on the same port, each by its own name.
    assert_eq!(curl_in(&agent, "http://web-a-staging.local/"), "pod a");
    assert_eq!(curl_in(&agent, "http://web-b-staging.local/"), "pod b");
    // Any TCP client on the pod's own port.
    let db = in_namespace(
        &agent,
        &[
            "python3",
            "-c",
            "import socket; s = socket.create_connection(('db-staging.local', 5432), timeout=10); \
             print(s.recv(64).decode(), end='')",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&db.stdout), "db ready");
    // The range port still works, on localhost and by name.
    let port = a["local_port"].as_u64().expect("range port");
    assert_eq!(
        curl_in(&agent, &format!("http://127.0.0.1:{port}/")),
        "pod a"
    );
    assert_eq!(
        curl_in(&agent, &format!("http://web-a-staging.local:{port}/")),
        "pod a"
    );

    // A restart keeps every address.
    agent.terminate().expect("SIGTERM");
    agent.wait_exit(Duration::from_secs(10)).expect("exits");
    let agent = agent_in_namespace(dir.path(), "21880-21899");
    for (id, address) in ["a", "b", "db"].iter().zip(&addresses) {
        assert_eq!(&address_of(&agent, id), address, "{id} moved address");
    }
    wait_until("web-a to answer by name again", || {
        curl_in(&agent, "http://web-a-staging.local/") == "pod a"
    })
    .expect("web-a back");

    // A delete frees the pod's address and takes its names away; the others
    // keep theirs.
    let (code, _) = agent
        .push(&json!({"agent_id": agent_id, "action": "delete", "pods": [{"id": "b"}]}))
        .expect("delete");
    assert_eq!(code, 200);
    wait_until("web-b's name to go", || {
        resolve_in(&agent, "web-b-staging.local").is_none()
    })
    .expect("name gone");
    assert!(
        TcpStream::connect((addresses[1].as_str(), 80)).is_err(),
        "web-b's address still listens"
    );
    assert_eq!(
        resolve_in(&agent, "web-a-staging.local").as_ref(),
        Some(&addresses[0])
    );
    let hosts = std::fs::read_to_string(dir.path().join("hosts")).expect("hosts");
    assert!(hosts.starts_with(FOREIGN_HOSTS));
    assert!(!hosts.contains(&addresses[1]), "{hosts}");
}

#[test]
fn without_privileges_the_name_port_is_unavailable_and_says_how_to_enable_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("hosts"), FOREIGN_HOSTS).expect("hosts");
    // The unprivileged user needs to reach the binary and its files.
    let binary = dir.path().join("k3s-local-agent");
    std::fs::copy(agent_binary(), &binary).expect("copy the binary");
    let open = |path: &std::path::Path, mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    };
    open(dir.path(), 0o777);
    open(&dir.path().join("hosts"), 0o666);
    open(&binary, 0o755);
    http_pod(SocketAddr::from(([127, 0, 10, 4], 80)), "pod c");
    http_pod(SocketAddr::from(([127, 0, 10, 5], 8080)), "pod d");

    let hosts = dir.path().join("hosts");
    let state = dir.path().join("state");
    let agent = AgentProcess::run_command(
        Command::new("setpriv")
            .args([
                // Any plain uid with a block of its own (127.144.146.0/24).
                "--reuid=4242",
                "--regid=4242",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
            ])
            .arg(&binary)
            .args([
                "run",
                "--no-cluster",
                "--agent-port",
                "0",
                "--port-range",
                "21900-21919",
            ])
            .arg("--state-dir")
            .arg(&state)
            .arg("--hosts-file")
            .arg(&hosts),
    )
    .expect("the agent starts without privileges");
    let agent_id = agent.agent_id().expect("agent id");
    let (code, answer) = agent
        .push(&json!({"agent_id": agent_id, "action": "create", "pods": [
            {"id": "c", "name": "web-c", "ip": "127.0.10.4", "port": 80},
            {"id": "d", "name": "web-d", "ip": "127.0.10.5", "port": 8080},
        ]}))
        .expect("push");
    assert_eq!(code, 200, "{answer}");

    // Port 80 is privileged: the tunnel works on its range port, and the
    // name port is reported unavailable with the command that enables it.
    let c = redirection(&agent, "c");
    assert_eq!(c["status"], "active", "{c}");
    assert_eq!(c["name_port"], Value::Null, "{c}");
    assert_eq!(c["name_url"], Value::Null);
    let why = c["name_port_error"].as_str().unwrap_or_default();
    assert!(why.contains("setcap cap_net_bind_service=+ep"), "{why}");
    assert!(why.contains("ip_unprivileged_port_start"), "{why}");
    let port = c["local_port"].as_u64().expect("range port");
    let body = k3s_local_agent_e2e::curl(&[&format!("http://127.0.0.1:{port}/")])
        .expect("curl")
        .1;
    assert_eq!(body, "pod c");
    // The range port also listens on the pod's address, where its names point.
    let address = c["address"].as_str().expect("address");
    let body = k3s_local_agent_e2e::curl(&[&format!("http://{address}:{port}/")])
        .expect("curl")
        .1;
    assert_eq!(body, "pod c");
    // An unprivileged pod port works as a name port.
    let d = redirection(&agent, "d");
    assert_eq!(d["name_port"], 8080, "{d}");
    let address = d["address"].as_str().expect("address");
    let body = k3s_local_agent_e2e::curl(&[&format!("http://{address}:8080/")])
        .expect("curl")
        .1;
    assert_eq!(body, "pod d");
    // Nothing failed hard.
    assert_eq!(
        agent.get_json("/health").expect("health")["status"],
        "healthy"
    );
}
