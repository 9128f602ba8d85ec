//! One pod as the store holds it: its spec, its own address and names, and
//! a tunnel per TCP port (range port, toggle, listeners, counters), with
//! the views the API, the report and the dashboard read of them.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use crate::model::{
    Activity, MirrorView, PodSpec, PortSpec, PortTunnelView, Protocol, Redirection, StagingVia,
    TunnelState, TunnelTarget, Way,
};
use crate::state::persist::{RememberedPort, StoredPod};
use crate::tunnel::{PodWays, RunningTunnel, TunnelShared};

/// Most ports a pod remembers after they left it: enough for any real
/// pod's history, bounded for one that churns its ports.
const MAX_DEPARTED_PORTS: usize = 64;

/// The tunnel of one TCP port of a pod.
#[derive(Debug)]
pub struct PortTunnel {
    /// The pod's port this tunnel forwards to.
    pub staging_port: u16,
    /// The user's toggle: false means the port refuses connections.
    pub forwarding: bool,
    /// The range port this port owns (kept while forwarding is off).
    pub local_port: Option<u16>,
    /// How the range port was chosen, when not the first choice.
    pub port_note: Option<String>,
    /// Why there is no listener although forwarding is on.
    pub failure: Option<String>,
    /// Target and counters, shared with the listeners and their connections.
    pub tunnel: Arc<TunnelShared>,
    /// The listener on the range port, while forwarding.
    pub listener: Option<RunningTunnel>,
    /// Listeners on the pod's own address: at `staging_port`, and at the
    /// range port unless that is another port of the same pod.
    pub name_listeners: Vec<RunningTunnel>,
    /// Why `staging_port` cannot listen on the pod's address.
    pub name_port_error: Option<String>,
}

impl PortTunnel {
    /// A port's tunnel, not listening yet, with what was remembered of it.
    pub fn new(tunnel: Arc<TunnelShared>, remembered: RememberedPort) -> Self {
        Self {
            staging_port: remembered.staging_port,
            forwarding: remembered.forwarding,
            local_port: remembered.local_port,
            port_note: None,
            failure: None,
            tunnel,
            listener: None,
            name_listeners: Vec::new(),
            name_port_error: None,
        }
    }

    pub fn state(&self) -> TunnelState {
        if self.failure.is_some() {
            TunnelState::Failed
        } else if self.listener.is_some() {
            TunnelState::Active
        } else {
            TunnelState::Stopped
        }
    }

    /// Every listener of this port, taken out to be closed.
    pub fn take_listeners(&mut self) -> Vec<RunningTunnel> {
        let mut all: Vec<RunningTunnel> = self.name_listeners.drain(..).collect();
        all.extend(self.listener.take());
        all
    }

    /// Whether the port listens on the pod's address at its own number.
    pub fn name_port_listening(&self) -> bool {
        self.name_listeners
            .iter()
            .any(|listener| listener.local_addr().port() == self.staging_port)
    }

    /// `http://<name>/` (with the port when it is not 80), while the port
    /// listens on the pod's address.
    fn name_url(&self, name: Option<&String>) -> Option<String> {
        if !self.name_port_listening() {
            return None;
        }
        let name = name?;
        Some(match self.staging_port {
            80 => format!("http://{name}/"),
            port => format!("http://{name}:{port}/"),
        })
    }

    pub fn remembered(&self) -> RememberedPort {
        RememberedPort {
            staging_port: self.staging_port,
            local_port: self.local_port,
            forwarding: self.forwarding,
        }
    }

    /// The problem now: why it cannot listen, else the last connection's.
    fn error(&self, current: Option<String>) -> Option<String> {
        match self.state() {
            TunnelState::Failed => self.failure.clone(),
            _ => current,
        }
    }

