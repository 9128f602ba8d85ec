//! No local user can take another user's pod names. Two plain users (uids
//! 4300 and 4301; `setpriv` needs no account) share the machine: the victim
//! runs the agent with the capable bind helper and the NSS module on the
//! hosts line, the attacker does what the attack did.
//!
//! 1. The attacker asks the helper for port 80 on the victim's pod address:
//!    refused, it is another user's block; the attacker's own bind of it
//!    needs a privilege it does not have.
//! 2. While the victim's agent runs, its every port on the pod's address is
//!    its own (the attacker's bind of the range port there is in use).
//! 3. The victim's agent is killed with `SIGKILL`: the names stop resolving
//!    at once, though its names file is still there.
//! 4. Meanwhile the attacker takes the range port on the old address (any
//!    user may bind a port from 1024 up). Started again, the agent finds it
//!    held, moves the pod to a fresh address of the victim's own block and
//!    says so; the victim's `curl http://my-app-staging.local/` reaches the
//!    real pod, on port 80 and on the range port, and the attacker's
//!    listener never sees a connection.
//! 5. Paused, the pod's names are withdrawn; resumed, they come back.
//!
//! As `nss.rs` does, the test re-runs itself in a private mount namespace
//! with its own nsswitch.conf, resolv.conf and /run/user; this machine's own
//! files are never touched. Needs root (CI runs as root) for the namespace
//! and `setcap`.

use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use k3s_local_agent_e2e::name_service::{
    chmod, private_name_service, rerun_in_private_mount_namespace, run,
};
use k3s_local_agent_e2e::{agent_binary, built_artifact, http_pod, wait_until, AgentProcess};
use serde_json::{json, Value};

/// Set in the re-run of this test inside the private mount namespace.
const INNER: &str = "K3S_NAMES_PER_USER_INNER";
const TEST_NAME: &str = "no_local_user_can_take_another_users_pod_names";
const VICTIM: u32 = 4300;
const ATTACKER: u32 = 4301;
/// The victim's own block under the default layout (uid 4300: 127.128.0.0
/// plus 4300 /24s).
const VICTIM_BLOCK: &str = "127.144.204.";
const RANGE: &str = "23170-23189";

/// The system's Python, which every user can run (a per-user install such
/// as pyenv's, first on root's PATH, is not).
fn python3() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// `setpriv` as `uid`, no groups, no inherited capabilities.
fn as_user(uid: u32) -> Command {
    let mut command = Command::new("setpriv");
    command.args([
        format!("--reuid={uid}"),
        format!("--regid={uid}"),
        "--clear-groups".to_owned(),
        "--inh-caps=-all".to_owned(),
    ]);
    command
}

#[test]
fn no_local_user_can_take_another_users_pod_names() {
    if std::env::var_os(INNER).is_some() {
        inside_private_mount_namespace();
        return;
    }
    rerun_in_private_mount_namespace(INNER, TEST_NAME).unwrap_or_else(|err| panic!("{err}"));
}

/// What the test's private world holds: the module's folder, the capable
/// helper, the victim's state.
struct World {
    dir: tempfile::TempDir,
    lib: PathBuf,
    helper: PathBuf,
}

impl World {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let lib = private_name_service(dir.path()).expect("a private name service");
        let helper = dir.path().join("k3s-local-agent-bind");
        let built = built_artifact(
            "K3S_LOCAL_AGENT_BIND",
            "k3s-local-agent-bind",
            "k3s-local-agent-bind",
        );
        std::fs::copy(built, &helper).expect("copy helper");
        chmod(&helper, 0o755).expect("chmod");
        run(
            "setcap",
            &["cap_net_bind_service=+ep", &helper.display().to_string()],
        )
        .expect("setcap");

