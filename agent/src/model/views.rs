//! What the agent shows of its pods: each pod's [`Redirection`] and port
//! tunnels, the status and pod lists, the dashboard's [`Snapshot`], and the
//! [`StatusReport`] sent to the control plane.

use std::collections::BTreeMap;
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::health::HealthResponse;
use super::pod::{PodSpec, PortSpec, Protocol};
use super::tunnel::{StagingVia, TunnelState, TunnelTarget, Way};

/// `GET /api/v1/pods/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusResponse {
    pub total_redirections: usize,
    pub active_redirections: usize,
    pub failed_redirections: usize,
    pub stopped_redirections: usize,
    pub redirections: BTreeMap<String, Redirection>,
    pub timestamp: DateTime<Utc>,
    /// True when the pods come from the built-in demo, not a control plane.
    #[serde(default)]
    pub demo: bool,
}

/// One pod's tunnel as the status endpoint and the report show it.
/// Field names up to `error` are the seed's `PodRedirection`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Redirection {
    pub staging_pod_id: String,
    pub staging_pod_name: String,
    pub staging_pod_ip: IpAddr,
    pub staging_port: u16,
    pub local_port: Option<u16>,
    pub local_host: String,
    pub dns_name: String,
    pub localhost_name: String,
    pub status: TunnelState,
    pub error: Option<String>,
    pub forwarding: bool,
    /// `staging` (direct) or `local` (the mirror, through the Kubernetes API).
    #[serde(default)]
    pub target: TunnelTarget,
    /// How a `staging` target is reached: `direct`, `api` or `auto`.
    #[serde(default)]
    pub via: StagingVia,
    /// The way connections take now (for `auto`, the one that last worked).
    #[serde(default)]
    pub way: Way,
    /// `way` as people read it: "via staging API", "via staging (direct)",
    /// "via mirror".
    #[serde(default)]
    pub way_label: String,
    pub namespace: String,
    pub pod_status: String,
    pub open_connections: u64,
    pub total_connections: u64,
    pub bytes_to_pod: u64,
    pub bytes_from_pod: u64,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    /// Notes on how the port was chosen, e.g. which port was held by another process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_note: Option<String>,
    /// The pod's mirror in the local cluster, when mirroring is on.
    #[serde(default)]
    pub mirror: Option<MirrorView>,
    /// The pod's own loopback address, where its names point.
    #[serde(default)]
    pub address: Option<std::net::Ipv4Addr>,
    /// The pod's own port, while it listens on `address` (the second way in:
    /// `<dns_name>:<name_port>`).
    #[serde(default)]
    pub name_port: Option<u16>,
    /// Why the pod's own port cannot listen there, with the fix.
    #[serde(default)]
    pub name_port_error: Option<String>,
    /// `http://<dns_name>/` while the name port listens.
    #[serde(default)]
    pub name_url: Option<String>,
    /// The `.local` names that resolve to this pod (the first to use).
    #[serde(default)]
    pub names: Vec<String>,
    /// Why `dns_name` is not this pod's (another pod holds it), and what to
    /// use instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_note: Option<String>,
    /// Every port of the pod, in the order pushed, each with its own
    /// tunnel (the fields above are the first TCP port's).
    #[serde(default)]
    pub ports: Vec<PortTunnelView>,
}

/// One port of a pod and its tunnel: its own range port, toggle, state,
/// errors and counters. A port that is not TCP is listed, never tunnelled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortTunnelView {
    pub staging_port: u16,
    pub local_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub protocol: Protocol,
    pub forwarding: bool,
    pub status: TunnelState,
    pub error: Option<String>,
    /// The pod's own port while it listens on the pod's address
    /// (`<dns_name>:<name_port>`).
    #[serde(default)]
    pub name_port: Option<u16>,
    /// `http://<name>:<port>/` while the name port listens.
    #[serde(default)]
    pub name_url: Option<String>,
    pub open_connections: u64,
    pub total_connections: u64,
    pub bytes_to_pod: u64,
    pub bytes_from_pod: u64,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_note: Option<String>,
}

