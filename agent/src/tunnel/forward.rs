//! Tunnels: one loopback listener per port of a pod, where each accepted
//! connection is placed and served (connect to the pod's `ip:port`, or a
//! port-forward through the staging API or to the mirror, then relay).
//!
//! A tunnel's target and counters ([`TunnelShared`]) outlive its listener, so
//! turning forwarding off and on, or changing the pod's address, keeps the
//! history and never needs the store to rebuild anything.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::events::{AgentEvent, EventBus};
use crate::model::{StagingVia, TunnelState, TunnelTarget, Way};
use crate::tunnel::listen::{gone_before_accept, SharedListener};
use crate::tunnel::reach::{Plan, PodWays, StagingPod};
use crate::tunnel::relay::relay;
use crate::tunnel::shards::{Balance, ForwardShards, LoadGuard, Pipes};

/// How long a connection waits for the pod before giving up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Each way's buffer on a port-forward connection (one read, one frame).
const STREAM_BUFFER: usize = 64 * 1024;
/// How long an `auto` connection waits for the pod IP before it takes the
/// staging API: a routable pod answers well within it.
const AUTO_DIRECT_TIMEOUT: Duration = Duration::from_millis(1500);
/// Pause after a failed accept (out of file descriptors), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Why a connection through a tunnel failed, as the metrics count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectErrorKind {
    /// The pod refused the connection.
    Refused,
    /// The pod did not answer in time.
    Timeout,
    /// The connection broke mid-stream.
    Reset,
    /// No route to the pod.
    Unreachable,
    /// A Kubernetes API port-forward could not be opened (to the local
    /// mirror, or to the staging pod through the staging API).
    Cluster,
    Other,
}

impl ConnectErrorKind {
    pub const ALL: [ConnectErrorKind; 6] = [
        Self::Refused,
        Self::Timeout,
        Self::Reset,
        Self::Unreachable,
        Self::Cluster,
        Self::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::Timeout => "timeout",
            Self::Reset => "reset",
            Self::Unreachable => "unreachable",
            Self::Cluster => "cluster",
            Self::Other => "other",
        }
    }

    fn of(err: &io::Error) -> Self {
        match err.kind() {
            io::ErrorKind::ConnectionRefused => Self::Refused,
            io::ErrorKind::TimedOut => Self::Timeout,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Self::Reset,
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => Self::Unreachable,
            _ => Self::Other,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Buckets for every latency histogram the agent keeps (a tunnel's connects,
/// the status reports): 100 µs to about 3.3 s. Here, beside the histogram
/// a tunnel keeps, so tunnels need nothing from the metrics endpoint.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 16)
}

/// How often the dashboard's throughput samples are taken.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// How far back the dashboard looks.
const RECENT: Duration = Duration::from_secs(60);
/// Most connection outcomes kept for the last minute's percentiles.
const RECENT_CONNECTS: usize = 512;

/// The last minute of a tunnel: throughput samples and connection outcomes.
#[derive(Debug, Default)]
struct Recent {
    throughput: std::collections::VecDeque<u64>,
    /// When, how long the connect took (seconds), and whether it worked.
    connects: std::collections::VecDeque<(std::time::Instant, f64, bool)>,
}

/// Live counters of one tunnel.
#[derive(Debug, Default)]
struct Counters {
    open: AtomicU64,
    total: AtomicU64,
    to_pod: AtomicU64,
    from_pod: AtomicU64,
}

/// Where a tunnel's new connections go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The staging pod's `ip:port`.
    pub target: SocketAddr,
    /// The staging pod, or its local mirror.
    pub mode: TunnelTarget,
    /// How the staging pod is reached: its IP, the staging API, or either.
    pub via: StagingVia,
}

/// A snapshot of a tunnel's counters and errors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TunnelStats {
    pub open_connections: u64,
    pub total_connections: u64,
    pub bytes_to_pod: u64,
    pub bytes_from_pod: u64,
    /// The problem right now: set by a failed connection to the pod, cleared by the next good one.
    pub current_error: Option<String>,
    /// The most recent error ever seen, with its time.
    pub last_error: Option<(String, DateTime<Utc>)>,
}

#[derive(Debug, Default)]
struct Errors {
    current: Option<String>,
    last: Option<(String, DateTime<Utc>)>,
}

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

