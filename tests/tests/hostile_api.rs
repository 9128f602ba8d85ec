//! A broken or hostile staging API server must not exhaust the agent: the
//! Kubernetes API emulator's SPDY port-forward misbehaves on demand (header
//! blocks that inflate a thousandfold, data frames of SPDY's largest size,
//! error text without end, ping floods, streams opened by the server), and
//! the built agent, reaching the pod `--staging-via api`, must keep its
//! memory and end what misbehaves.
//!
//! Memory is the agent process's: its peak resident size (VmHWM, reset
//! through `/proc/<pid>/clear_refs` just before the flood) over its
//! resident size before it. The bound each test allows is far below what
//! the flood would cost if held, and far above what a session, its buffers
//! and the allocator's slack take; each says why.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use k3s_local_agent_e2e::kube_emulator::{FloodEnd, Hostile, KubeEmulator};
use k3s_local_agent_e2e::{
    agent_binary, echo_server_on, wait_until_within, AgentProcess, Sandbox, DEADLINE,
};
use serde_json::json;

const CONTEXT: &str = "staging-ctx";
const MIB: u64 = 1024;
/// How long a flood may take to be written (a debug-built agent reads a
/// few hundred MiB of frames).
const FLOOD_DEADLINE: Duration = Duration::from_secs(120);

/// The agent reaching pod `team-a/web` of `staging` through its API only,
/// and the pod's tunnel port.
fn agent_for(staging: &KubeEmulator, sandbox: &Sandbox, range: &str) -> (AgentProcess, u16) {
    let kubeconfig = sandbox.dir.path().join("staging.kubeconfig");
    staging
        .write_kubeconfig(&kubeconfig, CONTEXT)
        .expect("kubeconfig");
    let (hosts, state) = (sandbox.hosts_str(), sandbox.state_dir());
    let kubeconfig = kubeconfig.display().to_string();
    let mut args = sandbox.args(range, &hosts, &state);
    args.extend([
        "--staging-kube-context",
        CONTEXT,
        "--staging-kubeconfig",
        &kubeconfig,
        "--staging-via",
        "api",
    ]);
    let agent = AgentProcess::run_command(Command::new(agent_binary()).arg("run").args(&args))
        .expect("agent runs");
    let (code, answer) = agent
        .push(&json!({
            "agent_id": agent.agent_id().expect("agent id"),
            "action": "create",
            "pods": [{"id": "web-1", "name": "web", "namespace": "team-a",
                      "ip": "10.0.1.100", "port": 8080}],
        }))
        .expect("push");
    assert_eq!(code, 200, "{answer}");
    let tunnel =
        agent.get_json("/api/v1/pods/status").expect("status")["redirections"]["web-1"].clone();
    let port = tunnel["local_port"]
        .as_u64()
        .and_then(|port| u16::try_from(port).ok())
        .unwrap_or_else(|| panic!("web-1 listens: {tunnel}"));
    (agent, port)
}

/// The staging cluster: pod `team-a/web`, an echo server behind it, its
/// SPDY sessions hostile as `mode` says from the first.
async fn hostile_staging(mode: Hostile) -> KubeEmulator {
    let staging = KubeEmulator::start().await.expect("staging emulator");
    staging.insert_pod("team-a", "web", json!({}), json!({}));
    let echo = echo_server_on("127.0.0.1:0").expect("echo");
    assert!(staging.set_backend("team-a", "web", echo));
    staging.hostile(Some(mode));
    staging
}

/// A field of `/proc/<pid>/status`, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix(field)
                    .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            })
        })
        .unwrap_or_else(|| panic!("{field} of {pid}"))
}

/// The agent's memory from now on: its resident size now, and its peak
/// started afresh.
struct Memory {
    pid: u32,
    before: u64,
}

impl Memory {
    fn from_now(agent: &AgentProcess) -> Self {
        let pid = agent.pid();
        // "5" resets the peak resident size to the current one.
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset VmHWM");
        Self {
            pid,
            before: status_kib(pid, "VmRSS:"),
        }
    }

    /// How far the peak rose over the resident size at the start, in KiB.
    fn peak_growth(&self) -> u64 {
        status_kib(self.pid, "VmHWM:").saturating_sub(self.before)
    }
}

/// Waits until the emulator's flood has ended, and says how.
fn flood_ended(staging: &KubeEmulator, agent: &AgentProcess) -> FloodEnd {
    wait_until_within(FLOOD_DEADLINE, "the flood to end", || {
        staging.flood().end.is_some()
    })
    .unwrap_or_else(|err| {
        panic!(
            "{err}: {:?}, the agent said {:#?}",
            staging.flood(),
            agent.log_lines()
        )
    });
    staging.flood().end.expect("ended")
}

