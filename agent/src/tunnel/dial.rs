//! Reaching the pod for one connection: TCP to its `ip:port`, a Kubernetes
//! API port-forward (to its local mirror, or to the staging pod through the
//! staging API), or `auto` (the pod IP while it answers, else the API). The
//! dialer traits the cluster module implements, and the one boxed future
//! they return.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::model::{StagingVia, TunnelTarget, Way};
use crate::tunnel::reach::{Plan, StagingPod};
use crate::tunnel::shared::{Route, TunnelShared};
use crate::tunnel::stats::ConnectErrorKind;

/// How long a connection waits for the pod before giving up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an `auto` connection waits for the pod IP before it takes the
/// staging API: a routable pod answers well within it.
const AUTO_DIRECT_TIMEOUT: Duration = Duration::from_millis(1500);

/// A byte stream to a pod through a Kubernetes API port-forward (to its
/// mirror, or to the staging pod through the staging API).
pub trait PodStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> PodStream for T {}

/// A stream to a pod, opened for one connection.
pub struct LocalStream {
    pub stream: Box<dyn PodStream>,
}

impl std::fmt::Debug for LocalStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalStream").finish_non_exhaustive()
    }
}

/// Why a stream to a mirror, or to a staging pod through the staging API,
/// could not be opened.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DialError {
    #[error("local cluster unavailable: {0}")]
    ClusterUnavailable(String),
    #[error("local mirroring is disabled (--no-cluster)")]
    Disabled,
    #[error("no pod {0:?}")]
    UnknownPod(String),
    #[error("port-forward to {mirror}:{port}: {message}")]
    PortForward {
        mirror: String,
        port: u16,
        message: String,
    },
    #[error("no staging cluster to reach it through: start the agent with --staging-kube-context")]
    NoStagingCluster,
    #[error("staging cluster unavailable: {0}")]
    StagingUnavailable(String),
    #[error(
        "staging pod {namespace}/{name} is not in the staging cluster (replaced? the control \
         plane's next push brings the new one; or is --staging-kube-context the right cluster?)"
    )]
    StagingPodGone { namespace: String, name: String },
    #[error("staging API port-forward to {namespace}/{name}:{port}: {message}")]
    StagingPortForward {
        namespace: String,
        name: String,
        port: u16,
        message: String,
    },
}

/// A dialer's stream in the making. Boxed, so the dialers can be trait
/// objects chosen at start-up (a cluster or none); owning everything it
/// needs, so it outlives the call that made it.
pub type DialFuture = Pin<Box<dyn Future<Output = Result<LocalStream, DialError>> + Send>>;

/// Opens streams to mirrors in the local cluster (the Kubernetes API
/// port-forward); implemented by the cluster module, resolved per connection.
pub trait LocalDialer: Send + Sync + std::fmt::Debug {
    /// A fresh stream to `port` of the mirror of `pod_id`.
    fn dial(&self, pod_id: &str, port: u16) -> DialFuture;
}

/// Opens streams to staging pods through the staging cluster's API server
/// (its port-forward, with the user's credentials); implemented by the
/// cluster module. A fresh stream per connection: a stream that fails
/// fails that one connection, never the listener.
pub trait StagingDialer: Send + Sync + std::fmt::Debug {
    /// A fresh stream to `port` of `pod`.
    fn dial(&self, pod: &StagingPod, port: u16) -> DialFuture;
}

/// The staging dialer of an agent with no staging cluster: every `api`
/// connection is told how to get one.
#[derive(Debug, Default)]
pub struct NoStagingCluster;

impl StagingDialer for NoStagingCluster {
    fn dial(&self, _pod: &StagingPod, _port: u16) -> DialFuture {
        Box::pin(async { Err(DialError::NoStagingCluster) })
    }
}

/// The ways a tunnel's connections reach a pod besides its IP: the local
/// mirror and the staging API.
#[derive(Debug, Clone)]
pub struct Dialers {
    pub mirror: Arc<dyn LocalDialer>,
    pub staging: Arc<dyn StagingDialer>,
}

/// A connection's way to its pod, open.
#[derive(Debug)]
pub(super) enum Upstream {
    /// TCP to the pod's `ip:port`.
    Direct(TcpStream),
    /// A port-forward stream, and the way it went (the mirror or the API).
    Forwarded { stream: LocalStream, way: Way },
}