/// Opens streams to mirrors in the local cluster (the Kubernetes API
/// port-forward); implemented by the cluster module, resolved per connection.
pub trait LocalDialer: Send + Sync + std::fmt::Debug {
    /// A fresh stream to `port` of the mirror of `pod_id`.
    fn dial(
        &self,
        pod_id: &str,
        port: u16,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<LocalStream, DialError>> + Send>>;
}

/// Opens streams to staging pods through the staging cluster's API server
/// (its port-forward, with the user's credentials); implemented by the
/// cluster module. A fresh stream per connection: a stream that fails
/// fails that one connection, never the listener.
pub trait StagingDialer: Send + Sync + std::fmt::Debug {
    /// A fresh stream to `port` of `pod`.
    fn dial(
        &self,
        pod: &StagingPod,
        port: u16,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<LocalStream, DialError>> + Send>>;
}

/// The staging dialer of an agent with no staging cluster: every `api`
/// connection is told how to get one.
#[derive(Debug, Default)]
pub struct NoStagingCluster;

impl StagingDialer for NoStagingCluster {
    fn dial(
        &self,
        _pod: &StagingPod,
        _port: u16,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<LocalStream, DialError>> + Send>>
    {
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

/// What a tunnel's listener and connections share with the store: where to
/// forward, and what happened.
#[derive(Debug)]
pub struct TunnelShared {
    pod_id: String,
    /// Where new connections go; one lock for both halves, read once per
    /// connection.
    route: RwLock<Route>,
    dialers: Dialers,
    /// What the pod's tunnels share: its staging name, which way works.
    ways: Arc<PodWays>,
    /// Most connections open at once through this tunnel; more are closed
    /// at accept, so a loop cannot eat every descriptor.
    limit: u64,
    counters: Counters,
    errors: Mutex<Errors>,
    /// Failed connections by kind (indexed by `ConnectErrorKind`).
    error_counts: [AtomicU64; ConnectErrorKind::ALL.len()],
    /// Time to reach the pod, one observation per connection.
    connect_latency: prometheus_client::metrics::histogram::Histogram,
    recent: Mutex<Recent>,
    /// Bytes moved at the last throughput sample.
    sampled_bytes: AtomicU64,
    /// Whether every throughput sample of the last minute is zero.
    quiet: AtomicBool,
    events: EventBus,
}

impl TunnelShared {
    pub fn new(
        pod_id: String,
        route: Route,
        dialers: Dialers,
        ways: Arc<PodWays>,
        events: EventBus,
        limit: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            pod_id,
            route: RwLock::new(route),
            dialers,
            ways,
            limit: u64::try_from(limit).unwrap_or(u64::MAX),
            counters: Counters::default(),
            errors: Mutex::new(Errors::default()),
            error_counts: Default::default(),
            connect_latency: prometheus_client::metrics::histogram::Histogram::new(
                latency_buckets(),
            ),
            recent: Mutex::new(Recent::default()),
            sampled_bytes: AtomicU64::new(0),
            quiet: AtomicBool::new(true),
            events,
        })
    }

    fn lock_recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        match self.recent.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Counts one connection attempt: how long reaching the pod took, and
    /// whether it worked.
    fn note_connect(&self, seconds: f64, worked: bool) {
        self.connect_latency.observe(seconds);
        let now = std::time::Instant::now();
        let mut recent = self.lock_recent();
        recent.connects.push_back((now, seconds, worked));
        while recent.connects.len() > RECENT_CONNECTS
            || recent
                .connects
                .front()
                .is_some_and(|(at, _, _)| now.duration_since(*at) > RECENT)
        {
            recent.connects.pop_front();
        }
    }

    /// Takes a throughput sample (bytes per second since the last one);
    /// returns whether the tunnel's line changed, and whether its last
    /// minute is all zeros now.
    pub fn sample_throughput(&self) -> (bool, bool) {
        let bytes = self.counters.to_pod.load(Ordering::Relaxed)
            + self.counters.from_pod.load(Ordering::Relaxed);
        let moved = bytes.saturating_sub(self.sampled_bytes.swap(bytes, Ordering::Relaxed));
        // An idle tunnel whose last minute is already all zeros has nothing
        // to add: most tunnels, most of the time.
        if moved == 0 && self.quiet.load(Ordering::Relaxed) {
            return (false, true);
        }
        let mut recent = self.lock_recent();
        recent
            .throughput
            .push_back(moved / SAMPLE_EVERY.as_secs().max(1));
        let keep = usize::try_from(RECENT.as_secs() / SAMPLE_EVERY.as_secs().max(1)).unwrap_or(30);
        while recent.throughput.len() > keep {
            recent.throughput.pop_front();
        }
        let quiet = recent.throughput.iter().all(|b| *b == 0);
        self.quiet.store(quiet, Ordering::Relaxed);
        // Moved now, or fell back to zero: either way the dashboard's line changed.
        (true, quiet)
    }

    /// The last minute, for the dashboard.
    pub fn activity(&self) -> crate::model::Activity {
        combined_activity(std::iter::once(self))
    }

    /// Failed connections of `kind` so far.
    pub fn error_count(&self, kind: ConnectErrorKind) -> u64 {
        self.error_counts[kind.index()].load(Ordering::Relaxed)
    }

    /// Time to reach the pod, one observation per connection.
    pub fn connect_latency(&self) -> &prometheus_client::metrics::histogram::Histogram {
        &self.connect_latency
    }

    /// Where new connections go: the staging pod's address, and whether they
    /// reach it directly or through its local mirror.
    pub fn route(&self) -> Route {
        match self.route.read() {
            Ok(guard) => *guard,
            Err(poisoned) => *poisoned.into_inner(),
        }
    }

    fn change_route(&self, change: impl FnOnce(&mut Route)) {
        match self.route.write() {
            Ok(mut guard) => change(&mut guard),
            Err(poisoned) => change(&mut poisoned.into_inner()),
        }
    }

    /// Where new connections go: the staging pod or its local mirror.
    pub fn mode(&self) -> TunnelTarget {
        self.route().mode
    }

    /// Switches new connections between the staging pod and its mirror,
    /// and how the staging pod is reached.
    pub fn set_mode(&self, mode: TunnelTarget, via: StagingVia) {
        self.change_route(|route| {
            route.mode = mode;
            route.via = via;
        });
    }

    /// The way new connections take now.
    pub fn way(&self) -> Way {
        let route = self.route();
        match (route.mode, route.via) {
            (TunnelTarget::Local, _) => Way::Mirror,
            (TunnelTarget::Staging, StagingVia::Direct) => Way::Direct,
            (TunnelTarget::Staging, StagingVia::Api) => Way::Api,
            (TunnelTarget::Staging, StagingVia::Auto) => self.ways.auto_way(),
        }
    }

    /// Where new connections go.
    pub fn target(&self) -> SocketAddr {
        self.route().target
    }

    /// Points new connections at `target`; open ones keep their pod.
    pub fn set_target(&self, target: SocketAddr) {
        self.change_route(|route| route.target = target);
    }

    pub fn stats(&self) -> TunnelStats {
        let errors = self.lock_errors();
        TunnelStats {
            open_connections: self.counters.open.load(Ordering::Relaxed),
            total_connections: self.counters.total.load(Ordering::Relaxed),
            bytes_to_pod: self.counters.to_pod.load(Ordering::Relaxed),
            bytes_from_pod: self.counters.from_pod.load(Ordering::Relaxed),
            current_error: errors.current.clone(),
            last_error: errors.last.clone(),
        }
    }

    fn lock_errors(&self) -> std::sync::MutexGuard<'_, Errors> {
        match self.errors.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Records a failed connection; tells subscribers only when the problem changes,
    /// so a flood of refused connections is one event, not thousands.
    fn record_error(&self, kind: ConnectErrorKind, message: String) {
        self.error_counts[kind.index()].fetch_add(1, Ordering::Relaxed);
        let changed = {
            let mut errors = self.lock_errors();
            errors.last = Some((message.clone(), Utc::now()));
            let changed = errors.current.as_deref() != Some(message.as_str());
            errors.current = Some(message.clone());
            changed
        };
        if changed {
            tracing::warn!(pod_id = %self.pod_id, error = %message, "tunnel connection failed");
            self.events.publish(AgentEvent::TunnelChanged {
                pod_id: self.pod_id.clone(),
                state: TunnelState::Active,
                error: Some(message),
            });
        }
    }

    /// Records a connection the pod cut mid-stream (a reset). The tunnel itself
    /// is fine, so this is history (`last_error`), not the current problem.
    fn record_dropped(&self, kind: ConnectErrorKind, message: String) {
        self.error_counts[kind.index()].fetch_add(1, Ordering::Relaxed);
        tracing::debug!(pod_id = %self.pod_id, error = %message, "connection cut mid-stream");
        self.lock_errors().last = Some((message, Utc::now()));
    }

    /// Clears the current problem after a good connection.
    fn record_success(&self) {
        let recovered = self.lock_errors().current.take().is_some();
        if recovered {
            tracing::info!(pod_id = %self.pod_id, "tunnel reaches its pod again");
            self.events.publish(AgentEvent::TunnelChanged {
                pod_id: self.pod_id.clone(),
                state: TunnelState::Active,
                error: None,
            });
        }
    }
}

/// The last minute of several tunnels together (a pod's ports): their
/// throughput added sample by sample (the newest samples aligned), their
/// connections pooled for the percentiles.
pub fn combined_activity<'a>(
    tunnels: impl Iterator<Item = &'a TunnelShared>,
) -> crate::model::Activity {
    let now = std::time::Instant::now();
    let mut throughput: Vec<u64> = Vec::new();
    let mut worked: Vec<f64> = Vec::new();
    let (mut connections, mut errors) = (0u64, 0u64);
    for tunnel in tunnels {
        let recent = tunnel.lock_recent();
        let samples = recent.throughput.len();
        if samples > throughput.len() {
            let mut longer = vec![0; samples - throughput.len()];
            longer.append(&mut throughput);
            throughput = longer;
        }
        let offset = throughput.len() - samples;
        for (sum, sample) in throughput[offset..].iter_mut().zip(&recent.throughput) {
            *sum += sample;
        }
        for (at, seconds, ok) in &recent.connects {
            if now.duration_since(*at) > RECENT {
                continue;
            }
            connections += 1;
            if *ok {
                worked.push(seconds * 1000.0);
            } else {
                errors += 1;
            }
        }
    }
    worked.sort_by(f64::total_cmp);
    let percentile = |p: f64| -> Option<f64> {
        let last = worked.len().checked_sub(1)?;
        // Nearest rank: the smallest value at or above p of the samples.
        let rank = ((p * worked.len() as f64).ceil() as usize).clamp(1, last + 1) - 1;
        worked.get(rank).copied()
    };
    crate::model::Activity {
        throughput,
        sample_seconds: SAMPLE_EVERY.as_secs(),
        connect_p50_ms: percentile(0.50),
        connect_p99_ms: percentile(0.99),
        connections,
        errors,
    }
}

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
            accept_loops.push(shard.spawn(tracker.track_future(accept_loop(
                listener,
                Arc::clone(&shared),
                balance,
                tracker.clone(),
                cancel.clone(),
            ))));
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
                tracing::warn!(error = %err, "tunnel accept loop ended abnormally");
            }
        }
    }
}

