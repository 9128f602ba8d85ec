//! Hostile and broken callers over real sockets: every kind of bad push, bad
//! credentials, foreign pages and a slow-loris client. Each gets a clear 4xx
//! naming the problem (or, for slow-loris, a closed connection), and the
//! agent's state afterwards equals its state before.

mod common;

use std::time::Duration;

use common::{echo_server, pod, within, Fixture, TestAgent};
use k3s_local_agent::api::HEADER_READ_TIMEOUT;
use k3s_local_agent::api::{MAX_BODY_BYTES, MAX_PODS_PER_PUSH};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Everything a user could observe of the agent's state, minus the clocks.
async fn observable_state(agent: &TestAgent, fx: &Fixture) -> (Value, Value, String) {
    let mut status = agent.get("/api/v1/pods/status").await;
    status["timestamp"] = Value::Null;
    let mut pods = agent.get("/api/v1/pods").await;
    pods["timestamp"] = Value::Null;
    (status, pods, fx.hosts_text())
}

/// A push of one pod that is `base` with `field` set to `value`.
fn push_with(field: &str, value: Value) -> Value {
    let mut bad = json!({"id": "bad", "name": "bad-pod", "ip": "10.0.0.1", "port": 80});
    bad[field] = value;
    json!({"agent_id": "test-agent", "action": "create", "pods": [bad]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_of_every_kind_is_named_and_changes_nothing() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let upstream = echo_server().await;
    let (code, _) = agent
        .push(
            "create",
            json!([
                pod("one", "app-one", upstream),
                pod("two", "app-two", upstream)
            ]),
        )
        .await;
    assert_eq!(code, 200);
    agent.set_forwarding("two", false).await;
    let before = observable_state(&agent, &fx).await;

    // (what, body, expected status, words the error must contain)
    let mut cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "malformed JSON",
            "{\"agent_id\": ".into(),
            400,
            "not valid JSON",
        ),
        ("not an object", "\"pods\"".into(), 400, "JSON object"),
        ("empty body", String::new(), 400, "not valid JSON"),
        (
            "deeply nested",
            format!(
                r#"{{"agent_id":"test-agent","action":"create","pods":[{{"id":"x","name":"x","ip":"1.1.1.1","labels":{}1{}}}]}}"#,
                "[".repeat(100_000),
                "]".repeat(100_000)
            ),
            400,
            "recursion limit",
        ),
        (
            "too big",
            format!(
                r#"{{"agent_id":"test-agent","action":"create","pods":[],"pad":"{}"}}"#,
                "x".repeat(MAX_BODY_BYTES)
            ),
            413,
            "limit",
        ),
        (
            "too many pods",
            json!({"agent_id": "test-agent", "action": "create",
                   "pods": vec![json!({"id": "p"}); MAX_PODS_PER_PUSH + 1]})
            .to_string(),
            400,
            "at most 5000",
        ),
        (
            "wrong agent",
            json!({"agent_id": "intruder", "action": "sync", "pods": []}).to_string(),
            401,
            "Invalid agent ID",
        ),
        (
            "agent id of the wrong type",
            json!({"agent_id": ["test-agent"], "action": "sync", "pods": []}).to_string(),
            400,
            "agent_id",
        ),
        (
            "unknown action",
            json!({"agent_id": "test-agent", "action": "DROP TABLE", "pods": []}).to_string(),
            400,
            "unknown action",
        ),
        (
            "action of the wrong type",
            json!({"agent_id": "test-agent", "action": 1, "pods": []}).to_string(),
            400,
            "action",
        ),
        (
            "missing pods",
            json!({"agent_id": "test-agent", "action": "sync"}).to_string(),
            400,
            "pods",
        ),
        (
            "pods not a list",
            json!({"agent_id": "test-agent", "action": "sync", "pods": "all"}).to_string(),
            400,
            "pods",
        ),
        (
            "duplicate ids of unknown pods",
            json!({"agent_id": "test-agent", "action": "delete",
                   "pods": [{"id": "ghost"}, {"id": "ghost"}]})
            .to_string(),
            400,
            "duplicate",
        ),
        (
            "a pod that is not an object",
            json!({"agent_id": "test-agent", "action": "create", "pods": ["one"]}).to_string(),
            400,
            "rejected",
        ),
    ];
    // One bad field at a time; the pod is refused by name and field.
    let bad_fields: Vec<(&str, &str, Value)> = vec![
        ("name with a dot", "name", json!("my.app")),
        ("name with capitals", "name", json!("MyApp")),
        ("name with a space", "name", json!("my app")),
        (
            "name with a newline",
            "name",
            json!("app\n6.6.6.6 bank.example"),
        ),
        ("name with a hash", "name", json!("app#x")),
        ("name with a tab", "name", json!("app\tx")),
        ("non-ASCII name", "name", json!("äpp")),
        ("empty name", "name", json!("")),
        ("name too long", "name", json!("a".repeat(60))),
        ("name starting with a dash", "name", json!("-app")),
        ("name of the wrong type", "name", json!(42)),
        ("missing name", "name", Value::Null),
        ("IP out of range", "ip", json!("10.0.0.256")),
        ("IP that is a hostname", "ip", json!("localhost")),
        ("IP cut short", "ip", json!("10.0.1")),
        ("IPv6 that is not", "ip", json!("::g")),
        ("IP of the wrong type", "ip", json!(167772161)),
        ("port 0", "port", json!(0)),
        ("port 65536", "port", json!(65536)),
        ("negative port", "port", json!(-1)),
        ("port as a string", "port", json!("80")),
        ("fractional port", "port", json!(80.5)),
        ("id of the wrong type", "id", json!(7)),
        ("empty id", "id", json!("")),
        ("labels of the wrong type", "labels", json!("app=x")),
        (
            "namespace that writes a hosts line",
            "namespace",
            json!("x\n10.6.6.6 bank.example"),
        ),
        ("namespace with capitals", "namespace", json!("Team-A")),
        ("namespace too long", "namespace", json!("s".repeat(64))),
    ];
    let bodies: Vec<(String, String)> = bad_fields
        .iter()
        .map(|(what, field, value)| {
            (
                what.to_string(),
                push_with(field, value.clone()).to_string(),
            )
        })
        .collect();
    for (what, body) in &bodies {
        cases.push((what.as_str(), body.clone(), 400, "rejected"));
    }

    for (what, body, code, needle) in &cases {
        let response = agent
            .http
            .post(agent.url("/api/v1/pods"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap_or_else(|err| panic!("{what}: no answer: {err}"));
        assert_eq!(response.status().as_u16(), *code, "{what}");
        let answer: Value = response
            .json()
            .await
            .unwrap_or_else(|err| panic!("{what}: answer is not JSON: {err}"));
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(needle),
            "{what}: error {error:?} should mention {needle:?}"
        );
        if *needle == "rejected" {
            // A refused pod is named with its field and a reason.
            let rejection = &answer["rejected"][0];
            assert!(
                rejection["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{what}: {answer}"
            );
        }
    }
    // The shapes of a pod's port list: each refused with the entry named.
    let many_ports: Vec<u16> = (1000..1065).collect();
    let bad_ports: Vec<(&str, Value, &str)> = vec![
        ("a port listed twice", json!([8080, 8080]), "ports[1]"),
        ("port 0 in the list", json!([0]), "ports[0]"),
        ("more than 64 ports", json!(many_ports), "ports"),
        (
            "an unknown protocol",
            json!([{"port": 53, "protocol": "QUIC"}]),
            "ports[0].protocol",
        ),
        (
            "a port object without port",
            json!([{"name": "http", "protocol": "TCP"}]),
            "ports[0].port",
        ),
        (
            "a port name that Kubernetes refuses",
            json!([{"port": 80, "name": "Http_Main"}]),
            "ports[0].name",
        ),
        ("a port of the wrong type", json!([true]), "ports[0]"),
    ];
    for (what, ports, field) in bad_ports {
        let (code, answer) = agent.push_raw(push_with("ports", ports)).await;
        assert_eq!(code, 400, "{what}: {answer}");
        assert_eq!(
            answer["rejected"][0]["field"],
            json!(field),
            "{what}: {answer}"
        );
    }

    let after = observable_state(&agent, &fx).await;
    assert_eq!(after, before, "bad input changed the state");
    assert!(!fx.hosts_text().contains("bank.example"));
    println!("bad inputs refused: {}", cases.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_pages_and_wrong_tokens_change_nothing() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let upstream = echo_server().await;
    agent
        .push("create", json!([pod("one", "app-one", upstream)]))
        .await;
    let before = observable_state(&agent, &fx).await;

    // A web page elsewhere (or a rebound name) tries to drive the agent.
    let attempts = [
        (
            "/api/v1/pods/one/forwarding",
            json!({"enabled": false}),
            Some("http://evil.example"),
            None,
        ),
        (
            "/api/v1/pods/one/stop",
            json!({}),
            Some("http://evil.example"),
            None,
        ),
        (
            "/api/v1/pods/one/forwarding",
            json!({"enabled": false}),
            None,
            Some("evil.example"),
        ),
        (
            "/api/v1/pods",
            json!({"agent_id": "test-agent", "action": "sync", "pods": []}),
            None,
            Some("evil.example"),
        ),
        (
            "/api/v1/pods",
            json!({"agent_id": "test-agent", "action": "sync", "pods": []}),
            Some("http://evil.example"),
            None,
        ),
    ];
    for (path, body, origin, host) in attempts {
        let mut request = agent.http.post(agent.url(path)).json(&body);
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        if let Some(host) = host {
            request = request.header("host", host);
        }
        let response = request.send().await.expect("answer");
        let code = response.status().as_u16();
        assert!(
            code == 403 || code == 421,
            "{path} from {origin:?}/{host:?}: {code}"
        );
        let answer: Value = response.json().await.expect("JSON");
        assert!(answer["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    assert_eq!(observable_state(&agent, &fx).await, before);
    agent.agent.shutdown().await;

    // Beyond loopback the token is the key: without it, or with a wrong one,
    // a push is refused and changes nothing.
    let fx = Fixture::new().await;
    let mut config = fx.config();
    config.bind = "0.0.0.0".parse().expect("ip");
    let agent = fx.start_with(config).await;
    let hosts_before = fx.hosts_text();
    let push = json!({"agent_id": "test-agent", "action": "create",
                      "pods": [pod("sneaky", "sneaky", upstream)]});
    for token in [None, Some("not-the-token"), Some("")] {
        let mut request = agent.http.post(agent.url("/api/v1/pods")).json(&push);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("answer");
        assert_eq!(response.status(), 401, "token {token:?}");
    }
    assert_eq!(agent.agent.health().pod_count, 0);
    assert_eq!(fx.hosts_text(), hosts_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_loris_client_is_cut_off_and_nobody_waits_for_it() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let mut loris = TcpStream::connect(agent.agent.local_addr())
        .await
        .expect("connect");
    loris
        .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .expect("request line");
    let started = tokio::time::Instant::now();
    // One header byte every half second, never the blank line that ends them.
    let mut drip = tokio::time::interval(Duration::from_millis(500));
    let mut answer = Vec::new();
    let cut_off = within_secs(HEADER_READ_TIMEOUT + Duration::from_secs(10), async {
        loop {
            tokio::select! {
                _ = drip.tick() => {
                    if loris.write_all(b"X").await.is_err() {
                        return;
                    }
                    // Meanwhile everyone else is served at once.
                    let health = within("health during the attack", agent.http.get(agent.url("/health")).send())
                        .await
                        .expect("health");
                    assert_eq!(health.status(), 200);
                }
                read = loris.read_buf(&mut answer) => {
                    if matches!(read, Ok(0) | Err(_)) {
                        return;
                    }
                }
            }
        }
    })
    .await;
    assert!(cut_off, "the slow client was never cut off");
    assert!(
        started.elapsed() >= HEADER_READ_TIMEOUT - Duration::from_secs(1),
        "cut off before the header deadline"
    );
    // No response was ever started for the unfinished request.
    assert!(!String::from_utf8_lossy(&answer).contains("200 OK"));
}

/// Whether `future` finishes within `limit`.
async fn within_secs(limit: Duration, future: impl std::future::Future<Output = ()>) -> bool {
    tokio::time::timeout(limit, future).await.is_ok()
}
