//! The operations callers ask of the agent: a push (create, update, delete,
//! sync), a toggle, a target switch, a stop. Each holds the operations lock
//! from start to end, so each sees the last one's result, and keeps the
//! store, the listeners, the state on disk and the names in step.

use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;

use super::tunnels::InUse;
use super::{Agent, AgentError, ApplyOutcome};

/// Pods upserted under one hold of the store's lock; between batches the
/// operation yields, so a push of thousands never stalls the readers.
const BATCH: usize = 256;
use crate::events::AgentEvent;
use crate::model::{Action, PodSpec, Redirection, StagingVia, TunnelTarget};
use crate::names::{assign, Claimant, HostEntry, NamesError};
use crate::state::PodEntry;
use crate::state::StoredPod;
use crate::tunnel::RunningTunnel;

impl Agent {
    /// Why a pod's target leads back into this agent (its API, a tunnel
    /// port, a pod address of its own): a tunnel there would connect to
    /// itself, again and again, until every descriptor is gone. The field
    /// to fix and why; `None` for a target elsewhere.
    pub fn target_loops_back(&self, spec: &PodSpec) -> Option<(&'static str, String)> {
        let config = &self.inner.config;
        let ip = spec.ip;
        if let (IpAddr::V4(v4), Some(block)) = (ip, config.address_block) {
            if block.contains(v4) {
                return Some((
                    "ip",
                    format!(
                        "{ip} is in this agent's own address block {block}: the tunnel would \
                         connect to itself"
                    ),
                ));
            }
        }
        // Every TCP port has a tunnel: each is checked, the first named
        // `port` as the seed's field, the others `ports`.
        spec.tcp_ports().enumerate().find_map(|(index, port)| {
            let field = if index == 0 { "port" } else { "ports" };
            self.port_loops_back(ip, port)
                .map(|message| (field, message))
        })
    }

    /// Why `ip:port` is one of this agent's own listeners, if it is.
    fn port_loops_back(&self, ip: IpAddr, port: u16) -> Option<String> {
        let config = &self.inner.config;
        // A listener on `on` takes connections to `ip` when they are the
        // same, or either is a wildcard (loopback for a wildcard listener).
        let reaches = |on: IpAddr| {
            ip == on || ip.is_unspecified() || (on.is_unspecified() && ip.is_loopback())
        };
        let api = self.inner.local_addr;
        if reaches(api.ip()) && port == api.port() {
            return Some(format!(
                "{ip}:{port} is this agent's own API: the tunnel would connect to itself"
            ));
        }
        if reaches(self.inner.listen_ip) && config.port_range.contains(port) {
            return Some(format!(
                "{ip}:{port} is in this agent's tunnel range {}: the tunnel would connect \
                 to a tunnel of its own",
                config.port_range
            ));
        }
        None
    }

