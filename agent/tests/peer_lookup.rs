//! Whose a loopback API connection is, with a crowded machine: 4,000
//! listening sockets and 400 API connections kept open after one request
//! each (every one of them looked up). `/health` on a new connection still
//! answers, and still tells the agent's own user (shown the pods, no token)
//! from strangers. How fast is the benchmark's business (`bench/`).

mod common;

use common::{echo_server, pod, within, Fixture};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_the_own_user_among_thousands_of_sockets() {
    // 4,000 listeners, 800 connection ends and the agent's own: more than
    // the usual soft limit of 1,024 descriptors.
    rlimit::increase_nofile_limit(u64::MAX).expect("raise the open-file limit");
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let upstream = echo_server().await;
    let (code, answer) = agent
        .push("create", serde_json::json!([pod("p1", "crowd", upstream)]))
        .await;
    assert_eq!(code, 200, "{answer}");

    let listeners: Vec<std::net::TcpListener> = (0..4_000)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a listener"))
        .collect();

    let addr = agent.agent.local_addr();
    let mut idle = Vec::with_capacity(400);
    for _ in 0..400 {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        // Not an open path: the connection's user is looked up.
        stream
            .write_all(b"GET /api/v1/pods HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .expect("write");
        idle.push(stream);
    }
    for stream in &mut idle {
        let mut head = [0u8; 12];
        within("an idle connection's answer", stream.read_exact(&mut head))
            .await
            .expect("read");
        assert_eq!(&head, b"HTTP/1.1 200", "the agent's own user is trusted");
    }

    let health = within("/health on a new connection", agent.get("/health")).await;
    assert_eq!(health["status"], "healthy", "{health}");
    assert_eq!(
        health["pod_count"], 1,
        "the own user sees the pods: {health}"
    );
    drop(idle);
    drop(listeners);
}
