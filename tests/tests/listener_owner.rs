//! Another user listening on the agent's port: the CLI (`status`) and
//! `doctor`, with this user's token at hand, refuse to send it there and say
//! whose the listener is; the listener, which records everything it is sent
//! and answers like an agent, gets no `Authorization` header. Tests run as
//! root (as CI does); the other user is `nobody`, through `setpriv`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use k3s_local_agent_e2e::cli;

/// Listens as uid 65534 on a free loopback port; prints `ready <port>`, then
/// every request it is sent, answering each with an agent's `/health` so a
/// client sending one does not hang; on its stdin's end it reads what is
/// still queued and exits.
const RECORDER: &str = r#"
import select, socket, sys
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(16)
print("ready", listener.getsockname()[1], flush=True)
def serve(conn):
    conn.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    sys.stdout.write(data.decode("latin-1") + "\n--\n")
    sys.stdout.flush()
    body = b'{"status":"healthy","pid":1,"version":"0","pod_count":0}'
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                 + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    conn.close()
while True:
    ready, _, _ = select.select([listener, sys.stdin], [], [])
    if listener in ready:
        serve(listener.accept()[0])
    elif sys.stdin in ready and not sys.stdin.readline():
        listener.setblocking(False)
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                break
            conn.setblocking(True)
            serve(conn)
        break
"#;

/// The recorder, running as `nobody`.
struct Recorder {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    port: u16,
}

impl Recorder {
    fn start() -> Self {
        let mut child = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                // The system's: root's PATH may lead to one `nobody` cannot run.
                "/usr/bin/python3",
                "-c",
                RECORDER,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("setpriv and python3 run (needs root, as CI has)");
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("the recorder starts");
        let port = line
            .trim()
            .strip_prefix("ready ")
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("the recorder did not start: {line:?}"));
        Self {
            child,
            stdin,
            stdout,
            port,
        }
    }

    /// Ends the recorder; everything it was sent.
    fn finish(mut self) -> String {
        drop(self.stdin.take());
        let mut got = String::new();
        self.stdout.read_to_string(&mut got).expect("read");
        let _ = self.child.wait();
        got
    }
}

/// A state dir holding a token, as the agent leaves it.
fn state_with_token(dir: &std::path::Path) -> String {
    let state = dir.join("state");
    std::fs::create_dir(&state).expect("state dir");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let mut token = std::fs::File::create(state.join("token")).expect("token");
    token
        .set_permissions(std::fs::Permissions::from_mode(0o600))
        .expect("chmod");
    token
        .write_all(b"0123456789abcdef0123456789abcdef\n")
        .expect("write");
    state.to_str().expect("utf-8").to_owned()
}

#[test]
fn the_cli_refuses_to_send_its_token_to_another_users_listener() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = state_with_token(dir.path());
    let recorder = Recorder::start();
    let url = format!("http://127.0.0.1:{}", recorder.port);
    for name in [url.clone(), format!("http://localhost:{}", recorder.port)] {
        let (ok, out, err) =
            cli(&["status", "--agent-url", &name, "--state-dir", &state]).expect("status runs");
        assert!(!ok, "status must fail:\n{out}{err}");
        assert!(
            err.contains("uid 65534") && err.contains("token"),
            "the refusal names the listener's user: {err}"
        );
    }
    let got = recorder.finish();
    assert!(
        !got.to_ascii_lowercase().contains("authorization"),
        "the token reached the other user's listener:\n{got}"
    );
}

#[test]
fn the_doctor_refuses_to_send_its_token_to_another_users_listener() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = state_with_token(dir.path());
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n").expect("hosts");
    let recorder = Recorder::start();
    let port = recorder.port.to_string();
    let (ok, out, err) = cli(&[
        "doctor",
        "--agent-port",
        &port,
        "--state-dir",
        &state,
        "--hosts-file",
        hosts.to_str().expect("utf-8"),
        "--control-plane-url",
        "http://127.0.0.1:9",
        "--no-cluster",
    ])
    .expect("doctor runs");
    assert!(!ok, "the doctor must fail:\n{out}{err}");
    assert!(
        out.contains("uid 65534"),
        "the doctor names the listener's user:\n{out}{err}"
    );
    let got = recorder.finish();
    assert!(
        !got.to_ascii_lowercase().contains("authorization"),
        "the token reached the other user's listener:\n{got}"
    );
}