/// Why a connection did not reach its pod: the kind the metrics count, and
/// the words the tunnel shows as its current problem.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(super) struct Unreached {
    pub(super) kind: ConnectErrorKind,
    pub(super) message: String,
}

/// What a port-forward of `way` reaches, as an error names it.
pub(super) fn destination(way: Way) -> &'static str {
    match way {
        Way::Api => "the staging pod through the staging API",
        Way::Mirror | Way::Direct => "the local mirror",
    }
}

/// Reaches the pod the way `route` says, timing the attempt into the
/// tunnel's figures (and, for `auto`, teaching the pod's ways).
pub(super) async fn dial(shared: &TunnelShared, route: Route) -> Result<Upstream, Unreached> {
    let Route { target, mode, via } = route;
    match (mode, via) {
        (TunnelTarget::Local, _) => dial_forwarded(shared, Way::Mirror, target.port()).await,
        (TunnelTarget::Staging, StagingVia::Direct) => dial_direct(shared, target).await,
        (TunnelTarget::Staging, StagingVia::Api) => {
            dial_forwarded(shared, Way::Api, target.port()).await
        }
        (TunnelTarget::Staging, StagingVia::Auto) => dial_auto(shared, target).await,
    }
}

/// Direct to the pod's `ip:port`, as a tunnel always went.
async fn dial_direct(shared: &TunnelShared, target: SocketAddr) -> Result<Upstream, Unreached> {
    let started = Instant::now();
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await;
    shared.note_connect(
        started.elapsed().as_secs_f64(),
        matches!(connected, Ok(Ok(_))),
    );
    match connected {
        Ok(Ok(upstream)) => Ok(Upstream::Direct(upstream)),
        Ok(Err(err)) => Err(Unreached {
            kind: ConnectErrorKind::of(&err),
            message: format!("cannot connect to pod at {target}: {err}"),
        }),
        Err(_) => Err(Unreached {
            kind: ConnectErrorKind::Timeout,
            message: format!(
                "cannot connect to pod at {target}: no answer within {}s",
                CONNECT_TIMEOUT.as_secs()
            ),
        }),
    }
}

/// `auto`: the pod IP while it answers (a short wait), else the staging
/// API, which later connections then take directly for a while.
async fn dial_auto(shared: &TunnelShared, target: SocketAddr) -> Result<Upstream, Unreached> {
    let started = Instant::now();
    if shared.ways.plan(started) == Plan::Api {
        return dial_forwarded(shared, Way::Api, target.port()).await;
    }
    let connected = tokio::time::timeout(AUTO_DIRECT_TIMEOUT, TcpStream::connect(target)).await;
    match connected {
        Ok(Ok(upstream)) => {
            shared.ways.direct_worked();
            shared.note_connect(started.elapsed().as_secs_f64(), true);
            Ok(Upstream::Direct(upstream))
        }
        // Routable, but the pod said no: the API would hear the same.
        Ok(Err(err)) if !is_unreachable(&err) => {
            shared.ways.direct_worked();
            shared.note_connect(started.elapsed().as_secs_f64(), false);
            Err(Unreached {
                kind: ConnectErrorKind::of(&err),
                message: format!("cannot connect to pod at {target}: {err}"),
            })
        }
        Ok(Err(err)) => {
            tracing::info!(pod_id = %shared.pod_id, %target, error = %err, "pod IP unreachable; through the staging API");
            shared.ways.direct_unreachable(Instant::now());
            dial_forwarded(shared, Way::Api, target.port()).await
        }
        Err(_) => {
            tracing::info!(pod_id = %shared.pod_id, %target, "pod IP silent; through the staging API");
            shared.ways.direct_unreachable(Instant::now());
            dial_forwarded(shared, Way::Api, target.port()).await
        }
    }
}

/// No route to the pod IP from here (the laptop is off the cluster's network).
fn is_unreachable(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::TimedOut
    )
}

