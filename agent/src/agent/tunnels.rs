//! Tunnel bookkeeping: which listeners each pod holds. Every TCP port of a
//! pod gets a range port (its remembered one first), and listeners on the
//! pod's own loopback address at its own number and at its range port. An
//! update opens the ports that came, closes the ports that left (keeping
//! their numbers for their return) and leaves the others untouched; ports
//! are retried after a removal frees one; every failure is recorded on its
//! port with the reason, never fatal.
//!
//! A pod's address is used only while every listener of the pod there is
//! ours: any user may bind a port from 1024 up on any loopback address, so
//! where another process already holds one of the pod's ports on its
//! address (`EADDRINUSE`), the pod moves to a fresh address of this user's
//! block and says so, rather than have its names lead to someone else.

use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use super::Agent;
use crate::events::AgentEvent;
use crate::model::{PodSpec, StagingVia, TunnelState, TunnelTarget};
use crate::state::{PodEntry, PodMap, PortTunnel, RememberedPort};
use crate::tunnel::{BlockFull, CannotListen};
use crate::tunnel::{PodWays, Route, RunningTunnel, StagingPod, TunnelShared};

impl Agent {
    /// A pod's entry with a tunnel per TCP port, none listening yet: each
    /// port with what was remembered of it, else `forwarding` and no port.
    pub(super) fn new_entry(
        &self,
        spec: PodSpec,
        target: TunnelTarget,
        via: Option<StagingVia>,
        remembered: Vec<RememberedPort>,
        forwarding: bool,
    ) -> PodEntry {
        let ways = Arc::new(PodWays::new(
            staging_pod(&spec),
            self.inner.config.staging.direct_retry,
        ));
        let route = |staging_port: u16| Route {
            target: SocketAddr::new(spec.ip, staging_port),
            mode: target,
            via: via.unwrap_or(self.inner.config.staging.via),
        };
        let mut departed: BTreeMap<u16, RememberedPort> = remembered
            .into_iter()
            .map(|port| (port.staging_port, port))
            .collect();
        let tunnels = spec
            .tcp_ports()
            .map(|staging_port| {
                let remembered = departed.remove(&staging_port).unwrap_or(RememberedPort {
                    staging_port,
                    local_port: None,
                    forwarding,
                });
                PortTunnel::new(
                    self.port_tunnel(&spec.id, route(staging_port), &ways),
                    remembered,
                )
            })
            .collect();
        let mut entry = PodEntry {
            spec,
            target,
            via,
            ways,
            tunnels,
            departed: BTreeMap::new(),
            address: None,
            refused_addresses: Default::default(),
            mirror: None,
            names: Default::default(),
        };
        for port in departed.into_values() {
            entry.remember_departed(port);
        }
        entry
    }

    /// The shared half of one port's tunnel: where it forwards, its counters.
    fn port_tunnel(&self, pod_id: &str, route: Route, ways: &Arc<PodWays>) -> Arc<TunnelShared> {
        TunnelShared::new(
            pod_id.to_owned(),
            route,
            self.inner.dialers.clone(),
            Arc::clone(ways),
            self.events().clone(),
            self.inner.config.max_tunnel_connections,
        )
    }

    /// How a pod's staging pod is reached, its own way first.
    pub(super) fn via_of(&self, entry: &PodEntry) -> StagingVia {
        entry.via.unwrap_or(self.inner.config.staging.via)
    }

    /// Inserts or updates one pod, opening its ports' listeners. Returns
    /// the listeners to close: those of ports that left the pod.
    pub(super) fn upsert(
        &self,
        map: &mut PodMap,
        spec: PodSpec,
        in_use: &mut InUse,
    ) -> Vec<RunningTunnel> {
        if let Some(entry) = map.get_mut(&spec.id) {
            return self.update(entry, spec, in_use);
        }
        let id = spec.id.clone();
        let mut entry = self.new_entry(spec, TunnelTarget::Staging, None, Vec::new(), true);
        self.open_ports(&mut entry, in_use);
        map.insert(id, entry);
        Vec::new()
    }

