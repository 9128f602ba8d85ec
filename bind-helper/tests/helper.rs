//! The helper as it runs for real: a copy with `cap_net_bind_service=+ep`,
//! used by an unprivileged user. These tests run as root, make the copy in
//! a temporary directory, and run their checks as a plain user ("nobody"
//! below: uid 4242, which needs no account for `setpriv`; its own address
//! block under the default layout is 127.144.146.0/24, the next uid's
//! 127.144.147.0/24) by running this very test binary again under
//! `setpriv` with a scenario named in [`SCENARIO`]; the one test
//! [`as_nobody_child_entry`] then does the checks (and does nothing in an
//! ordinary run).

// Test code: a failed expectation is a failed test, in helpers too.
#![allow(clippy::expect_used)]

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use k3s_local_agent_bind::protocol::read_reply;
use k3s_local_agent_bind::{bind_via_helper, BindHelper, BindHelperError};

/// Names the scenario a child run as nobody is to check.
const SCENARIO: &str = "K3S_LOCAL_AGENT_BIND_TEST_SCENARIO";
/// The capable helper copy, for the child.
const HELPER: &str = "K3S_LOCAL_AGENT_BIND_TEST_HELPER";
/// The same copy without the capability, for the child.
const PLAIN_HELPER: &str = "K3S_LOCAL_AGENT_BIND_TEST_PLAIN_HELPER";

fn v4(a: u8, b: u8, c: u8, d: u8, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(a, b, c, d), port)
}

/// A temporary directory nobody can enter, holding a capable copy of the
/// helper, a plain copy, and a copy of this test binary to run as nobody.
struct Setup {
    dir: tempfile::TempDir,
    helper: PathBuf,
    plain_helper: PathBuf,
    driver: PathBuf,
}

