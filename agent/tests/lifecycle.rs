//! The agent across its life: names in the hosts file, status reports to the
//! control plane, state that survives a restart, and a clean shutdown.

mod common;

use common::{greeting_server, pod, read_all_from, refuses, ControlPlane, Fixture, FOREIGN_HOSTS};
use k3s_local_agent::events::AgentEvent;
use k3s_local_agent::names::{count_blocks, BLOCK_BEGIN, BLOCK_END};
use serde_json::{json, Value};

#[tokio::test]
async fn names_follow_the_pods_and_leave_other_lines_alone() {
    let fx = Fixture::new().await;
    // A stale block from a crashed run must go at start.
    std::fs::write(
        &fx.hosts,
        format!("{FOREIGN_HOSTS}{BLOCK_BEGIN}\n127.0.0.1 ghost-staging.local\n{BLOCK_END}\n"),
    )
    .expect("seed stale block");
    let agent = fx.start().await;
    assert_eq!(
        fx.hosts_text(),
        FOREIGN_HOSTS,
        "stale block removed at start"
    );

    let upstream = greeting_server("hi").await;
    agent
        .push(
            "create",
            json!([pod("a", "my-app", upstream), pod("b", "other", upstream)]),
        )
        .await;
    let text = fx.hosts_text();
    assert!(text.starts_with(FOREIGN_HOSTS));
    assert_eq!(count_blocks(&text), 1);
    // Each name points at its own pod's address.
    for (id, name) in [("a", "my-app"), ("b", "other")] {
        let address = agent.redirection(id).await["address"]
            .as_str()
            .expect("address")
            .to_owned();
        assert!(
            address.starts_with("127.128.0."),
            "root's own block: {address}"
        );
        assert!(
            text.contains(&format!(
                "{address} {name}-staging.local {name}-staging.localhost\n"
            )),
            "{text}"
        );
    }
    assert_ne!(
        agent.redirection("a").await["address"],
        agent.redirection("b").await["address"]
    );

    agent.push("delete", json!([{"id": "b"}])).await;
    let text = fx.hosts_text();
    assert!(!text.contains("other-staging"));
    assert!(text.contains("my-app-staging.local"));

    agent.agent.shutdown().await;
    assert_eq!(
        fx.hosts_text(),
        FOREIGN_HOSTS,
        "stop removes our block and only it"
    );
}

#[tokio::test]
async fn reports_go_out_at_start_on_change_and_on_stop() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let first = fx
        .control_plane
        .wait_for(0, "the first report", |_| true)
        .await;
    assert_eq!(first["agent_id"], "test-agent");
    assert_eq!(first["status"], "running");
    assert_eq!(first["total_pods"], 0);
    assert_eq!(first["kind_cluster_status"], "disabled");
    for field in [
        "running_pods",
        "failed_pods",
        "staging_pods",
        "last_sync",
        "timestamp",
    ] {
        assert!(first.get(field).is_some(), "report lacks {field}: {first}");
    }
    let (headers, _) = fx.control_plane.reports()[0].clone();
    assert_eq!(headers["x-agent-id"], "test-agent");

    // The interval is an hour: only the change can trigger this report.
    let seen = fx.control_plane.len();
    let upstream = greeting_server("hi").await;
    agent
        .push("create", json!([pod("a", "my-app", upstream)]))
        .await;
    let report = fx
        .control_plane
        .wait_for(seen, "a report after the push", |r| r["total_pods"] == 1)
        .await;
    assert_eq!(report["running_pods"], 1);
    assert_eq!(
        report["staging_pods"]["a"]["dns_name"],
        "my-app-staging.local"
    );
    assert!(
        report["last_sync"].is_string(),
        "last_sync set after a success"
    );
    let health = agent.get("/health").await;
    assert_eq!(health["control_plane"]["reachable"], true);

    let seen = fx.control_plane.len();
    agent.agent.shutdown().await;
    let last = fx
        .control_plane
        .wait_for(seen, "the stopped report", |r| r["status"] == "stopped")
        .await;
    assert_eq!(last["agent_id"], "test-agent");
}