    /// Moves only what changed: a port kept keeps its listeners, range port
    /// and live connections (new ones follow a new pod address); a port
    /// that left is closed and remembered; a port that came is opened, with
    /// its old range port when it had one and it is still free.
    fn update(
        &self,
        entry: &mut PodEntry,
        spec: PodSpec,
        in_use: &mut InUse,
    ) -> Vec<RunningTunnel> {
        let ip_changed = entry.spec.ip != spec.ip;
        if ip_changed {
            tracing::info!(pod_id = %spec.id, ip = %spec.ip, "pod moved; new connections go to its new address");
        }
        // A paused pod (every port off) stays paused when a port comes.
        let paused = !entry.tunnels.is_empty() && entry.tunnels.iter().all(|t| !t.forwarding);
        let wanted: Vec<u16> = spec.tcp_ports().collect();
        let old_primary = entry.primary().map(|port| port.staging_port);
        if staging_pod(&spec) != staging_pod(&entry.spec) {
            entry.ways.set_pod(staging_pod(&spec));
        }
        entry.spec = spec;
        let (mut kept, mut gone): (Vec<PortTunnel>, Vec<PortTunnel>) = entry
            .tunnels
            .drain(..)
            .partition(|port| wanted.contains(&port.staging_port));
        // The pod's one port renumbered (80 became 8080): as before ports
        // had tunnels of their own, its tunnel follows, keeping its range
        // port; only its listener on the pod's address moves.
        let mut renumbered = None;
        if let (Some(old), Some(&new)) = (old_primary, wanted.first()) {
            let new_is_new = !kept.iter().any(|port| port.staging_port == new)
                && !entry.departed.contains_key(&new);
            if let Some(index) = gone
                .iter()
                .position(|port| port.staging_port == old)
                .filter(|_| new_is_new)
            {
                let mut port = gone.remove(index);
                port.staging_port = new;
                kept.push(port);
                renumbered = Some((new, old));
            }
        }
        let mut closing = Vec::new();
        for mut port in gone {
            tracing::info!(pod_id = %entry.spec.id, port = port.staging_port, "port left the pod; its tunnel closes");
            closing.extend(port.take_listeners());
            entry.remember_departed(port.remembered());
        }
        let mut tunnels = Vec::with_capacity(wanted.len());
        for staging_port in wanted {
            if let Some(index) = kept.iter().position(|p| p.staging_port == staging_port) {
                tunnels.push(kept.swap_remove(index));
                continue;
            }
            let mut remembered = entry
                .departed
                .remove(&staging_port)
                .unwrap_or(RememberedPort {
                    staging_port,
                    local_port: None,
                    forwarding: !paused,
                });
            // Its old number only if no other tunnel took it meanwhile, and
            // then claimed at once (it may not listen now: paused), so no
            // other port of this push is given it too.
            remembered.local_port = remembered
                .local_port
                .filter(|port| !in_use.ports.contains(port));
            in_use.ports.extend(remembered.local_port);
            // A paused pod stays paused, whatever the port was before.
            remembered.forwarding &= !paused;
            let route = Route {
                target: SocketAddr::new(entry.spec.ip, staging_port),
                mode: entry.target,
                via: self.via_of(entry),
            };
            let tunnel = self.port_tunnel(&entry.spec.id, route, &entry.ways);
            tunnels.push(PortTunnel::new(tunnel, remembered));
        }
        entry.tunnels = tunnels;
        if ip_changed || renumbered.is_some() {
            for port in &entry.tunnels {
                port.tunnel
                    .set_target(SocketAddr::new(entry.spec.ip, port.staging_port));
            }
        }
        if let Some((new, old)) = renumbered {
            closing.extend(self.move_name_port(entry, new, old));
        }
        self.open_ports(entry, in_use);
        closing
    }

