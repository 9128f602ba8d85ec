//! Every port of a pod, over real sockets: each TCP port answers by its own
//! range port and by the pod's address at its own number, with counters and
//! a toggle of its own; an update opens and closes only the ports that
//! changed, live connections on the others untouched; a port that leaves and
//! comes back, and every port across a restart, keeps its range port.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use common::{echo_server, open_and_ping, refuses, wait_until, Fixture, TestAgent};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An HTTP server on loopback that answers every request with `body`.
async fn http_server(body: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                // One request per connection: read its head, answer, close.
                let mut head = Vec::new();
                let mut buf = [0_u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// A pod on 127.0.0.1 with `ports` (numbers or port objects).
fn multi_port_pod(id: &str, ports: Value) -> Value {
    json!({
        "id": id, "name": id, "namespace": "staging", "status": "running",
        "ip": "127.0.0.1", "ports": ports,
        "created_at": "2024-01-15T10:30:00Z", "updated_at": "2024-01-15T10:30:00Z"
    })
}

/// The pod's ports as the status endpoint lists them, by staging port.
async fn ports_of(agent: &TestAgent, id: &str) -> BTreeMap<u16, Value> {
    let tunnel = agent.redirection(id).await;
    tunnel["ports"]
        .as_array()
        .unwrap_or_else(|| panic!("{id} lists no ports: {tunnel}"))
        .iter()
        .map(|port| {
            let number = port["staging_port"].as_u64().expect("staging_port");
            (u16::try_from(number).expect("u16"), port.clone())
        })
        .collect()
}

fn range_port(port: &Value) -> u16 {
    let number = port["local_port"]
        .as_u64()
        .unwrap_or_else(|| panic!("no range port: {port}"));
    u16::try_from(number).expect("u16")
}

async fn get_text(url: &str) -> String {
    common::within(
        url,
        reqwest::Client::new()
            .get(url)
            .send()
            .await
            .unwrap_or_else(|err| panic!("GET {url}: {err}"))
            .text(),
    )
    .await
    .unwrap_or_else(|err| panic!("body of {url}: {err}"))
}

async fn echo_at(addr: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|err| panic!("connect {addr}: {err}"));
    stream.write_all(payload).await.expect("write");
    stream.shutdown().await.expect("half-close");
    let mut back = Vec::new();
    common::within("echo", stream.read_to_end(&mut back))
        .await
        .expect("read");
    back
}

/// Pings on an open connection through a tunnel: it still carries bytes.
async fn still_carries(stream: &mut TcpStream, what: &str) {
    stream.write_all(b"pong").await.expect(what);
    let mut answer = [0_u8; 4];
    common::within(what, stream.read_exact(&mut answer))
        .await
        .expect(what);
    assert_eq!(&answer, b"pong", "{what}");
}

#[tokio::test]
async fn every_tcp_port_answers_by_its_range_port_and_by_the_pod_address() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let web = http_server("web").await;
    let metrics = http_server("metrics").await;
    let raw = echo_server().await;
    let (code, answer) = agent
        .push(
            "create",
            json!([multi_port_pod(
                "shop",
                json!([
                    {"name": "http", "port": web.port()},
                    {"name": "metrics", "port": metrics.port()},
                    raw.port(),
                    {"name": "dns", "port": 5353, "protocol": "UDP"}
                ])
            )]),
        )
        .await;
    assert_eq!(code, 200, "{answer}");

    let tunnel = agent.redirection("shop").await;
    // The seed's fields are the first port's.
    assert_eq!(tunnel["staging_port"], web.port());
    let address: std::net::Ipv4Addr = tunnel["address"]
        .as_str()
        .expect("the pod has its own address")
        .parse()
        .expect("address");
    let ports = ports_of(&agent, "shop").await;
    assert_eq!(ports.len(), 4, "{tunnel}");
    assert_eq!(ports[&web.port()]["name"], "http");
    assert_eq!(tunnel["local_port"], ports[&web.port()]["local_port"]);
    let range: Vec<u16> = [web.port(), metrics.port(), raw.port()]
        .iter()
        .map(|port| range_port(&ports[port]))
        .collect();
    assert!(
        range[0] != range[1] && range[1] != range[2] && range[0] != range[2],
        "one range port each: {range:?}"
    );
    for port in [web.port(), metrics.port(), raw.port()] {
        assert_eq!(ports[&port]["status"], "active", "{}", ports[&port]);
        assert_eq!(ports[&port]["forwarding"], true);
    }
    // UDP is listed, never tunnelled, never dropped.
    let dns = &ports[&5353];
    assert_eq!(dns["protocol"], "UDP");
    assert_eq!(dns["forwarding"], false);
    assert!(dns["local_port"].is_null());
    assert!(
        dns["error"]
            .as_str()
            .unwrap_or("")
            .contains("not tunnelled"),
        "{dns}"
    );

    // Each HTTP port by its range port and by the pod's address.
    assert_eq!(
        get_text(&format!("http://127.0.0.1:{}/", range[0])).await,
        "web"
    );
    assert_eq!(
        get_text(&format!("http://127.0.0.1:{}/", range[1])).await,
        "metrics"
    );
    assert_eq!(
        get_text(&format!("http://{address}:{}/", web.port())).await,
        "web"
    );
    assert_eq!(
        get_text(&format!("http://{address}:{}/", metrics.port())).await,
        "metrics"
    );
    // The raw TCP port both ways.
    let payload: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
    assert_eq!(
        echo_at(SocketAddr::from(([127, 0, 0, 1], range[2])), &payload).await,
        payload
    );
    assert_eq!(
        echo_at(SocketAddr::from((address, raw.port())), &payload).await,
        payload
    );

    // Counters are per port: two connections each, bytes only on the raw one.
    wait_until("every connection counted and closed", || {
        let status = agent.agent.status();
        status.redirections["shop"]
            .ports
            .iter()
            .filter(|port| port.protocol == k3s_local_agent::model::Protocol::Tcp)
            .all(|port| port.total_connections == 2 && port.open_connections == 0)
    })
    .await;
    let ports = ports_of(&agent, "shop").await;
    assert_eq!(ports[&raw.port()]["bytes_to_pod"], 100_000);
    assert_eq!(
        ports[&web.port()]["bytes_from_pod"].as_u64().map(|b| b > 0),
        Some(true)
    );
    assert_eq!(
        ports[&metrics.port()]["bytes_to_pod"]
            .as_u64()
            .map(|b| b < 100_000),
        Some(true)
    );
    let scrape = reqwest::get(agent.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        scrape.contains(&format!(
            "pod_id=\"shop\",pod=\"shop\",port=\"{}\"",
            raw.port()
        )),
        "a series per port in /metrics"
    );

    // One port off alone: it refuses both ways, the others carry on.
    let path = "/api/v1/pods/shop/forwarding";
    let (code, answer) = agent
        .post(path, &json!({"enabled": false, "port": metrics.port()}))
        .await;
    assert_eq!(code, 200, "{answer}");
    assert!(refuses(range[1]).await, "the metrics port is off");
    assert!(
        TcpStream::connect((address, metrics.port())).await.is_err(),
        "off by the pod's address too"
    );
    assert_eq!(
        get_text(&format!("http://127.0.0.1:{}/", range[0])).await,
        "web"
    );
    assert_eq!(
        answer["forwarding"], true,
        "the pod's first port is still on"
    );
    // On again, on the same range port.
    let (code, _) = agent
        .post(path, &json!({"enabled": true, "port": metrics.port()}))
        .await;
    assert_eq!(code, 200);
    assert_eq!(
        get_text(&format!("http://127.0.0.1:{}/", range[1])).await,
        "metrics"
    );
    // A port the pod does not list, or one that is not tunnelled, is named.
    let (code, answer) = agent
        .post(path, &json!({"enabled": false, "port": 1234}))
        .await;
    assert_eq!(code, 404, "{answer}");
    assert_eq!(answer["field"], "port");
    let (code, answer) = agent
        .post(path, &json!({"enabled": false, "port": 5353}))
        .await;
    assert_eq!(code, 404, "{answer}");
    assert!(
        answer["error"].as_str().unwrap_or("").contains("UDP"),
        "{answer}"
    );
    // The pod's toggle turns every port off, and on.
    let (code, _) = agent.set_forwarding("shop", false).await;
    assert_eq!(code, 200);
    for port in &range {
        assert!(refuses(*port).await, "{port} off with its pod");
    }
    let (code, _) = agent.set_forwarding("shop", true).await;
    assert_eq!(code, 200);
    assert_eq!(
        get_text(&format!("http://127.0.0.1:{}/", range[1])).await,
        "metrics"
    );
}

