//! Faults from the outside world, injected for real on loopback: a pod that
//! black-holes connections or resets them mid-stream, and a control plane that
//! takes a request and never answers. Each fault ends the one thing it touches;
//! everything else carries on, and recovery needs no one's help.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use common::{echo_through, pod, wait_until, wait_until_within, within, Fixture};
use serde_json::{json, Value};
use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Longer than the agent's own timeouts (pod connect 5 s, report 10 s).
const PAST_TIMEOUTS: Duration = Duration::from_secs(25);

/// A pod that takes no new connections: a listener with a backlog of one that
/// never accepts, with its queue already full, so the kernel drops every
/// further SYN and a connect hangs. Returns the listener (to bring the pod
/// back) and the queued connection that fills it.
fn black_hole() -> (std::net::TcpListener, std::net::TcpStream) {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    socket.listen(0).expect("listen");
    let listener: std::net::TcpListener = socket.into();
    let filler = std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("fill");
    (listener, filler)
}

/// Whether `stream` is closed by the other side (end of stream or reset)
/// within the deadline.
async fn ends(mut stream: TcpStream, limit: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(limit, stream.read(&mut byte)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_pod_times_out_its_connections_only_and_recovers() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let (hole, _filler) = black_hole();
    let hole_addr = hole.local_addr().expect("addr");
    let healthy = common::echo_server().await;
    let (code, answer) = agent
        .push(
            "create",
            json!([pod("hole", "hole", hole_addr), pod("fine", "fine", healthy)]),
        )
        .await;
    assert_eq!(code, 200, "{answer}");
    let hole_port = agent.port_of("hole").await;
    let fine_port = agent.port_of("fine").await;

    // A client of the black-holed pod is held while the agent waits for the
    // pod, and the healthy tunnel answers all the while.
    let stuck = TcpStream::connect(("127.0.0.1", hole_port))
        .await
        .expect("the tunnel accepts");
    assert_eq!(
        echo_through(fine_port, b"still here").await.expect("echo"),
        b"still here"
    );
    assert!(
        ends(stuck, PAST_TIMEOUTS).await,
        "the stuck connection was never closed"
    );
    let redirection = agent.redirection("hole").await;
    let error = redirection["error"].as_str().unwrap_or_default();
    assert!(error.contains("no answer within"), "{redirection}");
    assert_eq!(agent.redirection("fine").await["error"], Value::Null);

    // The pod comes back: the next connection goes through by itself, and
    // the tunnel's error clears.
    let served = Arc::new(AtomicBool::new(false));
    let served_flag = Arc::clone(&served);
    std::thread::spawn(move || {
        for stream in hole.incoming() {
            let Ok(mut stream) = stream else { return };
            served_flag.store(true, Ordering::SeqCst);
            let _ = std::io::Write::write_all(&mut stream, b"back");
        }
    });
    let mut answer = String::new();
    within("the pod to answer again", async {
        loop {
            let mut stream = TcpStream::connect(("127.0.0.1", hole_port))
                .await
                .expect("the tunnel accepts");
            answer.clear();
            let _ = stream.read_to_string(&mut answer).await;
            if answer == "back" {
                return;
            }
        }
    })
    .await;
    assert!(served.load(Ordering::SeqCst));
    assert_eq!(agent.redirection("hole").await["error"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_stream_ends_that_connection_only() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    // A pod that reads a first message, then resets the connection.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let resetting = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut first = [0u8; 5];
                if stream.read_exact(&mut first).await.is_ok() {
                    let _ = stream.write_all(b"ack").await;
                    // Linger zero: close sends RST, not FIN.
                    let _ = stream.set_zero_linger();
                }
            });
        }
    });
    let healthy = common::echo_server().await;
    agent
        .push(
            "create",
            json!([
                pod("flaky", "flaky", resetting),
                pod("steady", "steady", healthy)
            ]),
        )
        .await;
    let flaky_port = agent.port_of("flaky").await;
    let steady_port = agent.port_of("steady").await;

    // A long-lived connection through the other tunnel, open across the reset.
    let mut steady = TcpStream::connect(("127.0.0.1", steady_port))
        .await
        .expect("steady tunnel");
    steady.write_all(b"before").await.expect("write");
    let mut echoed = [0u8; 6];
    within("echo before", steady.read_exact(&mut echoed))
        .await
        .expect("echo");

    let mut flaky = TcpStream::connect(("127.0.0.1", flaky_port))
        .await
        .expect("flaky tunnel");
    flaky.write_all(b"hello").await.expect("write");
    let mut ack = [0u8; 3];
    within("the pod's ack", flaky.read_exact(&mut ack))
        .await
        .expect("ack");
    assert!(
        ends(flaky, common::DEADLINE).await,
        "the reset did not end the connection"
    );
    let mut last_error = String::new();
    wait_until("the tunnel to say why", || {
        let status = agent.agent.status();
        last_error = status.redirections["flaky"]
            .last_error
            .clone()
            .unwrap_or_default();
        last_error.contains("broke mid-stream")
    })
    .await;
    // The tunnel is not failing: a reset is one connection's fate.
    assert_eq!(agent.redirection("flaky").await["error"], Value::Null);
    assert_eq!(agent.redirection("flaky").await["status"], "active");

    steady.write_all(b"after!").await.expect("write");
    within("echo after", steady.read_exact(&mut echoed))
        .await
        .expect("echo");
    assert_eq!(&echoed, b"after!");
    // And the flaky pod's tunnel takes the next connection as before.
    let mut again = TcpStream::connect(("127.0.0.1", flaky_port))
        .await
        .expect("flaky tunnel again");
    again.write_all(b"again").await.expect("write");
    within("the pod's ack again", again.read_exact(&mut ack))
        .await
        .expect("ack");
}