    /// Gives failed tunnels another try; returns the ids that changed.
    pub(super) fn retry_failed(&self, map: &mut PodMap) -> Vec<String> {
        if !self.inner.config.forwarding {
            return Vec::new();
        }
        let failed: Vec<String> = map
            .iter()
            .filter(|(_, entry)| {
                entry
                    .tunnels
                    .iter()
                    .any(|port| port.forwarding && port.listener.is_none())
            })
            .map(|(id, _)| id.clone())
            .collect();
        let mut in_use = InUse::of(map);
        for id in &failed {
            if let Some(entry) = map.get_mut(id) {
                self.open_ports(entry, &mut in_use);
            }
        }
        failed
    }

    /// Opens every port of `entry` that is on and not listening.
    pub(super) fn open_ports(&self, entry: &mut PodEntry, in_use: &mut InUse) {
        for index in 0..entry.tunnels.len() {
            let port = &entry.tunnels[index];
            if port.forwarding && port.listener.is_none() {
                self.open_port(entry, index, in_use);
            }
        }
    }

    /// Binds a range port for one port of `entry` (its remembered one
    /// first) and starts its listeners, or records why it could not.
    pub(super) fn open_port(&self, entry: &mut PodEntry, index: usize, in_use: &mut InUse) {
        // `--forwarding off`: the pod is held, mirrored and reported, its
        // tunnels stopped (health says why, once for all pods).
        if !self.inner.config.forwarding {
            return;
        }
        let listen_ip = self.inner.listen_ip;
        let pod_id = entry.spec.id.clone();
        let Some(port) = entry.tunnels.get_mut(index) else {
            return;
        };
        // Another tunnel's port is taken; this port's own remembered one is not.
        let own = port.local_port;
        let taken = |number: u16| Some(number) != own && in_use.ports.contains(&number);
        let allocation = self.inner.ports.allocate(own, &taken, |number| {
            crate::tunnel::bind_listener(SocketAddr::new(listen_ip, number))
        });
        match allocation {
            Ok(allocation) => {
                let note = allocation.note();
                if let Some(note) = &note {
                    tracing::warn!(%pod_id, port = port.staging_port, "{note}");
                }
                match RunningTunnel::spawn(
                    allocation.listener,
                    Arc::clone(&port.tunnel),
                    &self.inner.shards,
                    &self.inner.tracker,
                    &self.inner.cancel,
                ) {
                    Ok(listener) => {
                        in_use.ports.insert(allocation.port);
                        port.local_port = Some(allocation.port);
                        port.port_note = note;
                        port.failure = None;
                        port.listener = Some(listener);
                    }
                    Err(err) => {
                        port.failure =
                            Some(format!("cannot listen on port {}: {err}", allocation.port));
                    }
                }
            }
            Err(err) => {
                tracing::warn!(%pod_id, port = port.staging_port, error = %err, "tunnel cannot listen");
                port.failure = Some(err.to_string());
            }
        }
        if port.failure.is_some() {
            let error = port.failure.clone();
            self.events().publish(AgentEvent::TunnelChanged {
                pod_id,
                state: TunnelState::Failed,
                error,
            });
            return;
        }
        self.open_name_listeners(entry, index, &mut in_use.addresses);
    }

    /// The pod's own loopback address (its remembered one first), when name
    /// ports are on; why there is none when every address is taken.
    fn pod_address(
        &self,
        entry: &mut PodEntry,
        taken: &mut HashSet<Ipv4Addr>,
    ) -> Option<Result<Ipv4Addr, BlockFull>> {
        if !self.inner.config.name_ports {
            return None;
        }
        let block = self.inner.config.address_block?;
        // The pod's own remembered address is not taken from it.
        let own = entry.address.filter(|own| taken.remove(own));
        let allocated = block.allocate(&entry.spec.id, entry.address, taken);
        taken.extend(own);
        let Some(address) = allocated else {
            return Some(Err(BlockFull {
                block: block.to_string(),
            }));
        };
        taken.insert(address);
        entry.address = Some(address);
        Some(Ok(address))
    }

