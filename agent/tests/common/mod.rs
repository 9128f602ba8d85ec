//! Shared test fixtures: an agent started as a library on loopback port 0
//! with its own state dir, hosts file and port range; a control-plane
//! stand-in that records every report; and upstream servers that play pods.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Json, Router};
use k3s_local_agent::config::{Config, FileSettings, PortRange, RunOverrides};
use k3s_local_agent::Agent;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Lines a hosts file holds before the agent touches it.
pub const FOREIGN_HOSTS: &str =
    "127.0.0.1 localhost\n::1 localhost ip6-localhost\n# keep me\n10.9.9.9 db.internal\n";

/// How long any awaited condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Waits for `condition` to hold, checking every few milliseconds, and fails
/// the test with `what` when the deadline passes first.
pub async fn wait_until(what: &str, condition: impl FnMut() -> bool) {
    wait_until_within(DEADLINE, what, condition).await;
}

/// [`wait_until`] with a deadline of its own, for conditions that involve a
/// timeout of the agent's.
pub async fn wait_until_within(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    eventually_within(limit, what, || std::future::ready(condition())).await;
}

/// The one polling loop of these tests: asks `check` until it holds, and
/// fails the test with `what` when `limit` passes first. The deadline only
/// fails the wait; it is never what a test asserts. Checks come every 10 ms
/// at first and slow to every 100 ms, so a quick condition is seen at once
/// and one that asks the agent over a connection does not ask it a hundred
/// times a second for a minute.
pub async fn eventually_within<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut pause = Duration::from_millis(10);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Awaits `future` or fails the test after the deadline.
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Where test agents' port ranges come from: 24000-31999, in blocks of 20.
/// Below the kernel's ephemeral ports (32768 up), so no outgoing connection
/// lands in one, and apart from the e2e tests' fixed ranges (18760-23189).
const BAND_START: u16 = 24_000;
const BLOCK: u16 = 20;
const BLOCKS: u16 = 400;
/// Block `i` is taken while someone holds port `MARKERS + i` (32000-32399).
const MARKERS: u16 = 32_000;

/// Leases a range of at least `ports` ports that no other test agent gets:
/// not in this test binary, not in another one running beside it (a second
/// `cargo test`), however the tests are scheduled.
///
/// A block is taken by binding its marker port, which the kernel grants to
/// one socket only, atomically, across every process. The marker is then
/// kept until this process exits, never given back when the test ends: an
/// agent the test dropped may still be closing its listeners on its
/// forwarding threads, so a block handed out again could find its ports
/// taken. The kernel frees the markers together with every listener the
/// process left, so the next process never meets them. Before a lease is
/// made, each of its ports is bound once (as the agent binds them, with
/// `SO_REUSEADDR`), so a range some other program holds is passed over.
pub fn lease_ports(ports: u16) -> PortRange {
    let blocks = ports.div_ceil(BLOCK).max(1);
    let mut first = 0;
    while first + blocks <= BLOCKS {
        let mut markers = Vec::new();
        for block in first..first + blocks {
            match take_marker(block) {
                Some(marker) => markers.push(marker),
                None => break,
            }
        }
        let taken = u16::try_from(markers.len()).expect("few blocks");
        if taken < blocks {
            // Block `first + taken` is someone else's; look past it.
            first += taken + 1;
            continue;
        }
        let start = BAND_START + first * BLOCK;
        let range = PortRange {
            start,
            end: start + ports - 1,
        };
        for marker in markers {
            // Held for the life of the process (see above).
            let _held_until_exit = std::os::fd::IntoRawFd::into_raw_fd(marker);
        }
        if (range.start..=range.end)
            .all(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
        {
            return range;
        }
        first += blocks;
    }
    panic!(
        "no {ports} free ports left in {BAND_START}-{}",
        BAND_START + BLOCKS * BLOCK - 1
    );
}

/// Binds block `block`'s marker (without `SO_REUSEADDR`, never listening),
/// or `None` when some socket holds it.
fn take_marker(block: u16) -> Option<socket2::Socket> {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], MARKERS + block)).into())
        .ok()?;
    Some(socket)
}

/// A control-plane stand-in recording every status report it receives.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    pub url: String,
    reports: Arc<Mutex<Vec<Report>>>,
    count: watch::Receiver<usize>,
}

/// One status report as received: its headers, its body and when it came.
#[derive(Debug, Clone)]
struct Report {
    headers: HeaderMap,
    body: Value,
    at: std::time::Instant,
}

#[derive(Clone)]
struct Recorder {
    reports: Arc<Mutex<Vec<Report>>>,
    count: Arc<watch::Sender<usize>>,
    /// Keep only the latest report (and count the rest), so a long test's
    /// own memory stays flat.
    latest_only: bool,
}

