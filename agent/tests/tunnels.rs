//! Tunnels over real sockets: bytes reach the pod and come back, counters
//! count, updates retarget without closing, failures stay contained, toggles
//! refuse and restore, ports are chosen as promised.

mod common;

use common::{
    echo_server, echo_through, greeting_server, pod, read_all_from, refuses, wait_until, Fixture,
};
use k3s_local_agent::events::AgentEvent;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn bytes_flow_both_ways_and_are_counted() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let upstream = echo_server().await;
    let (code, _) = agent
        .push("create", json!([pod("p1", "echo", upstream)]))
        .await;
    assert_eq!(code, 200);
    let port = agent.port_of("p1").await;
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let back = echo_through(port, &payload)
        .await
        .expect("echo through tunnel");
    assert_eq!(back, payload);

    let tunnel = agent.redirection("p1").await;
    assert_eq!(tunnel["total_connections"], 1);
    assert_eq!(tunnel["bytes_to_pod"], 200_000);
    assert_eq!(tunnel["bytes_from_pod"], 200_000);
    wait_until("the connection to be closed in the counters", || {
        agent.agent.status().redirections["p1"].open_connections == 0
    })
    .await;
}

#[tokio::test]
async fn an_update_retargets_new_connections_without_closing_the_listener() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let old_pod = echo_server().await;
    let new_pod = greeting_server("new pod").await;
    agent
        .push("create", json!([pod("p1", "moving", old_pod)]))
        .await;
    let port = agent.port_of("p1").await;

    // A connection opened before the move stays with the old pod.
    let mut early = common::open_and_ping(port).await;

    let (code, _) = agent
        .push("update", json!([pod("p1", "moving", new_pod)]))
        .await;
    assert_eq!(code, 200);
    assert_eq!(
        agent.port_of("p1").await,
        port,
        "same port after the update"
    );
    assert_eq!(read_all_from(port).await.expect("read"), "new pod");

    early
        .write_all(b"pong")
        .await
        .expect("old connection still open");
    let mut buf = [0u8; 4];
    early
        .read_exact(&mut buf)
        .await
        .expect("old pod still echoes");
    assert_eq!(&buf, b"pong");
}

#[tokio::test]
async fn a_refusing_pod_fails_its_connection_not_its_tunnel_or_others() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let (reserved, dead) = common::refusing_address();
    let healthy = greeting_server("healthy").await;
    agent
        .push(
            "create",
            json!([pod("dead", "dead", dead), pod("ok", "healthy", healthy)]),
        )
        .await;
    let mut events = agent.agent.events().subscribe();
    let dead_port = agent.port_of("dead").await;
    let text = read_all_from(dead_port)
        .await
        .expect("tunnel accepts, then closes");
    assert_eq!(text, "", "nothing comes back from a refusing pod");

    let event = common::within("a tunnel event", async {
        loop {
            if let Ok(AgentEvent::TunnelChanged {
                pod_id,
                error: Some(error),
                ..
            }) = events.recv().await
            {
                return (pod_id, error);
            }
        }
    })
    .await;
    assert_eq!(event.0, "dead");
    assert!(event.1.contains("refused"), "{}", event.1);

    let tunnel = agent.redirection("dead").await;
    assert_eq!(tunnel["status"], "active", "the listener stays up");
    assert!(tunnel["error"]
        .as_str()
        .expect("error")
        .contains(&dead.to_string()));
    assert!(tunnel["last_error_at"].is_string());
    assert!(!refuses(dead_port).await, "still listening");
    assert_eq!(
        read_all_from(agent.port_of("ok").await)
            .await
            .expect("read"),
        "healthy"
    );

    // The pod comes back on the same address: the tunnel recovers by itself.
    let revived = reserved.listen(16).expect("listen on the dead port");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = revived.accept().await {
            let _ = stream.write_all(b"back").await;
        }
    });
    assert_eq!(read_all_from(dead_port).await.expect("read"), "back");
    assert!(
        agent.redirection("dead").await["error"].is_null(),
        "error cleared after recovery"
    );
}

