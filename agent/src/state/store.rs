//! The pod store: the single source of truth for the pods we hold and their
//! tunnels. Readers take snapshots (status, pod list, reports, names); the
//! agent's operations are the only writers, and every change they make is
//! published on the event bus.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use chrono::Utc;
use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::events::AgentEvent;
use crate::events::EventBus;
use crate::model::{MirrorView, PodView, Redirection, StatusResponse, TunnelState};
use crate::state::entry::PodEntry;

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
        self.pods.read()
    }

    /// Write access for the agent's operations; never held across an await.
    pub fn write(&self) -> StoreWrite<'_> {
        let map = self.pods.write();
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
                activity: entry.activity(),
            })
            .collect()
    }

    /// Takes every tunnel's throughput sample; tells the dashboard's stream
    /// when a line changed. Returns whether every tunnel's last minute is
    /// all zeros.
    pub fn sample_throughput(&self) -> bool {
        let (mut changed, mut quiet) = (false, true);
        for entry in self.read().values() {
            for port in &entry.tunnels {
                let (moved, idle) = port.tunnel.sample_throughput();
                changed |= moved;
                quiet &= idle;
            }
        }
        if changed {
            self.events.traffic_moved();
        }
        quiet
    }

    /// How many of the range's ports our tunnels hold (one per port of a pod).
    pub fn ports_used(&self) -> usize {
        self.read()
            .values()
            .flat_map(|entry| &entry.tunnels)
            .filter(|port| port.local_port.is_some())
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
            activity: entry.activity(),
        })
    }
}
