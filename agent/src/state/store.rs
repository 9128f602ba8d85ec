//! The pod store: the single source of truth for the pods we hold and their
//! tunnels. Readers take snapshots (status, pod list, reports, names); the
//! agent's operations are the only writers, and every change they make is
//! published on the event bus.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use chrono::Utc;

use crate::events::AgentEvent;
use crate::events::EventBus;
use crate::model::{MirrorView, PodSpec, PodView, Redirection, StatusResponse, TunnelState};
use crate::state::persist::StoredPod;
use crate::tunnel::{RunningTunnel, TunnelShared};

/// One pod and everything about its tunnel.
#[derive(Debug)]
pub struct PodEntry {
    pub spec: PodSpec,
    /// The user's toggle: false means the port refuses connections.
    pub forwarding: bool,
    /// The local port this pod owns (kept while forwarding is off).
    pub local_port: Option<u16>,
    /// How the port was chosen, when not the first choice.
    pub port_note: Option<String>,
    /// Why there is no listener although forwarding is on.
    pub failure: Option<String>,
    /// Target and counters, shared with the listener and its connections.
    pub tunnel: Arc<TunnelShared>,
    /// The listener, while forwarding.
    pub listener: Option<RunningTunnel>,
    /// The pod's own loopback address (its names point here), when name
    /// ports are on; kept while forwarding is off.
    pub address: Option<Ipv4Addr>,
    /// Listeners on `address`: the pod's own port and the range port.
    pub name_listeners: Vec<RunningTunnel>,
    /// Why the pod's own port cannot listen on its address.
    pub name_port_error: Option<String>,
    /// The pod's mirror in the local cluster, as last seen.
    pub mirror: Option<MirrorView>,
    /// The names it answers to (decided over every pod when names are written).
    pub names: crate::model::AssignedNames,
}

impl PodEntry {
    pub fn state(&self) -> TunnelState {
        if self.failure.is_some() {
            TunnelState::Failed
        } else if self.listener.is_some() {
            TunnelState::Active
        } else {
            TunnelState::Stopped
        }
    }

    /// Every listener of this pod, taken out to be closed.
    pub fn take_listeners(&mut self) -> Vec<RunningTunnel> {
        let mut all: Vec<RunningTunnel> = self.name_listeners.drain(..).collect();
        all.extend(self.listener.take());
        all
    }

    /// Whether the pod's own port listens on its own address.
    fn name_port_listening(&self) -> bool {
        let own = self.spec.staging_port();
        self.name_listeners
            .iter()
            .any(|listener| listener.local_addr().port() == own)
    }

    /// `http://<name>-staging.local/` (with the port when it is not 80),
    /// while the pod's own port listens on its address.
    pub fn name_url(&self) -> Option<String> {
        if !self.name_port_listening() {
            return None;
        }
        let name = self.names.names.first()?;
        Some(match self.spec.staging_port() {
            80 => format!("http://{name}/"),
            port => format!("http://{name}:{port}/"),
        })
    }

    /// The pod's staging `ip:port`, where its tunnel forwards.
    pub fn target(&self) -> SocketAddr {
        SocketAddr::new(self.spec.ip, self.spec.staging_port())
    }

    /// What goes to disk for this pod.
    pub fn stored(&self) -> StoredPod {
        StoredPod {
            spec: self.spec.clone(),
            local_port: self.local_port,
            forwarding: self.forwarding,
            target: self.tunnel.mode(),
            address: self.address,
        }
    }

    /// The seed's `PodRedirection` view, with live counters. With names
    /// off, the pod's names are the local host (its range port is the way).
    pub fn redirection(&self, local_host: &str, names_on: bool) -> Redirection {
        let stats = self.tunnel.stats();
        let state = self.state();
        let error = match state {
            TunnelState::Failed => self.failure.clone(),
            _ => stats.current_error.clone(),
        };
        let (last_error, last_error_at) = match stats.last_error {
            Some((message, at)) => (Some(message), Some(at)),
            None => (self.failure.clone(), None),
        };
        Redirection {
            staging_pod_id: self.spec.id.clone(),
            staging_pod_name: self.spec.name.clone(),
            staging_pod_ip: self.spec.ip,
            staging_port: self.spec.staging_port(),
            local_port: self.local_port,
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
            status: state,
            error,
            forwarding: self.forwarding,
            target: self.tunnel.mode(),
            namespace: self.spec.namespace.clone(),
            pod_status: self.spec.status.clone(),
            open_connections: stats.open_connections,
            total_connections: stats.total_connections,
            bytes_to_pod: stats.bytes_to_pod,
            bytes_from_pod: stats.bytes_from_pod,
            last_error,
            last_error_at,
            port_note: self.port_note.clone(),
            mirror: self.mirror.clone(),
            address: self.address,
            name_port: self.name_port_listening().then(|| self.spec.staging_port()),
            name_port_error: self.name_port_error.clone(),
            name_url: self.name_url(),
            names: self.names.names.clone(),
            name_note: self.names.note.clone(),
        }
    }
}

