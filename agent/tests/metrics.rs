//! `GET /metrics` scraped after known traffic and parsed by the reference
//! OpenMetrics parser (Python's `prometheus_client`): the counters moved by
//! exactly the traffic sent, and the connect latency histogram holds one
//! observation per connection.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use common::{echo_through, pod, wait_until, Fixture, TestAgent};
use serde_json::json;

/// Every sample of a scrape: (name, labels) -> value.
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

const PARSER: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
samples = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        samples.append([s.name, s.labels, s.value])
print(json.dumps(samples))
"#;

/// Scrapes the agent and parses the answer with the reference parser.
async fn scrape(agent: &TestAgent) -> Samples {
    let response = agent
        .http
        .get(agent.url("/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .expect("text")
        .to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let text = response.text().await.expect("body");
    let mut parser = Command::new("python3")
        .args(["-c", PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    parser
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed the parser");
    let output = parser.wait_with_output().expect("parser ends");
    assert!(
        output.status.success(),
        "the OpenMetrics parser refused the scrape ({}); install it with \
         `python3 -m pip install prometheus-client`:\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    let parsed: Vec<(String, BTreeMap<String, String>, f64)> =
        serde_json::from_slice(&output.stdout).expect("parser output");
    parsed
        .into_iter()
        .map(|(name, labels, value)| ((name, labels), value))
        .collect()
}

fn value(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    *samples
        .get(&(name.to_owned(), labels.clone()))
        .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_by_the_traffic_sent_and_latency_counts_each_connection() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let echo = common::echo_server().await;
    let (_reserved, refusing) = common::refusing_address();
    let (code, _) = agent
        .push(
            "create",
            json!([pod("echo", "echo", echo), pod("down", "down", refusing)]),
        )
        .await;
    assert_eq!(code, 200);
    let before = scrape(&agent).await;
    // Each port's tunnel is its own series, labelled with its staging port.
    let echo_port = echo.port().to_string();
    let down_port = refusing.port().to_string();
    let pod_labels = |id: &'static str| {
        let port = if id == "echo" { &echo_port } else { &down_port };
        [("pod_id", id), ("pod", id), ("port", port.as_str())]
    };
    assert_eq!(
        value(
            &before,
            "k3s_local_agent_tunnel_connections_total",
            &pod_labels("echo")
        ),
        0.0
    );

    // Three connections through the echo pod, 1,000 bytes each way each.
    let port = agent.port_of("echo").await;
    for _ in 0..3 {
        let payload = vec![b'x'; 1000];
        assert_eq!(echo_through(port, &payload).await.expect("echo"), payload);
    }
    // Two connections to the refusing pod.
    let down = agent.port_of("down").await;
    for _ in 0..2 {
        let _ = common::read_all_from(down).await;
    }
    wait_until("the connections to close", || {
        let status = agent.agent.status();
        status.redirections["echo"].open_connections == 0
            && status.redirections["down"].total_connections == 2
    })
    .await;

    let after = scrape(&agent).await;
    let echo_labels = pod_labels("echo");
    assert_eq!(
        value(
            &after,
            "k3s_local_agent_tunnel_connections_total",
            &echo_labels
        ),
        3.0
    );
    assert_eq!(
        value(
            &after,
            "k3s_local_agent_tunnel_open_connections",
            &echo_labels
        ),
        0.0
    );
    for direction in ["to_pod", "from_pod"] {
        let labels = [
            ("pod_id", "echo"),
            ("pod", "echo"),
            ("port", echo_port.as_str()),
            ("direction", direction),
        ];
        assert_eq!(
            value(&after, "k3s_local_agent_tunnel_bytes_total", &labels),
            3000.0,
            "{direction}"
        );
    }
    // One latency observation per connection, good or refused.
    assert_eq!(
        value(
            &after,
            "k3s_local_agent_tunnel_connect_seconds_count",
            &echo_labels
        ),
        3.0
    );
    assert_eq!(
        value(
            &after,
            "k3s_local_agent_tunnel_connect_seconds_count",
            &pod_labels("down")
        ),
        2.0
    );
    let inf = [
        ("pod_id", "echo"),
        ("pod", "echo"),
        ("port", echo_port.as_str()),
        ("le", "+Inf"),
    ];
    assert_eq!(
        value(
            &after,
            "k3s_local_agent_tunnel_connect_seconds_bucket",
            &inf
        ),
        3.0
    );
    let refused = [
        ("pod_id", "down"),
        ("pod", "down"),
        ("port", down_port.as_str()),
        ("kind", "refused"),
    ];
    assert_eq!(
        value(&after, "k3s_local_agent_tunnel_errors_total", &refused),
        2.0
    );
    let echo_refused = [
        ("pod_id", "echo"),
        ("pod", "echo"),
        ("port", echo_port.as_str()),
        ("kind", "refused"),
    ];
    assert_eq!(
        value(&after, "k3s_local_agent_tunnel_errors_total", &echo_refused),
        0.0
    );

    // Agent-wide figures.
    assert_eq!(
        value(
            &after,
            "k3s_local_agent_redirections",
            &[("state", "active")]
        ),
        2.0
    );
    assert_eq!(
        value(&after, "k3s_local_agent_port_range_ports", &[]),
        f64::from(fx.range.end - fx.range.start + 1)
    );
    assert_eq!(value(&after, "k3s_local_agent_port_range_used", &[]), 2.0);
    assert_eq!(
        value(
            &after,
            "k3s_local_agent_cluster_status",
            &[("status", "disabled")]
        ),
        1.0
    );
    let delivered = value(
        &after,
        "k3s_local_agent_reports_total",
        &[("result", "success")],
    );
    assert!(delivered >= 1.0, "{delivered}");
    assert!(value(&after, "k3s_local_agent_report_seconds_count", &[]) >= delivered);

    // A deleted pod's series go with it.
    agent.push("delete", json!([{"id": "down"}])).await;
    let gone = scrape(&agent).await;
    assert!(!gone
        .keys()
        .any(|(_, labels)| labels.get("pod_id").map(String::as_str) == Some("down")));
}

#[tokio::test]
async fn metrics_need_the_token_beyond_loopback() {
    let fx = Fixture::new().await;
    let mut config = fx.config();
    config.bind = "0.0.0.0".parse().expect("ip");
    let agent = fx.start_with(config).await;
    let anonymous = agent
        .http
        .get(agent.url("/metrics"))
        .send()
        .await
        .expect("answer");
    assert_eq!(anonymous.status(), 401);
    let with_token = agent
        .http
        .get(agent.url("/metrics"))
        .bearer_auth(agent.agent.token())
        .send()
        .await
        .expect("answer");
    assert_eq!(with_token.status(), 200);
    let body: String = with_token.text().await.expect("text");
    assert!(body.ends_with("# EOF\n"), "{body}");
}

/// The open connections on each forwarding thread, by thread number.
fn thread_loads(samples: &Samples) -> BTreeMap<String, f64> {
    samples
        .iter()
        .filter(|((name, _), _)| name == "k3s_local_agent_forward_thread_connections")
        .map(|((_, labels), value)| (labels["thread"].clone(), *value))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_long_lived_connections_spreads_evenly_over_the_forwarding_threads() {
    const CONNECTIONS: usize = 40;
    let fx = Fixture::new().await;
    let mut config = fx.config();
    config.forward_threads = 4;
    let agent = fx.start_with(config).await;
    let echo = common::echo_server().await;
    let (code, _) = agent
        .push("create", json!([pod("held", "held", echo)]))
        .await;
    assert_eq!(code, 200);
    let port = agent.port_of("held").await;

    // All at once, as a browser or a connection pool opens them, and each
    // proven to forward before it is held open.
    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..CONNECTIONS {
        opening.spawn(common::open_and_ping(port));
    }
    let held = common::within("the connections to open", opening.join_all()).await;
    wait_until("the tunnel to count every connection", || {
        agent.agent.status().redirections["held"].open_connections == CONNECTIONS as u64
    })
    .await;

    let loads = thread_loads(&scrape(&agent).await);
    assert_eq!(
        loads.len(),
        4,
        "one figure per forwarding thread: {loads:?}"
    );
    assert_eq!(loads.values().sum::<f64>(), CONNECTIONS as f64, "{loads:?}");
    let busiest = loads.values().copied().fold(f64::MIN, f64::max);
    let quietest = loads.values().copied().fold(f64::MAX, f64::min);
    assert!(
        busiest - quietest <= 2.0,
        "the connections should be spread within two of even: {loads:?}"
    );

    // Every thread gives its count back as the connections close, those
    // handed from one thread to another included.
    drop(held);
    wait_until("the connections to close", || {
        agent.agent.status().redirections["held"].open_connections == 0
    })
    .await;
    let loads = thread_loads(&scrape(&agent).await);
    assert!(loads.values().all(|&load| load == 0.0), "{loads:?}");
}
