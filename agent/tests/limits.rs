//! The agent's totals stay bounded whatever a control plane or a client
//! does: a cap on the pods held (a push past it is refused whole), pushes
//! that finish as one unit however the client behaves, `/health` answering
//! through pushes of thousands, targets that would loop back into the agent
//! refused, a loop through another forwarder cut by the per-tunnel cap, and
//! dashboard streams that are capped, share one snapshot and are dropped
//! when their client stops reading.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{
    echo_server, echo_through, pod, silent_subscriber, wait_for_a_place, wait_until,
    wait_until_within, within, Fixture,
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn many_pods(prefix: &str, count: usize, target: SocketAddr) -> Value {
    Value::Array(
        (0..count)
            .map(|i| pod(&format!("{prefix}-{i}"), &format!("{prefix}-{i}"), target))
            .collect(),
    )
}

/// `count` pods with only the fields a push needs, so that 5,000 fit in one
/// push (whose body is at most 1 MiB).
fn lean_pods(prefix: &str, count: usize, target: SocketAddr) -> Value {
    Value::Array(
        (0..count)
            .map(|i| {
                json!({"id": format!("{prefix}{i}"), "name": format!("{prefix}{i}"),
                       "ip": target.ip().to_string(), "port": target.port()})
            })
            .collect(),
    )
}

#[tokio::test]
async fn targets_that_lead_back_into_the_agent_are_refused_naming_the_field() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let api = agent.agent.local_addr();
    let upstream = echo_server().await;
    let (code, _) = agent
        .push("create", json!([pod("fine", "fine", upstream)]))
        .await;
    assert_eq!(code, 200);
    let hosts_before = fx.hosts_text();
    let tunnel = SocketAddr::from(([127, 0, 0, 1], agent.port_of("fine").await));
    let cases: [(SocketAddr, &str); 5] = [
        (api, "port"),
        (SocketAddr::from(([0, 0, 0, 0], api.port())), "port"),
        (tunnel, "port"),
        (SocketAddr::from(([127, 0, 0, 1], fx.range.end)), "port"),
        (SocketAddr::from(([127, 128, 0, 4], 80)), "ip"),
    ];
    for (target, field) in cases {
        let (code, answer) = agent
            .push("create", json!([pod("loop", "loop", target)]))
            .await;
        assert_eq!(code, 400, "{target}: {answer}");
        assert_eq!(answer["rejected"][0]["id"], "loop", "{answer}");
        assert_eq!(answer["rejected"][0]["field"], field, "{target}: {answer}");
        assert!(
            answer["rejected"][0]["error"].as_str().is_some_and(|e| e
                .contains(&target.to_string())
                || e.contains(&target.ip().to_string())),
            "{answer}"
        );
    }
    // Every port has a tunnel, so every port is checked: a second one that
    // leads back is refused too.
    let (code, answer) = agent
        .push(
            "create",
            json!([{"id": "loop2", "name": "loop2", "ip": "127.0.0.1",
                    "ports": [upstream.port(), api.port()]}]),
        )
        .await;
    assert_eq!(code, 400, "{answer}");
    assert_eq!(answer["rejected"][0]["field"], "ports", "{answer}");
    let status = agent.get("/api/v1/pods/status").await;
    assert_eq!(status["total_redirections"], 1, "{status}");
    assert_eq!(fx.hosts_text(), hosts_before);
}

