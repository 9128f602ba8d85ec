//! The HTTP server under the API and the dashboard: hyper's HTTP/1 connection
//! builder with a deadline for request headers.
//!
//! Written over hyper rather than `axum::serve` because the latter has no
//! header-read timeout: a slow-loris client (headers one byte at a time)
//! would hold its connection, and a file descriptor, for as long as it liked.
//! Handlers have their own deadline (the router's `TimeoutLayer`).

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::peer::PeerLookups;
use super::ui::ConnectionCloser;

/// How long a client may take to send a request's line and headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (out of file descriptors), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `router` on `listener` until `cancel` fires, then lets the open
/// requests finish. Each request carries the peer's address as
/// [`ConnectInfo`], as `into_make_service_with_connect_info` would, and, on
/// loopback, the connection's [`Peer`](super::peer::Peer), whose user is
/// looked up when a request needs it.
pub async fn serve(listener: TcpListener, router: Router, cancel: CancellationToken) {
    let lookups = PeerLookups::kernel();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(error = %err, "cannot accept an API connection");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let local = stream.local_addr().ok();
        let router = router.clone();
        // Lets a handler drop this connection (a dashboard stream whose
        // client stopped reading), which the server would otherwise keep.
        let closer = CancellationToken::new();
        let request_closer = ConnectionCloser(closer.clone());
        // Whose the connection is: looked up (once) only if a request needs
        // to know, so a connection to an open path costs no lookup.
        let owner = match (peer.ip().is_loopback(), local) {
            (true, Some(local)) => Some(lookups.peer(peer, local)),
            _ => None,
        };
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            let router = router.clone();
            let owner = owner.clone();
            let closer = request_closer.clone();
            async move {
                request
                    .extensions_mut()
                    .insert(ConnectInfo::<SocketAddr>(peer));
                request.extensions_mut().insert(closer);
                if let Some(owner) = owner {
                    request.extensions_mut().insert(owner);
                }
                router.oneshot(request).await
            }
        });
        // No upgrades: nothing here speaks WebSocket, and a plain
        // connection is what graceful shutdown knows how to end.
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            tokio::select! {
                ended = connection => {
                    if let Err(err) = ended {
                        tracing::debug!(%peer, error = %err, "API connection ended with an error");
                    }
                }
                // Dropping the connection closes its socket.
                _ = closer.cancelled() => tracing::debug!(%peer, "API connection dropped"),
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
