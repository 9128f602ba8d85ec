//! The HTTP API's contract (DESIGN.md section 2) and its every error case,
//! over a real server on loopback and through the router directly.

mod common;

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{Request, StatusCode};
use common::{echo_server, pod, Fixture};
use http_body_util::BodyExt;
use k3s_local_agent::api;
use serde_json::{json, Value};
use tower::ServiceExt;

const SEED_BODY: &str = r#"{"agent_id":"test-agent",
 "pods":[{"id":"pod-123","name":"my-app","namespace":"staging","image":"nginx:latest",
          "status":"running","ip":"10.0.1.100","node_name":"gke-node-1",
          "labels":{"app":"my-app"},"created_at":"2024-01-15T10:30:00Z",
          "updated_at":"2024-01-15T10:30:00Z"}],
 "action":"create"}"#;

#[tokio::test]
async fn health_and_status_keep_the_seed_shape() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let health = agent.get("/health").await;
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["agent_id"], "test-agent");
    assert_eq!(health["pod_count"], 0);
    assert!(health["timestamp"].is_string());
    assert_eq!(health["names"]["system_wide"], false);
    assert!(health["names"]["warning"]
        .as_str()
        .expect("warning")
        .contains("not"));

    let response = agent
        .http
        .post(agent.url("/api/v1/pods"))
        .body(SEED_BODY)
        .send()
        .await
        .expect("push");
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.expect("json");
    assert_eq!(answer["applied"], json!(["pod-123"]));

    let status = agent.get("/api/v1/pods/status").await;
    assert_eq!(status["total_redirections"], 1);
    assert_eq!(status["active_redirections"], 1);
    assert_eq!(status["failed_redirections"], 0);
    assert!(status["timestamp"].is_string());
    let redirection = &status["redirections"]["pod-123"];
    for field in [
        "staging_pod_name",
        "staging_pod_ip",
        "staging_port",
        "local_port",
        "local_host",
        "dns_name",
        "status",
        "error",
    ] {
        assert!(
            redirection.get(field).is_some(),
            "missing {field} in {redirection}"
        );
    }
    assert_eq!(redirection["staging_pod_name"], "my-app");
    assert_eq!(redirection["staging_pod_ip"], "10.0.1.100");
    assert_eq!(redirection["staging_port"], 80);
    assert_eq!(redirection["local_host"], "localhost");
    assert_eq!(redirection["dns_name"], "my-app-staging.local");
    assert_eq!(redirection["status"], "active");
    assert!(fx
        .range
        .contains(u16::try_from(redirection["local_port"].as_u64().expect("port")).expect("u16")));

    assert_eq!(agent.get("/health").await["pod_count"], 1);
    let pods = agent.get("/api/v1/pods").await;
    assert_eq!(pods["pods"][0]["pod"]["id"], "pod-123");
    assert_eq!(pods["pods"][0]["pod"]["labels"]["app"], "my-app");
    assert_eq!(
        pods["pods"][0]["tunnel"]["dns_name"],
        "my-app-staging.local"
    );
    let one = agent.get("/api/v1/pods/pod-123").await;
    assert_eq!(one["pod"]["name"], "my-app");
}

/// Sends `body` to `POST /api/v1/pods` through the router; returns code and JSON.
async fn push_via_router(agent: &common::TestAgent, body: impl Into<Body>) -> (StatusCode, Value) {
    let app = api::router(agent.agent.clone())
        .layer(MockConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
    let response = app
        .oneshot(
            Request::post("/api/v1/pods")
                .header("content-type", "application/json")
                .body(body.into())
                .expect("request"),
        )
        .await
        .expect("router answers");
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).expect("error bodies are JSON"),
    )
}

