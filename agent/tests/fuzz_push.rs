//! A fuzz harness for the receiver's request parsing, driven by proptest so it
//! runs on stable Rust and in every `cargo test`: random bytes, mutated valid
//! requests, and random JSON shaped like a push. Parsing never panics, a
//! refusal is always a 4xx with a message, and whatever is accepted is a pod
//! the rest of the agent can trust (valid names that write exactly one hosts
//! line, unique ids, ports above 0).
//!
//! CI runs the default 256 cases per property; for a longer hunt:
//! `PROPTEST_CASES=200000 cargo test -p k3s-local-agent --test fuzz_push`.

use k3s_local_agent::api::{parse_push, ParsedPush};
use k3s_local_agent::model::{validate_pod_id, validate_pod_name};
use k3s_local_agent::names::{render, HostEntry};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

const AGENT: &str = "fuzz-agent";

const SEED: &str = r#"{"agent_id":"fuzz-agent","action":"create","pods":[{"id":"pod-123","name":"my-app","namespace":"staging","image":"nginx:latest","status":"running","ip":"10.0.1.100","port":8080,"node_name":"gke-node-1","labels":{"app":"my-app"},"created_at":"2024-01-15T10:30:00Z","updated_at":"2024-01-15T10:30:00Z"}]}"#;

/// Checks everything a caller of `parse_push` relies on.
fn check(body: &[u8], pods_sent: Option<usize>) -> Result<(), TestCaseError> {
    match parse_push(body, AGENT) {
        Err(err) => {
            prop_assert!(err.status().is_client_error(), "{}", err.status());
            prop_assert!(!err.message().is_empty());
        }
        Ok(parsed) => check_accepted(&parsed, pods_sent)?,
    }
    Ok(())
}

fn check_accepted(parsed: &ParsedPush, pods_sent: Option<usize>) -> Result<(), TestCaseError> {
    let accounted = parsed.upserts.len() + parsed.delete_ids.len() + parsed.rejected.len();
    if let Some(sent) = pods_sent {
        prop_assert_eq!(accounted, sent, "every pod is applied or rejected");
    }
    let mut ids: Vec<&str> = parsed.upserts.iter().map(|pod| pod.id.as_str()).collect();
    ids.extend(parsed.delete_ids.iter().map(String::as_str));
    let unique: std::collections::BTreeSet<&str> = ids.iter().copied().collect();
    prop_assert_eq!(unique.len(), ids.len(), "duplicate ids accepted");
    for rejection in &parsed.rejected {
        prop_assert!(!rejection.error.is_empty());
    }
    for pod in &parsed.upserts {
        prop_assert!(validate_pod_id(&pod.id).is_ok(), "{:?}", pod.id);
        prop_assert!(validate_pod_name(&pod.name).is_ok(), "{:?}", pod.name);
        prop_assert!(pod.staging_port() > 0);
        // Its names land on exactly one line of the hosts file, and nothing
        // else does.
        let foreign = "127.0.0.1 localhost\n";
        let text = render(
            foreign,
            &[HostEntry {
                ip: pod.ip,
                names: vec![pod.dns_name(), pod.localhost_name()],
            }],
        );
        let lines: Vec<&str> = text
            .lines()
            .filter(|line| line.contains(&pod.dns_name()))
            .collect();
        prop_assert_eq!(lines.len(), 1, "{}", text);
        prop_assert!(text.starts_with(foreign));
    }
    Ok(())
}

/// Strings that probe names, ids and IPs: separators, hosts-file syntax,
/// capitals, unicode, digits and dots.
fn tricky_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9-]{0,70}",
        "[a-zA-Z0-9 .#\t\n\r:/_-]{0,24}",
        "\\PC{0,12}",
        "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}",
        "[0-9a-f:]{0,20}",
    ]
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-2i64..70_000).prop_map(|n| json!(n)),
        any::<f64>().prop_map(|n| json!(n)),
        tricky_string().prop_map(Value::String),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(tricky_string(), inner, 0..6)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// A pod object whose known fields are each present, absent or random.
fn pod_like() -> impl Strategy<Value = Value> {
    let field = |name: &'static str, good: Value| {
        prop_oneof![
            2 => Just(Some(good)),
            1 => Just(None),
            2 => json_value().prop_map(Some),
        ]
        .prop_map(move |value| (name, value))
    };
    (
        field("id", json!("pod-1")),
        field("name", json!("my-app")),
        field("ip", json!("10.0.0.1")),
        field("port", json!(8080)),
        field("ports", json!([80, 443])),
        field("labels", json!({"app": "x"})),
        field("created_at", json!("2024-01-15T10:30:00Z")),
    )
        .prop_map(|fields| {
            let (a, b, c, d, e, f, g) = fields;
            let mut pod = Map::new();
            for (name, value) in [a, b, c, d, e, f, g] {
                if let Some(value) = value {
                    pod.insert(name.to_owned(), value);
                }
            }
            Value::Object(pod)
        })
}

fn action() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!("create")),
        Just(json!("update")),
        Just(json!("delete")),
        Just(json!("sync")),
        json_value(),
    ]
}

proptest! {
    #[test]
    fn random_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..2048)) {
        check(&body, None)?;
    }

    #[test]
    fn mutated_valid_requests_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..12)
    ) {
        let mut body = SEED.as_bytes().to_vec();
        for (at, byte, kind) in edits {
            let len = body.len();
            match kind {
                0 if len > 0 => body[at.index(len)] = byte,
                1 => body.insert(at.index(len + 1), byte),
                _ if len > 0 => { body.remove(at.index(len)); }
                _ => {}
            }
        }
        check(&body, None)?;
    }

    #[test]
    fn push_shaped_json_is_applied_or_rejected_pod_by_pod(
        action in action(),
        pods in prop::collection::vec(pod_like(), 0..12),
    ) {
        let count = pods.len();
        let body = json!({"agent_id": AGENT, "action": action, "pods": pods}).to_string();
        let action_ok = json!(["create", "update", "delete", "sync"])
            .as_array()
            .is_some_and(|names| names.contains(&action));
        match parse_push(body.as_bytes(), AGENT) {
            Ok(parsed) => {
                prop_assert!(action_ok, "accepted action {action}");
                check_accepted(&parsed, Some(count))?;
            }
            Err(err) => {
                prop_assert!(!action_ok, "refused a whole push with a good action: {}", err.message());
                prop_assert!(err.message().contains("action"), "{}", err.message());
            }
        }
    }
}