        for uid in [VICTIM, ATTACKER] {
            let run_dir = PathBuf::from(format!("/run/user/{uid}"));
            std::fs::create_dir(&run_dir).expect("mkdir runtime dir");
            chown(&run_dir, Some(uid), Some(uid)).expect("chown");
            chmod(&run_dir, 0o700).expect("chmod");
        }
        let state = dir.path().join("victim");
        std::fs::create_dir(&state).expect("mkdir");
        chown(&state, Some(VICTIM), Some(VICTIM)).expect("chown");
        chmod(&state, 0o700).expect("chmod");
        Self { dir, lib, helper }
    }

    /// The victim's agent, with the capable helper.
    fn start_victims_agent(&self) -> AgentProcess {
        AgentProcess::run_command(
            as_user(VICTIM)
                .arg(agent_binary())
                .args([
                    "run",
                    "--agent-port",
                    "0",
                    "--no-cluster",
                    "--port-range",
                    RANGE,
                    "--bind-helper",
                ])
                .arg(&self.helper)
                .arg("--state-dir")
                .arg(self.dir.path().join("victim/state")),
        )
        .expect("the victim's agent starts")
    }

    /// The address `uid` resolves `name` to through the real resolver.
    fn resolve(&self, uid: u32, name: &str) -> Option<String> {
        let output = as_user(uid)
            .args(["timeout", "10", "getent", "hosts", name])
            .env("LD_LIBRARY_PATH", &self.lib)
            .output()
            .expect("getent runs");
        match output.status.code() {
            Some(0) => String::from_utf8_lossy(&output.stdout)
                .split_whitespace()
                .next()
                .map(str::to_owned),
            Some(2) => None,
            other => panic!("getent hosts {name} as {uid}: {other:?} {output:?}"),
        }
    }

    /// `curl URL` as `uid`, the name resolved by the real resolver.
    fn curl(&self, uid: u32, url: &str) -> String {
        let output = as_user(uid)
            .args(["curl", "-s", "--max-time", "10", url])
            .env("LD_LIBRARY_PATH", &self.lib)
            .output()
            .expect("curl runs");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// What the helper answers `uid`'s request for `addr`.
    fn helper_answer(&self, uid: u32, addr: &str, port: u16) -> String {
        let script = r#"
import socket, subprocess, sys
ours, theirs = socket.socketpair()
helper = subprocess.Popen([sys.argv[1]], stdin=theirs.fileno())
theirs.close()
ours.sendall(("tcp %s %s\n" % (sys.argv[2], sys.argv[3])).encode())
message, ancillary, _, _ = ours.recvmsg(4096, socket.CMSG_SPACE(4))
print(message.decode().strip(), "fds:", len(ancillary))
ours.close()
helper.wait()
"#;
        let output = as_user(uid)
            .args([python3(), "-c", script])
            .arg(&self.helper)
            .args([addr, &port.to_string()])
            .output()
            .expect("python3 runs");
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        )
    }
}

/// The attacker's listener on `addr:port` (a plain bind, which any user may
/// make from port 1024 up), counting what connects into `log`; `None` when
/// the bind fails (the port is in use).
fn squat(addr: &str, port: u16, log: &Path) -> Option<Child> {
    let script = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind((sys.argv[1], int(sys.argv[2])))
except OSError as err:
    print("refused", err, flush=True)
    sys.exit(0)
s.listen(16)
print("listening", flush=True)
while True:
    conn, _ = s.accept()
    with open(sys.argv[3], "a") as log:
        log.write("connection\n")
    conn.close()
"#;
    let mut child = as_user(ATTACKER)
        .args([python3(), "-c", script, addr, &port.to_string()])
        .arg(log)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut first = String::new();
    let stdout = child.stdout.as_mut().expect("stdout");
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut first)
        .expect("read the squatter's first line");
    if first.starts_with("listening") {
        Some(child)
    } else {
        assert!(first.contains("Address already in use"), "{first}");
        let _ = child.wait();
        None
    }
}

fn redirection(agent: &AgentProcess) -> Value {
    agent.get_json("/api/v1/pods/status").expect("status")["redirections"]["web-1"].clone()
}

fn set_forwarding(agent: &AgentProcess, enabled: bool) {
    let (code, body) = k3s_local_agent_e2e::curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "-d",
        &json!({ "enabled": enabled }).to_string(),
        &agent.url("/api/v1/pods/web-1/forwarding"),
    ])
    .expect("curl");
    assert_eq!(code, 200, "{body}");
}

