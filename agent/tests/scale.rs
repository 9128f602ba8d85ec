//! Scale: a whole range of 921 ports live at once, and big transfers
//! through the splice path (churn has its own binary: tests/churn.rs).

mod common;

use common::{echo_server, greeting_server, read_all_from, refuses, Fixture};
use serde_json::{json, Value};

fn pods(prefix: &str, count: usize, target: std::net::SocketAddr) -> Value {
    Value::Array(
        (0..count)
            .map(|i| {
                json!({"id": format!("{prefix}-{i}"), "name": format!("{prefix}-{i}"),
                            "ip": target.ip().to_string(), "port": target.port()})
            })
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_whole_range_of_921_tunnels_is_live_at_once() {
    // The default range's size.
    let fx = Fixture::with_ports(921).await;
    let range = fx.range;
    let agent = fx.start().await;
    let upstream = greeting_server("up").await;
    let (code, answer) = agent.push("create", pods("p", 921, upstream)).await;
    assert_eq!(code, 200, "{answer}");
    let status = agent.get("/api/v1/pods/status").await;
    assert_eq!(
        status["active_redirections"], 921,
        "every port of the range is a live tunnel"
    );
    for port in (range.start..=range.end).step_by(23) {
        assert_eq!(
            read_all_from(port).await.expect("tunnel answers"),
            "up",
            "port {port}"
        );
    }
    let (code, _) = agent.push("sync", json!([])).await;
    assert_eq!(code, 200);
    for port in (range.start..=range.end).step_by(7) {
        assert!(refuses(port).await, "port {port} released");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn big_transfers_arrive_whole_both_ways_at_once() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let upstream = echo_server().await;
    agent
        .push(
            "create",
            json!([{"id": "e", "name": "echo", "ip": "127.0.0.1", "port": upstream.port()}]),
        )
        .await;
    let port = agent.port_of("e").await;
    const SIZE: usize = 16 * 1024 * 1024;
    let payload: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    let mut streams = Vec::new();
    for _ in 0..4 {
        let payload = payload.clone();
        streams.push(tokio::spawn(common::echo_bulk(port, payload)));
    }
    for stream in streams {
        let back = common::within("a 16 MiB echo", stream).await.expect("task");
        assert!(
            back == payload,
            "bytes arrived changed or cut ({} of {SIZE})",
            back.len()
        );
    }
    let tunnel = agent.redirection("e").await;
    assert_eq!(tunnel["bytes_to_pod"], 4 * SIZE as u64);
    assert_eq!(tunnel["bytes_from_pod"], 4 * SIZE as u64);
}