    /// Listens on the pod's own address at the port's own number and at its
    /// range port, so both `<name>-staging.local:<port>` and
    /// `<name>-staging.local:<range port>` work. The range port is left out
    /// when it is another port of the pod's (that port's own listener is
    /// there). A port that cannot listen is noted with the reason, never
    /// fatal; one that another process holds moves the whole pod to a fresh
    /// address (at most [`MAX_ADDRESS_MOVES`] times).
    fn open_name_listeners(
        &self,
        entry: &mut PodEntry,
        index: usize,
        taken: &mut HashSet<Ipv4Addr>,
    ) {
        for _ in 0..=MAX_ADDRESS_MOVES {
            // This port, then the pod's other listening ports (a no-op
            // where they listen already; after a move, their new listeners).
            let held = self.try_name_listeners(entry, index, taken).or_else(|| {
                (0..entry.tunnels.len())
                    .filter(|other| *other != index)
                    .filter(|other| {
                        entry
                            .tunnels
                            .get(*other)
                            .is_some_and(|p| p.listener.is_some())
                    })
                    .collect::<Vec<_>>()
                    .into_iter()
                    .find_map(|other| self.try_name_listeners(entry, other, taken))
            });
            let Some(held) = held else {
                return;
            };
            // Held elsewhere: this address is not the pod's to use. Every
            // port of the pod leaves it, and tries the next free one.
            let Some(old) = entry.address.take() else {
                return;
            };
            tracing::warn!(
                pod_id = %entry.spec.id,
                address = %old,
                "another process holds {held} on the pod's address; the pod moves to a fresh \
                 address so its names never lead there"
            );
            entry.refused_addresses.insert(old);
            taken.insert(old);
            let mut leaving = Vec::new();
            for port in &mut entry.tunnels {
                leaving.append(&mut port.name_listeners);
                port.name_port_error = None;
            }
            self.close_later(leaving);
            if let Some(port) = entry.tunnels.get_mut(index) {
                port.port_note = Some(format!(
                    "moved from {old}: another process holds {held} there, so the pod's names \
                     never point at it"
                ));
            }
        }
        let gave_up = format!(
            "cannot listen on an address of its own: another process held the pod's port on \
             {} addresses in a row; names point at the range port",
            MAX_ADDRESS_MOVES + 1
        );
        tracing::warn!(pod_id = %entry.spec.id, "{gave_up}");
        if let Some(address) = entry.address.take() {
            entry.refused_addresses.insert(address);
        }
        let mut leaving = Vec::new();
        for port in &mut entry.tunnels {
            leaving.append(&mut port.name_listeners);
        }
        self.close_later(leaving);
        if let Some(port) = entry.tunnels.get_mut(index) {
            port.name_port_error = Some(gave_up);
        }
    }

    /// One try of [`Self::open_name_listeners`] on the pod's current
    /// address: `Some(addr)` when another process holds `addr` there.
    fn try_name_listeners(
        &self,
        entry: &mut PodEntry,
        index: usize,
        taken: &mut HashSet<Ipv4Addr>,
    ) -> Option<SocketAddr> {
        // Addresses this pod left because another process held them are
        // not tried again while the agent runs.
        taken.extend(entry.refused_addresses.iter().copied());
        let address = match self.pod_address(entry, taken) {
            None => return None,
            Some(Ok(address)) => address,
            Some(Err(why)) => {
                if let Some(port) = entry.tunnels.get_mut(index) {
                    port.name_port_error = Some(why.to_string());
                }
                return None;
            }
        };
        let pod_ports: HashSet<u16> = entry.tunnels.iter().map(|p| p.staging_port).collect();
        let pod_id = entry.spec.id.clone();
        let port = entry.tunnels.get_mut(index)?;
        port.name_port_error = None;
        let own = port.staging_port;
        let mut numbers = vec![own];
        numbers.extend(
            port.local_port
                .filter(|number| *number != own && !pod_ports.contains(number)),
        );
        for number in numbers {
            let listening = port
                .name_listeners
                .iter()
                .any(|listener| listener.local_addr().port() == number);
            if listening {
                continue;
            }
            match self.listen_by_name(&pod_id, &port.tunnel, address, number) {
                Ok(listener) => port.name_listeners.push(listener),
                Err(CannotListen::Taken { addr }) => return Some(addr),
                Err(why) if number == own => port.name_port_error = Some(why.to_string()),
                Err(_) => {}
            }
        }
        None
    }