#[tokio::test]
async fn an_update_closes_the_port_that_left_and_leaves_the_others_carrying_bytes() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let kept = echo_server().await;
    let leaving = echo_server().await;
    // Another pod holds the range's first port: when it goes, the lowest
    // free number is not the one the leaving port had.
    let (code, _) = agent
        .push("create", json!([common::pod("first", "first", kept)]))
        .await;
    assert_eq!(code, 200);
    let both = json!([multi_port_pod("api", json!([kept.port(), leaving.port()]))]);
    let (code, _) = agent.push("create", both.clone()).await;
    assert_eq!(code, 200);
    let ports = ports_of(&agent, "api").await;
    let (kept_range, leaving_range) = (
        range_port(&ports[&kept.port()]),
        range_port(&ports[&leaving.port()]),
    );
    let address = agent.redirection("api").await["address"]
        .as_str()
        .expect("address")
        .parse::<std::net::Ipv4Addr>()
        .expect("ip");
    let mut live = open_and_ping(kept_range).await;
    let mut live_by_name = TcpStream::connect((address, kept.port()))
        .await
        .expect("connect by the pod's address");
    still_carries(&mut live_by_name, "a connection by the pod's address").await;

    // The port leaves: its listeners close, the other port's connections stay.
    let (code, _) = agent
        .push(
            "update",
            json!([multi_port_pod("api", json!([kept.port()]))]),
        )
        .await;
    assert_eq!(code, 200);
    assert!(refuses(leaving_range).await, "the port that left is closed");
    assert!(
        TcpStream::connect((address, leaving.port())).await.is_err(),
        "and closed on the pod's address"
    );
    still_carries(&mut live, "the kept port's open connection").await;
    still_carries(&mut live_by_name, "the kept port's connection by address").await;
    let ports = ports_of(&agent, "api").await;
    assert_eq!(ports.len(), 1);
    assert_eq!(
        range_port(&ports[&kept.port()]),
        kept_range,
        "the kept port keeps its number"
    );

    // It comes back, with its number while that is free (not the lowest free).
    let (code, _) = agent.push("delete", json!([{"id": "first"}])).await;
    assert_eq!(code, 200);
    let (code, _) = agent.push("update", both).await;
    assert_eq!(code, 200);
    let ports = ports_of(&agent, "api").await;
    assert_eq!(range_port(&ports[&leaving.port()]), leaving_range);
    assert_eq!(
        echo_at(SocketAddr::from(([127, 0, 0, 1], leaving_range)), b"back").await,
        b"back"
    );
    still_carries(
        &mut live,
        "the kept port's connection, after the port came back",
    )
    .await;
    assert_eq!(
        agent.redirection("api").await["ports"][0]["total_connections"],
        2,
        "the kept port's counters went on"
    );
}

