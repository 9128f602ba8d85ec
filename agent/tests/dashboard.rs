//! What the dashboard stands on: its files, the snapshot, the live event
//! stream, stopping a tunnel, and the guards that keep web pages out.

mod common;

use std::time::Duration;

use common::{greeting_server, pod, read_all_from, refuses, within, Fixture};
use serde_json::{json, Value};

/// Reads server-sent events until one named `snapshot` satisfies `check`.
async fn next_snapshot(
    response: &mut reqwest::Response,
    buffer: &mut String,
    check: impl Fn(&Value) -> bool,
) -> Value {
    within("a matching snapshot event", async {
        loop {
            while let Some(end) = buffer.find("\n\n") {
                let frame: String = buffer.drain(..end + 2).collect();
                if !frame.lines().any(|l| l == "event: snapshot") {
                    continue;
                }
                let data: String = frame
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect();
                let snapshot: Value = serde_json::from_str(&data).expect("snapshot JSON");
                if check(&snapshot) {
                    return snapshot;
                }
            }
            let chunk = response
                .chunk()
                .await
                .expect("stream open")
                .expect("stream not ended");
            buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
}

/// Opens the live event stream; returns it, what was read past the first
/// snapshot, and that snapshot.
async fn open_stream(agent: &common::TestAgent) -> (reqwest::Response, String, Value) {
    let mut stream = agent
        .http
        .get(agent.url("/api/v1/events"))
        .send()
        .await
        .expect("stream");
    let mut buffer = String::new();
    let first = next_snapshot(&mut stream, &mut buffer, |_| true).await;
    (stream, buffer, first)
}

#[tokio::test]
async fn the_event_stream_pushes_a_snapshot_on_every_change() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let (mut stream, mut buffer, first) = open_stream(&agent).await;
    assert_eq!(stream.status(), 200);
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    assert_eq!(first["health"]["agent_id"], "test-agent");
    assert_eq!(first["pods"], json!([]));

    let upstream = greeting_server("hi").await;
    agent
        .push("create", json!([pod("a", "my-app", upstream)]))
        .await;
    let pushed = next_snapshot(&mut stream, &mut buffer, |s| {
        s["pods"].as_array().is_some_and(|p| p.len() == 1)
    })
    .await;
    assert_eq!(
        pushed["pods"][0]["tunnel"]["dns_name"],
        "my-app-staging.local"
    );

    agent.set_forwarding("a", false).await;
    next_snapshot(&mut stream, &mut buffer, |s| {
        s["pods"][0]["tunnel"]["status"] == "stopped"
    })
    .await;

    // An open dashboard does not hold up shutdown, and its stream ends.
    within("shutdown with a dashboard open", agent.agent.shutdown()).await;
    let ended = within("the stream to end", async {
        loop {
            match stream.chunk().await {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return true,
            }
        }
    })
    .await;
    assert!(ended);
}

#[tokio::test]
async fn connections_reach_every_dashboard_even_after_one_closed_mid_update() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let upstream = greeting_server("hi").await;
    agent
        .push("create", json!([pod("a", "my-app", upstream)]))
        .await;
    let port = agent.port_of("a").await;
    let connections =
        |count: u64| move |s: &Value| s["pods"][0]["tunnel"]["total_connections"] == count;

    // Only a counter moves (no push, no toggle): the open tab hears it.
    let (mut first_tab, mut buffer, _) = open_stream(&agent).await;
    assert_eq!(read_all_from(port).await.expect("through the tunnel"), "hi");
    next_snapshot(&mut first_tab, &mut buffer, connections(1)).await;

    // A connection while the tab is still waiting out its throttle, and the
    // tab closes before it looks: the next tab still hears what follows.
    assert_eq!(read_all_from(port).await.expect("through the tunnel"), "hi");
    drop(first_tab);
    let (mut second_tab, mut buffer, _) = open_stream(&agent).await;
    assert_eq!(read_all_from(port).await.expect("through the tunnel"), "hi");
    next_snapshot(&mut second_tab, &mut buffer, connections(3)).await;
}

#[tokio::test]
async fn stop_removes_the_tunnel_and_its_name() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let upstream = greeting_server("hi").await;
    agent
        .push(
            "create",
            json!([pod("a", "my-app", upstream), pod("b", "other", upstream)]),
        )
        .await;
    let port = agent.port_of("a").await;
    let (code, answer) = agent.post("/api/v1/pods/a/stop", &json!({})).await;
    assert_eq!(code, 200, "{answer}");
    assert!(refuses(port).await);
    let snapshot = agent.get("/api/v1/snapshot").await;
    let ids: Vec<&str> = snapshot["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .filter_map(|v| v["pod"]["id"].as_str())
        .collect();
    assert_eq!(ids, vec!["b"]);
    assert!(!fx.hosts_text().contains("my-app-staging"));
    let (code, answer) = agent.post("/api/v1/pods/a/stop", &json!({})).await;
    assert_eq!(code, 404);
    assert!(answer["error"].as_str().expect("error").contains("\"a\""));
}

#[tokio::test]
async fn the_dashboard_files_are_served_with_a_strict_policy() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    for (path, kind, needle) in [
        ("/", "text/html", "K3s Local Agent"),
        ("/app.js", "text/javascript", "import * as agent"),
        ("/adapter.js", "text/javascript", "EventSource"),
        ("/style.css", "text/css", "prefers-color-scheme: dark"),
    ] {
        let response = agent
            .http
            .get(agent.url(path))
            .send()
            .await
            .expect("answer");
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers().clone();
        assert!(
            headers["content-type"]
                .to_str()
                .expect("type")
                .starts_with(kind),
            "{path}"
        );
        assert!(headers["content-security-policy"]
            .to_str()
            .expect("csp")
            .contains("default-src 'self'"));
        assert!(
            response.text().await.expect("body").contains(needle),
            "{path}"
        );
    }
    let missing = agent
        .http
        .get(agent.url("/secret.txt"))
        .send()
        .await
        .expect("answer");
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn a_rebound_name_cannot_read_or_push() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    // A page on evil.example whose name now resolves to 127.0.0.1.
    for path in ["/api/v1/pods", "/api/v1/snapshot", "/"] {
        let response = agent
            .http
            .get(agent.url(path))
            .header("host", "evil.example:8082")
            .send()
            .await
            .expect("answer");
        assert_eq!(response.status(), 403, "{path}");
    }
    let response = agent
        .http
        .get(agent.url("/api/v1/pods"))
        .header("host", "my-app-staging.localhost:8082")
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 200, "local names are fine");
}