async fn accept_loop(
    listener: SharedListener,
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
            Ok(client) if shared.counters.open.load(Ordering::Relaxed) >= shared.limit => {
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

/// What a connection's task needs besides its socket.
struct Connection {
    shared: Arc<TunnelShared>,
    cancel: CancellationToken,
    pipes: Pipes,
}

impl Connection {
    /// Serves `client` until either side ends or the tunnel stops; `load`
    /// counts it on its shard meanwhile.
    async fn run(self, client: TcpStream, load: LoadGuard) {
        let _load = load;
        tokio::select! {
            _ = self.cancel.cancelled() => {}
            _ = serve_connection(client, &self.shared, &self.pipes) => {}
        }
    }
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

/// Decrements the open-connection count however the connection ends.
struct OpenGuard<'a>(&'a TunnelShared);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.counters.open.fetch_sub(1, Ordering::Relaxed);
        self.0.events.connection_closed();
        self.0.events.traffic_moved();
    }
}

async fn serve_connection(client: TcpStream, shared: &TunnelShared, pipes: &Pipes) {
    shared.counters.total.fetch_add(1, Ordering::Relaxed);
    shared.counters.open.fetch_add(1, Ordering::Relaxed);
    shared.events.connection_opened();
    shared.events.traffic_moved();
    let _open = OpenGuard(shared);

    let Route { target, mode, via } = shared.route();
    match (mode, via) {
        (TunnelTarget::Local, _) => serve_stream(client, shared, Way::Mirror, target.port()).await,
        (TunnelTarget::Staging, StagingVia::Direct) => {
            serve_direct(client, shared, pipes, target).await;
        }
        (TunnelTarget::Staging, StagingVia::Api) => {
            serve_stream(client, shared, Way::Api, target.port()).await;
        }
        (TunnelTarget::Staging, StagingVia::Auto) => {
            serve_auto(client, shared, pipes, target).await;
        }
    }
}