/// A forwarder that sends every connection to `to`: with `to` one of the
/// agent's tunnels whose target is this forwarder, a loop the push check
/// cannot see.
async fn forwarder(to: std::sync::Arc<std::sync::OnceLock<SocketAddr>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let Some(target) = to.get().copied() else {
                continue;
            };
            tokio::spawn(async move {
                if let Ok(mut upstream) = TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_loop_through_another_forwarder_is_cut_and_other_tunnels_still_answer() {
    let fx = Fixture::new().await;
    let mut config = fx.config();
    config.max_tunnel_connections = 16;
    let agent = fx.start_with(config).await;
    let upstream = echo_server().await;
    let loop_to = std::sync::Arc::new(std::sync::OnceLock::new());
    let relay = forwarder(std::sync::Arc::clone(&loop_to)).await;
    let (code, answer) = agent
        .push(
            "create",
            json!([pod("loop", "loop", relay), pod("ok", "ok", upstream)]),
        )
        .await;
    assert_eq!(code, 200, "{answer}");
    let loop_port = agent.port_of("loop").await;
    loop_to
        .set(SocketAddr::from(([127, 0, 0, 1], loop_port)))
        .expect("set once");

    // One connection starts the loop: tunnel -> forwarder -> tunnel -> ...
    let mut first = TcpStream::connect(("127.0.0.1", loop_port))
        .await
        .expect("connect");
    let _ = first.write_all(b"go").await;
    wait_until_within(Duration::from_secs(30), "the loop to hit the cap", || {
        agent
            .agent
            .pod("loop")
            .and_then(|view| view.tunnel.last_error)
            .is_some_and(|e| e.contains("connections open at once"))
    })
    .await;
    // The cap held: the loop never had more than its share.
    let open = agent.agent.pod("loop").expect("loop pod").tunnel;
    assert!(open.open_connections <= 16 + 2, "{open:?}");
    // And the other tunnel carries on.
    let echoed = within(
        "the other tunnel",
        echo_through(agent.port_of("ok").await, b"still here"),
    )
    .await
    .expect("echo");
    assert_eq!(echoed, b"still here");
    drop(first);
}

#[tokio::test]
async fn a_push_past_the_cap_is_refused_whole_and_changes_nothing() {
    let fx = Fixture::new().await;
    let mut config = fx.config();
    config.max_pods = 30;
    let agent = fx.start_with(config).await;
    let upstream = echo_server().await;
    let (code, answer) = agent.push("create", many_pods("a", 20, upstream)).await;
    assert_eq!(code, 200, "{answer}");
    let hosts_before = fx.hosts_text();
    let (code, answer) = agent.push("create", many_pods("b", 15, upstream)).await;
    assert_eq!(code, 413, "{answer}");
    assert_eq!(answer["field"], "pods");
    assert_eq!(answer["limit"], 30);
    assert!(answer["error"].as_str().is_some_and(|e| e.contains("35")));
    assert_eq!(agent.get("/health").await["pod_count"], 20);
    assert_eq!(fx.hosts_text(), hosts_before, "names unchanged");
    // Updates of what is held, and a sync that shrinks, still go through.
    let (code, _) = agent.push("update", many_pods("a", 20, upstream)).await;
    assert_eq!(code, 200);
    let (code, _) = agent.push("sync", many_pods("b", 25, upstream)).await;
    assert_eq!(code, 200);
    assert_eq!(agent.get("/health").await["pod_count"], 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_finishes_as_one_unit_when_the_client_hangs_up_midway() {
    let fx = Fixture::new().await;
    let mut config = fx.config();
    config.name_ports = false;
    let agent = fx.start_with(config).await;
    let upstream = echo_server().await;
    let body = json!({"agent_id": "test-agent", "action": "create",
                      "pods": lean_pods("gone-", 3_000, upstream)})
    .to_string();
    let mut client = TcpStream::connect(agent.agent.local_addr())
        .await
        .expect("connect");
    let request = format!(
        "POST /api/v1/pods HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    client.write_all(request.as_bytes()).await.expect("send");
    // The push has begun (pods arrive in batches): the client gives up.
    wait_until("the push to begin", || !agent.agent.store().is_empty()).await;
    drop(client);
    wait_until("every pod of the abandoned push", || {
        agent.agent.store().len() == 3_000
    })
    .await;
    wait_until("their names", || {
        // One line per pod for its short name (and one for its long name).
        fx.hosts_text()
            .lines()
            .filter_map(|line| line.split_whitespace().nth(1))
            .filter(|name| {
                name.strip_prefix("gone-")
                    .and_then(|rest| rest.strip_suffix("-staging.local"))
                    .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            })
            .count()
            == 3_000
    })
    .await;
    let status = agent.get("/api/v1/pods/status").await;
    assert_eq!(status["total_redirections"], 3_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_throughout_pushes_of_thousands_into_ten_thousand() {
    let fx = Fixture::new().await;
    let mut config = fx.config();
    config.name_ports = false;
    let agent = fx.start_with(config).await;
    let upstream = echo_server().await;
    let health_url = agent.url("/health");
    let http = reqwest::Client::builder()
        .timeout(common::DEADLINE)
        .build()
        .expect("client");
    let watching = tokio::spawn(async move {
        // Every answer must come within the deadline while the pushes run.
        let mut answers = 0u32;
        loop {
            let response = http.get(&health_url).send().await;
            match response {
                Ok(response) if response.status() == 200 => answers += 1,
                Ok(response) => panic!("/health answered {}", response.status()),
                Err(err) if err.is_timeout() => panic!("/health stalled: {err}"),
                Err(_) => return answers,
            }
            tokio::task::yield_now().await;
        }
    });
    for (round, prefix) in ["one", "two"].into_iter().enumerate() {
        let (code, answer) = agent
            .push("create", lean_pods(prefix, 5_000, upstream))
            .await;
        assert_eq!(code, 200, "push {round}: {}", answer["error"]);
    }
    assert_eq!(agent.agent.store().len(), 10_000);
    let (code, answer) = agent
        .push("create", lean_pods("three", 5_000, upstream))
        .await;
    assert_eq!(
        code, 413,
        "past the default cap of 10,000: {}",
        answer["error"]
    );
    assert_eq!(answer["limit"], 10_000, "{answer}");
    assert_eq!(agent.agent.store().len(), 10_000);
    agent.agent.shutdown().await;
    let answers = watching.await.expect("the watcher never saw a stall");
    assert!(answers > 0, "/health was asked during the pushes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_are_capped_with_a_clear_refusal() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let api = agent.agent.local_addr();
    let mut open = Vec::new();
    for _ in 0..64 {
        let (stream, code) = silent_subscriber(api).await;
        assert_eq!(code, 200);
        open.push(stream);
    }
    let mut refused = TcpStream::connect(api).await.expect("connect");
    refused
        .write_all(b"GET /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .expect("ask");
    let mut answer = String::new();
    within("the refusal", refused.read_to_string(&mut answer))
        .await
        .expect("answer");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("--max-event-streams"), "{answer}");
    // One closes: a new one gets its place (the server notices the closed
    // socket at its next write to it, a keep-alive within 15 s).
    drop(open.pop());
    wait_for_a_place(api, Duration::from_secs(40)).await;
}
