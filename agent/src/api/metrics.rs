//! Prometheus metrics (`GET /metrics`, OpenMetrics text): per tunnel and
//! agent-wide figures. Counters that already live in the tunnels and the
//! store are read at each scrape by a collector (no second set of counters
//! to keep in step, and a deleted pod's series go with it); the reporter's
//! own counters and histogram are registered as they are.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use super::error::ApiError;
use crate::agent::Agent;
use crate::cluster::ClusterStatus;
use crate::config::PortRange;
use crate::model::TunnelState;
use crate::state::Store;
use crate::tunnel::ShardLoads;
use crate::tunnel::{ConnectErrorKind, TunnelShared, TunnelStats};

/// Prefix of every metric name (the registry adds it, collected ones too).
const PREFIX: &str = "k3s_local_agent";

/// Prometheus metrics in the OpenMetrics text format; like every endpoint
/// but `/health`, it needs the token beyond loopback.
pub(super) async fn endpoint(registry: Arc<Registry>) -> Result<Response, ApiError> {
    let mut text = String::new();
    encode(&mut text, &registry).map_err(|err| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode metrics: {err}"),
        )
    })?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// Builds the registry the `/metrics` endpoint encodes: the reporter's own
/// figures as they are, and collectors over the agent's live state.
pub(super) fn registry(agent: &Agent) -> Registry {
    let store = agent.store().clone();
    let shard_loads = agent.shard_loads();
    let port_range = agent.config().port_range;
    let cluster = agent.cluster_status();
    let reports = agent.report_metrics();
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register(
        "reports",
        "Status reports sent to the control plane, by result",
        reports.outcomes.clone(),
    );
    registry.register(
        "report_seconds",
        "Time the control plane took to take a status report",
        reports.latency.clone(),
    );
    registry.register_collector(Box::new(LiveCollector {
        store,
        shard_loads,
        port_range,
        cluster,
    }));
    registry
}

/// Reads the tunnels and the agent's state at each scrape.
#[derive(Debug)]
struct LiveCollector {
    store: Store,
    shard_loads: ShardLoads,
    port_range: PortRange,
    cluster: watch::Receiver<ClusterStatus>,
}

/// One port's tunnel as a scrape sees it.
struct TunnelFigures {
    id: String,
    name: String,
    /// The pod's staging port this tunnel forwards to.
    port: u16,
    stats: TunnelStats,
    tunnel: Arc<TunnelShared>,
}

