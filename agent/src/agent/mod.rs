//! The running agent: the one owner of the agent's state and the one writer
//! of it. `Agent` holds the store, the state on disk, the names, the port
//! plan and the forwarding threads, and every change to pods goes through one
//! of its operations, which keep them in step. It knows nothing of HTTP: the
//! API (`crate::api`) and the tray app are callers of these operations.
//!
//! - `lifecycle`: start-up (state dir, restore, background tasks) and shutdown;
//! - `operations`: what callers ask for (a push, a toggle, a target, a stop);
//! - `tunnels`: which listeners each pod holds, opened, moved and retried.

mod lifecycle;
mod operations;
mod tunnels;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::{ClusterStatus, StagingCluster};
use crate::config::Config;
use crate::events::EventBus;
use crate::model::{ControlPlaneHealth, HealthResponse, PodView, Snapshot, StatusResponse};
use crate::names::Names;
use crate::report::{ReportMetrics, Reporter};
use crate::state::Store;
use crate::state::{Identity, PersistError, StateDb};
use crate::tunnel::Dialers;
use crate::tunnel::PortPlan;
use crate::tunnel::{AddressPorts, ForwardShards, ShardLoads};

/// Why the agent could not start or carry out an operation.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error("cannot read the receiver's address: {0}")]
    Listener(#[source] std::io::Error),
    #[error("no pod with id {0:?}")]
    UnknownPod(String),
    #[error("pod {id:?} has no tunnelled port {port}: {why}")]
    UnknownPort { id: String, port: u16, why: String },
    #[error("cannot build the status reporter: {0}")]
    Reporter(#[source] crate::report::ReportError),
    #[error("cannot start the forwarding threads: {0}")]
    Shards(#[source] std::io::Error),
    #[error(transparent)]
    Names(#[from] crate::names::NamesError),
    #[error(
        "this push would make the agent hold {would_hold} pods; it holds at most {limit} \
         (--max-pods): nothing was changed"
    )]
    TooManyPods { would_hold: usize, limit: usize },
    #[error(
        "forwarding is off for this agent (--forwarding off): no tunnel port listens; \
         start it with --forwarding on"
    )]
    ForwardingOff,
    #[error(
        "no staging cluster to reach pods through: start the agent with \
         --staging-kube-context (and --staging-kubeconfig when it is not in the default kubeconfig)"
    )]
    NoStagingCluster,
}

/// The outcome of a push, by pod id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    pub applied: Vec<String>,
    pub removed: Vec<String>,
}

