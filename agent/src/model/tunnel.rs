//! Where a pod's tunnel leads and how: [`TunnelTarget`], [`StagingVia`],
//! [`Way`], its [`TunnelState`], and the request bodies that change them.

use serde::{Deserialize, Serialize};

/// Where a pod's tunnel leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelTarget {
    /// Direct TCP to the staging pod's `ip:port`.
    #[default]
    Staging,
    /// To the pod's mirror in the local cluster, through the Kubernetes API port-forward.
    Local,
}

impl TunnelTarget {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "staging" => Some(Self::Staging),
            "local" => Some(Self::Local),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Staging => "staging",
            Self::Local => "local",
        }
    }
}

/// How a `staging` tunnel reaches its pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StagingVia {
    /// TCP to the pod's `ip:port` (the laptop routes to pod IPs).
    #[default]
    Direct,
    /// The staging cluster's API server port-forward, with the user's kubeconfig.
    Api,
    /// Direct while the pod IP answers, the API when it is unreachable.
    Auto,
}

impl StagingVia {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Api => "api",
            Self::Auto => "auto",
        }
    }
}

/// A way that is none of `direct`, `api`, `auto`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a way: direct, api or auto")]
pub struct UnknownWay(pub String);

impl std::str::FromStr for StagingVia {
    type Err = UnknownWay;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "direct" => Ok(Self::Direct),
            "api" => Ok(Self::Api),
            "auto" => Ok(Self::Auto),
            other => Err(UnknownWay(other.to_owned())),
        }
    }
}

/// The way a tunnel's connections take now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Way {
    /// TCP straight to the staging pod.
    #[default]
    Direct,
    /// The staging cluster's API server port-forward.
    Api,
    /// The pod's mirror in the local cluster.
    Mirror,
}

impl Way {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Api => "api",
            Self::Mirror => "mirror",
        }
    }

    /// As people read it: "via staging API", "via staging (direct)", "via mirror".
    pub fn describe(self) -> &'static str {
        match self {
            Self::Direct => "via staging (direct)",
            Self::Api => "via staging API",
            Self::Mirror => "via mirror",
        }
    }
}

/// Body of `POST /api/v1/pods/{id}/target`: where the tunnel leads, and
/// for `staging` optionally how it gets there.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct TargetRequest {
    pub target: TunnelTarget,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<StagingVia>,
}

/// Body of `POST /api/v1/pods/{id}/forwarding`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ForwardingRequest {
    pub enabled: bool,
    /// One staging port of the pod alone; every port when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// State of one pod's tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelState {
    /// Listening and forwarding.
    Active,
    /// Forwarding turned off by the user: the port refuses connections.
    Stopped,
    /// Could not listen (no port, bind error); see the error.
    Failed,
}

impl TunnelState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
        }
    }
}