/// Whether the connection ends (EOF or an error) before `DEADLINE`,
/// whatever it carries until then.
fn ends(mut client: TcpStream) -> bool {
    client.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut buffer = vec![0u8; 64 * 1024];
    let deadline = std::time::Instant::now() + DEADLINE;
    while std::time::Instant::now() < deadline {
        match client.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(err) if err.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
    false
}

/// A SYN_REPLY whose header block, 65 KiB on the wire, inflates to 64
/// MiB. Inflated, that is 64 MiB plus its copy as a header value: 128 MiB
/// at the peak (197 MiB was measured). Refused from its frame header (no
/// port-forward control frame is over 16 KiB; one that inflates past 16
/// KiB is refused as it inflates, see the spdy crate's tests), it costs
/// nothing. The bound, 32 MiB, leaves the session, the kube client's
/// buffers and the allocator's arenas their slack (about 4 MiB measured).
#[tokio::test(flavor = "multi_thread")]
async fn a_header_block_that_inflates_a_thousandfold_is_refused_not_inflated() {
    let staging = hostile_staging(Hostile::HeaderBomb { inflated: 64 << 20 }).await;
    let sandbox = Sandbox::new().expect("sandbox");
    let (agent, port) = agent_for(&staging, &sandbox, "23100-23109");
    let memory = Memory::from_now(&agent);
    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    client.write_all(b"hello").expect("write");
    // The connection's replies come before its data: once it answers or
    // ends, the agent has read the blocks.
    let mut answer = [0u8; 5];
    client
        .set_read_timeout(Some(FLOOD_DEADLINE))
        .expect("timeout");
    let answered = client.read_exact(&mut answer).is_ok();
    let growth = memory.peak_growth();
    eprintln!("header bomb: peak grew {growth} KiB (answered: {answered})");
    assert!(growth < 32 * MIB, "peak grew {growth} KiB");
    assert!(!answered, "a session whose header block is refused ends");
    // A server that behaves again is reached on a session of its own.
    staging.hostile(None);
    let mut again = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    again.set_read_timeout(Some(DEADLINE)).expect("timeout");
    again.write_all(b"again").expect("write");
    let mut echoed = [0u8; 5];
    if let Err(err) = again.read_exact(&mut echoed) {
        panic!("no echo ({err}): {:#?}", agent.log_lines());
    }
    assert_eq!(&echoed, b"again");
    agent.terminate().expect("stop");
}

/// 24 data frames of SPDY's largest size (16 MiB) to a client that reads
/// nothing: held, that is 384 MiB queued for one connection (388 MiB was
/// measured); each is passed over unheld and the connection reset at the
/// first. The bound, 32 MiB, is two of the largest frames a port-forward
/// takes (1 MiB) many times over, for the session's buffers and the
/// allocator's slack (about 4 MiB measured).
#[tokio::test(flavor = "multi_thread")]
async fn data_frames_of_16_mib_are_passed_over_and_their_connection_reset() {
    let staging = hostile_staging(Hostile::DataFrames {
        size: (1 << 24) - 1,
        count: 24,
    })
    .await;
    let sandbox = Sandbox::new().expect("sandbox");
    let (agent, port) = agent_for(&staging, &sandbox, "23110-23119");
    let memory = Memory::from_now(&agent);
    let client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let end = flood_ended(&staging, &agent);
    let growth = memory.peak_growth();
    eprintln!(
        "huge frames: peak grew {growth} KiB ({end:?} after {} bytes)",
        staging.flood().written
    );
    assert!(growth < 32 * MIB, "peak grew {growth} KiB");
    assert!(ends(client), "the connection was reset");
    agent.terminate().expect("stop");
}

/// Where the server refuses SPDY, a WebSocket per connection: four
/// connections, each sent one message of almost 16 MiB (tungstenite's
/// largest frame by default) by a server whose clients read none of it.
/// Taken, each is held whole until its client reads: 64 MiB and more. A
/// message over 4 MiB ends its connection from its frame header. The
/// bound, 32 MiB, as the others'.
#[tokio::test(flavor = "multi_thread")]
async fn websocket_messages_over_a_few_mib_end_their_connection_unheld() {
    let staging = hostile_staging(Hostile::DataFrames {
        size: (16 << 20) - 64,
        count: 1,
    })
    .await;
    staging.refuse_spdy();
    let sandbox = Sandbox::new().expect("sandbox");
    let (agent, port) = agent_for(&staging, &sandbox, "23150-23159");
    let memory = Memory::from_now(&agent);
    let clients: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    // A message reaches its client only whole: once each client has a byte
    // or its end, the agent has read or refused its message.
    let mut ended = 0;
    for mut client in clients.iter() {
        client.set_read_timeout(Some(DEADLINE)).expect("timeout");
        let mut byte = [0u8; 1];
        match client.read(&mut byte) {
            Ok(1) => {}
            Ok(_) => ended += 1,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("no byte and no end within {DEADLINE:?}")
            }
            Err(_) => ended += 1,
        }
    }
    let growth = memory.peak_growth();
    eprintln!("websocket: peak grew {growth} KiB ({ended} of 4 ended)");
    assert!(growth < 32 * MIB, "peak grew {growth} KiB");
    assert_eq!(ended, 4, "every connection ended");
    drop(clients);
    agent.terminate().expect("stop");
}

