//! What a tunnel's listener and connections share with the store
//! ([`TunnelShared`]): where new connections go ([`Route`]), the ways to
//! reach the pod, the figures, and the announcing of a changed problem.
//!
//! It outlives the tunnel's listener, so turning forwarding off and on, or
//! changing the pod's address, keeps the history and never needs the store
//! to rebuild anything.

use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::RwLock;
use prometheus_client::metrics::histogram::Histogram;

use crate::events::{AgentEvent, EventBus};
use crate::model::{StagingVia, TunnelState, TunnelTarget, Way};
use crate::tunnel::dial::Dialers;
use crate::tunnel::reach::PodWays;
use crate::tunnel::stats::{self, ConnectErrorKind, Figures, TunnelStats};

/// Where a tunnel's new connections go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The staging pod's `ip:port`.
    pub target: SocketAddr,
    /// The staging pod, or its local mirror.
    pub mode: TunnelTarget,
    /// How the staging pod is reached: its IP, the staging API, or either.
    pub via: StagingVia,
}

/// What a tunnel's listener and connections share with the store: where to
/// forward, and what happened.
#[derive(Debug)]
pub struct TunnelShared {
    pub(super) pod_id: String,
    /// Where new connections go; one lock for both halves, read once per
    /// connection.
    route: RwLock<Route>,
    pub(super) dialers: Dialers,
    /// What the pod's tunnels share: its staging name, which way works.
    pub(super) ways: Arc<PodWays>,
    /// Most connections open at once through this tunnel; more are closed
    /// at accept, so a loop cannot eat every descriptor.
    pub(super) limit: u64,
    pub(super) figures: Figures,
    pub(super) events: EventBus,
}

impl TunnelShared {
    pub fn new(
        pod_id: String,
        route: Route,
        dialers: Dialers,
        ways: Arc<PodWays>,
        events: EventBus,
        limit: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            pod_id,
            route: RwLock::new(route),
            dialers,
            ways,
            limit: u64::try_from(limit).unwrap_or(u64::MAX),
            figures: Figures::default(),
            events,
        })
    }

    /// Takes a throughput sample (bytes per second since the last one);
    /// returns whether the tunnel's line changed, and whether its last
    /// minute is all zeros now.
    pub fn sample_throughput(&self) -> (bool, bool) {
        self.figures.sample_throughput()
    }

    /// The last minute, for the dashboard.
    pub fn activity(&self) -> crate::model::Activity {
        combined_activity(std::iter::once(self))
    }

    /// Failed connections of `kind` so far.
    pub fn error_count(&self, kind: ConnectErrorKind) -> u64 {
        self.figures.error_count(kind)
    }

    /// Time to reach the pod, one observation per connection.
    pub fn connect_latency(&self) -> &Histogram {
        self.figures.connect_latency()
    }

    /// Where new connections go: the staging pod's address, and whether they
    /// reach it directly or through its local mirror.
    pub fn route(&self) -> Route {
        *self.route.read()
    }

    fn change_route(&self, change: impl FnOnce(&mut Route)) {
        change(&mut self.route.write());
    }

    /// Where new connections go: the staging pod or its local mirror.
    pub fn mode(&self) -> TunnelTarget {
        self.route().mode
    }

    /// Switches new connections between the staging pod and its mirror,
    /// and how the staging pod is reached.
    pub fn set_mode(&self, mode: TunnelTarget, via: StagingVia) {
        self.change_route(|route| {
            route.mode = mode;
            route.via = via;
        });
    }

    /// The way new connections take now.
    pub fn way(&self) -> Way {
        let route = self.route();
        match (route.mode, route.via) {
            (TunnelTarget::Local, _) => Way::Mirror,
            (TunnelTarget::Staging, StagingVia::Direct) => Way::Direct,
            (TunnelTarget::Staging, StagingVia::Api) => Way::Api,
            (TunnelTarget::Staging, StagingVia::Auto) => self.ways.auto_way(),
        }
    }

    /// Where new connections go.
    pub fn target(&self) -> SocketAddr {
        self.route().target
    }

    /// Points new connections at `target`; open ones keep their pod.
    pub fn set_target(&self, target: SocketAddr) {
        self.change_route(|route| route.target = target);
    }

    pub fn stats(&self) -> TunnelStats {
        self.figures.stats()
    }

    /// Counts one connection attempt: how long reaching the pod took, and
    /// whether it worked.
    pub(super) fn note_connect(&self, seconds: f64, worked: bool) {
        self.figures.note_connect(seconds, worked);
    }

    /// Records a failed connection; tells subscribers only when the problem changes,
    /// so a flood of refused connections is one event, not thousands.
    pub(super) fn record_error(&self, kind: ConnectErrorKind, message: String) {
        if self.figures.record_error(kind, &message) {
            tracing::warn!(pod_id = %self.pod_id, error = %message, "tunnel connection failed");
            self.events.publish(AgentEvent::TunnelChanged {
                pod_id: self.pod_id.clone(),
                state: TunnelState::Active,
                error: Some(message),
            });
        }
    }

    /// Records a connection the pod cut mid-stream (a reset). The tunnel itself
    /// is fine, so this is history (`last_error`), not the current problem.
    pub(super) fn record_dropped(&self, kind: ConnectErrorKind, message: String) {
        tracing::debug!(pod_id = %self.pod_id, error = %message, "connection cut mid-stream");
        self.figures.record_dropped(kind, message);
    }

    /// Clears the current problem after a good connection.
    pub(super) fn record_success(&self) {
        if self.figures.record_success() {
            tracing::info!(pod_id = %self.pod_id, "tunnel reaches its pod again");
            self.events.publish(AgentEvent::TunnelChanged {
                pod_id: self.pod_id.clone(),
                state: TunnelState::Active,
                error: None,
            });
        }
    }
}