#[tokio::test]
async fn whole_request_errors_name_what_is_wrong_and_change_nothing() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let hosts_before = fx.hosts_text();
    let cases: Vec<(String, StatusCode, &str)> = vec![
        (
            "{not json".into(),
            StatusCode::BAD_REQUEST,
            "not valid JSON",
        ),
        ("[1,2]".into(), StatusCode::BAD_REQUEST, "JSON object"),
        (
            r#"{"action":"create","pods":[]}"#.into(),
            StatusCode::BAD_REQUEST,
            "agent_id",
        ),
        (
            r#"{"agent_id":7,"action":"create","pods":[]}"#.into(),
            StatusCode::BAD_REQUEST,
            "agent_id",
        ),
        (
            r#"{"agent_id":"someone-else","action":"create","pods":[]}"#.into(),
            StatusCode::UNAUTHORIZED,
            "Invalid agent ID",
        ),
        (
            r#"{"agent_id":"test-agent","pods":[]}"#.into(),
            StatusCode::BAD_REQUEST,
            "action",
        ),
        (
            r#"{"agent_id":"test-agent","action":"explode","pods":[]}"#.into(),
            StatusCode::BAD_REQUEST,
            "create, update, delete, sync",
        ),
        (
            r#"{"agent_id":"test-agent","action":"create"}"#.into(),
            StatusCode::BAD_REQUEST,
            "pods",
        ),
        (
            r#"{"agent_id":"test-agent","action":"create","pods":{}}"#.into(),
            StatusCode::BAD_REQUEST,
            "pods",
        ),
        (
            format!("{}{}", "[".repeat(5000), "]".repeat(5000)),
            StatusCode::BAD_REQUEST,
            "not valid JSON",
        ),
    ];
    for (body, code, needle) in cases {
        let (status, answer) = push_via_router(&agent, body.clone()).await;
        assert_eq!(status, code, "for body {body:.60}: {answer}");
        let error = answer["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error in {answer}"));
        assert!(
            error.contains(needle),
            "error {error:?} should mention {needle:?}"
        );
    }
    let (_, unknown) = push_via_router(
        &agent,
        r#"{"agent_id":"test-agent","action":"explode","pods":[]}"#,
    )
    .await;
    assert_eq!(
        unknown["valid_actions"],
        json!(["create", "update", "delete", "sync"])
    );
    assert_eq!(agent.get("/health").await["pod_count"], 0);
    assert_eq!(fx.hosts_text(), hosts_before);
}

#[tokio::test]
async fn oversized_body_is_413_with_json() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let huge = format!(
        r#"{{"agent_id":"test-agent","action":"create","pods":[],"pad":"{}"}}"#,
        "x".repeat(api::MAX_BODY_BYTES + 1)
    );
    let (status, answer) = push_via_router(&agent, huge.clone()).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(answer["error"].as_str().expect("error").contains("limit"));
    // And over a real socket, where the client sends a content length.
    let response = agent
        .http
        .post(agent.url("/api/v1/pods"))
        .body(huge)
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 413);
}

#[tokio::test]
async fn bad_pods_are_rejected_by_id_and_good_ones_still_apply() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let upstream = echo_server().await;
    let (code, answer) = agent
        .push(
            "create",
            json!([
                pod("good-1", "good-one", upstream),
                {"id": "no-name", "ip": "10.0.0.1"},
                {"id": "bad-name", "name": "Bad.Name", "ip": "10.0.0.1"},
                {"id": "bad-ip", "name": "bad-ip", "ip": "10.0.0.999"},
                {"id": "bad-port", "name": "bad-port", "ip": "10.0.0.1", "port": 65536},
                {"id": "zero-port", "name": "zero-port", "ip": "10.0.0.1", "port": 0},
                {"id": "typed-port", "name": "typed-port", "ip": "10.0.0.1", "port": "80"},
                {"name": "no-id", "ip": "10.0.0.1"},
                {"id": "inject", "name": "x\n6.6.6.6 bank.com", "ip": "10.0.0.1"},
                pod("good-1", "duplicate", upstream),
                pod("good-2", "good-two", upstream),
            ]),
        )
        .await;
    assert_eq!(code, 400, "{answer}");
    assert_eq!(answer["applied"], json!(["good-1", "good-2"]));
    let rejected = answer["rejected"].as_array().expect("rejected list");
    let by_id = |id: &str| {
        rejected
            .iter()
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("{id} not rejected: {answer}"))
            .clone()
    };
    assert_eq!(by_id("no-name")["field"], "name");
    assert_eq!(by_id("bad-name")["field"], "name");
    assert!(by_id("bad-name")["error"]
        .as_str()
        .expect("e")
        .contains("DNS-1123"));
    assert_eq!(by_id("bad-ip")["field"], "ip");
    assert_eq!(by_id("bad-port")["field"], "port");
    assert_eq!(by_id("zero-port")["field"], "port");
    assert!(by_id("typed-port")["error"]
        .as_str()
        .expect("e")
        .contains("invalid type"));
    assert_eq!(by_id("inject")["field"], "name");
    assert!(by_id("good-1")["error"]
        .as_str()
        .expect("e")
        .contains("duplicate"));
    let no_id = rejected.iter().find(|r| r["index"] == 7).expect("index 7");
    assert_eq!(no_id["field"], "id");
    assert!(answer["error"]
        .as_str()
        .expect("summary")
        .contains("9 of 11"));

    let status = agent.get("/api/v1/pods/status").await;
    assert_eq!(status["total_redirections"], 2);
    let hosts = fx.hosts_text();
    assert!(hosts.contains("good-one-staging.local"));
    assert!(
        !hosts.contains("bank.com"),
        "a name injected a line:\n{hosts}"
    );
    assert!(!hosts.contains("duplicate"));
}

