//! One connection through a tunnel, from its placement to its end: counted
//! open, its pod reached (`dial.rs`), then its bytes relayed both ways,
//! through `relay.rs` for TCP or a buffered copy for a port-forward stream.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::field::Empty;
use tracing::Instrument as _;

use crate::model::Way;
use crate::tunnel::dial::{destination, dial, LocalStream, Upstream};
use crate::tunnel::relay::relay;
use crate::tunnel::shards::{LoadGuard, Pipes};
use crate::tunnel::shared::TunnelShared;
use crate::tunnel::stats::ConnectErrorKind;

/// Each way's buffer on a port-forward connection (one read, one frame).
const STREAM_BUFFER: usize = 64 * 1024;

/// What a connection's task needs besides its socket.
pub(super) struct Connection {
    pub(super) shared: Arc<TunnelShared>,
    pub(super) cancel: CancellationToken,
    pub(super) pipes: Pipes,
    /// The tunnel's local port, the one its client connected to.
    pub(super) port: u16,
}

impl Connection {
    /// Serves `client` until either side ends or the tunnel stops; `load`
    /// counts it on its shard meanwhile.
    pub(super) async fn run(self, client: TcpStream, load: LoadGuard) {
        let _load = load;
        // Per connection, on the hot path: only what is at hand (the pod id
        // borrowed, the port a number), nothing formatted or looked up by
        // us; the subscriber's own bookkeeping is the whole cost, and none
        // when `info` is filtered out. `way` is known once dialled; `peer`
        // is asked of the kernel (getpeername) only when the connection
        // fails, which is when a warning needs it.
        let span = connection_span(&self.shared, self.port);
        async {
            tokio::select! {
                _ = self.cancel.cancelled() => {}
                _ = serve_connection(client, &self.shared, &self.pipes) => {}
            }
        }
        .instrument(span)
        .await;
    }
}

/// The span of one connection to the tunnel on local `port`.
fn connection_span(shared: &TunnelShared, port: u16) -> tracing::Span {
    tracing::info_span!(
        "connection",
        pod = %shared.pod_id,
        port,
        way = Empty,
        peer = Empty,
    )
}

/// Decrements the open-connection count however the connection ends.
struct OpenGuard<'a>(&'a TunnelShared);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.figures.counters.open.fetch_sub(1, Ordering::Relaxed);
        self.0.events.connection_closed();
        self.0.events.traffic_moved();
    }
}

async fn serve_connection(client: TcpStream, shared: &TunnelShared, pipes: &Pipes) {
    let counters = &shared.figures.counters;
    counters.total.fetch_add(1, Ordering::Relaxed);
    counters.open.fetch_add(1, Ordering::Relaxed);
    shared.events.connection_opened();
    shared.events.traffic_moved();
    let _open = OpenGuard(shared);

    let route = shared.route();
    match dial(shared, route).await {
        Ok(Upstream::Direct(upstream)) => {
            tracing::Span::current().record("way", Way::Direct.as_str());
            shared.record_success();
            relay_both_ways(client, upstream, shared, pipes, route.target).await;
        }
        Ok(Upstream::Forwarded { stream, way }) => {
            tracing::Span::current().record("way", way.as_str());
            shared.record_success();
            copy_both_ways(client, stream, shared, way).await;
        }
        Err(unreached) => {
            record_peer(&client);
            shared.record_error(unreached.kind, unreached.message);
        }
    }
}

/// Names the client in the connection's span, for the warning about to be
/// logged: asked of the kernel only on this, the failing, path.
fn record_peer(client: &TcpStream) {
    if let Ok(peer) = client.peer_addr() {
        tracing::Span::current().record("peer", tracing::field::display(peer));
    }
}

/// Carries a connected pair's bytes both ways until both ends are done.
async fn relay_both_ways(
    mut client: TcpStream,
    mut upstream: TcpStream,
    shared: &TunnelShared,
    pipes: &Pipes,
    target: SocketAddr,
) {
    // Requests and answers go out at once; the client side has it from the
    // listener already on Linux.
    #[cfg(not(target_os = "linux"))]
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = client.split();
    let (upstream_read, upstream_write) = upstream.split();
    let one_way_ended = AtomicBool::new(false);
    let counters = &shared.figures.counters;
    let result = tokio::try_join!(
        relay(
            client_read,
            upstream_write,
            &counters.to_pod,
            &one_way_ended,
            pipes,
        ),
        relay(
            upstream_read,
            client_write,
            &counters.from_pod,
            &one_way_ended,
            pipes,
        ),
    );
    if let Err(err) = result {
        record_peer(&client);
        // A reset mid-stream ends this connection only; the tunnel is fine.
        shared.record_dropped(
            ConnectErrorKind::of(&err),
            format!("a connection to the pod at {target} broke mid-stream: {err}"),
        );
    }
}