impl PortTunnelView {
    /// A listed port with no tunnel: no range port, off, nothing counted.
    pub fn without_tunnel(spec: &PortSpec) -> Self {
        Self {
            staging_port: spec.port,
            local_port: None,
            name: spec.name.clone(),
            protocol: spec.protocol,
            forwarding: false,
            status: TunnelState::Stopped,
            error: None,
            name_port: None,
            name_url: None,
            open_connections: 0,
            total_connections: 0,
            bytes_to_pod: 0,
            bytes_from_pod: 0,
            last_error: None,
            last_error_at: None,
            port_note: None,
        }
    }

    /// The port as tables and menus name it: `9090 metrics`, `53/UDP dns`
    /// (the protocol only when it is not TCP).
    pub fn label(&self) -> String {
        let mut label = self.staging_port.to_string();
        if self.protocol != Protocol::Tcp {
            label.push('/');
            label.push_str(self.protocol.as_str());
        }
        if let Some(name) = &self.name {
            label.push(' ');
            label.push_str(name);
        }
        label
    }
}

/// The pod's mirror in the local cluster, as its watch last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MirrorView {
    /// The mirror's name in the local namespace.
    pub name: String,
    /// `Pending`, `Running`, ... (`None` until the cluster reports it).
    pub phase: Option<String>,
    pub pod_ip: Option<String>,
    pub restarts: i32,
    /// The latest thing the cluster said about it: a container waiting or
    /// terminated with a reason (`ImagePullBackOff: ...`), or a failing condition.
    #[serde(default)]
    pub last_event: Option<String>,
    /// Why the cluster refused the mirror (bad image, quota, ...).
    pub error: Option<String>,
}

/// `GET /api/v1/pods`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodList {
    pub pods: Vec<PodView>,
    pub timestamp: DateTime<Utc>,
}

/// One entry of `GET /api/v1/pods`: the pod as pushed, with its tunnel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodView {
    pub pod: PodSpec,
    pub tunnel: Redirection,
    /// The last minute of the tunnel, for the dashboard.
    #[serde(default)]
    pub activity: Activity,
}

/// What a tunnel did over the last minute.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Activity {
    /// Bytes per second, both ways together, one sample every
    /// `sample_seconds`, oldest first.
    pub throughput: Vec<u64>,
    pub sample_seconds: u64,
    /// Time to reach the pod, over the connections of the last minute.
    pub connect_p50_ms: Option<f64>,
    pub connect_p99_ms: Option<f64>,
    /// Connections tried, and those that failed, in the last minute.
    pub connections: u64,
    pub errors: u64,
}

/// The names one pod answers to (decided over every pod by
/// `names::assign`), and why it lacks one it might expect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AssignedNames {
    /// `.local` names that resolve to this pod, the one to show first.
    pub names: Vec<String>,
    /// Why `<name>-staging.local` is not this pod's, when it is not.
    pub note: Option<String>,
}

/// Everything the dashboard shows, in one value: sent whole on every change
/// (`GET /api/v1/snapshot`, the SSE stream, the tray app's events).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub health: HealthResponse,
    pub pods: Vec<PodView>,
    #[serde(default)]
    pub ports: PortUsage,
}

/// How much of the port range the tunnels hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortUsage {
    pub used: usize,
    pub size: usize,
}

/// The status report we POST to `{control_plane_url}/api/v1/staging/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub agent_id: String,
    pub status: String,
    pub total_pods: usize,
    pub running_pods: usize,
    pub failed_pods: usize,
    pub staging_pods: BTreeMap<String, Redirection>,
    pub kind_cluster_status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind_cluster_reason: Option<String>,
    pub last_sync: Option<DateTime<Utc>>,
    pub timestamp: DateTime<Utc>,
    pub demo: bool,
}
