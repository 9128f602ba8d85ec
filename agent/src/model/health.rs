//! `GET /health`: [`HealthResponse`] and its parts (where names go, the
//! control plane, the staging cluster), and what strangers may see of it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// `GET /health`: the seed's four fields plus what a user needs to trust it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealthResponse {
    pub status: String,
    pub agent_id: String,
    /// The agent's process id (so `doctor` can tell its ports from others').
    #[serde(default)]
    pub pid: u32,
    pub timestamp: DateTime<Utc>,
    pub pod_count: usize,
    pub version: String,
    pub demo: bool,
    /// Where this agent's API answers (`http://127.0.0.1:8082`): what the
    /// tray app's window, which has no HTTP origin, shows in its examples.
    #[serde(default)]
    pub api_url: String,
    pub names: NamesHealth,
    /// Whether tunnel ports listen (`--forwarding off`: said here once,
    /// each pod's tunnel then simply `stopped`).
    #[serde(default = "forwarding_default")]
    pub forwarding: bool,
    pub control_plane: ControlPlaneHealth,
    /// The local cluster mirror: `ready`, `unavailable` or `disabled`.
    pub cluster_status: String,
    /// Why the cluster is unavailable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_reason: Option<String>,
    /// The staging cluster's API, when a staging context is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging: Option<StagingHealth>,
}

/// An agent that does not say has forwarding on (older agents).
fn forwarding_default() -> bool {
    true
}

impl HealthResponse {
    /// What a caller that is not trusted may see: that the agent lives, and
    /// its id (which a push must carry anyway), but no pods, no names, no
    /// control plane.
    pub fn for_strangers(self) -> Self {
        Self {
            pid: 0,
            pod_count: 0,
            names: NamesHealth::default(),
            control_plane: ControlPlaneHealth::default(),
            cluster_reason: None,
            staging: None,
            ..self
        }
    }
}

/// Where names are written and whether the system resolver sees them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct NamesHealth {
    /// The file the names are written to.
    pub hosts_file: String,
    /// Whether every program of this user resolves them.
    pub system_wide: bool,
    /// Which of the places was chosen.
    #[serde(default)]
    pub mode: NamesMode,
    /// Why that place: what was found on this machine.
    #[serde(default)]
    pub why: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// Where the agent writes its names.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum NamesMode {
    /// This user's file, answered by the package's NSS module.
    NssModule,
    /// A block of the system hosts file.
    #[default]
    SystemHosts,
    /// A private file in the state dir that the system resolver does not read.
    PrivateFile,
    /// The file `--hosts-file` names.
    File,
    /// `--names off`: no names anywhere.
    Off,
}

impl NamesMode {
    /// How the dashboard and `doctor` say it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::NssModule => "the system resolver, through the k3slocal NSS module",
            Self::SystemHosts => "the system hosts file",
            Self::PrivateFile => "a private file the system resolver does not read",
            Self::File => "the file --hosts-file names",
            Self::Off => "nowhere: names are off (--names off)",
        }
    }
}

/// Whether the control plane took our last report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ControlPlaneHealth {
    pub url: String,
    pub reachable: Option<bool>,
    pub last_sync: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

/// The staging cluster's API as the agent reaches it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StagingHealth {
    /// `ready`, `connecting` (no client yet) or `unavailable`.
    pub status: String,
    /// What is wrong, with what to do: a credential plugin that did not
    /// answer, credentials refused, a kubeconfig that cannot be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}
