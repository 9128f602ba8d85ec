//! What the agent tells its subscribers (the status reporter, the web UI's
//! event stream, the tray): typed events on a broadcast channel, and a
//! revision counter on a watch channel for those that only need "something
//! changed" (coalesced, so a burst of changes wakes them once).

use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;
use tokio::sync::{broadcast, watch};

use crate::model::TunnelState;

/// How many events a slow subscriber may fall behind before it is told it lagged.
const EVENT_BUFFER: usize = 1024;

/// One change inside the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentEvent {
    /// Pods were added, updated or removed by a push or a restore.
    PodsChanged {
        applied: Vec<String>,
        removed: Vec<String>,
    },
    /// A tunnel changed state or recorded an error.
    TunnelChanged {
        pod_id: String,
        state: TunnelState,
        error: Option<String>,
    },
    /// The pod's mirror in the local cluster changed (phase, IP, error).
    MirrorChanged { pod_id: String },
    /// The local cluster became ready or unavailable.
    Cluster {
        status: String,
        reason: Option<String>,
    },
    /// The control plane accepted or refused our report.
    ControlPlane {
        reachable: bool,
        error: Option<String>,
    },
    /// The agent is shutting down.
    Stopping,
}

/// The agent's event fan-out; cheap to clone, every clone publishes to the same subscribers.
#[derive(Debug, Clone)]
pub struct EventBus {
    events: broadcast::Sender<AgentEvent>,
    revision: watch::Sender<u64>,
    traffic: watch::Sender<u64>,
    /// Whether a movement is already announced and not yet looked at by a
    /// subscriber: while it is, further movements announce nothing. A
    /// busy tunnel opens and closes thousands of connections a second on
    /// every forwarding thread, and each announcement takes the watch's
    /// locks (nine of them), which the threads would otherwise contend for.
    traffic_pending: std::sync::Arc<AtomicBool>,
    connections: std::sync::Arc<ConnectionTally>,
}

/// Wakes its holder when tunnel counters moved since it last looked
/// ([`TrafficWatch::mark_unchanged`]).
#[derive(Debug)]
pub struct TrafficWatch {
    changes: watch::Receiver<u64>,
    pending: std::sync::Arc<AtomicBool>,
}

impl TrafficWatch {
    /// Waits for a movement; an error once the agent is gone.
    pub async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        self.changes.changed().await
    }

    /// Marks what moved so far as seen: the next movement wakes again. Call
    /// it before reading the counters, so a movement after is never missed.
    pub fn mark_unchanged(&mut self) {
        self.pending.store(false, Ordering::Release);
        self.changes.mark_unchanged();
    }
}

/// Connections across every tunnel: how many ever opened, how many are open.
/// Lets the throughput sampler skip its walk while nothing can have moved.
#[derive(Debug, Default)]
struct ConnectionTally {
    opened: std::sync::atomic::AtomicU64,
    open: std::sync::atomic::AtomicU64,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let (revision, _) = watch::channel(0);
        let (traffic, _) = watch::channel(0);
        Self {
            events,
            revision,
            traffic,
            traffic_pending: std::sync::Arc::default(),
            connections: std::sync::Arc::default(),
        }
    }

    /// Publishes an event and bumps the revision. Nobody listening is fine.
    pub fn publish(&self, event: AgentEvent) {
        let _ = self.events.send(event);
        self.revision.send_modify(|r| *r += 1);
    }

    /// Every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<AgentEvent> {
        self.events.subscribe()
    }

    /// A receiver that wakes once per burst of changes.
    pub fn watch_revision(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    /// Notes that a tunnel's counters moved (a connection opened or closed).
    /// Kept apart from the revision: it can fire thousands of times a second,
    /// so its subscribers throttle it, and it never triggers a status report.
    pub fn traffic_moved(&self) {
        // Reading first keeps the common case (already announced) a load of
        // a cache line every thread shares, never a write to it.
        if self.traffic_pending.load(Ordering::Acquire)
            || self.traffic_pending.swap(true, Ordering::AcqRel)
        {
            return;
        }
        self.traffic.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Counts a connection opening through any tunnel.
    pub fn connection_opened(&self) {
        self.connections.opened.fetch_add(1, Ordering::Relaxed);
        self.connections.open.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection closing.
    pub fn connection_closed(&self) {
        self.connections.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// (connections ever opened, connections open now), across all tunnels.
    pub fn connections(&self) -> (u64, u64) {
        (
            self.connections.opened.load(Ordering::Relaxed),
            self.connections.open.load(Ordering::Relaxed),
        )
    }

    /// A receiver that wakes when counters moved.
    pub fn watch_traffic(&self) -> TrafficWatch {
        let changes = self.traffic.subscribe();
        // A watcher that went away without looking (a closed dashboard tab)
        // may have left a movement pending; re-arm, after subscribing, so
        // the next movement reaches this one.
        self.traffic_pending.store(false, Ordering::Release);
        TrafficWatch {
            changes,
            pending: std::sync::Arc::clone(&self.traffic_pending),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `watch` has a movement waiting, without waiting for one.
    fn woken(watch: &mut TrafficWatch) -> bool {
        watch.changes.has_changed().unwrap_or(false)
    }

    #[test]
    fn a_burst_of_movements_wakes_every_watcher_once_and_a_look_rearms_it() {
        let bus = EventBus::new();
        let (mut tray, mut dashboard) = (bus.watch_traffic(), bus.watch_traffic());
        assert!(!woken(&mut tray));

        for _ in 0..1000 {
            bus.traffic_moved();
        }
        assert!(woken(&mut tray) && woken(&mut dashboard));
        assert_eq!(*bus.traffic.borrow(), 1, "a burst is announced once");

        // The tray looks; the dashboard has not yet. A movement after the
        // look wakes both again.
        tray.mark_unchanged();
        assert!(!woken(&mut tray));
        bus.traffic_moved();
        assert!(woken(&mut tray), "a movement after a look is never missed");
        assert!(woken(&mut dashboard));
        assert_eq!(*bus.traffic.borrow(), 2);
    }

    #[test]
    fn a_watcher_gone_without_looking_does_not_silence_the_next() {
        let bus = EventBus::new();
        let closed_tab = bus.watch_traffic();
        bus.traffic_moved();
        drop(closed_tab);

        let mut new_tab = bus.watch_traffic();
        assert!(!woken(&mut new_tab));
        bus.traffic_moved();
        assert!(
            woken(&mut new_tab),
            "the new watcher hears the next movement"
        );
    }
}