#[tokio::test]
async fn forwarding_off_refuses_and_on_restores_the_same_port() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let one = greeting_server("one").await;
    let two = greeting_server("two").await;
    agent
        .push(
            "create",
            json!([pod("p1", "one", one), pod("p2", "two", two)]),
        )
        .await;
    let port = agent.port_of("p1").await;
    let other = agent.port_of("p2").await;

    let (code, tunnel) = agent.set_forwarding("p1", false).await;
    assert_eq!(code, 200);
    assert_eq!(tunnel["status"], "stopped");
    assert_eq!(tunnel["forwarding"], false);
    assert!(refuses(port).await, "a stopped tunnel refuses connections");
    assert_eq!(
        read_all_from(other).await.expect("read"),
        "two",
        "others untouched"
    );
    let status = agent.get("/api/v1/pods/status").await;
    assert_eq!(status["active_redirections"], 1);
    assert_eq!(status["stopped_redirections"], 1);

    // A new pod never takes the stopped pod's port.
    let three = greeting_server("three").await;
    agent
        .push("create", json!([pod("p3", "three", three)]))
        .await;
    assert_ne!(agent.port_of("p3").await, port);

    let (code, tunnel) = agent.set_forwarding("p1", true).await;
    assert_eq!(code, 200);
    assert_eq!(tunnel["status"], "active");
    assert_eq!(tunnel["local_port"], port);
    assert_eq!(read_all_from(port).await.expect("read"), "one");
}

#[tokio::test]
async fn ports_held_elsewhere_are_skipped_and_exhaustion_fails_only_that_pod() {
    let fx = Fixture::new().await;
    // Another process holds the first port of the range.
    let squatter = std::net::TcpListener::bind(("127.0.0.1", fx.range.start)).expect("squat");
    let mut config = fx.config();
    config.port_range = k3s_local_agent::config::PortRange {
        start: fx.range.start,
        end: fx.range.start + 2,
    };
    let agent = fx.start_with(config).await;
    let upstream = greeting_server("hi").await;
    let (code, _) = agent
        .push(
            "create",
            json!([
                pod("a", "a", upstream),
                pod("b", "b", upstream),
                pod("c", "c", upstream)
            ]),
        )
        .await;
    assert_eq!(
        code, 200,
        "port failures are tunnel states, not push errors"
    );
    let a = agent.redirection("a").await;
    assert_eq!(a["local_port"], fx.range.start + 1);
    assert!(
        a["port_note"].as_str().expect("note").contains(&format!(
            "port {} is held by another process",
            fx.range.start
        )),
        "{a}"
    );
    assert_eq!(
        agent.redirection("b").await["local_port"],
        fx.range.start + 2
    );
    let c = agent.redirection("c").await;
    assert_eq!(c["status"], "failed");
    assert_eq!(
        c["error"],
        format!(
            "no available ports in range {}-{}",
            fx.range.start,
            fx.range.start + 2
        )
    );
    assert_eq!(
        agent.get("/api/v1/pods/status").await["failed_redirections"],
        1
    );
    assert_eq!(
        read_all_from(fx.range.start + 1).await.expect("a works"),
        "hi"
    );

    // Freeing a port lets the failed pod listen.
    agent.push("delete", json!([{"id": "b"}])).await;
    let c = agent.redirection("c").await;
    assert_eq!(c["status"], "active", "{c}");
    assert_eq!(c["local_port"], fx.range.start + 2);
    drop(squatter);
}

#[tokio::test]
async fn the_agent_and_control_plane_ports_are_never_handed_out() {
    let fx = Fixture::new().await;
    let mut config = fx.config();
    // The control plane "listens" on the first port of the range.
    config.control_plane_url = format!("http://127.0.0.1:{}", fx.range.start)
        .parse()
        .expect("url");
    let agent = fx.start_with(config).await;
    let upstream = greeting_server("hi").await;
    agent.push("create", json!([pod("a", "a", upstream)])).await;
    assert_eq!(agent.port_of("a").await, fx.range.start + 1);
}

#[tokio::test]
async fn deleting_a_pod_closes_its_port() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let upstream = greeting_server("hi").await;
    agent.push("create", json!([pod("a", "a", upstream)])).await;
    let port = agent.port_of("a").await;
    assert!(!refuses(port).await);
    agent.push("delete", json!([{"id": "a"}])).await;
    assert!(refuses(port).await);
    assert_eq!(
        agent.get("/api/v1/pods/status").await["total_redirections"],
        0
    );
}

#[tokio::test]
async fn pause_all_and_resume_all() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let upstream = greeting_server("hi").await;
    agent
        .push(
            "create",
            json!([pod("a", "a", upstream), pod("b", "b", upstream)]),
        )
        .await;
    agent.set_forwarding("b", false).await;
    let (a, b) = (agent.port_of("a").await, agent.port_of("b").await);
    assert_eq!(
        agent.agent.set_forwarding_all(false).await.expect("pause"),
        1
    );
    assert!(refuses(a).await && refuses(b).await);
    assert_eq!(
        agent.agent.set_forwarding_all(true).await.expect("resume"),
        2
    );
    assert_eq!(read_all_from(a).await.expect("a"), "hi");
    assert_eq!(read_all_from(b).await.expect("b"), "hi");
}