fn open_to_all(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// `None` (and a note) when not root: capabilities cannot be set then.
fn setup() -> Option<Setup> {
    let probe = tempfile::tempfile().expect("tempfile");
    if probe.metadata().expect("metadata").uid() != 0 {
        eprintln!("skipped: these tests set file capabilities and need root");
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    open_to_all(dir.path(), 0o755);
    let helper = dir.path().join("k3s-local-agent-bind");
    let plain_helper = dir.path().join("k3s-local-agent-bind-plain");
    let driver = dir.path().join("driver");
    for (from, to) in [
        (
            Path::new(env!("CARGO_BIN_EXE_k3s-local-agent-bind")),
            &helper,
        ),
        (
            Path::new(env!("CARGO_BIN_EXE_k3s-local-agent-bind")),
            &plain_helper,
        ),
        (&std::env::current_exe().expect("test binary"), &driver),
    ] {
        std::fs::copy(from, to).expect("copy");
        open_to_all(to, 0o755);
    }
    let setcap = Command::new("setcap")
        .arg("cap_net_bind_service=+ep")
        .arg(&helper)
        .output()
        .expect("setcap runs (apt-get install libcap2-bin)");
    assert!(setcap.status.success(), "setcap: {setcap:?}");
    Some(Setup {
        dir,
        helper,
        plain_helper,
        driver,
    })
}

/// The `setpriv` command that runs `scenario` as nobody, with no
/// capabilities of its own (only the helper's file capability can help).
fn nobody_command(setup: &Setup, scenario: &str) -> Command {
    let mut command = Command::new("setpriv");
    command
        .args([
            "--reuid=4242",
            "--regid=4242",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&setup.driver)
        .args([
            "--exact",
            "as_nobody_child_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SCENARIO, scenario)
        .env(HELPER, &setup.helper)
        .env(PLAIN_HELPER, &setup.plain_helper);
    command
}

/// Checks the child passed, and ran its one test rather than none.
fn assert_child_passed(scenario: &str, output: &Output) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "scenario {scenario} as nobody failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    eprintln!("scenario {scenario} as nobody:\n{stderr}");
}

fn run_as_nobody(scenario: &str) {
    let Some(setup) = setup() else { return };
    let output = nobody_command(&setup, scenario)
        .output()
        .expect("setpriv runs");
    assert_child_passed(scenario, &output);
}

#[test]
fn nobody_cannot_bind_port_80_alone_nor_with_an_uncapable_helper() {
    run_as_nobody("alone");
}

#[test]
fn the_helper_binds_port_80_for_nobody_and_the_socket_accepts() {
    run_as_nobody("helper");
}

#[test]
fn the_helper_refuses_what_is_not_a_pod_port_and_says_why() {
    run_as_nobody("refusals");
}

#[test]
fn the_helper_takes_no_arguments_and_needs_a_socket() {
    let Some(setup) = setup() else { return };
    let output = Command::new(&setup.helper)
        .arg("--help")
        .stdin(Stdio::null())
        .output()
        .expect("helper runs");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("takes no arguments"));
    let output = Command::new(&setup.helper)
        .stdin(Stdio::null())
        .output()
        .expect("helper runs");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    drop(setup.dir);
}

/// The config file is only read from `/etc/k3s-local-agent`; this machine's
/// `/etc` is left alone by giving the child a private mount namespace in
/// which a copy of `/etc` (with the config added) is mounted over `/etc`.
fn run_with_config(scenario: &str, config: &str, mode: u32) {
    let Some(setup) = setup() else { return };
    let etc = setup.dir.path().join("etc");
    let copied = Command::new("cp")
        .args(["-a", "/etc"])
        .arg(&etc)
        .status()
        .expect("cp runs");
    assert!(copied.success());
    let config_dir = etc.join("k3s-local-agent");
    std::fs::create_dir(&config_dir).expect("config dir");
    open_to_all(&config_dir, 0o755);
    let config_path = config_dir.join("bind-helper.conf");
    std::fs::write(&config_path, config).expect("config");
    open_to_all(&config_path, mode);

    let nobody = nobody_command(&setup, scenario);
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$0" /etc && exec "$@""#)
        .arg(&etc)
        .arg(nobody.get_program())
        .args(nobody.get_args());
    for (key, value) in nobody.get_envs() {
        if let Some(value) = value {
            command.env(key, value);
        }
    }
    let output = command.output().expect("unshare runs");
    assert_child_passed(scenario, &output);
}

#[test]
fn a_root_owned_config_moves_the_block() {
    run_with_config(
        "config-88",
        "# pods live here\nblock = 127.88.0.0/16\nfirst_uid = 4200\n",
        0o644,
    );
}

#[test]
fn a_config_others_may_write_is_refused_on_every_request() {
    run_with_config("config-bad", "block = 127.88.0.0/16\n", 0o666);
}

/// What the child does, as nobody. Does nothing unless started by a test
/// above.
#[test]
fn as_nobody_child_entry() {
    let Ok(scenario) = std::env::var(SCENARIO) else {
        return;
    };
    let helper = PathBuf::from(std::env::var_os(HELPER).expect("helper path"));
    let plain = PathBuf::from(std::env::var_os(PLAIN_HELPER).expect("plain helper path"));
    match scenario.as_str() {
        "alone" => alone(&plain),
        "helper" => helper_binds(&helper),
        "refusals" => refusals(&helper),
        "config-88" => config_88(&helper),
        "config-bad" => config_bad(&helper),
        other => panic!("unknown scenario {other}"),
    }
}

fn alone(plain: &Path) {
    let err = TcpListener::bind(v4(127, 144, 146, 9, 80)).expect_err("nobody binds port 80 itself");
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    eprintln!("nobody's own bind of 127.144.146.9:80: {err}");
    // The same binary without the capability fails the same way: the
    // capability is what makes the helper work.
    let err = bind_via_helper(plain, v4(127, 144, 146, 9, 80)).expect_err("uncapable helper");
    let errno = err.bind_error().expect("a bind error").kind();
    assert_eq!(errno, ErrorKind::PermissionDenied, "{err}");
    eprintln!("helper without the capability: {err}");
}

fn helper_binds(helper: &Path) {
    let addr = v4(127, 144, 146, 9, 80);
    let listener = bind_via_helper(helper, addr).expect("the helper binds 127.144.146.9:80");
    assert_eq!(
        listener.local_addr().expect("local addr"),
        SocketAddr::V4(addr)
    );
    assert_set_up_like_the_agents_own(&listener);
    accepts_a_real_connection(&listener, addr);
    eprintln!("127.144.146.9:80 bound by the helper, listening, accepting");

    // One helper for many requests; a port in use comes back as AddrInUse.
    let mut running = BindHelper::spawn(helper).expect("spawn");
    let mut held = Vec::new();
    for addr in [
        v4(127, 144, 146, 10, 80),
        v4(127, 144, 146, 10, 443),
        v4(127, 144, 146, 200, 22),
    ] {
        let listener = running.bind(addr).expect("bind");
        assert_eq!(listener.local_addr().expect("addr"), SocketAddr::V4(addr));
        held.push(listener);
    }
    let err = running
        .bind(addr)
        .expect_err("127.144.146.9:80 is ours already");
    assert_eq!(
        err.bind_error().map(|e| e.kind()),
        Some(ErrorKind::AddrInUse),
        "{err}"
    );
    assert!(err.to_string().contains("127.144.146.9:80"), "{err}");
    eprintln!("in use: {err}");
    running
        .finish()
        .expect("the helper exits cleanly at end of file");
}

fn assert_set_up_like_the_agents_own(listener: &TcpListener) {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use nix::sys::socket::{getsockopt, sockopt};
    let flags = fcntl(listener, FcntlArg::F_GETFL).expect("flags");
    assert!(OFlag::from_bits_truncate(flags).contains(OFlag::O_NONBLOCK));
    let fd_flags = fcntl(listener, FcntlArg::F_GETFD).expect("fd flags");
    assert_eq!(fd_flags & nix::libc::FD_CLOEXEC, nix::libc::FD_CLOEXEC);
    assert!(getsockopt(listener, sockopt::ReuseAddr).expect("reuse"));
    assert!(getsockopt(listener, sockopt::TcpNoDelay).expect("nodelay"));
    assert!(getsockopt(listener, sockopt::AcceptConn).expect("listening"));
}

fn accepts_a_real_connection(listener: &TcpListener, addr: SocketAddrV4) {
    let mut client = TcpStream::connect(addr).expect("connect");
    // The listener is non-blocking: wait for the connection with poll(2),
    // within a deadline.
    let mut ready = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(listener),
        nix::poll::PollFlags::POLLIN,
    )];
    let waited = nix::poll::poll(&mut ready, nix::poll::PollTimeout::from(5_000u16)).expect("poll");
    assert_eq!(waited, 1, "no connection within 5 s");
    let (mut server, peer) = listener.accept().expect("accept");
    assert_eq!(peer, client.local_addr().expect("client addr"));
    server.set_nonblocking(false).expect("blocking");
    client.write_all(b"ping").expect("write");
    let mut got = [0u8; 4];
    server.read_exact(&mut got).expect("read");
    assert_eq!(&got, b"ping");
    server.write_all(b"pong").expect("write back");
    client.read_exact(&mut got).expect("read back");
    assert_eq!(&got, b"pong");
}

fn refused(err: BindHelperError, expected: &[&str]) {
    let BindHelperError::Refused { reason, .. } = &err else {
        panic!("not a refusal: {err}");
    };
    for part in expected {
        assert!(reason.contains(part), "{part:?} not in {reason:?}");
    }
    eprintln!("refused: {err}");
}

fn refusals(helper: &Path) {
    let mut running = BindHelper::spawn(helper).expect("spawn");
    let cases: &[(SocketAddrV4, &[&str])] = &[
        (
            v4(127, 0, 0, 1, 80),
            &["127.0.0.1", "system's own loopback"],
        ),
        (
            v4(127, 0, 0, 53, 53),
            &["127.0.0.53", "system's own loopback"],
        ),
        (v4(10, 1, 2, 3, 80), &["10.1.2.3", "not a loopback"]),
        (v4(0, 0, 0, 0, 80), &["0.0.0.0", "every address"]),
        (v4(127, 144, 146, 9, 0), &["port 0"]),
        (
            v4(127, 78, 0, 9, 80),
            &["outside the pod block 127.144.146.0/24"],
        ),
        // The next uid's block: another user's pod address is never served.
        (
            v4(127, 144, 147, 9, 80),
            &[
                "127.144.147.9 is in another user's address block",
                "uid 4242 may bind only in 127.144.146.0/24",
            ],
        ),
        (
            v4(127, 144, 147, 9, 8080),
            &["another user's address block"],
        ),
    ];
    for (addr, expected) in cases {
        refused(running.bind(*addr).expect_err("refused"), expected);
    }
    running.finish().expect("clean exit");

    // Raw lines the client never sends, on a socket of our own.
    let (ours, theirs) = UnixStream::pair().expect("pair");
    let mut child = Command::new(helper)
        .env_clear()
        .stdin(OwnedFd::from(theirs))
        .spawn()
        .expect("spawn");
    let long = format!("tcp 127.144.146.9 80{}", " ".repeat(300));
    let lines: &[(&str, &str)] = &[
        (
            "udp 127.144.146.9 53",
            "error refused UDP is not served: only TCP",
        ),
        ("tcp ::1 80", "error refused ::1 is an IPv6 address"),
        (
            "tcp 127.144.146.9 +80",
            "error refused \"+80\" is not a port number",
        ),
        ("hello", "error refused expected `tcp <ipv4> <port>`"),
        (&long, "error refused request is longer than 200 bytes"),
        ("tcp 127.144.146.9 80", "ok"),
    ];
    let mut writer = &ours;
    for (line, expected) in lines {
        writer
            .write_all(format!("{line}\n").as_bytes())
            .expect("send");
        let (reply, fds) = read_reply(&ours).expect("reply");
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.starts_with(expected), "{line:?}: {reply:?}");
        assert_eq!(fds.len(), usize::from(*expected == "ok"), "{line:?}");
        eprintln!("{:?} -> {reply}", &line[..line.len().min(40)]);
    }
    drop(ours);
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}");
}

fn config_88(helper: &Path) {
    let mut running = BindHelper::spawn(helper).expect("spawn");
    let listener = running
        .bind(v4(127, 88, 42, 5, 80))
        .expect("in the configured block");
    assert_eq!(
        listener.local_addr().expect("addr"),
        SocketAddr::V4(v4(127, 88, 42, 5, 80))
    );
    refused(
        running
            .bind(v4(127, 144, 146, 9, 80))
            .expect_err("outside now"),
        &["outside the pod block 127.88.42.0/24"],
    );
    refused(
        running
            .bind(v4(127, 88, 0, 5, 80))
            .expect_err("uid 4200's block"),
        &["another user's address block"],
    );
    running.finish().expect("clean exit");
}

fn config_bad(helper: &Path) {
    let err = bind_via_helper(helper, v4(127, 88, 42, 5, 80)).expect_err("bad config");
    refused(
        err,
        &[
            "bad config",
            "/etc/k3s-local-agent/bind-helper.conf",
            "writable by group or others",
        ],
    );
}