    /// Closes listeners off the caller's path (closing waits for their
    /// accept loops): on the agent's tracker, so shutdown waits for them.
    fn close_later(&self, listeners: Vec<RunningTunnel>) {
        if listeners.is_empty() {
            return;
        }
        self.inner.tracker.spawn(async move {
            for listener in listeners {
                listener.close().await;
            }
        });
    }

    /// One listener of a port's on the pod's own address; the reason,
    /// logged, when the port cannot listen.
    fn listen_by_name(
        &self,
        pod_id: &str,
        tunnel: &Arc<TunnelShared>,
        address: Ipv4Addr,
        number: u16,
    ) -> Result<RunningTunnel, CannotListen> {
        let addr = SocketAddr::from((address, number));
        self.inner
            .address_ports
            .bind(addr)
            .and_then(|listener| {
                RunningTunnel::spawn(
                    listener,
                    Arc::clone(tunnel),
                    &self.inner.shards,
                    &self.inner.tracker,
                    &self.inner.cancel,
                )
                .map_err(|err| CannotListen::new(addr, &err))
            })
            .inspect_err(|why| tracing::warn!(%pod_id, "{why}"))
    }

    /// After the pod's one port was renumbered from `old` to `new`: its
    /// listener on the pod's address moves with it, so the name keeps
    /// reaching the pod's current port. Returns the listener to close.
    fn move_name_port(&self, entry: &mut PodEntry, new: u16, old: u16) -> Option<RunningTunnel> {
        let address = entry.address?;
        let pod_id = entry.spec.id.clone();
        let port = entry.port_mut(new)?;
        // Stopped or failed: it listens by name again when it listens at all.
        port.listener.as_ref()?;
        // The old number stays open when it is also the port's range port.
        let closing = (Some(old) != port.local_port)
            .then(|| {
                port.name_listeners
                    .iter()
                    .position(|listener| listener.local_addr().port() == old)
            })
            .flatten()
            .map(|index| port.name_listeners.remove(index));
        port.name_port_error = None;
        let listening = port
            .name_listeners
            .iter()
            .any(|listener| listener.local_addr().port() == new);
        if !listening {
            match self.listen_by_name(&pod_id, &port.tunnel, address, new) {
                Ok(listener) => port.name_listeners.push(listener),
                Err(why) => port.name_port_error = Some(why.to_string()),
            }
        }
        closing
    }
}

/// How many times a pod moves to a fresh address because another process
/// holds one of its ports, before it gives up on an address of its own.
const MAX_ADDRESS_MOVES: usize = 8;

/// The staging pod an `api` connection of `spec`'s goes to.
fn staging_pod(spec: &PodSpec) -> StagingPod {
    StagingPod {
        namespace: spec.namespace.clone(),
        name: spec.name.clone(),
        ip: spec.ip,
    }
}

/// The ports and addresses our pods hold: gathered once per operation (a
/// walk over the pods) and kept up to date as the operation hands out more,
/// so each pod costs O(its ports) however many pods there are. A port's own
/// range port and a pod's own address count as free for it.
#[derive(Debug, Default)]
pub(super) struct InUse {
    ports: HashSet<u16>,
    addresses: HashSet<Ipv4Addr>,
}

impl InUse {
    pub(super) fn of(map: &PodMap) -> Self {
        Self {
            ports: map
                .values()
                .flat_map(|entry| &entry.tunnels)
                .filter_map(|port| port.local_port)
                .collect(),
            addresses: map.values().filter_map(|entry| entry.address).collect(),
        }
    }
}