/// A control plane that can be told to take requests and never answer.
struct SlowControlPlane {
    url: String,
    hanging: Arc<AtomicBool>,
    reports: watch::Receiver<Vec<Value>>,
}

impl SlowControlPlane {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let hanging = Arc::new(AtomicBool::new(true));
        let (record, reports) = watch::channel(Vec::new());
        let record = Arc::new(record);
        let hang = Arc::clone(&hanging);
        let app = axum::Router::new().route(
            "/api/v1/staging/status",
            post(move |axum::Json(body): axum::Json<Value>| {
                let hang = Arc::clone(&hang);
                let record = Arc::clone(&record);
                async move {
                    if hang.load(Ordering::SeqCst) {
                        std::future::pending::<()>().await;
                    }
                    record.send_modify(|reports| reports.push(body));
                    axum::Json(json!({"status": "ok"}))
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            url,
            hanging,
            reports,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_that_never_answers_times_out_and_stalls_nothing() {
    let fx = Fixture::new().await;
    let control_plane = SlowControlPlane::start().await;
    let mut config = fx.config();
    config.control_plane_url = control_plane.url.parse().expect("url");
    let agent = fx.start_with(config).await;
    let upstream = common::echo_server().await;

    // While the first report hangs, pushes are answered and tunnels work.
    let (code, _) = within(
        "a push while the report hangs",
        agent.push("create", json!([pod("p1", "p-one", upstream)])),
    )
    .await;
    assert_eq!(code, 200);
    let port = agent.port_of("p1").await;
    assert_eq!(echo_through(port, b"ping").await.expect("echo"), b"ping");

    wait_until_within(PAST_TIMEOUTS, "the hung report to time out", || {
        agent.agent.health().control_plane.reachable == Some(false)
    })
    .await;
    let health = agent.agent.health();
    let error = health.control_plane.last_error.unwrap_or_default();
    assert!(error.contains("timed out"), "{error}");

    // The control plane answers again: the next report (backoff) catches it
    // up with the pod pushed during the outage.
    control_plane.hanging.store(false, Ordering::SeqCst);
    let mut reports = control_plane.reports.clone();
    within("a report with the pod", async {
        loop {
            let caught_up = reports
                .borrow_and_update()
                .iter()
                .any(|report| report["staging_pods"]["p1"]["local_port"] == json!(port));
            if caught_up {
                return;
            }
            reports.changed().await.expect("control plane alive");
        }
    })
    .await;
    wait_until("the agent to see it back", || {
        agent.agent.health().control_plane.reachable == Some(true)
    })
    .await;
}
