//! Pod names resolve through the system resolver: the agent runs in a private
//! mount namespace where a temp file is bind-mounted over /etc/hosts, writes
//! its names to /etc/hosts there, and `getent hosts` (glibc's resolver, the
//! one every program uses) finds them. The machine's real /etc/hosts is never
//! touched. Needs root or user namespaces (CI runs as root); on a machine
//! without them the test fails and says why.

use std::process::Command;

use k3s_local_agent_e2e::{agent_binary, wait_until, AgentProcess, FOREIGN_HOSTS};
use serde_json::json;

fn getent_in(pid: u32, name: &str) -> Option<String> {
    let output = Command::new("nsenter")
        .args([
            "--mount",
            "--target",
            &pid.to_string(),
            "getent",
            "hosts",
            name,
        ])
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

#[test]
fn names_resolve_through_the_system_resolver_in_a_private_mount_namespace() {
    k3s_local_agent_e2e::require_mount_namespace();
    let real_hosts_before = std::fs::read_to_string("/etc/hosts").expect("read /etc/hosts");

    let dir = tempfile::tempdir().expect("tempdir");
    let fake_hosts = dir.path().join("hosts");
    std::fs::write(&fake_hosts, FOREIGN_HOSTS).expect("write");
    let state = dir.path().join("state");
    // `unshare --mount` gives the shell (and the agent it execs) a private
    // mount namespace with private propagation: the bind mount is invisible
    // outside it.
    let script = format!(
        "mount --bind '{}' /etc/hosts && exec '{}' run --no-cluster --agent-port 0 --port-range 21200-21219 \
         --state-dir '{}' --hosts-file /etc/hosts",
        fake_hosts.display(),
        agent_binary().display(),
        state.display()
    );
    let agent =
        AgentProcess::run_command(Command::new("unshare").args(["--mount", "sh", "-c", &script]))
            .expect("agent runs in its namespace");

    let health: serde_json::Value = agent.get_json("/health").expect("health");
    assert_eq!(health["names"]["system_wide"], true, "{health}");
    let body = json!({"agent_id": health["agent_id"], "action": "create", "pods": [
        {"id": "p", "name": "my-app", "ip": "10.0.1.100", "port": 80}]});
    let (code, answer) = agent.push(&body).expect("push");
    assert_eq!(code, 200, "{answer}");

    let mut resolved = None;
    wait_until("my-app-staging.local to resolve", || {
        resolved = getent_in(agent.pid(), "my-app-staging.local");
        resolved.is_some()
    })
    .expect("name resolves");
    // Both names point at the pod's own loopback address.
    let status = agent.get_json("/api/v1/pods/status").expect("status");
    let address = status["redirections"]["p"]["address"]
        .as_str()
        .expect("the pod has its own address")
        .to_owned();
    assert!(
        address.starts_with("127.128.0."),
        "root's own block: {address}"
    );
    let line = resolved.unwrap_or_default();
    assert!(line.starts_with(&format!("{address} ")), "{line}");
    let localhost_name =
        getent_in(agent.pid(), "my-app-staging.localhost").expect("localhost name resolves");
    assert!(localhost_name.starts_with(&format!("{address} ")));
    assert!(
        getent_in(agent.pid(), "db.internal").is_some_and(|l| l.starts_with("10.9.9.9")),
        "foreign lines still resolve"
    );

    // The same file, seen from outside the namespace, holds the block too.
    let text = std::fs::read_to_string(&fake_hosts).expect("read");
    assert!(text.starts_with(FOREIGN_HOSTS));
    assert!(text.contains("my-app-staging.local"));
    assert_eq!(
        std::fs::read_to_string("/etc/hosts").expect("read /etc/hosts"),
        real_hosts_before,
        "the machine's own /etc/hosts is untouched"
    );
    // Deleting the pod removes its name from the resolver.
    let delete = json!({"agent_id": health["agent_id"], "action": "delete", "pods": [{"id": "p"}]});
    agent.push(&delete).expect("delete");
    wait_until("the name to go away", || {
        getent_in(agent.pid(), "my-app-staging.local").is_none()
    })
    .expect("name removed");
}