async fn record(
    State(rec): State<Recorder>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Json<Value> {
    {
        let mut reports = rec.reports.lock().expect("reports lock");
        if rec.latest_only {
            reports.clear();
        }
        reports.push(Report {
            headers,
            body,
            at: std::time::Instant::now(),
        });
    }
    rec.count.send_modify(|count| *count += 1);
    Json(json!({"status": "ok"}))
}

impl ControlPlane {
    /// Starts on a fresh loopback port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind control plane");
        Self::serve(listener)
    }

    /// Starts on a fresh loopback port, keeping only the latest report.
    pub async fn start_latest_only() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind control plane");
        Self::serve_with(listener, true)
    }

    /// Starts on a given listener (to come up on a port known in advance).
    pub fn serve(listener: TcpListener) -> Self {
        Self::serve_with(listener, false)
    }

    fn serve_with(listener: TcpListener, latest_only: bool) -> Self {
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let reports = Arc::new(Mutex::new(Vec::new()));
        let (count_tx, count) = watch::channel(0);
        let app = Router::new()
            .route("/api/v1/staging/status", post(record))
            .with_state(Recorder {
                reports: Arc::clone(&reports),
                count: Arc::new(count_tx),
                latest_only,
            });
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            url,
            reports,
            count,
        }
    }

    pub fn reports(&self) -> Vec<(HeaderMap, Value)> {
        self.reports
            .lock()
            .expect("reports lock")
            .iter()
            .map(|report| (report.headers.clone(), report.body.clone()))
            .collect()
    }

    /// When each report came, in order.
    pub fn arrivals(&self) -> Vec<std::time::Instant> {
        self.reports
            .lock()
            .expect("reports lock")
            .iter()
            .map(|report| report.at)
            .collect()
    }

    pub fn len(&self) -> usize {
        *self.count.borrow()
    }

    /// Waits for a report (after the first `after`) that satisfies `check`.
    pub async fn wait_for(
        &self,
        after: usize,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let mut count = self.count.clone();
        within(what, async {
            loop {
                if let Some((_, body)) = self
                    .reports()
                    .into_iter()
                    .skip(after)
                    .find(|(_, b)| check(b))
                {
                    return body;
                }
                count.changed().await.expect("control plane alive");
            }
        })
        .await
    }
}

/// A TCP server that echoes every byte back: a pod for raw tunnel tests.
pub async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

/// A TCP server that answers every connection with `greeting` and closes:
/// tells which pod a connection reached.
pub async fn greeting_server(greeting: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind greeter");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = stream.write_all(greeting.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// Connects to a tunnel and reads everything the pod sends until it closes.
pub async fn read_all_from(port: u16) -> std::io::Result<String> {
    read_all_at(SocketAddr::from(([127, 0, 0, 1], port))).await
}

/// [`read_all_from`] at any address (a pod's own address, by name).
pub async fn read_all_at(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut text = String::new();
    within("tunnel to answer", stream.read_to_string(&mut text)).await?;
    Ok(text)
}

/// A connection through a tunnel to an echo pod, proven to forward (a ping
/// comes back), and left open.
pub async fn open_and_ping(port: u16) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect through the tunnel");
    stream.write_all(b"ping").await.expect("write");
    let mut answer = [0_u8; 4];
    stream.read_exact(&mut answer).await.expect("echo");
    assert_eq!(&answer, b"ping");
    stream
}

/// Sends `payload` through a tunnel to an echo pod and returns what came back.
pub async fn echo_through(port: u16, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(payload).await?;
    stream.shutdown().await?;
    let mut back = Vec::new();
    within("echo to come back", stream.read_to_end(&mut back)).await?;
    Ok(back)
}

/// [`echo_through`] for payloads larger than the sockets' buffers: writes and
/// reads at once, so neither side waits on the other.
pub async fn echo_bulk(port: u16, payload: Vec<u8>) -> Vec<u8> {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect through the tunnel");
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        write.write_all(&payload).await.expect("write");
        write.shutdown().await.expect("half-close");
    });
    let mut back = Vec::new();
    read.read_to_end(&mut back).await.expect("read the echo");
    writer.await.expect("writer");
    back
}

/// An address on loopback that refuses connections for as long as the
/// returned socket lives: bound, so no other test or outgoing connection can
/// take the port, but never listening. (Binding a port and closing it again
/// does not do: the port is free for the next `bind(0)` of a test running
/// beside it, and the "refusing" pod then answers.)
pub fn refusing_address() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind");
    let addr = socket.local_addr().expect("addr");
    (socket, addr)
}