/// 256 MiB of error text, never finished: held, that is 256 MiB for one
/// connection, more as its buffer doubles (395 to 463 MiB measured); kept
/// to 4 KiB, the connection ends. The bound, 32 MiB, is as the others'.
#[tokio::test(flavor = "multi_thread")]
async fn endless_error_text_ends_its_connection_after_a_few_kib() {
    let staging = hostile_staging(Hostile::ErrorText { bytes: 256 << 20 }).await;
    let sandbox = Sandbox::new().expect("sandbox");
    let (agent, port) = agent_for(&staging, &sandbox, "23120-23129");
    let memory = Memory::from_now(&agent);
    let client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let ended = ends(client);
    let end = flood_ended(&staging, &agent);
    let growth = memory.peak_growth();
    eprintln!(
        "error text: peak grew {growth} KiB ({end:?} after {} bytes)",
        staging.flood().written
    );
    assert!(growth < 32 * MIB, "peak grew {growth} KiB");
    assert!(ended, "the connection ended at once");
    agent.terminate().expect("stop");
}

/// 4 million pings from a server that reads nothing: each echo queued is
/// a frame waiting (tens of bytes), 150 MiB and more in all (202 MiB
/// measured); answered only while a few are pending, they cost nothing.
/// The bound, 32 MiB, as the others'.
#[tokio::test(flavor = "multi_thread")]
async fn a_ping_flood_from_a_server_that_reads_nothing_queues_few_echoes() {
    let staging = hostile_staging(Hostile::PingFlood { count: 4_000_000 }).await;
    let sandbox = Sandbox::new().expect("sandbox");
    let (agent, port) = agent_for(&staging, &sandbox, "23130-23139");
    let memory = Memory::from_now(&agent);
    let _client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let end = flood_ended(&staging, &agent);
    let growth = memory.peak_growth();
    eprintln!(
        "ping flood: peak grew {growth} KiB ({end:?} after {} bytes)",
        staging.flood().written
    );
    assert!(growth < 32 * MIB, "peak grew {growth} KiB");
    agent.terminate().expect("stop");
}

/// A million streams opened by the server (about 25 MB of frames), which
/// reads nothing. The first ends the session, so the server's writes are
/// cut short within what the sockets hold in flight when it does (about
/// 100 KiB here; loopback buffers start at a few hundred KiB and grow only
/// while they are read). A session that refused each stream instead would
/// read on, queueing a reset a stream, until its own connection's reply
/// timeout (10 s) ended it: megabytes. The memory bound, 32 MiB, is as the
/// others'.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_opens_streams_has_its_session_ended() {
    let staging = hostile_staging(Hostile::ServerStreams { count: 1_000_000 }).await;
    let sandbox = Sandbox::new().expect("sandbox");
    let (agent, port) = agent_for(&staging, &sandbox, "23140-23149");
    let memory = Memory::from_now(&agent);
    let client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let end = flood_ended(&staging, &agent);
    let growth = memory.peak_growth();
    let written = staging.flood().written;
    eprintln!("server streams: peak grew {growth} KiB ({end:?} after {written} bytes)");
    assert_eq!(end, FloodEnd::Cut, "the agent ended the session");
    assert!(
        written < 2 << 20,
        "the session read on: {written} bytes written before it ended"
    );
    assert!(growth < 32 * MIB, "peak grew {growth} KiB");
    assert!(ends(client), "its connection ended with it");
    agent.terminate().expect("stop");
}
