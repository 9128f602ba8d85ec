//! The NSS module `libnss_k3slocal.so.2` answers through the real glibc
//! resolver (`getent`, what every program uses): the test re-runs itself under
//! `unshare --mount`, and in that private mount namespace bind-mounts a temp
//! nsswitch.conf (`hosts: files k3slocal dns`) and resolv.conf over /etc and a
//! tmpfs over /run/user, then resolves names as other users with `setpriv`.
//! The machine's own /etc and /run/user are never touched. Needs root (CI runs
//! as root); without it the test fails and says why.
//!
//! A user is answered only while a lock on `names.lock` beside the file is
//! held (the user's agent holds it while it runs), only with addresses in
//! that user's own block (uid 4244's is 127.144.148.0/24 under the default
//! layout, uid 4245's 127.144.149.0/24), and nscd is answered nothing.
//!
//! At the end, the agent itself (run as a user with a runtime dir, and the
//! module on the hosts line) picks the module's file for its names, and
//! `getent` as that user finds its pod; once the agent is killed with
//! `SIGKILL`, the name no longer resolves although its file is still there.

use std::os::unix::fs::{chown, lchown, symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use k3s_local_agent_e2e::name_service::{
    private_name_service, rerun_in_private_mount_namespace, run,
};
use k3s_local_agent_e2e::{agent_binary, wait_until, AgentProcess};

/// Set in the re-run of this test inside the private mount namespace.
const INNER: &str = "K3S_NSS_E2E_INNER";
/// This test's name, for libtest's `--exact`.
const TEST_NAME: &str = "the_nss_module_answers_each_user_from_its_own_names_file";
/// A user with a names file and one without (no accounts needed: `setpriv`
/// takes any uid).
const A: u32 = 4244;
const B: u32 = 4245;
/// A's pod, at an address of A's own block.
const LINE: &str = "127.144.148.9 web-staging.local web-staging-staging-staging.local\n";
/// The same, at an address of B's own block.
const B_LINE: &str = "127.144.149.9 web-staging.local web-staging-staging-staging.local\n";

/// Holds an open-file-description lock on UID's `names.lock`, as that
/// user's running agent does, until dropped.
fn hold_lock(uid: u32) -> std::fs::File {
    use nix::fcntl::{fcntl, FcntlArg};
    let path = user_dir(uid).join("names.lock");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .expect("open the lock file");
    chown(&path, Some(uid), Some(uid)).expect("chown");
    chmod(&path, 0o600);
    let lock = nix::libc::flock {
        l_type: nix::libc::F_WRLCK as nix::libc::c_short,
        l_whence: nix::libc::SEEK_SET as nix::libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    fcntl(&file, FcntlArg::F_OFD_SETLK(&lock)).expect("lock");
    file
}

/// `getent ARGS` as `uid` (no groups) with the module on the library path:
/// exit code and stdout.
fn getent_as(lib_dir: &Path, uid: u32, args: &[&str]) -> (i32, String) {
    let id = uid.to_string();
    let output = Command::new("setpriv")
        .args([
            &format!("--reuid={id}"),
            &format!("--regid={id}"),
            "--clear-groups",
            "timeout",
            "10",
            "getent",
        ])
        .args(args)
        .env("LD_LIBRARY_PATH", lib_dir)
        .output()
        .expect("setpriv (util-linux) is installed");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// The address `getent hosts NAME` prints for `uid`, `None` when not found.
fn address_for(lib_dir: &Path, uid: u32, name: &str) -> Option<String> {
    let (code, out) = getent_as(lib_dir, uid, &["hosts", name]);
    match code {
        0 => out.split_whitespace().next().map(str::to_owned),
        2 => {
            assert!(out.is_empty(), "{out}");
            None
        }
        other => panic!("getent hosts {name} as {uid} exited {other}: {out}"),
    }
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// `/run/user/UID/k3s-local-agent` (dirs 0700, owned by UID).
fn user_dir(uid: u32) -> PathBuf {
    let run = PathBuf::from(format!("/run/user/{uid}"));
    let dir = run.join("k3s-local-agent");
    std::fs::create_dir_all(&dir).expect("mkdir");
    for path in [&run, &dir] {
        chown(path, Some(uid), Some(uid)).expect("chown");
        chmod(path, 0o700);
    }
    dir
}

/// [`user_dir`], with the names file in it removed.
fn agent_dir(uid: u32) -> PathBuf {
    let dir = user_dir(uid);
    let _ = std::fs::remove_file(dir.join("names"));
    dir
}

/// Writes UID's names file with `text`, owned by `owner`, with `mode`.
fn write_names(uid: u32, owner: u32, mode: u32, text: &str) {
    let names = agent_dir(uid).join("names");
    std::fs::write(&names, text).expect("write names");
    chown(&names, Some(owner), Some(owner)).expect("chown");
    chmod(&names, mode);
}

#[test]
fn the_nss_module_answers_each_user_from_its_own_names_file() {
    if std::env::var_os(INNER).is_some() {
        inside_private_mount_namespace();
        return;
    }
    let real_nsswitch = std::fs::read("/etc/nsswitch.conf").expect("read /etc/nsswitch.conf");
    rerun_in_private_mount_namespace(INNER, TEST_NAME).unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(
        std::fs::read("/etc/nsswitch.conf").expect("read /etc/nsswitch.conf"),
        real_nsswitch,
        "the machine's own nsswitch.conf is untouched"
    );
    assert!(
        !Path::new(&format!("/run/user/{B}/k3s-local-agent")).exists(),
        "the machine's own /run/user is untouched"
    );
}

fn inside_private_mount_namespace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lib_dir = private_name_service(dir.path()).expect("a private name service");
    let lib = lib_dir.as_path();

    // User A's own file answers nothing while no agent of A's holds the
    // lock: the names of an agent that crashed are dead.
    write_names(A, A, 0o600, &format!("# k3s-local-agent names\n{LINE}"));
    assert_eq!(
        address_for(lib, A, "web-staging.local"),
        None,
        "no lock held"
    );
    let a_lock = hold_lock(A);
    let _b_lock = hold_lock(B);
    // With it, A's own file answers A, by every glibc path.
    let (code, out) = getent_as(lib, A, &["hosts", "web-staging.local"]);
    assert_eq!(code, 0, "{out}");
    let fields: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(
        fields,
        [
            "127.144.148.9",
            "web-staging.local",
            "web-staging-staging-staging.local"
        ]
    );
    for database in ["ahosts", "ahostsv4"] {
        let (code, out) = getent_as(lib, A, &[database, "web-staging.local"]);
        assert_eq!(code, 0, "{database}: {out}");
        assert!(
            out.starts_with("127.144.148.9 ") && out.contains("STREAM web-staging.local"),
            "{database}: {out}"
        );
    }
    // No IPv6 answer of its own: ahostsv6 (AI_V4MAPPED) sees only the mapping.
    let (code, out) = getent_as(lib, A, &["ahostsv6", "web-staging.local"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.lines()
            .all(|line| line.starts_with("::ffff:127.144.148.9 ")),
        "{out}"
    );
    let expected = Some("127.144.148.9".to_owned());
    assert_eq!(address_for(lib, A, "WEB-Staging.LOCAL."), expected);
    assert_eq!(
        address_for(lib, A, "web-staging-staging-staging.local"),
        expected
    );
    assert_eq!(address_for(lib, A, "other-staging.local"), None);
    assert_eq!(
        address_for(lib, A, "localhost").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(address_for(lib, A, "unrelated.example"), None);

    // Nobody else sees A's names.
    assert_eq!(
        address_for(lib, B, "web-staging.local"),
        None,
        "B has no file"
    );
    let (code, _) = getent_as(lib, B, &["ahosts", "web-staging.local"]);
    assert_eq!(code, 2);
    assert_eq!(
        address_for(lib, 0, "web-staging.local"),
        None,
        "root has no file"
    );

    // nscd caches for every user: it is answered nothing (getent run under
    // the name nscd is, to the module, nscd).
    let nscd = lib_dir.join("nscd");
    std::fs::copy("/usr/bin/getent", &nscd).expect("copy getent");
    chmod(&nscd, 0o755);
    let output = Command::new("setpriv")
        .args([
            &format!("--reuid={A}"),
            &format!("--regid={A}"),
            "--clear-groups",
        ])
        .arg(&nscd)
        .args(["hosts", "web-staging.local"])
        .env("LD_LIBRARY_PATH", lib)
        .output()
        .expect("run getent as nscd");
    assert_eq!(
        output.status.code(),
        Some(2),
        "nscd is answered nothing: {output:?}"
    );

    // B's file, in every shape the module must refuse.
    let b_dir = agent_dir(B);
    let names = b_dir.join("names");
    std::fs::write(b_dir.join("real"), B_LINE).expect("write");
    chown(b_dir.join("real"), Some(B), Some(B)).expect("chown");
    chmod(&b_dir.join("real"), 0o600);
    symlink("real", &names).expect("symlink");
    lchown(&names, Some(B), Some(B)).expect("lchown");
    assert_eq!(address_for(lib, B, "web-staging.local"), None, "symlink");
    write_names(B, A, 0o644, B_LINE);
    assert_eq!(address_for(lib, B, "web-staging.local"), None, "owned by A");
    write_names(B, B, 0o620, B_LINE);
    assert_eq!(
        address_for(lib, B, "web-staging.local"),
        None,
        "group-writable"
    );
    write_names(B, B, 0o602, B_LINE);
    assert_eq!(
        address_for(lib, B, "web-staging.local"),
        None,
        "other-writable"
    );
    std::fs::remove_file(&names).expect("rm");
    run("mkfifo", &["-m", "0600", &names.display().to_string()]).expect("mkfifo");
    chown(&names, Some(B), Some(B)).expect("chown");
    assert_eq!(
        address_for(lib, B, "web-staging.local"),
        None,
        "FIFO, no hang"
    );
    write_names(
        B,
        B,
        0o600,
        &format!("{B_LINE}{}\n", "#".repeat(6 * 1024 * 1024)),
    );
    assert_eq!(address_for(lib, B, "web-staging.local"), None, "over 6 MiB");
    // A's address in B's file: B's file never leads B into A's block.
    write_names(B, B, 0o600, LINE);
    assert_eq!(
        address_for(lib, B, "web-staging.local"),
        None,
        "an address of another user's block"
    );

    // Control: B's own good file answers B; malformed lines and foreign names
    // are skipped.
    write_names(
        B,
        B,
        0o600,
        "999.1.2.3 web-staging.local\nnot-an-address web-staging.local\n\
         127.144.149.5 evil.example\n127.144.148.10 web-staging.local\n\
         127.144.149.10 web-staging.local\n",
    );
    assert_eq!(
        address_for(lib, B, "web-staging.local").as_deref(),
        Some("127.144.149.10")
    );
    assert_eq!(address_for(lib, B, "evil.example"), None);
    assert_eq!(address_for(lib, A, "web-staging.local"), expected);
    drop(a_lock);
    assert_eq!(
        address_for(lib, A, "web-staging.local"),
        None,
        "the lock let go: A's names are dead"
    );
    drop(_b_lock);

    the_agent_writes_its_users_names_for_the_module(lib);
}

/// The agent, run as user B with B's runtime dir and the module on the
/// hosts line, writes its names to B's file: `getent` as B finds B's pod
/// at its own address, and A does not.
fn the_agent_writes_its_users_names_for_the_module(lib: &Path) {
    let state = tempfile::tempdir().expect("tempdir");
    chown(state.path(), Some(B), Some(B)).expect("chown");
    chmod(state.path(), 0o700);
    // The agent makes the folder itself.
    let _ = std::fs::remove_dir_all(format!("/run/user/{B}/k3s-local-agent"));
    let start = || {
        AgentProcess::run_command(
            Command::new("setpriv")
                .args([
                    &format!("--reuid={B}"),
                    &format!("--regid={B}"),
                    "--clear-groups",
                ])
                .arg(agent_binary())
                .args(["run", "--agent-port", "0", "--no-cluster"])
                .args(["--port-range", "18760-18780", "--state-dir"])
                .arg(state.path().join("state")),
        )
        .expect("the agent starts as B")
    };
    let agent = start();
    let health = agent.get_json("/health").expect("health");
    assert_eq!(health["names"]["mode"], "nss-module", "{health}");
    let agent_id = agent.agent_id().expect("agent id");
    let (code, answer) = agent
        .push(&serde_json::json!({
            "agent_id": agent_id,
            "action": "create",
            "pods": [{"id": "db-1", "name": "db", "namespace": "staging",
                      "image": "postgres", "status": "running", "ip": "127.0.0.1", "port": 5432}],
        }))
        .expect("push");
    assert_eq!(code, 200, "{answer}");
    let mut address = String::new();
    wait_until("the pod's address", || {
        address = agent
            .get_json("/api/v1/pods/status")
            .ok()
            .and_then(|status| {
                status["redirections"]["db-1"]["address"]
                    .as_str()
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        !address.is_empty()
    })
    .expect("the pod gets an address");
    let mut found = None;
    wait_until("the name to resolve for B", || {
        found = address_for(lib, B, "db-staging.local");
        found.is_some()
    })
    .unwrap_or_else(|err| panic!("{err}; agent log:\n{}", agent.log_lines().join("\n")));
    assert_eq!(found.as_deref(), Some(address.as_str()));
    assert_eq!(
        address_for(lib, A, "db-staging.local"),
        None,
        "A does not see B's pod"
    );
    // Killed outright, it removes nothing: its file stays, and its names
    // stop resolving at once all the same (the kernel let its lock go).
    let mut agent = agent;
    agent.kill_hard().expect("kill -9 the agent");
    let names = PathBuf::from(format!("/run/user/{B}/k3s-local-agent/names"));
    assert!(
        std::fs::read_to_string(&names).is_ok_and(|text| text.contains("db-staging.local")),
        "the dead agent's file is still there"
    );
    assert_eq!(
        address_for(lib, B, "db-staging.local"),
        None,
        "a killed agent's names do not resolve"
    );

    // Started again, its names come back; stopped, it takes them away.
    let agent = start();
    wait_until("the name to resolve again", || {
        address_for(lib, B, "db-staging.local").is_some()
    })
    .unwrap_or_else(|err| panic!("{err}; agent log:\n{}", agent.log_lines().join("\n")));
    agent.terminate().expect("stop the agent");
    wait_until("the agent to take its names away", || {
        address_for(lib, B, "db-staging.local").is_none()
    })
    .expect("names are removed at shutdown");
}