    fn view(&self, spec: &PortSpec, name: Option<&String>) -> PortTunnelView {
        let stats = self.tunnel.stats();
        let (last_error, last_error_at) = match stats.last_error {
            Some((message, at)) => (Some(message), Some(at)),
            None => (self.failure.clone(), None),
        };
        PortTunnelView {
            staging_port: self.staging_port,
            local_port: self.local_port,
            name: spec.name.clone(),
            protocol: spec.protocol,
            forwarding: self.forwarding,
            status: self.state(),
            error: self.error(stats.current_error),
            name_port: self.name_port_listening().then_some(self.staging_port),
            name_url: self.name_url(name),
            open_connections: stats.open_connections,
            total_connections: stats.total_connections,
            bytes_to_pod: stats.bytes_to_pod,
            bytes_from_pod: stats.bytes_from_pod,
            last_error,
            last_error_at,
            port_note: self.port_note.clone(),
        }
    }
}

/// A port that is listed and never tunnelled (UDP, SCTP), as the views show it.
fn untunnelled_view(spec: &PortSpec) -> PortTunnelView {
    PortTunnelView {
        error: Some(format!("{} is not tunnelled", spec.protocol.as_str())),
        ..PortTunnelView::without_tunnel(spec)
    }
}

/// One pod and everything about its tunnels.
#[derive(Debug)]
pub struct PodEntry {
    pub spec: PodSpec,
    /// Where every port's new connections go: the staging pod or its mirror.
    pub target: TunnelTarget,
    /// How the staging pod is reached, when the pod was given its own way
    /// (else the agent's `--staging-via`).
    pub via: Option<StagingVia>,
    /// What its ports share about reaching it (its staging name, which way works).
    pub ways: Arc<PodWays>,
    /// One tunnel per TCP port, in the spec's order: the first is the
    /// pod's primary (the seed's one port).
    pub tunnels: Vec<PortTunnel>,
    /// Ports that left the pod, by staging port: what they get back if
    /// they return (their range port only if it is still free).
    pub departed: BTreeMap<u16, RememberedPort>,
    /// The pod's own loopback address (its names point here), when name
    /// ports are on; kept while forwarding is off.
    pub address: Option<Ipv4Addr>,
    /// Addresses the pod left because another process held one of its
    /// ports there: not tried again while the agent runs.
    pub refused_addresses: std::collections::HashSet<Ipv4Addr>,
    /// The pod's mirror in the local cluster, as last seen.
    pub mirror: Option<MirrorView>,
    /// The names it answers to (decided over every pod when names are written).
    pub names: crate::model::AssignedNames,
}

impl PodEntry {
    /// Whether the pod's names may be published: it is not paused, and on
    /// an address of its own every port of it is on and listening, so
    /// every listener of the pod there is this agent's own (a port that is
    /// off, or failed, leaves a number there that another user could take;
    /// a port that another process held moved the pod elsewhere). A name
    /// never leads to an address where someone else may answer. Without an
    /// address of its own (name ports off, no block) its names lead to the
    /// tunnels' host, where its ports are the range ports this agent holds.
    pub fn publishes_names(&self) -> bool {
        let paused = self.tunnels.iter().all(|port| !port.forwarding);
        if self.address.is_none() {
            return !paused;
        }
        !paused
            && self
                .tunnels
                .iter()
                .all(|port| port.forwarding && port.listener.is_some())
    }

    /// The first TCP port's tunnel, whose figures the seed's fields show.
    pub fn primary(&self) -> Option<&PortTunnel> {
        self.tunnels.first()
    }

    /// The tunnel of one staging port.
    pub fn port_mut(&mut self, staging_port: u16) -> Option<&mut PortTunnel> {
        self.tunnels
            .iter_mut()
            .find(|port| port.staging_port == staging_port)
    }

    /// The primary port's state.
    pub fn state(&self) -> TunnelState {
        self.primary()
            .map_or(TunnelState::Stopped, PortTunnel::state)
    }

    /// The primary port's toggle (the pod's toggle sets every port's).
    pub fn forwarding(&self) -> bool {
        self.primary().is_some_and(|port| port.forwarding)
    }

    /// Every listener of every port, taken out to be closed.
    pub fn take_listeners(&mut self) -> Vec<RunningTunnel> {
        self.tunnels
            .iter_mut()
            .flat_map(PortTunnel::take_listeners)
            .collect()
    }

    /// Keeps what a port that left the pod had, for its return.
    pub fn remember_departed(&mut self, port: RememberedPort) {
        if self.departed.len() < MAX_DEPARTED_PORTS
            || self.departed.contains_key(&port.staging_port)
        {
            self.departed.insert(port.staging_port, port);
        }
    }