impl Collector for LiveCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let tunnels: Vec<TunnelFigures> = self
            .store
            .read()
            .iter()
            .flat_map(|(id, entry)| {
                entry.tunnels.iter().map(|port| TunnelFigures {
                    id: id.clone(),
                    name: entry.spec.name.clone(),
                    port: port.staging_port,
                    stats: port.tunnel.stats(),
                    tunnel: Arc::clone(&port.tunnel),
                })
            })
            .collect();
        let used_ports = self.store.ports_used();
        let pod_states: Vec<TunnelState> = self
            .store
            .read()
            .values()
            .map(|entry| entry.state())
            .collect();
        let labels = |t: &TunnelFigures| {
            [
                ("pod_id", t.id.clone()),
                ("pod", t.name.clone()),
                ("port", t.port.to_string()),
            ]
        };

        let mut metric = encoder.encode_descriptor(
            "tunnel_connections",
            "Connections a tunnel accepted",
            None,
            MetricType::Counter,
        )?;
        for t in &tunnels {
            ConstCounter::new(t.stats.total_connections)
                .encode(metric.encode_family(&labels(t))?)?;
        }

        let mut metric = encoder.encode_descriptor(
            "tunnel_open_connections",
            "Connections a tunnel carries now",
            None,
            MetricType::Gauge,
        )?;
        for t in &tunnels {
            let value = i64::try_from(t.stats.open_connections).unwrap_or(i64::MAX);
            ConstGauge::new(value).encode(metric.encode_family(&labels(t))?)?;
        }

        let mut metric = encoder.encode_descriptor(
            "tunnel_bytes",
            "Bytes a tunnel moved, by direction",
            None,
            MetricType::Counter,
        )?;
        for t in &tunnels {
            for (direction, value) in [
                ("to_pod", t.stats.bytes_to_pod),
                ("from_pod", t.stats.bytes_from_pod),
            ] {
                let [pod_id, pod, port] = labels(t);
                let labels = [pod_id, pod, port, ("direction", direction.to_owned())];
                ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
            }
        }

        let mut metric = encoder.encode_descriptor(
            "tunnel_errors",
            "Connections a tunnel could not carry, by kind",
            None,
            MetricType::Counter,
        )?;
        for t in &tunnels {
            for kind in ConnectErrorKind::ALL {
                let [pod_id, pod, port] = labels(t);
                let labels = [pod_id, pod, port, ("kind", kind.as_str().to_owned())];
                ConstCounter::new(t.tunnel.error_count(kind))
                    .encode(metric.encode_family(&labels)?)?;
            }
        }

        let mut metric = encoder.encode_descriptor(
            "tunnel_connect_seconds",
            "Time to reach the pod, one observation per connection",
            None,
            MetricType::Histogram,
        )?;
        for t in &tunnels {
            t.tunnel
                .connect_latency()
                .encode(metric.encode_family(&labels(t))?)?;
        }

        let mut metric = encoder.encode_descriptor(
            "tunnel_way",
            "The way a tunnel's connections take now: 1 for its way (direct, api, mirror)",
            None,
            MetricType::Gauge,
        )?;
        for t in &tunnels {
            let [pod_id, pod, port] = labels(t);
            let labels = [
                pod_id,
                pod,
                port,
                ("way", t.tunnel.way().as_str().to_owned()),
            ];
            ConstGauge::new(1).encode(metric.encode_family(&labels)?)?;
        }

        let mut metric = encoder.encode_descriptor(
            "redirections",
            "Pods by their tunnel's state (as /api/v1/pods/status counts them)",
            None,
            MetricType::Gauge,
        )?;
        for state in [
            TunnelState::Active,
            TunnelState::Failed,
            TunnelState::Stopped,
        ] {
            let count = pod_states.iter().filter(|s| **s == state).count();
            let labels = [("state", state.as_str())];
            ConstGauge::new(i64::try_from(count).unwrap_or(i64::MAX))
                .encode(metric.encode_family(&labels)?)?;
        }

        let range_size = self.port_range.len();
        for (metric_name, help, value) in [
            (
                "port_range_ports",
                "Ports in the tunnel port range",
                range_size,
            ),
            (
                "port_range_used",
                "Ports of the range held by our tunnels",
                used_ports,
            ),
        ] {
            let metric = encoder.encode_descriptor(metric_name, help, None, MetricType::Gauge)?;
            ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(metric)?;
        }

        let mut metric = encoder.encode_descriptor(
            "forward_thread_connections",
            "Connections each forwarding thread carries now",
            None,
            MetricType::Gauge,
        )?;
        for (thread, load) in self.shard_loads.iter().enumerate() {
            let labels = [("thread", thread.to_string())];
            ConstGauge::new(i64::try_from(load).unwrap_or(i64::MAX))
                .encode(metric.encode_family(&labels)?)?;
        }

        let metric = encoder.encode_descriptor(
            "forward_handovers",
            "New connections a forwarding thread passed to a quieter one",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.shard_loads.handed_over()).encode(metric)?;

        let mut metric = encoder.encode_descriptor(
            "cluster_status",
            "The local mirror cluster: 1 for its current status",
            None,
            MetricType::Gauge,
        )?;
        let current = self.cluster.borrow().word();
        for status in ["ready", "unavailable", "disabled"] {
            let labels = [("status", status)];
            ConstGauge::new(i64::from(status == current)).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
