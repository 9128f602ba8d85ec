//! Harness for black-box tests of the built `k3s-local-agent` binary: start it
//! as a user would, find its address in its log, stop it with a signal or
//! `kill -9`, and wait on everything with a deadline.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub mod desktop;
pub mod kube_emulator;
pub mod name_service;

/// How long any awaited condition may take.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// The agent binary: `K3S_LOCAL_AGENT_BIN`, else beside this test's target dir.
pub fn agent_binary() -> PathBuf {
    built_artifact("K3S_LOCAL_AGENT_BIN", "k3s-local-agent", "k3s-local-agent")
}

/// A file the workspace builds: the path in `env` when set, else `file`
/// beside this test's target dir (target/<profile>/deps/<test> ->
/// target/<profile>/<file>), which must exist (`package` says what builds it).
pub fn built_artifact(env: &str, file: &str, package: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let artifact = profile_dir.join(file);
    assert!(
        artifact.exists(),
        "{} is missing: build it first with `cargo build -p {package}` (the test script does)",
        artifact.display()
    );
    artifact
}

/// Polls `condition` until it holds or the deadline passes.
pub fn wait_until(what: &str, condition: impl FnMut() -> bool) -> Result<()> {
    wait_until_within(DEADLINE, what, condition)
}

/// Polls `condition` until it holds or `within` has passed. The one
/// polling loop of the e2e tests: the deadline only fails the wait, it is
/// never what a test asserts. Checks come every 10 ms at first and slow to
/// every 100 ms, so a quick condition is seen at once and a long wait (a
/// real cluster pulling an image) does not ask fifty times a second.
pub fn wait_until_within(
    within: Duration,
    what: &str,
    mut condition: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + within;
    let mut pause = Duration::from_millis(10);
    while !condition() {
        if Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
    Ok(())
}

/// A running agent process.
#[derive(Debug)]
pub struct AgentProcess {
    child: Child,
    /// Every line it wrote to stderr (its log).
    log: Arc<Mutex<Vec<String>>>,
    /// Every line it wrote to stdout.
    out: Arc<Mutex<Vec<String>>>,
    /// `http://127.0.0.1:PORT`, from its "listening on" log line.
    pub base_url: String,
}

fn collect(stream: impl std::io::Read + Send + 'static, lines: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if let Ok(mut lines) = lines.lock() {
                lines.push(line);
            }
        }
    });
}

impl AgentProcess {
    /// Starts `k3s-local-agent run ARGS` (add `--agent-port 0` for a free
    /// port) and waits until it listens.
    pub fn run(args: &[&str]) -> Result<Self> {
        Self::run_command(Command::new(agent_binary()).arg("run").args(args))
    }

    /// Starts any command that ends up running the agent (e.g. under `unshare`).
    pub fn run_command(command: &mut Command) -> Result<Self> {
        if !command.get_envs().any(|(key, _)| key == "RUST_LOG") {
            command.env("RUST_LOG", "info");
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning the agent")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let out = Arc::new(Mutex::new(Vec::new()));
        collect(child.stderr.take().context("stderr")?, Arc::clone(&log));
        collect(child.stdout.take().context("stdout")?, Arc::clone(&out));
        let mut process = Self {
            child,
            log,
            out,
            base_url: String::new(),
        };
        let mut found = None;
        let waited = wait_until("the agent to listen", || {
            if let Ok(Some(_)) = process.child.try_wait() {
                return true;
            }
            found = process.log_lines().iter().find_map(|line| {
                let start = line.find("listening on http://")? + "listening on ".len();
                Some(line[start..].split_whitespace().next()?.to_owned())
            });
            found.is_some()
        });
        match (waited, found) {
            (Ok(()), Some(url)) => {
                process.base_url = url;
                Ok(process)
            }
            _ => bail!(
                "agent did not start; its log:\n{}",
                process.log_lines().join("\n")
            ),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.out.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// `GET path` with curl; the answer as JSON.
    pub fn get_json(&self, path: &str) -> Result<serde_json::Value> {
        let (code, body) = curl(&[&self.url(path)])?;
        serde_json::from_str(&body).with_context(|| format!("GET {path} answered {code}: {body}"))
    }

    /// The agent's id, from `/health`.
    pub fn agent_id(&self) -> Result<String> {
        let health = self.get_json("/health")?;
        health["agent_id"]
            .as_str()
            .map(str::to_owned)
            .context("health has no agent_id")
    }

    /// Pushes a `PodUpdateRequest` with curl, as a control plane would;
    /// returns the HTTP code and the JSON answer.
    pub fn push(&self, request: &serde_json::Value) -> Result<(u16, serde_json::Value)> {
        let body = request.to_string();
        let (code, answer) = curl(&[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            &body,
            &self.url("/api/v1/pods"),
        ])?;
        Ok((
            code,
            serde_json::from_str(&answer).with_context(|| format!("push answer: {answer}"))?,
        ))
    }

    /// Sends SIGTERM, as a service manager would.
    pub fn terminate(&self) -> Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        Ok(())
    }

    /// `kill -9`: no chance to clean up.
    pub fn kill_hard(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<ExitStatus> {
        let mut exit = Ok(None);
        wait_until_within(limit, "the agent to exit", || {
            exit = self.child.try_wait();
            !matches!(exit, Ok(None))
        })?;
        exit?.context("the agent exited")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a CLI subcommand of the agent binary; returns (success, stdout, stderr).
pub fn cli(args: &[&str]) -> Result<(bool, String, String)> {
    let output = Command::new(agent_binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running the CLI")?;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// A temp dir with a hosts file holding foreign lines, and a state dir.
#[derive(Debug)]
pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

/// What a hosts file holds before the agent touches it.
pub const FOREIGN_HOSTS: &str =
    "127.0.0.1 localhost\n::1 localhost ip6-localhost\n# keep me\n10.9.9.9 db.internal\n";

impl Sandbox {
    pub fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("hosts"), FOREIGN_HOSTS)?;
        Ok(Self { dir })
    }

    pub fn hosts(&self) -> PathBuf {
        self.dir.path().join("hosts")
    }

    pub fn hosts_str(&self) -> String {
        self.hosts().display().to_string()
    }

    pub fn state_dir(&self) -> String {
        self.dir.path().join("state").display().to_string()
    }

    pub fn hosts_text(&self) -> String {
        std::fs::read_to_string(self.hosts()).unwrap_or_default()
    }

    /// The usual flags: free agent port, this sandbox's files, `range`, and no
    /// local cluster (a developer's real kube context is never touched).
    pub fn args<'a>(&'a self, range: &'a str, hosts: &'a str, state: &'a str) -> Vec<&'a str> {
        let mut args = self.args_with_cluster(range, hosts, state);
        args.push("--no-cluster");
        args
    }

    /// The usual flags, leaving the cluster settings to the caller.
    pub fn args_with_cluster<'a>(
        &'a self,
        range: &'a str,
        hosts: &'a str,
        state: &'a str,
    ) -> Vec<&'a str> {
        vec![
            "--agent-port",
            "0",
            "--port-range",
            range,
            "--hosts-file",
            hosts,
            "--state-dir",
            state,
        ]
    }
}

/// A loopback TCP server answering every connection with `text`, in a thread.
pub fn greeting_server(text: &'static str) -> Result<std::net::SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let _ = std::io::Write::write_all(&mut stream, text.as_bytes());
        }
    });
    Ok(addr)
}

