//! What the tunnel folder's unit tests share: a tunnel of pod `web` with
//! dialers of the test's choosing, pods on loopback (one that echoes, a port
//! that refuses) and a wait on a tunnel's counters with a deadline.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::events::{EventBus, TrafficWatch};
use crate::model::{StagingVia, TunnelTarget};
use crate::tunnel::dial::{
    DialError, DialFuture, Dialers, LocalDialer, LocalStream, NoStagingCluster,
};
use crate::tunnel::reach::{PodWays, StagingPod};
use crate::tunnel::shared::{Route, TunnelShared};

/// Longest any test waits for something that should happen at once.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A mirror dialer that never reaches anything.
#[derive(Debug)]
pub struct NoMirror;

impl LocalDialer for NoMirror {
    fn dial(&self, _pod_id: &str, _port: u16) -> DialFuture {
        Box::pin(async { Err(DialError::Disabled) })
    }
}

/// A mirror dialer that hands out the one stream it was given.
#[derive(Debug)]
pub struct Handing(Mutex<Option<LocalStream>>);

impl Handing {
    pub fn new(stream: impl crate::tunnel::dial::PodStream + 'static) -> Arc<Self> {
        Arc::new(Self(Mutex::new(Some(LocalStream {
            stream: Box::new(stream),
        }))))
    }
}

impl LocalDialer for Handing {
    fn dial(&self, pod_id: &str, _port: u16) -> DialFuture {
        let stream = self.0.lock().expect("stream").take();
        let pod_id = pod_id.to_owned();
        Box::pin(async move { stream.ok_or(DialError::UnknownPod(pod_id)) })
    }
}

/// Neither a mirror nor a staging cluster.
pub fn no_dialers() -> Dialers {
    Dialers {
        mirror: Arc::new(NoMirror),
        staging: Arc::new(NoStagingCluster),
    }
}

/// A tunnel of pod `web` (staging/web at 10.0.1.100, direct retried after
/// a minute) to the staging pod at `target`, reached `via`.
pub fn tunnel_with(
    target: SocketAddr,
    via: StagingVia,
    dialers: Dialers,
    events: &EventBus,
    limit: usize,
) -> Arc<TunnelShared> {
    let ways = PodWays::new(
        StagingPod {
            namespace: "staging".into(),
            name: "web".into(),
            ip: IpAddr::from([10, 0, 1, 100]),
        },
        Duration::from_secs(60),
    );
    TunnelShared::new(
        "web".into(),
        Route {
            target,
            mode: TunnelTarget::Staging,
            via,
        },
        dialers,
        Arc::new(ways),
        events.clone(),
        limit,
    )
}

/// A loopback port nothing listens on, held (bound, never listening) so
/// nobody else takes it while the test runs: a connect there is refused.
pub fn closed_port() -> (socket2::Socket, SocketAddr) {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
        .expect("bind");
    let addr = socket
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("inet");
    (socket, addr)
}

/// A pod on loopback that sends back whatever each connection sends, and
/// closes its side when the client closes its own.
pub async fn echo_pod() -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind the pod");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut connection, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = connection.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    addr
}

/// Both ends of a loopback connection: (the client's, the tunnel's).
pub async fn connected_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind");
    let client = TcpStream::connect(listener.local_addr().expect("addr"));
    let (client, accepted) = tokio::join!(client, listener.accept());
    (client.expect("connect"), accepted.expect("accept").0)
}

/// Waits, at most [`DEADLINE`], until `done` holds; woken whenever a
/// tunnel's counters move.
pub async fn until(traffic: &mut TrafficWatch, what: &str, done: impl Fn() -> bool) {
    let waited = tokio::time::timeout(DEADLINE, async {
        loop {
            traffic.mark_unchanged();
            if done() {
                return;
            }
            traffic.changed().await.expect("the event bus is alive");
        }
    })
    .await;
    assert!(waited.is_ok(), "still waiting for {what}");
}