/// A Kubernetes API port-forward: to the pod's local mirror (resolved at
/// this moment) or to the staging pod through the staging API. A fresh
/// stream per connection, so a stream that breaks ends this connection alone.
async fn dial_forwarded(shared: &TunnelShared, way: Way, port: u16) -> Result<Upstream, Unreached> {
    let started = Instant::now();
    let opening = match way {
        Way::Api => shared.dialers.staging.dial(&shared.ways.pod(), port),
        Way::Mirror | Way::Direct => shared.dialers.mirror.dial(&shared.pod_id, port),
    };
    let dialed = tokio::time::timeout(CONNECT_TIMEOUT, opening).await;
    shared.note_connect(started.elapsed().as_secs_f64(), matches!(dialed, Ok(Ok(_))));
    match dialed {
        Ok(Ok(stream)) => Ok(Upstream::Forwarded { stream, way }),
        Ok(Err(err)) => Err(Unreached {
            kind: ConnectErrorKind::Cluster,
            message: format!("cannot reach {}: {err}", destination(way)),
        }),
        Err(_) => Err(Unreached {
            kind: ConnectErrorKind::Timeout,
            message: format!(
                "cannot reach {}: no answer within {}s",
                destination(way),
                CONNECT_TIMEOUT.as_secs()
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::Mutex;

    use super::*;
    use crate::events::EventBus;
    use crate::tunnel::listen::bind_listener;
    use crate::tunnel::testing::{closed_port, no_dialers, tunnel_with, NoMirror};

    /// A dialer that answers with an in-memory stream (or never, or with an
    /// error), and remembers what it was asked for.
    #[derive(Debug, Default)]
    struct Fake {
        asked: Mutex<Vec<(String, u16)>>,
        hang: bool,
    }

    impl Fake {
        fn asked(&self) -> Vec<(String, u16)> {
            self.asked.lock().expect("asked").clone()
        }

        fn answer(&self, what: String, port: u16) -> DialFuture {
            self.asked.lock().expect("asked").push((what, port));
            if self.hang {
                return Box::pin(std::future::pending());
            }
            let (ours, _theirs) = tokio::io::duplex(64);
            Box::pin(async move {
                Ok(LocalStream {
                    stream: Box::new(ours),
                })
            })
        }
    }

    impl LocalDialer for Fake {
        fn dial(&self, pod_id: &str, port: u16) -> DialFuture {
            self.answer(pod_id.to_owned(), port)
        }
    }

    impl StagingDialer for Fake {
        fn dial(&self, pod: &StagingPod, port: u16) -> DialFuture {
            self.answer(format!("{}/{}", pod.namespace, pod.name), port)
        }
    }

    fn staging_through(fake: &Arc<Fake>) -> Dialers {
        Dialers {
            mirror: Arc::new(NoMirror),
            staging: Arc::clone(fake) as Arc<dyn StagingDialer>,
        }
    }

    /// An address no route leads to: Linux refuses TCP to a multicast
    /// group at once with `ENETUNREACH`, whatever the routes, and sends
    /// nothing.
    #[cfg(target_os = "linux")]
    const NO_ROUTE: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(224, 0, 0, 1)), 8080);

    fn staging(target: SocketAddr, via: StagingVia, dialers: Dialers) -> Arc<TunnelShared> {
        tunnel_with(target, via, dialers, &EventBus::new(), 16)
    }

    #[tokio::test]
    async fn direct_reaches_a_listening_pod_and_times_it() {
        let pod = bind_listener(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("pod");
        let target = pod.local_addr().expect("addr");
        let shared = staging(target, StagingVia::Direct, no_dialers());

        match dial(&shared, shared.route()).await {
            Ok(Upstream::Direct(upstream)) => {
                assert_eq!(upstream.peer_addr().expect("peer"), target);
            }
            other => panic!("expected the pod directly, got {other:?}"),
        }
        let activity = shared.activity();
        assert_eq!((activity.connections, activity.errors), (1, 0));
        assert!(activity.connect_p50_ms.is_some());
    }

    #[tokio::test]
    async fn direct_to_a_closed_port_is_refused() {
        let (_held, target) = closed_port();
        let shared = staging(target, StagingVia::Direct, no_dialers());

        let unreached = dial(&shared, shared.route()).await.expect_err("refused");
        assert_eq!(unreached.kind, ConnectErrorKind::Refused);
        assert!(
            unreached
                .message
                .starts_with(&format!("cannot connect to pod at {target}: ")),
            "{}",
            unreached.message
        );
        let activity = shared.activity();
        assert_eq!((activity.connections, activity.errors), (1, 1));
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn direct_without_a_route_is_unreachable() {
        let shared = staging(NO_ROUTE, StagingVia::Direct, no_dialers());
        let unreached = dial(&shared, shared.route()).await.expect_err("no route");
        assert_eq!(unreached.kind, ConnectErrorKind::Unreachable);
    }

    #[tokio::test]
    async fn auto_takes_the_pod_ip_while_it_answers() {
        let pod = bind_listener(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("pod");
        let target = pod.local_addr().expect("addr");
        let api = Arc::new(Fake::default());
        let shared = staging(target, StagingVia::Auto, staging_through(&api));

        let upstream = dial(&shared, shared.route()).await.expect("direct");
        assert!(matches!(upstream, Upstream::Direct(_)), "{upstream:?}");
        assert_eq!(shared.way(), Way::Direct);
        assert!(api.asked().is_empty());
    }

    #[tokio::test]
    async fn auto_passes_a_refusal_on_and_stays_direct() {
        // Routable, and the pod said no: the API would hear the same.
        let (_held, target) = closed_port();
        let api = Arc::new(Fake::default());
        let shared = staging(target, StagingVia::Auto, staging_through(&api));

        let unreached = dial(&shared, shared.route()).await.expect_err("refused");
        assert_eq!(unreached.kind, ConnectErrorKind::Refused);
        assert_eq!(shared.way(), Way::Direct);
        assert!(api.asked().is_empty());
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn auto_takes_the_api_when_the_pod_ip_is_unreachable_and_stays_there() {
        let api = Arc::new(Fake::default());
        let shared = staging(NO_ROUTE, StagingVia::Auto, staging_through(&api));

        let upstream = dial(&shared, shared.route())
            .await
            .expect("through the API");
        assert!(
            matches!(upstream, Upstream::Forwarded { way: Way::Api, .. }),
            "{upstream:?}"
        );
        assert_eq!(api.asked(), vec![("staging/web".to_owned(), 8080)]);
        assert_eq!(shared.way(), Way::Api);

        // The next connection goes straight to the API, even to a pod IP
        // that would answer now: direct is tried again only when it is due.
        let pod = bind_listener(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("pod");
        shared.set_target(pod.local_addr().expect("addr"));
        let upstream = dial(&shared, shared.route())
            .await
            .expect("through the API");
        assert!(
            matches!(upstream, Upstream::Forwarded { way: Way::Api, .. }),
            "{upstream:?}"
        );
        assert_eq!(api.asked().len(), 2);
        // Only the API's opening was timed: one attempt per connection.
        assert_eq!(shared.activity().connections, 2);
    }

    #[tokio::test]
    async fn api_without_a_staging_cluster_says_how_to_get_one() {
        let target = SocketAddr::from((Ipv4Addr::new(10, 0, 1, 100), 8080));
        let shared = staging(target, StagingVia::Api, no_dialers());

        let unreached = dial(&shared, shared.route()).await.expect_err("no cluster");
        assert_eq!(unreached.kind, ConnectErrorKind::Cluster);
        assert_eq!(
            unreached.message,
            format!(
                "cannot reach the staging pod through the staging API: {}",
                DialError::NoStagingCluster
            )
        );
    }

    #[tokio::test]
    async fn a_local_tunnel_opens_its_mirror_by_pod_id_and_port() {
        let target = SocketAddr::from((Ipv4Addr::new(10, 0, 1, 100), 8080));
        let mirror = Arc::new(Fake::default());
        let dialers = Dialers {
            mirror: Arc::clone(&mirror) as Arc<dyn LocalDialer>,
            staging: Arc::new(NoStagingCluster),
        };
        let shared = staging(target, StagingVia::Api, dialers);
        shared.set_mode(TunnelTarget::Local, StagingVia::Api);

        let upstream = dial(&shared, shared.route()).await.expect("mirror");
        assert!(
            matches!(
                upstream,
                Upstream::Forwarded {
                    way: Way::Mirror,
                    ..
                }
            ),
            "{upstream:?}"
        );
        assert_eq!(mirror.asked(), vec![("web".to_owned(), 8080)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_port_forward_that_never_opens_is_a_timeout() {
        let target = SocketAddr::from((Ipv4Addr::new(10, 0, 1, 100), 8080));
        let api = Arc::new(Fake {
            hang: true,
            ..Fake::default()
        });
        let shared = staging(target, StagingVia::Api, staging_through(&api));

        let unreached = dial(&shared, shared.route()).await.expect_err("timeout");
        assert_eq!(unreached.kind, ConnectErrorKind::Timeout);
        assert_eq!(
            unreached.message,
            "cannot reach the staging pod through the staging API: no answer within 5s"
        );
    }
}