/// Carries a connection's bytes over its port-forward stream (to the mirror
/// or through the staging API) until both ends are done.
async fn copy_both_ways(
    mut client: TcpStream,
    mut local: LocalStream,
    shared: &TunnelShared,
    way: Way,
) {
    let _ = client.set_nodelay(true);
    // A port-forward frame carries what one read gave: large buffers make
    // large frames, and fewer of them, for bulk transfers.
    match tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut local.stream,
        STREAM_BUFFER,
        STREAM_BUFFER,
    )
    .await
    {
        Ok((to_pod, from_pod)) => {
            let counters = &shared.figures.counters;
            counters.to_pod.fetch_add(to_pod, Ordering::Relaxed);
            counters.from_pod.fetch_add(from_pod, Ordering::Relaxed);
        }
        // The pod's port refused the kubelet's connection (the pod is not
        // listening there), or the API server never acknowledged the
        // stream: the connection never got through, which is the tunnel's
        // current problem, not a break mid-stream.
        Err(err)
            if matches!(
                err.kind(),
                io::ErrorKind::ConnectionRefused | io::ErrorKind::TimedOut
            ) =>
        {
            record_peer(&client);
            shared.record_error(
                ConnectErrorKind::of(&err),
                format!("cannot reach {}: {err}", destination(way)),
            );
        }
        Err(err) => {
            record_peer(&client);
            // A stream reset mid-transfer: this connection ends, the
            // listener and the other connections carry on.
            shared.record_dropped(
                ConnectErrorKind::Reset,
                format!("a connection {} broke mid-stream: {err}", way.describe()),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

    use super::*;
    use crate::events::EventBus;
    use crate::model::{StagingVia, TunnelTarget};
    use crate::tunnel::dial::{Dialers, NoStagingCluster};
    use crate::tunnel::testing::{
        closed_port, connected_pair, echo_pod, no_dialers, tunnel_with, Handing, DEADLINE,
    };

    /// Serves one connection whose client sends `request` and closes its
    /// side; returns what the client got back.
    async fn exchange(shared: &TunnelShared, request: &[u8]) -> Vec<u8> {
        let (mut client, tunnel_side) = connected_pair().await;
        let pipes = Pipes::default();
        let client_side = async {
            // The tunnel may have let go of a refused connection already,
            // so a failed send or a reset is as good as the end here.
            let _ = client.write_all(request).await;
            let _ = client.shutdown().await;
            let mut answer = Vec::new();
            let _ = client.read_to_end(&mut answer).await;
            answer
        };
        let both =
            async { tokio::join!(serve_connection(tunnel_side, shared, &pipes), client_side).1 };
        tokio::time::timeout(DEADLINE, both)
            .await
            .expect("the connection ends")
    }

    /// A port-forward stream that fails its first read as `kind` says and
    /// takes every write.
    #[derive(Debug)]
    struct Failing(io::ErrorKind);

    impl AsyncRead for Failing {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::Error::from(self.0)))
        }
    }

    impl AsyncWrite for Failing {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A `local` tunnel whose mirror dialer hands out `stream`.
    fn through_mirror(
        stream: impl crate::tunnel::dial::PodStream + 'static,
        events: &EventBus,
    ) -> Arc<TunnelShared> {
        let dialers = Dialers {
            mirror: Handing::new(stream),
            staging: Arc::new(NoStagingCluster),
        };
        let target = SocketAddr::from(([10, 0, 1, 100], 8080));
        let shared = tunnel_with(target, StagingVia::Direct, dialers, events, 16);
        shared.set_mode(TunnelTarget::Local, StagingVia::Direct);
        shared
    }

    #[tokio::test]
    async fn a_connection_is_relayed_both_ways_and_counted() {
        let events = EventBus::new();
        let shared = tunnel_with(
            echo_pod().await,
            StagingVia::Direct,
            no_dialers(),
            &events,
            16,
        );

        assert_eq!(exchange(&shared, b"ping").await, b"ping");
        let stats = shared.stats();
        assert_eq!(
            (stats.total_connections, stats.open_connections),
            (1, 0),
            "{stats:?}"
        );
        assert_eq!((stats.bytes_to_pod, stats.bytes_from_pod), (4, 4));
        assert_eq!((stats.current_error, stats.last_error), (None, None));
        // The agent-wide tally saw it open and close.
        assert_eq!(events.connections(), (1, 0));
    }

    /// What a test's subscriber wrote.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("capture").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_failed_connection_warns_naming_its_pod_port_and_peer() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);
        let (_held, target) = closed_port();
        let shared = tunnel_with(
            target,
            StagingVia::Direct,
            no_dialers(),
            &EventBus::new(),
            16,
        );

        exchange(&shared, b"ping")
            .instrument(connection_span(&shared, 18080))
            .await;
        let text = String::from_utf8(captured.0.lock().expect("capture").clone()).expect("utf-8");
        let warning = text
            .lines()
            .find(|line| line.contains("tunnel connection failed"))
            .unwrap_or_else(|| panic!("no warning in {text:?}"));
        assert!(
            warning.contains(&format!(
                "connection{{pod={} port=18080 peer=127.0.0.1:",
                shared.pod_id
            )),
            "{warning}"
        );
    }

    #[tokio::test]
    async fn a_refusing_pod_is_the_tunnels_problem_and_its_client_is_let_go() {
        let (_held, target) = closed_port();
        let events = EventBus::new();
        let mut announced = events.subscribe();
        let shared = tunnel_with(target, StagingVia::Direct, no_dialers(), &events, 16);

        assert_eq!(exchange(&shared, b"ping").await, b"");
        let stats = shared.stats();
        let problem = stats.current_error.expect("the refusal is the problem");
        assert!(
            problem.starts_with(&format!("cannot connect to pod at {target}: ")),
            "{problem}"
        );
        assert_eq!(shared.error_count(ConnectErrorKind::Refused), 1);
        assert_eq!((stats.total_connections, stats.open_connections), (1, 0));
        assert!(matches!(
            announced.try_recv(),
            Ok(crate::events::AgentEvent::TunnelChanged { error: Some(_), .. })
        ));
    }

    #[tokio::test]
    async fn a_port_forward_stream_is_copied_both_ways_and_counted() {
        let (ours, mut pod) = tokio::io::duplex(1024);
        tokio::spawn(async move {
            let mut request = Vec::new();
            pod.read_to_end(&mut request).await.expect("request");
            pod.write_all(b"pong from the mirror")
                .await
                .expect("answer");
            pod.shutdown().await.expect("close");
        });
        let shared = through_mirror(ours, &EventBus::new());

        assert_eq!(exchange(&shared, b"ping").await, b"pong from the mirror");
        let stats = shared.stats();
        assert_eq!((stats.bytes_to_pod, stats.bytes_from_pod), (4, 20));
        assert_eq!((stats.current_error, stats.last_error), (None, None));
    }

    #[tokio::test]
    async fn a_port_forward_the_pod_refused_is_the_current_problem() {
        let shared = through_mirror(Failing(io::ErrorKind::ConnectionRefused), &EventBus::new());

        exchange(&shared, b"").await;
        let problem = shared.stats().current_error.expect("the refusal");
        assert!(
            problem.starts_with("cannot reach the local mirror: "),
            "{problem}"
        );
        assert_eq!(shared.error_count(ConnectErrorKind::Refused), 1);
    }

    #[tokio::test]
    async fn a_port_forward_cut_mid_stream_is_history_only() {
        let shared = through_mirror(Failing(io::ErrorKind::ConnectionReset), &EventBus::new());

        exchange(&shared, b"").await;
        let stats = shared.stats();
        assert_eq!(stats.current_error, None);
        let (last, _) = stats.last_error.expect("the cut");
        assert!(
            last.starts_with("a connection via mirror broke mid-stream: "),
            "{last}"
        );
        assert_eq!(shared.error_count(ConnectErrorKind::Reset), 1);
    }
}