#[tokio::test]
async fn update_delete_and_sync_follow_the_contract() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let upstream = echo_server().await;
    let (code, _) = agent
        .push(
            "create",
            json!([
                pod("a", "app-a", upstream),
                pod("b", "app-b", upstream),
                pod("c", "app-c", upstream)
            ]),
        )
        .await;
    assert_eq!(code, 200);
    let port_a = agent.port_of("a").await;

    let (code, _) = agent
        .push("update", json!([pod("a", "app-a-renamed", upstream)]))
        .await;
    assert_eq!(code, 200);
    assert_eq!(agent.port_of("a").await, port_a, "an update keeps the port");
    assert_eq!(
        agent.redirection("a").await["staging_pod_name"],
        "app-a-renamed"
    );
    assert!(fx.hosts_text().contains("app-a-renamed-staging.local"));

    let (code, answer) = agent.push("delete", json!([{"id": "b"}])).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["removed"], json!(["b"]));
    assert!(!fx.hosts_text().contains("app-b-staging"));

    // Sync: the list is the whole desired set. A rejected pod's existing
    // tunnel is kept, not punished.
    let (code, answer) = agent
        .push(
            "sync",
            json!([pod("d", "app-d", upstream), {"id": "c", "name": "BAD", "ip": "1.1.1.1"}]),
        )
        .await;
    assert_eq!(code, 400);
    assert_eq!(answer["removed"], json!(["a"]));
    let status = agent.get("/api/v1/pods/status").await;
    let ids: Vec<&String> = status["redirections"]
        .as_object()
        .expect("map")
        .keys()
        .collect();
    assert_eq!(ids, vec!["c", "d"]);
}