    /// Applies a push: upserts for create/update/sync, removals for delete,
    /// and for sync the removal of every pod not listed and not in `keep`
    /// (ids of pods rejected from this push, which must not be lost).
    #[tracing::instrument(
        name = "push",
        skip_all,
        fields(action = ?action, pods = pods.len(), deletes = delete_ids.len())
    )]
    pub async fn apply(
        &self,
        action: Action,
        pods: Vec<PodSpec>,
        delete_ids: Vec<String>,
        keep: BTreeSet<String>,
    ) -> Result<ApplyOutcome, AgentError> {
        let _op = self.inner.ops.lock().await;
        let mut outcome = ApplyOutcome::default();
        let doomed: Vec<String> = {
            let map = self.inner.store.read();
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
            // The cap on the total, checked before anything changes: a push
            // past it is refused whole.
            let doomed_held: HashSet<&str> = doomed
                .iter()
                .map(String::as_str)
                .filter(|id| map.contains_key(*id))
                .collect();
            let new_ids: HashSet<&str> = pods
                .iter()
                .map(|spec| spec.id.as_str())
                .filter(|id| !map.contains_key(*id))
                .collect();
            let would_hold = map.len() - doomed_held.len() + new_ids.len();
            let limit = self.inner.config.max_pods;
            if would_hold > limit && would_hold > map.len() {
                return Err(AgentError::TooManyPods { would_hold, limit });
            }
            doomed
        };
        // Removals first, and their ports released, so that pods in this
        // same push (or failed ones) can use the freed ports.
        let closing: Vec<RunningTunnel> = {
            let mut map = self.inner.store.write();
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
        let mut upserted = Vec::with_capacity(pods.len());
        let mut moved_away = Vec::new();
        let mut in_use = InUse::of(&self.inner.store.read());
        let mut pods = pods.into_iter().peekable();
        while pods.peek().is_some() {
            {
                let mut map = self.inner.store.write();
                for spec in pods.by_ref().take(BATCH) {
                    let id = spec.id.clone();
                    moved_away.extend(self.upsert(&mut map, spec, &mut in_use));
                    upserted.push(id.clone());
                    outcome.applied.push(id);
                }
            }
            // Readers (status, the dashboard) get the lock between batches.
            tokio::task::yield_now().await;
        }
        // Ports that left pods release their numbers once closed.
        let ports_left = !moved_away.is_empty();
        for listener in moved_away {
            listener.close().await;
        }
        if !outcome.removed.is_empty() || ports_left {
            // Ports freed by removals may let failed tunnels listen now.
            let mut map = self.inner.store.write();
            upserted.extend(self.retry_failed(&mut map));
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

    /// Turns forwarding for one pod on (listen again, on its own ports when
    /// free) or off (close its ports and their connections): every port of
    /// it, or one staging port alone.
    pub async fn set_forwarding(
        &self,
        id: &str,
        enabled: bool,
        port: Option<u16>,
    ) -> Result<Redirection, AgentError> {
        // Turning a tunnel on where no port may listen would change nothing:
        // said, rather than taken in silence.
        if enabled && !self.inner.config.forwarding {
            return Err(AgentError::ForwardingOff);
        }
        let _op = self.inner.ops.lock().await;
        let closing = {
            let mut map = self.inner.store.write();
            let mut in_use = InUse::of(&map);
            let entry = map
                .get_mut(id)
                .ok_or_else(|| AgentError::UnknownPod(id.to_owned()))?;
            let chosen: Vec<usize> = match port {
                None => (0..entry.tunnels.len()).collect(),
                Some(number) => vec![entry
                    .tunnels
                    .iter()
                    .position(|tunnel| tunnel.staging_port == number)
                    .ok_or_else(|| port_not_tunnelled(&entry.spec, number))?],
            };
            let mut closing = Vec::new();
            for index in chosen {
                let Some(tunnel) = entry.tunnels.get_mut(index) else {
                    continue;
                };
                tunnel.forwarding = enabled;
                if enabled {
                    if tunnel.listener.is_none() {
                        self.open_port(entry, index, &mut in_use);
                    }
                } else {
                    tunnel.failure = None;
                    tunnel.name_port_error = None;
                    closing.extend(tunnel.take_listeners());
                }
            }
            closing
        };
        // Names first: a port turned off withdraws them before its number
        // on the pod's address is free for anyone to take; one turned on
        // publishes them once it listens.
        self.write_names().await;
        for listener in closing {
            listener.close().await;
        }
        tracing::info!(pod_id = %id, enabled, port, "forwarding toggled");
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
            .filter(|(_, entry)| entry.tunnels.iter().any(|t| t.forwarding != enabled))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            match self.set_forwarding(id, enabled, None).await {
                // Removed meanwhile by a push: nothing to pause.
                Ok(_) | Err(AgentError::UnknownPod(_)) => {}
                Err(other) => return Err(other),
            }
        }
        Ok(ids.len())
    }

    /// Points one pod's tunnels at the staging pod or its local mirror, and
    /// (`via`, when given) sets how the staging pod is reached; new
    /// connections follow at once, the listeners and the name stay. Kept on disk.
    pub async fn set_target(
        &self,
        id: &str,
        target: TunnelTarget,
        via: Option<StagingVia>,
    ) -> Result<Redirection, AgentError> {
        // The API needs a staging cluster: refused, not taken in silence.
        if via.is_some_and(|via| via != StagingVia::Direct)
            && self.inner.config.staging.context.is_none()
        {
            return Err(AgentError::NoStagingCluster);
        }
        let _op = self.inner.ops.lock().await;
        {
            let mut map = self.inner.store.write();
            let entry = map
                .get_mut(id)
                .ok_or_else(|| AgentError::UnknownPod(id.to_owned()))?;
            entry.target = target;
            if via.is_some() {
                entry.via = via;
            }
            let via = self.via_of(entry);
            for port in &entry.tunnels {
                port.tunnel.set_mode(target, via);
            }
        }
        tracing::info!(pod_id = %id, target = target.as_str(), via = ?via, "tunnel target switched");
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

    /// Writes the named pods (and removals) to disk in one transaction.
    pub(super) async fn save(&self, ids: &[String], removed: &[String]) -> Result<(), AgentError> {
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
    pub(super) async fn write_names(&self) {
        // `--names off`: no pod holds a name, and nothing is written.
        if !self.inner.hosts.enabled() {
            return;
        }
        let ip = self.inner.listen_ip;
        let own_namespace = &self.inner.config.cluster.namespace;
        let entries: Vec<HostEntry> = {
            let mut map = self.inner.store.write();
            let claims: Vec<Claimant<'_>> = map
                .values()
                .map(|entry| Claimant {
                    id: &entry.spec.id,
                    name: &entry.spec.name,
                    namespace: &entry.spec.namespace,
                    created_at: entry.spec.created_at,
                    updated_at: entry.spec.updated_at,
                })
                .collect();
            let mut assigned = assign(&claims, own_namespace);
            for (id, entry) in map.iter_mut() {
                entry.names = assigned.remove(id).unwrap_or_default();
            }
            // One line per name the pod holds (the short one as it always
            // was, then the long one), each also as `.localhost`, which
            // browsers resolve to loopback with no setup.
            map.values()
                .filter(|entry| entry.publishes_names())
                .flat_map(|entry| {
                    let ip = entry.address.map_or(ip, IpAddr::V4);
                    entry.names.names.iter().map(move |name| HostEntry {
                        ip,
                        names: vec![name.clone(), format!("{name}host")],
                    })
                })
                .collect()
        };
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

/// Why `number` cannot be toggled on its own: the pod does not list it, or
/// lists it as a protocol that is not tunnelled.
fn port_not_tunnelled(spec: &PodSpec, number: u16) -> AgentError {
    let listed = spec.ports.iter().find(|port| port.port == number);
    AgentError::UnknownPort {
        id: spec.id.clone(),
        port: number,
        why: match listed {
            Some(port) => format!("{} is not tunnelled", port.protocol.as_str()),
            None => format!(
                "the pod lists {}",
                spec.ports
                    .iter()
                    .map(|port| format!("{}/{}", port.port, port.protocol.as_str()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    }
}
