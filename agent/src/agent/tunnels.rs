//! Tunnel bookkeeping: which listeners each pod holds. A pod's range port
//! (its remembered one first), its own loopback address, and the listeners
//! there on its own port and its range port are opened, moved after an
//! update and retried after a removal frees a port; every failure is
//! recorded on the pod with its reason, never fatal.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use super::Agent;
use crate::events::AgentEvent;
use crate::model::{PodSpec, TunnelState, TunnelTarget};
use crate::state::{PodEntry, PodMap};
use crate::tunnel::CannotListen;
use crate::tunnel::{RunningTunnel, TunnelShared};

impl Agent {
    /// Inserts or updates one pod. An existing tunnel keeps its port and
    /// listener; a new target applies to new connections, and a new pod
    /// port moves the name listener (the old one, to close, is returned).
    pub(super) fn upsert(
        &self,
        map: &mut PodMap,
        spec: PodSpec,
        in_use: &mut InUse,
    ) -> Option<RunningTunnel> {
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
            self.inner.config.max_tunnel_connections,
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
            names: Default::default(),
        };
        self.open_listener(&mut entry, in_use);
        map.insert(id, entry);
        None
    }

    /// Gives failed tunnels another try; returns the ids that changed.
    pub(super) fn retry_failed(&self, map: &mut PodMap) -> Vec<String> {
        if !self.inner.config.forwarding {
            return Vec::new();
        }
        let failed: Vec<String> = map
            .iter()
            .filter(|(_, e)| e.forwarding && e.listener.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        let mut in_use = InUse::of(map);
        for id in &failed {
            if let Some(entry) = map.get_mut(id) {
                self.open_listener(entry, &mut in_use);
            }
        }
        failed
    }

    /// Binds a port for `entry` (its remembered one first) and starts its
    /// listener, or records why it could not.
    pub(super) fn open_listener(&self, entry: &mut PodEntry, in_use: &mut InUse) {
        // `--forwarding off`: the pod is held, mirrored and reported, its
        // tunnel stopped (health says why, once for all pods).
        if !self.inner.config.forwarding {
            return;
        }
        let listen_ip = self.inner.listen_ip;
        // Another pod's port is taken; the pod's own remembered one is not.
        let own = entry.local_port;
        let taken = |port: u16| Some(port) != own && in_use.ports.contains(&port);
        let allocation = self.inner.ports.allocate(entry.local_port, &taken, |port| {
            crate::tunnel::bind_listener(SocketAddr::new(listen_ip, port))
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
                        in_use.ports.insert(allocation.port);
                        entry.local_port = Some(allocation.port);
                        entry.port_note = note;
                        entry.failure = None;
                        entry.listener = Some(listener);
                        self.open_name_listeners(entry, &mut in_use.addresses);
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
    fn open_name_listeners(&self, entry: &mut PodEntry, taken: &mut HashSet<Ipv4Addr>) {
        entry.name_port_error = None;
        if !self.inner.config.name_ports {
            return;
        }
        let block = self.inner.config.address_block;
        // The pod's own remembered address is not taken from it.
        let own = entry.address.filter(|own| taken.remove(own));
        let allocated = block.allocate(&entry.spec.id, entry.address, taken);
        taken.extend(own);
        let Some(address) = allocated else {
            entry.name_port_error = Some(format!("every address in {block} is taken"));
            return;
        };
        taken.insert(address);
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
        self.inner
            .address_ports
            .bind(addr)
            .and_then(|listener| {
                RunningTunnel::spawn(
                    listener,
                    Arc::clone(&entry.tunnel),
                    &self.inner.shards,
                    &self.inner.tracker,
                    &self.inner.cancel,
                )
                .map_err(|err| CannotListen::new(addr, &err))
            })
            .inspect_err(|why| tracing::warn!(pod_id = %entry.spec.id, "{why}"))
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
}

/// The ports and addresses our pods hold: gathered once per operation (a
/// walk over the pods) and kept up to date as the operation hands out more,
/// so each pod costs O(1) however many there are. A pod's own port and
/// address count as free for it.
#[derive(Debug, Default)]
pub(super) struct InUse {
    ports: HashSet<u16>,
    addresses: HashSet<Ipv4Addr>,
}

impl InUse {
    pub(super) fn of(map: &PodMap) -> Self {
        Self {
            ports: map.values().filter_map(|entry| entry.local_port).collect(),
            addresses: map.values().filter_map(|entry| entry.address).collect(),
        }
    }
}