fn inside_private_mount_namespace() {
    let world = World::new();
    // The real pod, on port 80 of an address of its own.
    http_pod(
        std::net::SocketAddr::from(([127, 0, 23, 1], 80)),
        "the real pod",
    );

    let agent = world.start_victims_agent();
    let agent_id = agent.agent_id().expect("agent id");
    let (code, answer) = agent
        .push(&json!({"agent_id": agent_id, "action": "create",
                      "pods": [{"id": "web-1", "name": "my-app", "ip": "127.0.23.1", "port": 80}]}))
        .expect("push");
    assert_eq!(code, 200, "{answer}");
    let mut first = None;
    wait_until("the victim's name to resolve", || {
        first = world.resolve(VICTIM, "my-app-staging.local");
        first.is_some()
    })
    .unwrap_or_else(|err| panic!("{err}; log:\n{}", agent.log_lines().join("\n")));
    let first = first.expect("resolved");
    assert!(
        first.starts_with(VICTIM_BLOCK),
        "{first}: the victim's own block"
    );
    let tunnel = redirection(&agent);
    assert_eq!(
        tunnel["name_port"], 80,
        "port 80 through the helper: {tunnel}"
    );
    let range_port =
        u16::try_from(tunnel["local_port"].as_u64().expect("range port")).expect("a port number");
    assert_eq!(
        world.curl(VICTIM, "http://my-app-staging.local/"),
        "the real pod"
    );
    assert_eq!(
        world.resolve(ATTACKER, "my-app-staging.local"),
        None,
        "the victim's names are the victim's alone"
    );

    // 1. The helper serves nobody another user's address.
    let answer = world.helper_answer(ATTACKER, &first, 80);
    assert!(
        answer.starts_with("error refused") && answer.contains("another user's address block"),
        "{answer}"
    );
    assert!(
        answer.ends_with("fds: 0"),
        "no socket handed over: {answer}"
    );
    let own = world.helper_answer(ATTACKER, "127.144.205.7", 80);
    assert!(
        own.starts_with("ok") && own.ends_with("fds: 1"),
        "in its own block: {own}"
    );

    // 2. Every port of the pod on its address is the victim's agent's.
    let log = world.dir.path().join("squatted");
    assert!(
        squat(&first, range_port, &log).is_none(),
        "the range port on the pod's address is held by the victim's agent"
    );

    // 3. Killed, the agent's names stop resolving at once.
    let mut agent = agent;
    agent.kill_hard().expect("kill -9");
    assert!(
        std::fs::read_to_string(format!("/run/user/{VICTIM}/k3s-local-agent/names"))
            .is_ok_and(|text| text.contains("my-app-staging.local")),
        "the dead agent's names file is still there"
    );
    assert_eq!(
        world.resolve(VICTIM, "my-app-staging.local"),
        None,
        "a dead agent's names do not resolve"
    );

    // 4. The attacker takes the range port on the old address meanwhile.
    let mut squatter = squat(&first, range_port, &log).expect("a port from 1024 up is anyone's");
    let agent = world.start_victims_agent();
    let mut moved = None;
    wait_until("the victim's name to resolve again", || {
        moved = world.resolve(VICTIM, "my-app-staging.local");
        moved.is_some()
    })
    .unwrap_or_else(|err| panic!("{err}; log:\n{}", agent.log_lines().join("\n")));
    let moved = moved.expect("resolved");
    assert_ne!(moved, first, "the name never leads to the held address");
    assert!(
        moved.starts_with(VICTIM_BLOCK),
        "{moved}: the victim's own block"
    );
    let tunnel = redirection(&agent);
    assert_eq!(tunnel["address"], moved.as_str(), "{tunnel}");
    let said = serde_json::to_string(&tunnel).expect("json");
    assert!(
        said.contains(&format!("moved from {first}")),
        "the move is said: {tunnel}"
    );
    assert!(
        agent
            .log_lines()
            .iter()
            .any(|line| line.contains("another process holds") && line.contains(&first)),
        "and logged: {:?}",
        agent.log_lines()
    );
    assert_eq!(
        world.curl(VICTIM, "http://my-app-staging.local/"),
        "the real pod"
    );
    assert_eq!(
        world.curl(
            VICTIM,
            &format!("http://my-app-staging.local:{range_port}/")
        ),
        "the real pod"
    );
    let _ = squatter.kill();
    let _ = squatter.wait();
    assert!(
        !log.exists(),
        "the attacker's listener saw no connection: {:?}",
        std::fs::read_to_string(&log)
    );

    // 5. Paused, the names are withdrawn; resumed, they come back.
    set_forwarding(&agent, false);
    assert_eq!(
        world.resolve(VICTIM, "my-app-staging.local"),
        None,
        "a paused pod's name is withdrawn"
    );
    set_forwarding(&agent, true);
    wait_until("the name to come back", || {
        world.resolve(VICTIM, "my-app-staging.local").as_deref() == Some(moved.as_str())
    })
    .expect("resumed, the name resolves again");
    agent.terminate().expect("stop the agent");
}