/// Whether a connection to `port` on loopback is refused.
pub async fn refuses(port: u16) -> bool {
    matches!(
        TcpStream::connect(("127.0.0.1", port)).await,
        Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// Everything one test's agent lives in.
#[derive(Debug)]
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub hosts: PathBuf,
    pub range: PortRange,
    pub control_plane: ControlPlane,
}

impl Fixture {
    /// A fixture with a range of 20 ports of its own.
    pub async fn new() -> Self {
        Self::with_ports(20).await
    }

    /// A fixture with a range of `ports` ports of its own ([`lease_ports`]).
    pub async fn with_ports(ports: u16) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, FOREIGN_HOSTS).expect("hosts");
        Self {
            dir,
            hosts,
            range: lease_ports(ports),
            control_plane: ControlPlane::start().await,
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The settings a test agent runs with; tweak before starting.
    pub fn config(&self) -> Config {
        let overrides = RunOverrides {
            agent_id: Some("test-agent".into()),
            agent_port: Some(0),
            control_plane_url: Some(self.control_plane.url.clone()),
            sync_interval: Some(3600),
            port_range: Some(self.range),
            hosts_file: Some(self.hosts.clone()),
            state_dir: Some(self.state_dir()),
            // Hermetic: the cluster tests turn the mirror on against the emulator.
            no_cluster: true,
            ..RunOverrides::default()
        };
        Config::layer(&overrides, &FileSettings::default()).expect("test config")
    }

    pub async fn start(&self) -> TestAgent {
        self.start_with(self.config()).await
    }

    pub async fn start_with(&self, config: Config) -> TestAgent {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind agent");
        let agent = k3s_local_agent::start(config, listener)
            .await
            .expect("agent starts");
        TestAgent::new(agent)
    }

    pub fn hosts_text(&self) -> String {
        std::fs::read_to_string(&self.hosts).expect("read hosts")
    }
}

/// A started agent and an HTTP client pointed at it. Dropped (at the end of
/// a test, or when it panics), it stops the agent: see [`Drop`] below.
#[derive(Debug)]
pub struct TestAgent {
    pub agent: Agent,
    pub base: String,
    pub http: reqwest::Client,
}

impl Drop for TestAgent {
    /// `Drop` cannot await [`Agent::shutdown`], so it cancels the agent's root
    /// token, which is what `shutdown` itself stops everything with: the API
    /// server, the reporter, the mirror and every tunnel's accept loops (their
    /// tokens are its children) end, and the API port and the tunnels' ports
    /// close on their own runtimes. A test that checks what a graceful
    /// shutdown does (the hosts block cleared, the last report) still awaits
    /// `shutdown()`; cancelling again afterwards changes nothing.
    fn drop(&mut self) {
        self.agent.cancellation().cancel();
    }
}

impl TestAgent {
    pub fn new(agent: Agent) -> Self {
        let base = format!("http://{}", agent.local_addr());
        Self {
            agent,
            base,
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Pushes `pods` with `action`; returns the status code and JSON answer.
    pub async fn push(&self, action: &str, pods: Value) -> (u16, Value) {
        self.push_raw(json!({"agent_id": self.agent.agent_id(), "action": action, "pods": pods}))
            .await
    }

    pub async fn push_raw(&self, body: Value) -> (u16, Value) {
        self.post("/api/v1/pods", &body).await
    }

    /// POSTs JSON; returns the status code and the JSON answer.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("agent answers");
        let code = response.status().as_u16();
        (code, response.json().await.expect("JSON answer"))
    }

    pub async fn get(&self, path: &str) -> Value {
        self.http
            .get(self.url(path))
            .send()
            .await
            .expect("agent answers")
            .json()
            .await
            .expect("JSON answer")
    }

    pub async fn set_forwarding(&self, id: &str, enabled: bool) -> (u16, Value) {
        self.post(
            &format!("/api/v1/pods/{id}/forwarding"),
            &json!({"enabled": enabled}),
        )
        .await
    }

    /// The local port of a pod's tunnel, from the status endpoint.
    pub async fn port_of(&self, id: &str) -> u16 {
        let status = self.get("/api/v1/pods/status").await;
        let port = status["redirections"][id]["local_port"]
            .as_u64()
            .unwrap_or_else(|| panic!("pod {id} has no port: {status}"));
        u16::try_from(port).expect("port fits u16")
    }

    pub async fn redirection(&self, id: &str) -> Value {
        self.get("/api/v1/pods/status").await["redirections"][id].clone()
    }
}

/// A pod pushed as JSON, pointing at `target`.
pub fn pod(id: &str, name: &str, target: SocketAddr) -> Value {
    json!({
        "id": id, "name": name, "namespace": "staging", "image": "nginx:latest",
        "status": "running", "ip": target.ip().to_string(), "port": target.port(),
        "node_name": "node-1", "labels": {"app": name},
        "created_at": "2024-01-15T10:30:00Z", "updated_at": "2024-01-15T10:30:00Z"
    })
}

/// Opens an event stream with a tiny receive buffer and never reads it;
/// returns the socket and the status line's code.
pub async fn silent_subscriber(api: SocketAddr) -> (TcpStream, u16) {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(1024).expect("rcvbuf");
    socket.connect(&api.into()).expect("connect");
    socket.set_nonblocking(true).expect("nonblocking");
    let mut stream = TcpStream::from_std(socket.into()).expect("tokio");
    stream
        .write_all(b"GET /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .expect("ask");
    let mut head = [0u8; 12];
    within("the status line", stream.read_exact(&mut head))
        .await
        .expect("status line");
    let code = std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    (stream, code)
}

/// Asks for an event stream until one is granted (200), within `limit`;
/// every refusal meanwhile is a 503.
pub async fn wait_for_a_place(api: SocketAddr, limit: Duration) {
    eventually_within(limit, "an event stream to be granted", || async {
        let (_stream, code) = silent_subscriber(api).await;
        if code != 200 {
            assert_eq!(code, 503);
        }
        code == 200
    })
    .await;
}

/// Resident memory of this process, in KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