    /// `http://<name>-staging.local/` (with the port when it is not 80),
    /// while the primary port listens on the pod's address.
    pub fn name_url(&self) -> Option<String> {
        self.primary()?.name_url(self.names.names.first())
    }

    /// The pod's staging `ip:port`, where its primary tunnel forwards.
    pub fn target(&self) -> SocketAddr {
        SocketAddr::new(self.spec.ip, self.spec.staging_port())
    }

    /// What goes to disk for this pod: every port, also those that left.
    pub fn stored(&self) -> StoredPod {
        let primary = self.primary();
        let ports = self
            .tunnels
            .iter()
            .map(PortTunnel::remembered)
            .chain(self.departed.values().copied())
            .collect();
        StoredPod {
            spec: self.spec.clone(),
            local_port: primary.and_then(|port| port.local_port),
            forwarding: primary.is_none_or(|port| port.forwarding),
            target: self.target,
            via: self.via,
            address: self.address,
            ports,
        }
    }

    /// The last minute of every port together, for the dashboard.
    pub fn activity(&self) -> Activity {
        crate::tunnel::combined_activity(self.tunnels.iter().map(|port| port.tunnel.as_ref()))
    }

    /// Every port of the pod as the views list it, in the order pushed.
    fn port_views(&self, names_on: bool) -> Vec<PortTunnelView> {
        let name = names_on.then(|| self.names.names.first()).flatten();
        self.spec
            .ports
            .iter()
            .map(|spec| {
                let tunnel = (spec.protocol == Protocol::Tcp)
                    .then(|| {
                        self.tunnels
                            .iter()
                            .find(|port| port.staging_port == spec.port)
                    })
                    .flatten();
                match tunnel {
                    Some(tunnel) => tunnel.view(spec, name),
                    None => untunnelled_view(spec),
                }
            })
            .collect()
    }

    /// The seed's `PodRedirection` view of the primary port, with live
    /// counters, and every port in `ports`. With names off, the pod's
    /// names are the local host (its range ports are the way).
    pub fn redirection(&self, local_host: &str, names_on: bool) -> Redirection {
        let ports = self.port_views(names_on);
        let primary_port = self.spec.staging_port();
        let primary = ports
            .iter()
            .find(|port| port.staging_port == primary_port && port.protocol == Protocol::Tcp);
        let pick = |field: fn(&PortTunnelView) -> u64| primary.map_or(0, field);
        let (via, way) = self
            .primary()
            .map_or((StagingVia::Direct, Way::Direct), |port| {
                (port.tunnel.route().via, port.tunnel.way())
            });
        Redirection {
            staging_pod_id: self.spec.id.clone(),
            staging_pod_name: self.spec.name.clone(),
            staging_pod_ip: self.spec.ip,
            staging_port: primary_port,
            local_port: primary.and_then(|port| port.local_port),
            local_host: local_host.to_owned(),
            dns_name: if names_on {
                self.spec.dns_name()
            } else {
                local_host.to_owned()
            },
            localhost_name: if names_on {
                self.spec.localhost_name()
            } else {
                local_host.to_owned()
            },
            status: self.state(),
            error: primary.and_then(|port| port.error.clone()),
            forwarding: self.forwarding(),
            target: self.target,
            via,
            way,
            way_label: way.describe().to_owned(),
            namespace: self.spec.namespace.clone(),
            pod_status: self.spec.status.clone(),
            open_connections: pick(|port| port.open_connections),
            total_connections: pick(|port| port.total_connections),
            bytes_to_pod: pick(|port| port.bytes_to_pod),
            bytes_from_pod: pick(|port| port.bytes_from_pod),
            last_error: primary.and_then(|port| port.last_error.clone()),
            last_error_at: primary.and_then(|port| port.last_error_at),
            port_note: primary.and_then(|port| port.port_note.clone()),
            mirror: self.mirror.clone(),
            address: self.address,
            name_port: primary.and_then(|port| port.name_port),
            name_port_error: self.primary().and_then(|port| port.name_port_error.clone()),
            name_url: self.name_url(),
            names: self.names.names.clone(),
            name_note: self.names.note.clone(),
            ports,
        }
    }
}