#[tokio::test]
async fn a_restart_gives_every_pod_port_its_range_port_back() {
    let fx = Fixture::new().await;
    let agent = fx.start().await;
    let servers = [
        echo_server().await,
        echo_server().await,
        echo_server().await,
    ];
    let [a, b, c] = servers.map(|server| server.port());
    let (code, _) = agent
        .push(
            "create",
            json!([
                multi_port_pod("one", json!([a, b])),
                multi_port_pod("two", json!([b, c, a]))
            ]),
        )
        .await;
    assert_eq!(code, 200);
    let left_range = range_port(&ports_of(&agent, "two").await[&c]);
    // A port that leaves before the restart is remembered across it too.
    let (code, _) = agent
        .push("update", json!([multi_port_pod("two", json!([b, a]))]))
        .await;
    assert_eq!(code, 200);
    let before = (ports_of(&agent, "one").await, ports_of(&agent, "two").await);
    agent.agent.shutdown().await;

    let agent = fx.start().await;
    let after = (ports_of(&agent, "one").await, ports_of(&agent, "two").await);
    for (id, was, now) in [("one", &before.0, &after.0), ("two", &before.1, &after.1)] {
        assert_eq!(was.len(), now.len(), "{id} keeps its ports");
        for (port, tunnel) in was {
            assert_eq!(
                range_port(&now[port]),
                range_port(tunnel),
                "{id} port {port} keeps its range port"
            );
            let through = SocketAddr::from(([127, 0, 0, 1], range_port(&now[port])));
            assert_eq!(echo_at(through, b"hi").await, b"hi");
        }
    }
    let (code, _) = agent
        .push("update", json!([multi_port_pod("two", json!([b, c, a]))]))
        .await;
    assert_eq!(code, 200);
    assert_eq!(
        range_port(&ports_of(&agent, "two").await[&c]),
        left_range,
        "the port that left before the restart gets its number back"
    );
}