/// A handle to the running agent; cheap to clone.
#[derive(Debug, Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    identity: Identity,
    /// Where the caller serves the agent's HTTP API (never a tunnel port).
    local_addr: SocketAddr,
    listen_ip: IpAddr,
    store: Store,
    db: StateDb,
    hosts: Names,
    ports: PortPlan,
    reporter: Reporter,
    control_plane: watch::Receiver<ControlPlaneHealth>,
    cluster: watch::Receiver<ClusterStatus>,
    /// How tunnels reach mirrors and, through the staging API, staging pods.
    dialers: Dialers,
    /// The staging cluster, when configured (its health is shown).
    staging: Option<StagingCluster>,
    /// The per-core runtimes every tunnel's connections run on.
    shards: ForwardShards,
    /// Binds ports on pod addresses, through the bind helper when privileged.
    address_ports: AddressPorts,
    /// Serializes the operations that change state, so each sees the last one's result.
    ops: Mutex<()>,
    /// True from start until the pods on disk are back (`/health` says so).
    restoring: std::sync::atomic::AtomicBool,
    /// Fired once the restore is done: the reporter and the mirror wait for
    /// it, so no report carries half the pods and no garbage collection
    /// removes the mirror of a pod not yet back.
    restored: CancellationToken,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Agent {
    pub fn agent_id(&self) -> &str {
        &self.inner.identity.agent_id
    }

    /// The bearer token callers present when one is required.
    pub fn token(&self) -> &str {
        &self.inner.identity.token
    }

    /// Whether requests other than `/health` must carry the bearer token.
    pub fn token_required(&self) -> bool {
        self.inner.config.binds_beyond_loopback()
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Where the HTTP API listens (the address the caller gave at start).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// The API's URL as a caller on this machine reaches it (an agent bound
    /// to every address is reached on loopback).
    pub fn api_url(&self) -> String {
        let mut addr = self.inner.local_addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{addr}")
    }

    pub fn events(&self) -> &EventBus {
        self.inner.store.events()
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The root token: cancelled when the agent stops.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.inner.cancel
    }

    /// Tasks alive on the forwarding threads: one accept loop per tunnel and
    /// shard, one task per open connection.
    pub fn forwarding_tasks(&self) -> usize {
        self.inner.shards.alive_tasks()
    }

    /// The tracker every agent task runs on (the demo adds its servers here).
    pub fn tracker(&self) -> &TaskTracker {
        &self.inner.tracker
    }

    /// How many connections each forwarding thread holds (for `/metrics`).
    pub fn shard_loads(&self) -> ShardLoads {
        self.inner.shards.loads()
    }

    /// The local cluster's status, as it changes.
    pub fn cluster_status(&self) -> watch::Receiver<ClusterStatus> {
        self.inner.cluster.clone()
    }

    /// The status reporter's counters (for `/metrics`).
    pub fn report_metrics(&self) -> &ReportMetrics {
        self.inner.reporter.metrics()
    }

    pub fn status(&self) -> StatusResponse {
        StatusResponse {
            demo: self.inner.config.demo,
            ..self.inner.store.status()
        }
    }

    pub fn pods(&self) -> Vec<PodView> {
        self.inner.store.pod_views()
    }

    pub fn pod(&self, id: &str) -> Option<PodView> {
        self.inner.store.pod_view(id)
    }

    /// Health and every pod with its tunnel, for the dashboard.
    pub fn snapshot(&self) -> Snapshot {
        let range = self.inner.config.port_range;
        Snapshot {
            health: self.health(),
            pods: self.pods(),
            ports: crate::model::PortUsage {
                used: self.inner.store.ports_used(),
                size: range.len(),
            },
        }
    }

    /// `http://<name>-staging.localhost:<port>/`: where a browser reaches the
    /// pod with no setup. `None` for an unknown pod or one without a port.
    pub fn pod_url(&self, id: &str) -> Option<String> {
        let view = self.inner.store.pod_view(id)?;
        // The name alone when the pod's own port listens on its address and
        // the system resolves the name; else the range port, which browsers
        // reach by the `.localhost` name with no setup.
        if let Some(url) = view.tunnel.name_url {
            if self.inner.hosts.health().system_wide {
                return Some(url);
            }
        }
        let port = view.tunnel.local_port?;
        Some(format!("http://{}:{port}/", view.tunnel.localhost_name))
    }

    pub fn health(&self) -> HealthResponse {
        HealthResponse {
            // Serving before the pods on disk are back: it says so.
            status: if self
                .inner
                .restoring
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                "restoring"
            } else {
                "healthy"
            }
            .to_owned(),
            agent_id: self.inner.identity.agent_id.clone(),
            pid: std::process::id(),
            timestamp: chrono::Utc::now(),
            pod_count: self.inner.store.len(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            demo: self.inner.config.demo,
            api_url: self.api_url(),
            names: self.inner.hosts.health(),
            forwarding: self.inner.config.forwarding,
            control_plane: self.inner.control_plane.borrow().clone(),
            cluster_status: self.inner.cluster.borrow().word().to_owned(),
            cluster_reason: self.inner.cluster.borrow().reason(),
            staging: self.inner.staging.as_ref().map(StagingCluster::health),
        }
    }
}