#[tokio::test]
async fn reports_follow_the_interval() {
    let fx = Fixture::new().await;
    let mut config = fx.config();
    let interval = std::time::Duration::from_secs(1);
    config.sync_interval = interval;
    let _agent = fx.start_with(config).await;
    // No change happens: after the one at start, reports can only come from
    // the interval.
    fx.control_plane
        .wait_for(3, "a fourth report, the third periodic one", |_| true)
        .await;
    let reports = fx.control_plane.reports();
    for (_, report) in &reports {
        assert_eq!(report["status"], "running", "{report}");
        assert_eq!(report["total_pods"], 0, "{report}");
    }
    // The next report is due an interval after the last was answered, so no
    // two arrive closer together than that; one sent for any other reason
    // (a change is reported 250 ms after it) would.
    let arrivals = fx.control_plane.arrivals();
    assert_eq!(arrivals.len(), reports.len());
    for (i, pair) in arrivals.windows(2).enumerate() {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= interval,
            "reports {i} and {} came {gap:?} apart; the interval is {interval:?}",
            i + 1
        );
    }
}

#[tokio::test]
async fn an_absent_control_plane_is_retried_and_caught_up() {
    let fx = Fixture::new().await;
    // Reserve an address for the control plane, but do not serve it yet.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = reserved.local_addr().expect("addr");
    drop(reserved);
    let mut config = fx.config();
    config.control_plane_url = format!("http://{address}").parse().expect("url");
    let agent = fx.start_with(config).await;
    let mut events = agent.agent.events().subscribe();

    common::within("the outage to be noticed", async {
        loop {
            if let Ok(AgentEvent::ControlPlane {
                reachable: false, ..
            }) = events.recv().await
            {
                return;
            }
        }
    })
    .await;
    let health = agent.get("/health").await;
    assert_eq!(health["control_plane"]["reachable"], false);
    assert!(health["control_plane"]["last_sync"].is_null());
    // Tunnels work regardless.
    let upstream = greeting_server("still works").await;
    agent.push("create", json!([pod("a", "a", upstream)])).await;
    assert_eq!(
        read_all_from(agent.port_of("a").await).await.expect("read"),
        "still works"
    );

    let listener = tokio::net::TcpListener::bind(address)
        .await
        .expect("control plane comes up");
    let control_plane = ControlPlane::serve(listener);
    let report = control_plane
        .wait_for(0, "the first report after the outage", |r| {
            r["total_pods"] == 1
        })
        .await;
    assert_eq!(report["staging_pods"]["a"]["status"], "active");
    common::wait_until("health to say reachable", || {
        agent.agent.health().control_plane.reachable == Some(true)
    })
    .await;
    assert!(agent.agent.health().control_plane.last_sync.is_some());
}

#[tokio::test]
async fn a_restart_brings_back_pods_ports_and_toggles() {
    let fx = Fixture::new().await;
    let upstream = greeting_server("hello").await;
    let agent = fx.start().await;
    let pods: Vec<_> = (0..5)
        .map(|i| pod(&format!("p{i}"), &format!("app-{i}"), upstream))
        .collect();
    agent.push("create", json!(pods)).await;
    // Push a second batch so ports are not simply the first five.
    agent.push("delete", json!([{"id": "p0"}])).await;
    agent
        .push("create", json!([pod("p5", "app-5", upstream)]))
        .await;
    agent.set_forwarding("p2", false).await;
    let before = agent.agent.status();
    let token = agent.agent.token().to_owned();
    let agent_id = agent.agent.agent_id().to_owned();
    agent.agent.shutdown().await;
    assert!(refuses(before.redirections["p1"].local_port.expect("port")).await);

    // Started without an explicit id: the stored one is kept.
    let mut config = fx.config();
    config.agent_id = None;
    let again = fx.start_with(config).await;
    assert_eq!(again.agent.agent_id(), agent_id);
    assert_eq!(again.agent.token(), token);
    let after = again.agent.status();
    assert_eq!(after.redirections.len(), 5);
    for (id, old) in &before.redirections {
        let new = &after.redirections[id];
        assert_eq!(new.local_port, old.local_port, "pod {id} kept its port");
        assert_eq!(new.forwarding, old.forwarding, "pod {id} kept its toggle");
        assert_eq!(new.status, old.status, "pod {id} kept its state");
    }
    let p1 = after.redirections["p1"].local_port.expect("port");
    assert_eq!(read_all_from(p1).await.expect("read"), "hello");
    assert!(refuses(after.redirections["p2"].local_port.expect("port")).await);
    let text = fx.hosts_text();
    assert_eq!(count_blocks(&text), 1);
    assert!(text.contains("app-5-staging.local"));
}

