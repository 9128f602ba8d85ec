//! Scale: a whole range of 921 ports live at once, and big transfers
//! through the splice path (churn has its own binary: tests/churn.rs).

mod common;

use common::{echo_server, greeting_server, read_all_from, refuses, Fixture};
use k3s_local_agent::config::PortRange;
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
    let fx = Fixture::new(40).await;
    let mut config = fx.config();
    // The default range's size, away from the default's neighbours.
    config.port_range = PortRange {
        start: 30_000,
        end: 30_920,
    };
    let agent = fx.start_with(config).await;
    let upstream = greeting_server("up").await;
    let (code, answer) = agent.push("create", pods("p", 921, upstream)).await;
    assert_eq!(code, 200, "{answer}");
    let status = agent.get("/api/v1/pods/status").await;
    assert_eq!(
        status["active_redirections"], 921,
        "every port of the range is a live tunnel"
    );
    for port in (30_000..=30_920).step_by(23) {
        assert_eq!(
            read_all_from(port).await.expect("tunnel answers"),
            "up",
            "port {port}"
        );
    }
    let (code, _) = agent.push("sync", json!([])).await;
    assert_eq!(code, 200);
    for port in (30_000..=30_920).step_by(7) {
        assert!(refuses(port).await, "port {port} released");
    }
    agent.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn big_transfers_arrive_whole_both_ways_at_once() {
    let fx = Fixture::new(41).await;
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
    agent.agent.shutdown().await;
}
