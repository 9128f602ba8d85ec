//! The running agent: starts every part under one cancellation token and task
//! tracker, and carries out the operations that change state (a push, a
//! toggle, a restore, shutdown), keeping the store, the listeners, the state
//! on disk and the hosts file in step. The HTTP receiver and the tray app both
//! call into this and nothing else.

use crate::shards::ForwardShards;
use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::addresses::CannotListen;
use crate::cluster::{ClusterStatus, Mirror};
use crate::config::Config;
use crate::events::{AgentEvent, EventBus};
use crate::forward::{self, LocalDialer, RunningTunnel, TunnelShared};
use crate::model::{
    Action, ControlPlaneHealth, HealthResponse, PodSpec, PodView, Redirection, Snapshot,
    StatusResponse, TunnelState, TunnelTarget,
};
use crate::names::{HostEntry, HostsFile, NamesError};
use crate::persist::{Identity, PersistError, StateDb, StoredPod};
use crate::ports::PortPlan;
use crate::receiver;
use crate::report::Reporter;
use crate::store::{PodEntry, PodMap, Store};

/// How long shutdown waits for tasks before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Why the agent could not start or carry out an operation.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error("cannot read the receiver's address: {0}")]
    Listener(std::io::Error),
    #[error("no pod with id {0:?}")]
    UnknownPod(String),
    #[error("cannot build the status reporter: {0}")]
    Reporter(String),
    #[error("cannot start the forwarding threads: {0}")]
    Shards(std::io::Error),
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
    local_addr: SocketAddr,
    listen_ip: IpAddr,
    store: Store,
    db: StateDb,
    hosts: HostsFile,
    ports: PortPlan,
    reporter: Reporter,
    control_plane: watch::Receiver<ControlPlaneHealth>,
    cluster: watch::Receiver<ClusterStatus>,
    /// How `local` tunnels reach mirrors.
    dialer: Arc<dyn LocalDialer>,
    /// The per-core runtimes every tunnel's connections run on.
    shards: ForwardShards,
    /// What `GET /metrics` encodes.
    metrics: prometheus_client::registry::Registry,
    /// Serializes the operations that change state, so each sees the last one's result.
    ops: Mutex<()>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Agent {
    /// Opens the state dir, brings back every tunnel it recorded, and starts
    /// the receiver on `listener` and the status reporter. Everything stops
    /// when [`Agent::shutdown`] runs.
    pub async fn start(config: Config, listener: TcpListener) -> Result<Self, AgentError> {
        let local_addr = listener.local_addr().map_err(AgentError::Listener)?;
        raise_open_file_limit();
        let identity = Identity::load_or_create(&config.state_dir, config.agent_id.as_deref())?;
        let db = StateDb::open(&config.state_dir)?;
        let hosts = HostsFile::choose(config.hosts_file.clone(), &config.state_dir);
        if let Some(warning) = hosts.warning() {
            tracing::warn!("{warning}");
        }
        // Never hand out the agent's own port, nor the control plane's (the
        // configured one, and the seed's default, where a control plane on
        // this machine usually listens).
        let reserved = [
            Some(local_addr.port()),
            Some(config.agent_port),
            config.control_plane_port(),
            crate::config::DEFAULT_CONTROL_PLANE_URL
                .parse::<reqwest::Url>()
                .ok()
                .and_then(|url| url.port()),
        ];
        let ports = PortPlan::new(config.port_range, reserved.into_iter().flatten());
        let events = EventBus::new();
        let store = Store::new(&config.local_host, events.clone());
        let (mirror, cluster) =
            Mirror::new(config.cluster.clone(), &identity.agent_id, store.clone());
        let (reporter, control_plane) = Reporter::new(
            &config,
            identity.agent_id.clone(),
            store.clone(),
            cluster.clone(),
        )
        .map_err(|err| AgentError::Reporter(err.to_string()))?;

        let shards = ForwardShards::new(config.forward_threads).map_err(AgentError::Shards)?;
        let metrics = crate::metrics::registry(
            store.clone(),
            shards.loads(),
            config.port_range,
            cluster.clone(),
            reporter.metrics(),
        );
        let agent = Self {
            inner: Arc::new(Inner {
                listen_ip: config.listen_ip(),
                config,
                identity,
                local_addr,
                store,
                db,
                hosts,
                ports,
                reporter,
                control_plane,
                cluster,
                dialer: mirror.dialer(),
                shards,
                metrics,
                ops: Mutex::new(()),
                cancel: CancellationToken::new(),
                tracker: TaskTracker::new(),
            }),
        };
        agent.restore().await?;

        let inner = &agent.inner;
        let router = receiver::router(agent.clone());
        let cancel = inner.cancel.clone();
        inner
            .tracker
            .spawn(crate::serve::serve(listener, router, cancel));
        let reporter = inner.reporter.clone();
        let cancel = inner.cancel.clone();
        inner
            .tracker
            .spawn(async move { reporter.run(cancel).await });
        let cancel = inner.cancel.clone();
        inner.tracker.spawn(async move { mirror.run(cancel).await });
        let (store, cancel) = (inner.store.clone(), inner.cancel.clone());
        inner.tracker.spawn(async move {
            let mut every = tokio::time::interval(forward::SAMPLE_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let (mut opened_before, mut all_quiet) = (0, true);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = every.tick() => {}
                }
                // Bytes move only on open connections: with none open, none
                // opened since the last tick and every line already flat,
                // nothing can have changed, so an idle agent skips the walk
                // over its tunnels (a cost on a machine with 900 of them).
                let (opened, open) = store.events().connections();
                if open == 0 && opened == opened_before && all_quiet {
                    continue;
                }
                opened_before = opened;
                all_quiet = store.sample_throughput();
            }
        });

        tracing::info!(
            agent_id = %inner.identity.agent_id,
            "listening on http://{local_addr}",
        );
        if inner.config.demo {
            tracing::warn!("DEMO MODE: pods come from a built-in stand-in control plane");
        }
        if cfg!(not(target_os = "linux")) && inner.config.name_ports {
            // Only Linux routes all of 127/8 to the loopback interface.
            tracing::warn!(
                block = %inner.config.address_block,
                "pod addresses need loopback aliases here (`sudo ifconfig lo0 alias <address> up`); \
                 a pod whose address is missing says which, and its range port works meanwhile"
            );
        }
        Ok(agent)
    }

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

    /// Where the HTTP API listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
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

    /// The metrics in the OpenMetrics text format (`GET /metrics`).
    pub fn metrics_text(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.inner.metrics)?;
        Ok(text)
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

    /// Stops a tunnel for good: closes its port, removes the pod and its name.
    /// (A control plane that pushes it again brings it back.)
    pub async fn stop_tunnel(&self, id: &str) -> Result<(), AgentError> {
        if self.inner.store.pod_view(id).is_none() {
            return Err(AgentError::UnknownPod(id.to_owned()));
        }
        let outcome = self
            .apply(
                Action::Delete,
                Vec::new(),
                vec![id.to_owned()],
                BTreeSet::new(),
            )
            .await?;
        if outcome.removed.is_empty() {
            return Err(AgentError::UnknownPod(id.to_owned()));
        }
        tracing::info!(pod_id = %id, "tunnel stopped by the user");
        Ok(())
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
            status: "healthy".to_owned(),
            agent_id: self.inner.identity.agent_id.clone(),
            pid: std::process::id(),
            timestamp: chrono::Utc::now(),
            pod_count: self.inner.store.len(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            demo: self.inner.config.demo,
            names: self.inner.hosts.health(),
            control_plane: self.inner.control_plane.borrow().clone(),
            cluster_status: self.inner.cluster.borrow().word().to_owned(),
            cluster_reason: self.inner.cluster.borrow().reason(),
        }
    }

    /// Applies a push: upserts for create/update/sync, removals for delete,
    /// and for sync the removal of every pod not listed and not in `keep`
    /// (ids of pods rejected from this push, which must not be lost).
    pub async fn apply(
        &self,
        action: Action,
        pods: Vec<PodSpec>,
        delete_ids: Vec<String>,
        keep: BTreeSet<String>,
    ) -> Result<ApplyOutcome, AgentError> {
        let _op = self.inner.ops.lock().await;
        let mut outcome = ApplyOutcome::default();
        // Removals first, and their ports released, so that pods in this
        // same push (or failed ones) can use the freed ports.
        let closing: Vec<RunningTunnel> = {
            let mut map = self.inner.store.write();
            let doomed: Vec<String> = match action {
                Action::Delete => delete_ids,
                Action::Sync => {
                    let wanted: HashSet<&str> = pods.iter().map(|p| p.id.as_str()).collect();
                    map.keys()
                        .filter(|id| !wanted.contains(id.as_str()) && !keep.contains(*id))
                        .cloned()
                        .collect()
                }
                Action::Create | Action::Update => Vec::new(),
            };
            doomed
                .into_iter()
                .filter_map(|id| {
                    let mut entry = map.remove(&id)?;
                    outcome.removed.push(id);
                    Some(entry.take_listeners())
                })
                .flatten()
                .collect::<Vec<RunningTunnel>>()
        };
        for listener in closing {
            listener.close().await;
        }
        let mut upserted = Vec::new();
        let mut moved_away = Vec::new();
        {
            let mut map = self.inner.store.write();
            for spec in pods {
                let id = spec.id.clone();
                moved_away.extend(self.upsert(&mut map, spec));
                upserted.push(id.clone());
                outcome.applied.push(id);
            }
            if !outcome.removed.is_empty() {
                // Ports freed by removals may let failed tunnels listen now.
                upserted.extend(self.retry_failed(&mut map));
            }
        }
        for listener in moved_away {
            listener.close().await;
        }
        self.save(&upserted, &outcome.removed).await?;
        self.write_names().await;
        if !(outcome.applied.is_empty() && outcome.removed.is_empty()) {
            self.events().publish(AgentEvent::PodsChanged {
                applied: outcome.applied.clone(),
                removed: outcome.removed.clone(),
            });
        }
        Ok(outcome)
    }

    /// Turns forwarding for one pod on (listen again, on its own port when
    /// free) or off (close the port and its connections).
    pub async fn set_forwarding(&self, id: &str, enabled: bool) -> Result<Redirection, AgentError> {
        let _op = self.inner.ops.lock().await;
        let closing = {
            let mut map = self.inner.store.write();
            if !map.contains_key(id) {
                return Err(AgentError::UnknownPod(id.to_owned()));
            }
            if enabled {
                let in_use = held_by_others(&map, Some(id));
                if let Some(entry) = map.get_mut(id) {
                    entry.forwarding = true;
                    if entry.listener.is_none() {
                        self.open_listener(entry, &in_use);
                    }
                }
                Vec::new()
            } else {
                map.get_mut(id)
                    .map(|entry| {
                        entry.forwarding = false;
                        entry.failure = None;
                        entry.name_port_error = None;
                        entry.take_listeners()
                    })
                    .unwrap_or_default()
            }
        };
        for listener in closing {
            listener.close().await;
        }
        tracing::info!(pod_id = %id, enabled, "forwarding toggled");
        self.save_and_announce(id).await
    }

    /// After a change to one tunnel: keeps it on disk, tells subscribers, and
    /// returns how it looks now.
    async fn save_and_announce(&self, id: &str) -> Result<Redirection, AgentError> {
        self.save(&[id.to_owned()], &[]).await?;
        let view = self
            .inner
            .store
            .pod_view(id)
            .ok_or_else(|| AgentError::UnknownPod(id.to_owned()))?;
        self.events().publish(AgentEvent::TunnelChanged {
            pod_id: id.to_owned(),
            state: view.tunnel.status,
            error: view.tunnel.error.clone(),
        });
        Ok(view.tunnel)
    }

    /// Points one pod's tunnel at the staging pod or its local mirror; new
    /// connections follow at once, the listener and the name stay. Kept on disk.
    pub async fn set_target(
        &self,
        id: &str,
        target: TunnelTarget,
    ) -> Result<Redirection, AgentError> {
        let _op = self.inner.ops.lock().await;
        {
            let map = self.inner.store.read();
            let entry = map
                .get(id)
                .ok_or_else(|| AgentError::UnknownPod(id.to_owned()))?;
            entry.tunnel.set_mode(target);
        }
        tracing::info!(pod_id = %id, target = target.as_str(), "tunnel target switched");
        self.save_and_announce(id).await
    }

    /// Turns forwarding on or off for every pod (the tray's Pause all /
    /// Resume all); returns how many pods changed.
    pub async fn set_forwarding_all(&self, enabled: bool) -> Result<usize, AgentError> {
        let ids: Vec<String> = self
            .inner
            .store
            .read()
            .iter()
            .filter(|(_, entry)| entry.forwarding != enabled)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            match self.set_forwarding(id, enabled).await {
                // Removed meanwhile by a push: nothing to pause.
                Ok(_) | Err(AgentError::UnknownPod(_)) => {}
                Err(other) => return Err(other),
            }
        }
        Ok(ids.len())
    }

    /// Stops every task, closes every listener, removes our names from the
    /// hosts file and tells the control plane we stopped. The pods stay on
    /// disk, so the next start brings the tunnels back.
    pub async fn shutdown(&self) {
        let _op = self.inner.ops.lock().await;
        self.events().publish(AgentEvent::Stopping);
        let listeners: Vec<RunningTunnel> = self
            .inner
            .store
            .write()
            .values_mut()
            .flat_map(PodEntry::take_listeners)
            .collect();
        self.inner.cancel.cancel();
        for listener in listeners {
            listener.close().await;
        }
        self.inner.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.inner.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some tasks did not stop within {SHUTDOWN_GRACE:?}");
        }
        let hosts = self.inner.hosts.clone();
        match tokio::task::spawn_blocking(move || hosts.clear()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::error!(error = %err, "could not remove pod names"),
            Err(err) => tracing::error!(error = %err, "could not remove pod names"),
        }
        self.inner.reporter.send_final().await;
        tracing::info!("agent stopped");
    }

    /// Waits until the agent has been told to stop.
    pub async fn stopped(&self) {
        self.inner.cancel.cancelled().await;
    }

    /// Brings back the pods on disk, each on its remembered port, and
    /// rewrites the hosts file (dropping a stale block from a crash).
    async fn restore(&self) -> Result<(), AgentError> {
        let _op = self.inner.ops.lock().await;
        let stored = self.inner.db.load().await?;
        let mut ids = Vec::with_capacity(stored.len());
        {
            let mut map = self.inner.store.write();
            for StoredPod {
                spec,
                local_port,
                forwarding,
                target,
                address,
            } in stored
            {
                let id = spec.id.clone();
                let tunnel = TunnelShared::new(
                    id.clone(),
                    SocketAddr::new(spec.ip, spec.staging_port()),
                    target,
                    Arc::clone(&self.inner.dialer),
                    self.events().clone(),
                );
                map.insert(
                    id.clone(),
                    PodEntry {
                        spec,
                        forwarding,
                        local_port,
                        port_note: None,
                        failure: None,
                        tunnel,
                        listener: None,
                        address,
                        name_listeners: Vec::new(),
                        name_port_error: None,
                        mirror: None,
                    },
                );
                ids.push(id);
            }
            // Every remembered port is claimed before any is bound, so a pod
            // that must move cannot take another pod's remembered port.
            for id in &ids {
                let in_use = held_by_others(&map, Some(id));
                if let Some(entry) = map.get_mut(id) {
                    if entry.forwarding {
                        self.open_listener(entry, &in_use);
                    }
                }
            }
        }
        if !ids.is_empty() {
            tracing::info!(pods = ids.len(), "restored pods from the state dir");
        }
        self.save(&ids, &[]).await?;
        self.write_names().await;
        if !ids.is_empty() {
            self.events().publish(AgentEvent::PodsChanged {
                applied: ids,
                removed: Vec::new(),
            });
        }
        Ok(())
    }

    /// Inserts or updates one pod. An existing tunnel keeps its port and
    /// listener; a new target applies to new connections, and a new pod
    /// port moves the name listener (the old one, to close, is returned).
    fn upsert(&self, map: &mut PodMap, spec: PodSpec) -> Option<RunningTunnel> {
        let target = SocketAddr::new(spec.ip, spec.staging_port());
        if let Some(entry) = map.get_mut(&spec.id) {
            if entry.target() != target {
                tracing::info!(pod_id = %spec.id, %target, "pod moved; new connections go to its new address");
                entry.tunnel.set_target(target);
            }
            let old_own = entry.spec.staging_port();
            entry.spec = spec;
            if entry.spec.staging_port() != old_own {
                return self.move_name_port(entry, old_own);
            }
            return None;
        }
        let id = spec.id.clone();
        let tunnel = TunnelShared::new(
            id.clone(),
            target,
            TunnelTarget::Staging,
            Arc::clone(&self.inner.dialer),
            self.events().clone(),
        );
        let mut entry = PodEntry {
            spec,
            forwarding: true,
            local_port: None,
            port_note: None,
            failure: None,
            tunnel,
            listener: None,
            address: None,
            name_listeners: Vec::new(),
            name_port_error: None,
            mirror: None,
        };
        let in_use = held_by_others(map, None);
        self.open_listener(&mut entry, &in_use);
        map.insert(id, entry);
        None
    }

    /// Gives failed tunnels another try; returns the ids that changed.
    fn retry_failed(&self, map: &mut PodMap) -> Vec<String> {
        let failed: Vec<String> = map
            .iter()
            .filter(|(_, e)| e.forwarding && e.listener.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        for id in &failed {
            let in_use = held_by_others(map, Some(id));
            if let Some(entry) = map.get_mut(id) {
                self.open_listener(entry, &in_use);
            }
        }
        failed
    }

    /// Binds a port for `entry` (its remembered one first) and starts its
    /// listener, or records why it could not.
    fn open_listener(&self, entry: &mut PodEntry, in_use: &InUse) {
        let listen_ip = self.inner.listen_ip;
        let taken = |port: u16| in_use.ports.contains(&port);
        let allocation = self.inner.ports.allocate(entry.local_port, &taken, |port| {
            crate::listen::bind_listener(SocketAddr::new(listen_ip, port))
        });
        match allocation {
            Ok(allocation) => {
                let note = allocation.note();
                if let Some(note) = &note {
                    tracing::warn!(pod_id = %entry.spec.id, "{note}");
                }
                match RunningTunnel::spawn(
                    allocation.listener,
                    Arc::clone(&entry.tunnel),
                    &self.inner.shards,
                    &self.inner.tracker,
                    &self.inner.cancel,
                ) {
                    Ok(listener) => {
                        entry.local_port = Some(allocation.port);
                        entry.port_note = note;
                        entry.failure = None;
                        entry.listener = Some(listener);
                        self.open_name_listeners(entry, &in_use.addresses);
                    }
                    Err(err) => {
                        entry.failure =
                            Some(format!("cannot listen on port {}: {err}", allocation.port));
                    }
                }
            }
            Err(err) => {
                tracing::warn!(pod_id = %entry.spec.id, error = %err, "tunnel cannot listen");
                entry.failure = Some(err.to_string());
            }
        }
        if entry.failure.is_some() {
            self.events().publish(AgentEvent::TunnelChanged {
                pod_id: entry.spec.id.clone(),
                state: TunnelState::Failed,
                error: entry.failure.clone(),
            });
        }
    }

    /// Gives the pod its own loopback address (its remembered one first) and
    /// listens there on the pod's own port and on its range port, so both
    /// `<name>-staging.local` and `<name>-staging.local:<range port>` work.
    /// A port that cannot listen is noted with the reason, never fatal.
    fn open_name_listeners(&self, entry: &mut PodEntry, taken: &HashSet<Ipv4Addr>) {
        entry.name_port_error = None;
        if !self.inner.config.name_ports {
            return;
        }
        let block = self.inner.config.address_block;
        let Some(address) = block.allocate(&entry.spec.id, entry.address, taken) else {
            entry.name_port_error = Some(format!("every address in {block} is taken"));
            return;
        };
        entry.address = Some(address);
        let own = entry.spec.staging_port();
        let mut ports = vec![own];
        ports.extend(entry.local_port.filter(|port| *port != own));
        for port in ports {
            match self.listen_by_name(entry, address, port) {
                Ok(listener) => entry.name_listeners.push(listener),
                Err(why) if port == own => entry.name_port_error = Some(why.to_string()),
                Err(_) => {}
            }
        }
    }

    /// One listener of the pod's on its own address; the reason, logged,
    /// when the port cannot listen.
    fn listen_by_name(
        &self,
        entry: &PodEntry,
        address: Ipv4Addr,
        port: u16,
    ) -> Result<RunningTunnel, CannotListen> {
        let addr = SocketAddr::from((address, port));
        crate::listen::bind_listener(addr)
            .and_then(|listener| {
                RunningTunnel::spawn(
                    listener,
                    Arc::clone(&entry.tunnel),
                    &self.inner.shards,
                    &self.inner.tracker,
                    &self.inner.cancel,
                )
            })
            .map_err(|err| {
                let why = CannotListen::new(addr, &err);
                tracing::warn!(pod_id = %entry.spec.id, "{why}");
                why
            })
    }

    /// After an update changed the pod's own port: its name listener moves
    /// from the old port to the new one, so `<name>-staging.local` keeps
    /// reaching the pod's current port. Returns the listener to close.
    fn move_name_port(&self, entry: &mut PodEntry, old_own: u16) -> Option<RunningTunnel> {
        let address = entry.address?;
        // Stopped or failed: it listens by name again when it listens at all.
        entry.listener.as_ref()?;
        // The old port stays open when it is also the pod's range port.
        let old = (Some(old_own) != entry.local_port)
            .then(|| {
                entry
                    .name_listeners
                    .iter()
                    .position(|listener| listener.local_addr().port() == old_own)
            })
            .flatten()
            .map(|index| entry.name_listeners.remove(index));
        let own = entry.spec.staging_port();
        entry.name_port_error = None;
        let listening = entry
            .name_listeners
            .iter()
            .any(|listener| listener.local_addr().port() == own);
        if !listening {
            match self.listen_by_name(entry, address, own) {
                Ok(listener) => entry.name_listeners.push(listener),
                Err(why) => entry.name_port_error = Some(why.to_string()),
            }
        }
        old
    }

    /// Writes the named pods (and removals) to disk in one transaction.
    async fn save(&self, ids: &[String], removed: &[String]) -> Result<(), AgentError> {
        let upserts: Vec<StoredPod> = {
            let map = self.inner.store.read();
            ids.iter()
                .filter_map(|id| map.get(id).map(PodEntry::stored))
                .collect()
        };
        if upserts.is_empty() && removed.is_empty() {
            return Ok(());
        }
        self.inner.db.save(upserts, removed.to_vec()).await?;
        Ok(())
    }

    /// Makes the hosts block list every pod we hold. A failure is logged,
    /// not fatal: tunnels work by port without names.
    async fn write_names(&self) {
        let ip = self.inner.listen_ip;
        let entries: Vec<HostEntry> = self
            .inner
            .store
            .read()
            .values()
            .map(|entry| HostEntry {
                ip: entry.address.map_or(ip, IpAddr::V4),
                names: vec![entry.spec.dns_name(), entry.spec.localhost_name()],
            })
            .collect();
        let hosts = self.inner.hosts.clone();
        let written = tokio::task::spawn_blocking(move || hosts.write(&entries))
            .await
            .unwrap_or_else(|err| {
                Err(NamesError::Write {
                    path: self.inner.hosts.path().to_owned(),
                    source: std::io::Error::other(err.to_string()),
                })
            });
        if let Err(err) = written {
            tracing::error!(error = %err, "could not write pod names");
        }
    }
}

/// Lifts the soft limit on open files to the hard one: every tunnel is a
/// listener and every connection two sockets (and two pipes while busy), so
/// the usual 1024 runs out long before the port range does.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(err) => tracing::warn!(error = %err, "cannot raise the open-file limit"),
    }
}

/// What our other pods hold: their ports and their addresses.
#[derive(Debug, Default)]
struct InUse {
    ports: HashSet<u16>,
    addresses: HashSet<Ipv4Addr>,
}

/// The ports and addresses our pods hold, except `except`'s own.
fn held_by_others(map: &PodMap, except: Option<&str>) -> InUse {
    let others = || map.iter().filter(|(id, _)| Some(id.as_str()) != except);
    InUse {
        ports: others().filter_map(|(_, entry)| entry.local_port).collect(),
        addresses: others().filter_map(|(_, entry)| entry.address).collect(),
    }
}