#[tokio::test]
async fn events_tell_subscribers_about_pushes() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let mut events = agent.agent.events().subscribe();
    let upstream = greeting_server("hi").await;
    agent.push("create", json!([pod("a", "a", upstream)])).await;
    let event = common::within("a pods event", async {
        loop {
            if let Ok(event @ AgentEvent::PodsChanged { .. }) = events.recv().await {
                return event;
            }
        }
    })
    .await;
    assert_eq!(
        event,
        AgentEvent::PodsChanged {
            applied: vec!["a".into()],
            removed: vec![]
        }
    );
}

#[tokio::test]
async fn a_control_plane_answering_500_counts_as_down() {
    let fx = Fixture::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let app = axum::Router::new().route(
        "/api/v1/staging/status",
        axum::routing::post(|| async { (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "boom") }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut config = fx.config();
    config.control_plane_url = url.parse().expect("url");
    let agent = fx.start_with(config).await;
    common::wait_until("the 500 to be noticed", || {
        agent.agent.health().control_plane.reachable == Some(false)
    })
    .await;
    let health = agent.agent.health();
    assert!(
        health
            .control_plane
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("500")),
        "{health:?}"
    );
    assert!(health.control_plane.last_sync.is_none());
}

#[tokio::test]
async fn an_update_that_changes_the_pod_port_moves_its_name_port() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let before = greeting_server("before").await;
    let after = greeting_server("after").await;
    agent
        .push("create", json!([pod("m", "mover", before)]))
        .await;
    let address: std::net::Ipv4Addr = agent.redirection("m").await["address"]
        .as_str()
        .expect("an address of its own")
        .parse()
        .expect("an IPv4 address");
    let by_name = |port: u16| std::net::SocketAddr::from((address, port));
    assert_eq!(
        common::read_all_at(by_name(before.port()))
            .await
            .expect("by name"),
        "before"
    );

    // The pod comes back on another port: its name follows at once.
    agent
        .push("update", json!([pod("m", "mover", after)]))
        .await;
    let tunnel = agent.redirection("m").await;
    assert_eq!(tunnel["name_port"], after.port(), "{tunnel}");
    assert_eq!(
        tunnel["name_port_error"],
        serde_json::Value::Null,
        "{tunnel}"
    );
    assert_eq!(
        common::read_all_at(by_name(after.port()))
            .await
            .expect("by name, new port"),
        "after"
    );
    assert!(
        common::read_all_at(by_name(before.port())).await.is_err(),
        "the old pod port no longer listens on the pod's address"
    );
    let range_port = agent.port_of("m").await;
    assert_eq!(
        read_all_from(range_port).await.expect("range port"),
        "after"
    );
}

/// A pod pushed with a creation time: newer pods win shared names.
fn pod_created(id: &str, name: &str, target: std::net::SocketAddr, created: &str) -> Value {
    let mut pod = pod(id, name, target);
    pod["created_at"] = json!(created);
    pod["updated_at"] = json!(created);
    pod
}

#[tokio::test]
async fn two_ids_with_one_name_give_the_name_to_the_newest_whatever_the_order() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let upstream = greeting_server("hi").await;
    let old = pod_created("old-id", "same", upstream, "2024-01-15T10:00:00Z");
    let new = pod_created("new-id", "same", upstream, "2024-01-15T11:00:00Z");
    // The replacement arrives before the old pod is deleted, in either order.
    for order in [[&old, &new], [&new, &old]] {
        agent.push("sync", json!([])).await;
        for pod in order {
            agent.push("create", json!([pod])).await;
        }
        let text = fx.hosts_text();
        let lines: Vec<&str> = text
            .lines()
            .filter(|line| line.contains(" same-staging.local "))
            .collect();
        let newest = agent.redirection("new-id").await;
        let address = newest["address"].as_str().expect("address");
        assert_eq!(
            lines,
            [format!(
                "{address} same-staging.local same-staging.localhost"
            )],
            "one name, one address: the newest pod's\n{text}"
        );
        let older = agent.redirection("old-id").await;
        assert!(
            older["local_port"].is_u64(),
            "the older pod keeps its range port"
        );
        assert!(
            older["name_note"]
                .as_str()
                .is_some_and(|note| note.contains("new-id")),
            "{older}"
        );
        assert_eq!(older["names"], json!([]), "{older}");
    }
    // The newer one goes: the name moves to the one left.
    agent.push("delete", json!([{"id": "new-id"}])).await;
    let left = agent.redirection("old-id").await;
    let address = left["address"].as_str().expect("address");
    assert!(fx.hosts_text().contains(&format!(
        "{address} same-staging.local same-staging.localhost\n"
    )));
}