/// The last minute of several tunnels together (a pod's ports): their
/// throughput added sample by sample (the newest samples aligned), their
/// connections pooled for the percentiles.
pub fn combined_activity<'a>(
    tunnels: impl Iterator<Item = &'a TunnelShared>,
) -> crate::model::Activity {
    stats::combined(tunnels.map(|tunnel| &tunnel.figures))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use tokio::sync::broadcast::error::TryRecvError;

    use super::*;
    use crate::tunnel::testing::{no_dialers, tunnel_with};

    fn tunnel(events: &EventBus) -> Arc<TunnelShared> {
        let target = SocketAddr::from((Ipv4Addr::new(10, 0, 1, 100), 8080));
        tunnel_with(target, StagingVia::Direct, no_dialers(), events, 16)
    }

    fn next_error(events: &mut tokio::sync::broadcast::Receiver<AgentEvent>) -> Option<String> {
        match events.try_recv() {
            Ok(AgentEvent::TunnelChanged { pod_id, error, .. }) => {
                assert_eq!(pod_id, "web");
                error
            }
            other => panic!("expected a tunnel change, got {other:?}"),
        }
    }

    #[test]
    fn a_flood_of_one_error_is_one_event_and_recovery_another() {
        let bus = EventBus::new();
        let mut events = bus.subscribe();
        let tunnel = tunnel(&bus);
        for _ in 0..3 {
            tunnel.record_error(ConnectErrorKind::Refused, "refused".into());
        }
        assert_eq!(next_error(&mut events).as_deref(), Some("refused"));
        assert_eq!(events.try_recv(), Err(TryRecvError::Empty));
        assert_eq!(tunnel.error_count(ConnectErrorKind::Refused), 3);

        // A cut mid-stream is not news.
        tunnel.record_dropped(ConnectErrorKind::Reset, "cut".into());
        assert_eq!(events.try_recv(), Err(TryRecvError::Empty));

        tunnel.record_success();
        assert_eq!(next_error(&mut events), None);
        tunnel.record_success();
        assert_eq!(events.try_recv(), Err(TryRecvError::Empty));
        assert_eq!(tunnel.stats().current_error, None);
    }

    #[test]
    fn the_route_changes_for_new_connections_and_names_the_way() {
        let bus = EventBus::new();
        let tunnel = tunnel(&bus);
        assert_eq!(tunnel.way(), Way::Direct);
        tunnel.set_mode(TunnelTarget::Staging, StagingVia::Api);
        assert_eq!(tunnel.way(), Way::Api);
        tunnel.set_mode(TunnelTarget::Local, StagingVia::Api);
        assert_eq!(
            (tunnel.mode(), tunnel.way()),
            (TunnelTarget::Local, Way::Mirror)
        );
        // `auto` names the way its pod last took.
        tunnel.set_mode(TunnelTarget::Staging, StagingVia::Auto);
        assert_eq!(tunnel.way(), Way::Direct);
        tunnel.ways.direct_unreachable(std::time::Instant::now());
        assert_eq!(tunnel.way(), Way::Api);

        let moved = SocketAddr::from((Ipv4Addr::new(10, 0, 1, 101), 9090));
        tunnel.set_target(moved);
        assert_eq!(tunnel.target(), moved);
        assert_eq!(tunnel.route().via, StagingVia::Auto);
    }
}
