//! Files planted in the agent's state dir. Run as root (as CI is), with a
//! state dir that another user owns or that holds a link to a victim file or
//! a token of someone else's, the agent refuses to start, names the path and
//! the fix, and touches nothing: the victim keeps its mode, and the planted
//! token is never accepted.

use std::os::unix::fs::{chown, symlink, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

use k3s_local_agent_e2e::agent_binary;

/// Another user of this machine: `nobody`.
const OTHER: u32 = 65534;

/// `k3s-local-agent run` on `state_dir`, beyond loopback (so a token would
/// matter), given at most 20 s: it must refuse and exit by itself.
fn run_on(state_dir: &Path, hosts: &Path) -> Output {
    Command::new("timeout")
        .arg("20")
        .arg(agent_binary())
        .args([
            "run",
            "--no-cluster",
            "--agent-port",
            "0",
            "--bind",
            "0.0.0.0",
            "--port-range",
            "22400-22419",
            "--hosts-file",
        ])
        .arg(hosts)
        .arg("--state-dir")
        .arg(state_dir)
        .output()
        .expect("the agent runs")
}

fn assert_refused(output: &Output, path: &Path, why: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "the agent must refuse to start (124 would mean it ran): {stderr}"
    );
    assert!(
        stderr.contains(&path.display().to_string()) && stderr.contains(why),
        "the error names {} and says {why:?}: {stderr}",
        path.display()
    );
}

#[test]
fn a_state_dir_of_another_user_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("mkdir");
    chown(&state, Some(OTHER), Some(OTHER)).expect("chown (needs root, as CI has)");
    let output = run_on(&state, &dir.path().join("hosts"));
    assert_refused(&output, &state, "belongs to uid 65534");
    assert_eq!(
        std::fs::read_dir(&state).expect("list").count(),
        0,
        "nothing written"
    );
}

#[test]
fn a_planted_link_to_a_victim_is_refused_and_the_victim_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious\n").expect("write");
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    for name in ["state.db", "token", "agent-id"] {
        let state = dir.path().join(format!("state-{name}"));
        std::fs::create_dir(&state).expect("mkdir");
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let planted = state.join(name);
        symlink(&victim, &planted).expect("plant a link");
        let output = run_on(&state, &dir.path().join("hosts"));
        assert_refused(&output, &planted, "symbolic link");
        let meta = std::fs::metadata(&victim).expect("victim");
        assert_eq!(
            meta.mode() & 0o777,
            0o644,
            "{name}: the victim keeps its mode"
        );
        assert_eq!(
            std::fs::read_to_string(&victim).expect("read"),
            "precious\n"
        );
    }
}

#[test]
fn a_planted_token_of_another_user_is_never_adopted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("mkdir");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let token = state.join("token");
    std::fs::write(&token, "attacker-token\n").expect("plant a token");
    chown(&token, Some(OTHER), Some(OTHER)).expect("chown");
    let output = run_on(&state, &dir.path().join("hosts"));
    assert_refused(&output, &token, "belongs to uid 65534");
    assert_eq!(
        std::fs::read_to_string(&token).expect("read"),
        "attacker-token\n",
        "left as it was"
    );
}