/// Direct to the pod's `ip:port`, as a tunnel always went.
async fn serve_direct(client: TcpStream, shared: &TunnelShared, pipes: &Pipes, target: SocketAddr) {
    let started = std::time::Instant::now();
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await;
    shared.note_connect(
        started.elapsed().as_secs_f64(),
        matches!(connected, Ok(Ok(_))),
    );
    match connected {
        Ok(Ok(upstream)) => {
            shared.record_success();
            relay_both_ways(client, upstream, shared, pipes, target).await;
        }
        Ok(Err(err)) => shared.record_error(
            ConnectErrorKind::of(&err),
            format!("cannot connect to pod at {target}: {err}"),
        ),
        Err(_) => shared.record_error(
            ConnectErrorKind::Timeout,
            format!(
                "cannot connect to pod at {target}: no answer within {}s",
                CONNECT_TIMEOUT.as_secs()
            ),
        ),
    }
}

/// `auto`: the pod IP while it answers (a short wait), else the staging
/// API, which later connections then take directly for a while.
async fn serve_auto(client: TcpStream, shared: &TunnelShared, pipes: &Pipes, target: SocketAddr) {
    let started = std::time::Instant::now();
    if shared.ways.plan(started) == Plan::Api {
        serve_stream(client, shared, Way::Api, target.port()).await;
        return;
    }
    let connected = tokio::time::timeout(AUTO_DIRECT_TIMEOUT, TcpStream::connect(target)).await;
    match connected {
        Ok(Ok(upstream)) => {
            shared.ways.direct_worked();
            shared.note_connect(started.elapsed().as_secs_f64(), true);
            shared.record_success();
            relay_both_ways(client, upstream, shared, pipes, target).await;
        }
        // Routable, but the pod said no: the API would hear the same.
        Ok(Err(err)) if !is_unreachable(&err) => {
            shared.ways.direct_worked();
            shared.note_connect(started.elapsed().as_secs_f64(), false);
            shared.record_error(
                ConnectErrorKind::of(&err),
                format!("cannot connect to pod at {target}: {err}"),
            );
        }
        Ok(Err(err)) => {
            tracing::info!(pod_id = %shared.pod_id, %target, error = %err, "pod IP unreachable; through the staging API");
            shared.ways.direct_unreachable(std::time::Instant::now());
            serve_stream(client, shared, Way::Api, target.port()).await;
        }
        Err(_) => {
            tracing::info!(pod_id = %shared.pod_id, %target, "pod IP silent; through the staging API");
            shared.ways.direct_unreachable(std::time::Instant::now());
            serve_stream(client, shared, Way::Api, target.port()).await;
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
    let result = tokio::try_join!(
        relay(
            client_read,
            upstream_write,
            &shared.counters.to_pod,
            &one_way_ended,
            pipes,
        ),
        relay(
            upstream_read,
            client_write,
            &shared.counters.from_pod,
            &one_way_ended,
            pipes,
        ),
    );
    if let Err(err) = result {
        // A reset mid-stream ends this connection only; the tunnel is fine.
        shared.record_dropped(
            ConnectErrorKind::of(&err),
            format!("a connection to the pod at {target} broke mid-stream: {err}"),
        );
    }
}

/// A connection through a Kubernetes API port-forward: to the pod's local
/// mirror (resolved at this moment) or to the staging pod through the
/// staging API. A fresh stream per connection, so a stream that breaks
/// ends this connection alone.
async fn serve_stream(mut client: TcpStream, shared: &TunnelShared, way: Way, port: u16) {
    let started = std::time::Instant::now();
    let (what, dial) = match way {
        Way::Api => {
            let pod = shared.ways.pod();
            (
                "the staging pod through the staging API",
                shared.dialers.staging.dial(&pod, port),
            )
        }
        Way::Mirror | Way::Direct => (
            "the local mirror",
            shared.dialers.mirror.dial(&shared.pod_id, port),
        ),
    };
    let dialed = tokio::time::timeout(CONNECT_TIMEOUT, dial).await;
    shared.note_connect(started.elapsed().as_secs_f64(), matches!(dialed, Ok(Ok(_))));
    let mut local = match dialed {
        Ok(Ok(local)) => local,
        Ok(Err(err)) => {
            shared.record_error(
                ConnectErrorKind::Cluster,
                format!("cannot reach {what}: {err}"),
            );
            return;
        }
        Err(_) => {
            shared.record_error(
                ConnectErrorKind::Timeout,
                format!(
                    "cannot reach {what}: no answer within {}s",
                    CONNECT_TIMEOUT.as_secs()
                ),
            );
            return;
        }
    };
    shared.record_success();
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
            shared.counters.to_pod.fetch_add(to_pod, Ordering::Relaxed);
            shared
                .counters
                .from_pod
                .fetch_add(from_pod, Ordering::Relaxed);
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
            shared.record_error(
                ConnectErrorKind::of(&err),
                format!("cannot reach {what}: {err}"),
            );
        }
        Err(err) => {
            // A stream reset mid-transfer: this connection ends, the
            // listener and the other connections carry on.
            shared.record_dropped(
                ConnectErrorKind::Reset,
                format!("a connection {} broke mid-stream: {err}", way.describe()),
            );
        }
    }
}
