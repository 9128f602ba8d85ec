//! The agent's life: start-up (the state dir, the restore of every recorded
//! tunnel, the background tasks) and shutdown (every task and listener
//! stopped, the names removed, a last report sent).

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::tunnels::InUse;
use super::{Agent, AgentError, Inner};
use crate::cluster::{Mirror, StagingCluster};
use crate::config::Config;
use crate::events::{AgentEvent, EventBus};
use crate::names::Names;
use crate::report::Reporter;
use crate::state::{Identity, StateDb, StoredPod};
use crate::state::{PodEntry, Store};
use crate::tunnel::PortPlan;
use crate::tunnel::RunningTunnel;
use crate::tunnel::{AddressPorts, ForwardShards};
use crate::tunnel::{Dialers, NoStagingCluster, StagingDialer};

/// Pods brought back under one hold of the store's lock.
const RESTORE_BATCH: usize = 256;

/// How long shutdown waits for tasks before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

impl Agent {
    /// Opens the state dir and starts the status reporter, the mirror and
    /// the throughput sampler. The caller serves the HTTP API at
    /// `local_addr` (a port no tunnel may take), then calls
    /// [`Agent::restore`] to bring back every tunnel on disk, so the API
    /// answers (`restoring`) however many there are; see [`crate::start`].
    /// Everything stops when [`Agent::shutdown`] runs.
    pub async fn start(config: Config, local_addr: SocketAddr) -> Result<Self, AgentError> {
        raise_open_file_limit();
        let identity = Identity::load_or_create(&config.state_dir, config.agent_id.as_deref())?;
        let db = StateDb::open(&config.state_dir)?;
        let hosts = if config.names {
            Names::choose(config.hosts_file.clone(), &config.state_dir)
        } else {
            Names::off()
        };
        hosts.check()?;
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
        let store = Store::new(&config.local_host, config.names, events.clone());
        let (mirror, cluster) =
            Mirror::new(config.cluster.clone(), &identity.agent_id, store.clone());
        let (reporter, control_plane) = Reporter::new(
            &config,
            identity.agent_id.clone(),
            store.clone(),
            cluster.clone(),
        )
        .map_err(AgentError::Reporter)?;

        let shards = ForwardShards::new(config.forward_threads).map_err(AgentError::Shards)?;
        // The staging cluster's client is built at the first `api`
        // connection: a start never waits on (or fails for) it.
        let staging_cluster = config
            .staging
            .context
            .is_some()
            .then(|| StagingCluster::new(config.staging.clone()));
        let staging_dialer: Arc<dyn StagingDialer> = match &staging_cluster {
            Some(cluster) => Arc::new(cluster.clone()),
            None => Arc::new(NoStagingCluster),
        };
        let address_ports = AddressPorts::new(config.bind_helper.clone());
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
                dialers: Dialers {
                    mirror: mirror.dialer(),
                    staging: staging_dialer,
                },
                staging: staging_cluster.clone(),
                shards,
                address_ports,
                ops: Mutex::new(()),
                restoring: AtomicBool::new(true),
                restored: CancellationToken::new(),
                cancel: CancellationToken::new(),
                tracker: TaskTracker::new(),
            }),
        };

        let inner = &agent.inner;
        if let Some(cluster) = staging_cluster {
            // Builds the client, and at shutdown kills the credential
            // plugins still running rather than waiting on them.
            let cancel = inner.cancel.clone();
            inner
                .tracker
                .spawn(async move { cluster.run(cancel).await });
        }
        let reporter = inner.reporter.clone();
        let cancel = inner.cancel.clone();
        inner.tracker.spawn(after_restore(
            inner.restored.clone(),
            cancel.clone(),
            async move { reporter.run(cancel).await },
        ));
        let cancel = inner.cancel.clone();
        inner.tracker.spawn(after_restore(
            inner.restored.clone(),
            cancel.clone(),
            async move { mirror.run(cancel).await },
        ));
        let (store, cancel) = (inner.store.clone(), inner.cancel.clone());
        inner.tracker.spawn(async move {
            let mut every = tokio::time::interval(crate::tunnel::SAMPLE_EVERY);
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

        if inner.config.demo {
            tracing::warn!("DEMO MODE: pods come from a built-in stand-in control plane");
        }
        if let Some(note) = &inner.config.address_block_note {
            tracing::warn!("{note}");
        }
        if let (Some(block), Ok(own)) = (
            inner.config.address_block,
            crate::tunnel::AddressBlock::of_this_user(),
        ) {
            if inner.config.name_ports && !block.within(&own) {
                tracing::warn!(
                    %block,
                    own = %own,
                    "the address block set is not this user's own: the bind helper will not \
                     bind there for this user, and the NSS module will not answer names there"
                );
            }
        }
        if cfg!(not(target_os = "linux")) && inner.config.name_ports {
            // Only Linux routes all of 127/8 to the loopback interface.
            tracing::warn!(
                block = ?inner.config.address_block,
                "pod addresses need loopback aliases here (`sudo ifconfig lo0 alias <address> up`); \
                 a pod whose address is missing says which, and its range port works meanwhile"
            );
        }
        Ok(agent)
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
    /// rewrites the hosts file (dropping a stale block from a crash). Until
    /// it is done, `/health` says `restoring` and pushes wait their turn.
    pub async fn restore(&self) -> Result<(), AgentError> {
        let _op = self.inner.ops.lock().await;
        let stored = self.inner.db.load().await?;
        let mut ids = Vec::with_capacity(stored.len());
        {
            let mut map = self.inner.store.write();
            for StoredPod {
                spec,
                forwarding,
                target,
                via,
                address,
                ports,
                ..
            } in stored
            {
                let id = spec.id.clone();
                let mut entry = self.new_entry(spec, target, via, ports, forwarding);
                entry.address = address;
                map.insert(id.clone(), entry);
                ids.push(id);
            }
        }
        // Every remembered port is claimed before any is bound, so a pod
        // that must move cannot take another pod's remembered port.
        let mut in_use = InUse::of(&self.inner.store.read());
        for batch in ids.chunks(RESTORE_BATCH) {
            {
                let mut map = self.inner.store.write();
                for id in batch {
                    if let Some(entry) = map.get_mut(id) {
                        self.open_ports(entry, &mut in_use);
                    }
                }
            }
            tokio::task::yield_now().await;
        }
        if !ids.is_empty() {
            tracing::info!(pods = ids.len(), "restored pods from the state dir");
        }
        self.save(&ids, &[]).await?;
        self.write_names().await;
        self.inner
            .restoring
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.inner.restored.cancel();
        if !ids.is_empty() {
            self.events().publish(AgentEvent::PodsChanged {
                applied: ids,
                removed: Vec::new(),
            });
        }
        Ok(())
    }
}

/// Runs `task` once the restore is done, unless the agent stops first.
async fn after_restore(
    restored: CancellationToken,
    cancel: CancellationToken,
    task: impl std::future::Future<Output = ()>,
) {
    tokio::select! {
        _ = restored.cancelled() => task.await,
        _ = cancel.cancelled() => {}
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