#[tokio::test]
async fn token_is_required_beyond_loopback() {
    let fx = Fixture::new().await;
    let mut config = fx.config();
    config.bind = "0.0.0.0".parse().expect("ip");
    // The listener itself stays on loopback: what matters is the setting.
    let agent = fx.start_with(config).await;
    let token = agent.agent.token().to_owned();
    assert_eq!(
        agent
            .http
            .get(agent.url("/health"))
            .send()
            .await
            .expect("health")
            .status(),
        200
    );
    let anonymous = agent
        .http
        .get(agent.url("/api/v1/pods/status"))
        .send()
        .await
        .expect("answer");
    assert_eq!(anonymous.status(), 401);
    let body: Value = anonymous.json().await.expect("json");
    assert!(body["error"]
        .as_str()
        .expect("error")
        .contains("bearer token"));
    let wrong = agent
        .http
        .get(agent.url("/api/v1/pods/status"))
        .bearer_auth("not-the-token")
        .send()
        .await
        .expect("answer");
    assert_eq!(wrong.status(), 401);
    let right = agent
        .http
        .get(agent.url("/api/v1/pods/status"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("answer");
    assert_eq!(right.status(), 200);
    let push = agent
        .http
        .post(agent.url("/api/v1/pods"))
        .body(SEED_BODY)
        .send()
        .await
        .expect("answer");
    assert_eq!(push.status(), 401, "a push without the token is refused");
    assert_eq!(agent.agent.store().len(), 0);
}

#[tokio::test]
async fn local_endpoints_refuse_remote_peers_and_foreign_pages() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let upstream = echo_server().await;
    agent
        .push("create", json!([pod("a", "app-a", upstream)]))
        .await;
    let toggle = |peer: [u8; 4], host: &str, origin: Option<&str>| {
        let app = api::router(agent.agent.clone())
            .layer(MockConnectInfo(SocketAddr::from((peer, 40000))));
        let mut request = Request::post("/api/v1/pods/a/forwarding")
            .header("host", host)
            .header("content-type", "application/json");
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        let request = request
            .body(Body::from(r#"{"enabled":false}"#))
            .expect("request");
        async move {
            let response = app.oneshot(request).await.expect("answer");
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            eprintln!(
                "toggle answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
            status
        }
    };
    assert_eq!(
        toggle([10, 0, 0, 5], "127.0.0.1:8082", None).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        toggle([127, 0, 0, 1], "evil.example:8082", None).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        toggle(
            [127, 0, 0, 1],
            "localhost:8082",
            Some("http://evil.example")
        )
        .await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        agent.redirection("a").await["status"],
        "active",
        "refused calls changed nothing"
    );
    assert_eq!(
        toggle(
            [127, 0, 0, 1],
            "localhost:8082",
            Some("http://localhost:8082")
        )
        .await,
        StatusCode::OK
    );
    assert_eq!(agent.redirection("a").await["status"], "stopped");

    let (code, answer) = agent.set_forwarding("nope", true).await;
    assert_eq!(code, 404, "{answer}");
    assert!(answer["error"].as_str().expect("error").contains("nope"));
    let bad = agent
        .http
        .post(agent.url("/api/v1/pods/a/forwarding"))
        .body("{\"enabled\":\"yes\"}")
        .send()
        .await
        .expect("answer");
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn unknown_paths_and_methods_answer_json() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let missing = agent
        .http
        .get(agent.url("/api/v2/nothing"))
        .send()
        .await
        .expect("answer");
    assert_eq!(missing.status(), 404);
    assert!(missing.json::<Value>().await.expect("json")["error"]
        .as_str()
        .expect("e")
        .contains("/api/v2/nothing"));
    let wrong = agent
        .http
        .delete(agent.url("/health"))
        .send()
        .await
        .expect("answer");
    assert_eq!(wrong.status(), 405);
    let unknown_pod = agent
        .http
        .get(agent.url("/api/v1/pods/ghost"))
        .send()
        .await
        .expect("answer");
    assert_eq!(unknown_pod.status(), 404);
}

#[tokio::test]
async fn the_longest_name_in_the_longest_namespace_is_taken_with_a_valid_long_name() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let upstream = echo_server().await;
    let name = "n".repeat(55);
    let pods: Vec<Value> = ["a", "b"]
        .iter()
        .map(|suffix| {
            let namespace = format!("{}{suffix}", "s".repeat(62));
            json!({"id": format!("pod-{suffix}"), "name": name, "namespace": namespace,
                   "ip": upstream.ip().to_string(), "port": upstream.port()})
        })
        .collect();
    let (code, answer) = agent.push("create", json!(pods)).await;
    assert_eq!(
        code, 200,
        "a valid pod is never refused for its names: {answer}"
    );
    let mut long_names = Vec::new();
    for id in ["pod-a", "pod-b"] {
        let tunnel = agent.redirection(id).await;
        let names: Vec<String> = tunnel["names"]
            .as_array()
            .expect("names")
            .iter()
            .filter_map(|name| name.as_str().map(str::to_owned))
            .collect();
        // Two namespaces share the short name, neither the agent's own: each
        // answers to its long name alone, a valid DNS label.
        assert_eq!(names.len(), 1, "{tunnel}");
        let label = names[0].strip_suffix(".local").expect("a .local name");
        assert!(label.len() <= 63 && label.ends_with("-staging"), "{label}");
        assert!(
            label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "{label}"
        );
        assert!(fx.hosts_text().contains(&names[0]), "written");
        long_names.push(names[0].clone());
    }
    assert_ne!(long_names[0], long_names[1], "unique");
}