/// A TCP server on `address` echoing every byte back, a thread per
/// connection: a pod for raw tunnel tests.
pub fn echo_server_on(address: &str) -> Result<std::net::SocketAddr> {
    let listener = std::net::TcpListener::bind(address)?;
    let bound = listener.local_addr()?;
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            std::thread::spawn(move || {
                let Ok(mut reader) = stream.try_clone() else {
                    return;
                };
                let mut writer = stream;
                let _ = std::io::copy(&mut reader, &mut writer);
            });
        }
    });
    Ok(bound)
}

/// A port on loopback that refuses connections for as long as the returned
/// socket lives: bound, so nothing else takes it meanwhile, but never
/// listening. (A port found free and released is free only at that
/// moment: a test beside this one may take it next.)
/// `listen` on the socket brings the port to life.
pub fn refusing_port() -> (socket2::Socket, u16) {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    let port = socket
        .local_addr()
        .ok()
        .and_then(|addr| addr.as_socket())
        .expect("addr")
        .port();
    (socket, port)
}

/// A control plane stand-in on `listener` that answers every report 200, in a thread.
pub fn serve_control_plane(listener: std::net::TcpListener) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut buf = [0u8; 65536];
            let _ = std::io::Read::read(&mut stream, &mut buf);
            let _ = std::io::Write::write_all(
                &mut stream,
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
            );
        }
    });
}

/// Reads everything a tunnel's pod sends on a fresh connection.
pub fn read_from(port: u16) -> Result<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(DEADLINE))?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut stream, &mut text)?;
    Ok(text)
}

/// Whether a connection to `port` is refused.
pub fn refuses(port: u16) -> bool {
    matches!(
        std::net::TcpStream::connect(("127.0.0.1", port)),
        Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// Runs curl and returns (HTTP code, body).
pub fn curl(args: &[&str]) -> Result<(u16, String)> {
    let output = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .context("running curl (install it: apt-get install curl)")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').context("curl output")?;
    Ok((code.trim().parse()?, body.to_owned()))
}

/// Another program (python3) listening on a port, as a user's process might:
/// killed when dropped.
#[derive(Debug)]
pub struct PortSquatter {
    child: std::process::Child,
}

impl PortSquatter {
    /// Starts it on `127.0.0.1:port` and waits until it listens.
    pub fn on(port: u16) -> Result<Self> {
        let mut child = Command::new("python3")
            .args([
                "-c",
                "import socket,sys; s=socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); \
                 s.listen(); print('ready', flush=True); sys.stdin.read()",
                &port.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("running python3")?;
        let mut ready = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut ready)?;
        if ready.trim() != "ready" {
            bail!("python3 could not listen on port {port}");
        }
        Ok(Self { child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for PortSquatter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP server on `addr` answering every request with `body`, in a thread.
pub fn http_pod(addr: std::net::SocketAddr, body: &'static str) {
    use std::io::{Read, Write};
    let listener =
        std::net::TcpListener::bind(addr).unwrap_or_else(|err| panic!("bind {addr}: {err}"));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let _ = stream.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    });
}

/// Fails the test, saying why, where no private mount namespace can be made
/// (the tests that need one run as root, as CI does).
pub fn require_mount_namespace() {
    let probe = Command::new("unshare")
        .args(["--mount", "true"])
        .output()
        .expect("unshare (util-linux) is installed");
    assert!(
        probe.status.success(),
        "this test needs a private mount namespace (run as root, as CI does): {}",
        String::from_utf8_lossy(&probe.stderr)
    );
}