/// The pods we hold, keyed by pod id.
pub type PodMap = BTreeMap<String, PodEntry>;

/// Shared handle to the pod map.
#[derive(Debug, Clone)]
pub struct Store {
    pods: Arc<RwLock<PodMap>>,
    /// How many pods the map holds, as of the last write: read without the
    /// lock, so `/health` answers while a large push holds it.
    count: Arc<AtomicUsize>,
    local_host: Arc<str>,
    /// Whether pod names are written (views fall back to the local host).
    names_on: bool,
    events: EventBus,
}

/// Write access to the pod map; keeps the lock-free count in step when
/// it is let go.
#[derive(Debug)]
pub struct StoreWrite<'a> {
    map: RwLockWriteGuard<'a, PodMap>,
    count: &'a AtomicUsize,
}

impl std::ops::Deref for StoreWrite<'_> {
    type Target = PodMap;
    fn deref(&self) -> &PodMap {
        &self.map
    }
}

impl std::ops::DerefMut for StoreWrite<'_> {
    fn deref_mut(&mut self) -> &mut PodMap {
        &mut self.map
    }
}

impl Drop for StoreWrite<'_> {
    fn drop(&mut self) {
        self.count.store(self.map.len(), Ordering::Relaxed);
    }
}

impl Store {
    pub fn new(local_host: &str, names_on: bool, events: EventBus) -> Self {
        Self {
            pods: Arc::new(RwLock::new(PodMap::new())),
            count: Arc::new(AtomicUsize::new(0)),
            local_host: Arc::from(local_host),
            names_on,
            events,
        }
    }

    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// Read access; never held across an await.
    pub fn read(&self) -> RwLockReadGuard<'_, PodMap> {
        match self.pods.read() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Write access for the agent's operations; never held across an await.
    pub fn write(&self) -> StoreWrite<'_> {
        let map = match self.pods.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        StoreWrite {
            map,
            count: &self.count,
        }
    }

    /// How many pods are held (as of the last write; takes no lock).
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every tunnel, keyed by pod id.
    pub fn redirections(&self) -> BTreeMap<String, Redirection> {
        self.read()
            .iter()
            .map(|(id, entry)| {
                (
                    id.clone(),
                    entry.redirection(&self.local_host, self.names_on),
                )
            })
            .collect()
    }

    /// `GET /api/v1/pods/status`.
    pub fn status(&self) -> StatusResponse {
        let redirections = self.redirections();
        let count = |state| redirections.values().filter(|r| r.status == state).count();
        StatusResponse {
            total_redirections: redirections.len(),
            active_redirections: count(TunnelState::Active),
            failed_redirections: count(TunnelState::Failed),
            stopped_redirections: count(TunnelState::Stopped),
            redirections,
            timestamp: Utc::now(),
            demo: false,
        }
    }

    /// Every pod with its tunnel, in id order.
    pub fn pod_views(&self) -> Vec<PodView> {
        self.read()
            .values()
            .map(|entry| PodView {
                pod: entry.spec.clone(),
                tunnel: entry.redirection(&self.local_host, self.names_on),
                activity: entry.tunnel.activity(),
            })
            .collect()
    }

    /// Takes every tunnel's throughput sample; tells the dashboard's stream
    /// when a line changed. Returns whether every tunnel's last minute is
    /// all zeros.
    pub fn sample_throughput(&self) -> bool {
        let (mut changed, mut quiet) = (false, true);
        for entry in self.read().values() {
            let (moved, idle) = entry.tunnel.sample_throughput();
            changed |= moved;
            quiet &= idle;
        }
        if changed {
            self.events.traffic_moved();
        }
        quiet
    }

    /// How many of the range's ports our tunnels hold.
    pub fn ports_used(&self) -> usize {
        self.read()
            .values()
            .filter(|entry| entry.local_port.is_some())
            .count()
    }

    /// Records what the cluster says of a pod's mirror; tells subscribers
    /// only when it changed. Unknown pods are ignored (a mirror outlives its
    /// pod until the next garbage collection).
    pub fn set_mirror(&self, id: &str, mirror: Option<MirrorView>) {
        let changed = {
            let mut pods = self.write();
            match pods.get_mut(id) {
                Some(entry) if entry.mirror != mirror => {
                    entry.mirror = mirror;
                    true
                }
                _ => false,
            }
        };
        if changed {
            self.events.publish(AgentEvent::MirrorChanged {
                pod_id: id.to_owned(),
            });
        }
    }

    /// One pod with its tunnel.
    pub fn pod_view(&self, id: &str) -> Option<PodView> {
        self.read().get(id).map(|entry| PodView {
            pod: entry.spec.clone(),
            tunnel: entry.redirection(&self.local_host, self.names_on),
            activity: entry.tunnel.activity(),
        })
    }
}
