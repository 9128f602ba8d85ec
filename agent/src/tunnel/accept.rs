//! A tunnel's running listener ([`RunningTunnel`]): one accept loop per
//! forwarding shard on the shared socket, the open-connection limit, and
//! where each accepted connection is placed for its whole life.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::tunnel::listen::{gone_before_accept, SharedListener};
use crate::tunnel::serve::Connection;
use crate::tunnel::shards::{Balance, ForwardShards};
use crate::tunnel::shared::TunnelShared;
use crate::tunnel::stats::ConnectErrorKind;

/// Pause after a failed accept (out of file descriptors), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A tunnel's running listener. Closing it makes the port refuse connections
/// and ends the connections it carried.
#[derive(Debug)]
pub struct RunningTunnel {
    local_addr: SocketAddr,
    cancel: CancellationToken,
    accept_loops: Vec<JoinHandle<()>>,
}

impl RunningTunnel {
    /// Starts accepting on `listener` on every forwarding shard, forwarding to
    /// `shared`'s target. The shards share the one listening socket (each
    /// through a descriptor of its own, registered with its own reactor), so
    /// the kernel's accept decides which core takes a connection. Tasks are
    /// counted by `tracker` and stop with `parent`.
    pub fn spawn(
        listener: std::net::TcpListener,
        shared: Arc<TunnelShared>,
        shards: &ForwardShards,
        tracker: &TaskTracker,
        parent: &CancellationToken,
    ) -> io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let cancel = parent.child_token();
        let mut accept_loops = Vec::new();
        for (shard, balance) in shards.shards() {
            let descriptor = listener.try_clone()?;
            let listener = {
                let _entered = shard.enter();
                SharedListener::register(descriptor)
            };
            let listener = match listener {
                Ok(listener) => listener,
                Err(err) => {
                    cancel.cancel();
                    return Err(err);
                }
            };
            // One per shard for the tunnel's life, so its accept failures
            // say whose tunnel they are about.
            let span =
                tracing::info_span!("tunnel", pod = %shared.pod_id, port = local_addr.port());
            accept_loops.push(
                shard.spawn(
                    tracker.track_future(
                        accept_loop(
                            listener,
                            local_addr.port(),
                            Arc::clone(&shared),
                            balance,
                            tracker.clone(),
                            cancel.clone(),
                        )
                        .instrument(span),
                    ),
                ),
            );
        }
        // `listener` itself closes here; the shards hold the socket open.
        Ok(Self {
            local_addr,
            cancel,
            accept_loops,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops listening and waits until the port is released.
    pub async fn close(self) {
        self.cancel.cancel();
        for accept_loop in self.accept_loops {
            if let Err(err) = accept_loop.await {
                tracing::warn!(port = self.local_addr.port(), error = %err, "tunnel accept loop ended abnormally");
            }
        }
    }
}

async fn accept_loop(
    listener: SharedListener,
    port: u16,
    shared: Arc<TunnelShared>,
    balance: Balance,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok(client) if shared.figures.counters.open.load(Ordering::Relaxed) >= shared.limit => {
                // Closed at once: its descriptor is back before the next accept.
                drop(client);
                shared.record_error(
                    ConnectErrorKind::Other,
                    format!(
                        "more than {} connections open at once: new ones are closed until some \
                         end (does the pod's target lead back into this tunnel?)",
                        shared.limit
                    ),
                );
            }
            Ok(client) => {
                let connection = Connection {
                    shared: Arc::clone(&shared),
                    cancel: cancel.clone(),
                    pipes: balance.pipes(),
                    port,
                };
                place(client, connection, &balance, &tracker);
            }
            // A client that gave up while queued: its problem, not the
            // tunnel's; the next one may be waiting already.
            Err(err) if gone_before_accept(&err) => {}
            Err(err) => {
                // Out of file descriptors or similar: the listener itself is
                // fine, so wait a moment and accept again.
                shared.record_error(ConnectErrorKind::Other, format!("accept failed: {err}"));
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
    // Dropping the listener here releases the port before `close` returns.
}

/// Places a just-accepted connection for its whole life: on this shard, or
/// on a clearly quieter one, whose reactor then registers its socket (the
/// only registration it gets).
fn place(
    client: std::net::TcpStream,
    connection: Connection,
    balance: &Balance,
    tracker: &TaskTracker,
) {
    let shard = balance.quieter_shard().unwrap_or(balance.me());
    let load = balance.carry(shard);
    balance
        .handle(shard)
        .spawn(tracker.track_future(async move {
            // Registering with a shard's reactor needs its context: here, on it.
            match TcpStream::from_std(client) {
                Ok(client) => connection.run(client, load).await,
                Err(err) => connection
                    .shared
                    .record_error(ConnectErrorKind::Other, format!("accept failed: {err}")),
            }
        }));
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::events::{AgentEvent, EventBus};
    use crate::model::StagingVia;
    use crate::tunnel::listen::bind_listener;
    use crate::tunnel::testing::{echo_pod, no_dialers, tunnel_with, until, DEADLINE};

    /// A tunnel to `target` listening on a fresh loopback port, on `shards`.
    fn running(
        shared: &Arc<TunnelShared>,
        shards: &ForwardShards,
        tracker: &TaskTracker,
    ) -> RunningTunnel {
        let listener = bind_listener(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("bind");
        RunningTunnel::spawn(
            listener,
            Arc::clone(shared),
            shards,
            tracker,
            &CancellationToken::new(),
        )
        .expect("spawn")
    }

    async fn read_to_end(client: &mut tokio::net::TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        tokio::time::timeout(DEADLINE, client.read_to_end(&mut got))
            .await
            .expect("the tunnel lets the client go")
            .expect("read");
        got
    }

    #[tokio::test]
    async fn a_tunnel_forwards_and_closing_it_ends_its_connections_and_frees_the_port() {
        let events = EventBus::new();
        let mut traffic = events.watch_traffic();
        let pod = echo_pod().await;
        let shared = tunnel_with(pod, StagingVia::Direct, no_dialers(), &events, 16);
        let shards = ForwardShards::new(2).expect("shards");
        let tracker = TaskTracker::new();
        let tunnel = running(&shared, &shards, &tracker);
        let addr = tunnel.local_addr();

        let mut done = tokio::net::TcpStream::connect(addr).await.expect("connect");
        done.write_all(b"ping").await.expect("send");
        done.shutdown().await.expect("half-close");
        assert_eq!(read_to_end(&mut done).await, b"ping");
        until(&mut traffic, "the first connection to end", || {
            shared.stats().open_connections == 0
        })
        .await;

        // One left open, idle, when the tunnel closes.
        let mut idle = tokio::net::TcpStream::connect(addr).await.expect("connect");
        until(&mut traffic, "the second connection to open", || {
            shared.stats().open_connections == 1
        })
        .await;
        tunnel.close().await;

        assert_eq!(read_to_end(&mut idle).await, b"", "ended with the tunnel");
        let refused = tokio::net::TcpStream::connect(addr)
            .await
            .expect_err("closed");
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
        // Nothing listens there any more: the port is free for the next listener.
        bind_listener(addr).expect("the port is released");
        until(
            &mut traffic,
            "the idle connection to be counted closed",
            || shared.stats().open_connections == 0,
        )
        .await;
        let stats = shared.stats();
        assert_eq!(stats.total_connections, 2);
        assert_eq!((stats.bytes_to_pod, stats.bytes_from_pod), (4, 4));
    }

    #[tokio::test]
    async fn past_the_limit_a_connection_is_closed_at_once_and_the_tunnel_says_why() {
        let events = EventBus::new();
        let mut announced = events.subscribe();
        let pod = echo_pod().await;
        let shared = tunnel_with(pod, StagingVia::Direct, no_dialers(), &events, 0);
        let shards = ForwardShards::new(1).expect("shards");
        let tracker = TaskTracker::new();
        let tunnel = running(&shared, &shards, &tracker);

        let mut client = tokio::net::TcpStream::connect(tunnel.local_addr())
            .await
            .expect("connect");
        assert_eq!(read_to_end(&mut client).await, b"");
        let event = tokio::time::timeout(DEADLINE, announced.recv())
            .await
            .expect("announced")
            .expect("event");
        let AgentEvent::TunnelChanged {
            error: Some(why), ..
        } = event
        else {
            panic!("expected the tunnel's problem, got {event:?}");
        };
        assert!(
            why.starts_with("more than 0 connections open at once"),
            "{why}"
        );
        assert_eq!(shared.error_count(ConnectErrorKind::Other), 1);
        // Never served: no connection counted, nothing dialled.
        assert_eq!(shared.stats().total_connections, 0);
        assert_eq!(shared.activity().connections, 0);
        tunnel.close().await;
    }
}
