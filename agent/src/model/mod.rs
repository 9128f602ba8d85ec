//! Wire types of the agent's HTTP API and of the status report, and the
//! validation that turns untrusted JSON into a [`PodSpec`] we can act on.
//!
//! The shapes follow the seed's contract exactly (DESIGN.md section 2); fields we
//! add are additive so an old control plane keeps working. One file per
//! concern; every item is exported here, so callers name `crate::model::X`
//! and never the file it lives in.

mod dns;
mod hash;
mod health;
mod pod;
mod push;
mod tunnel;
mod views;

pub use dns::{is_dns_label, is_label_value, MAX_LABEL_LEN};
pub use hash::{fnv1a_32, fnv1a_64};
pub use health::{ControlPlaneHealth, HealthResponse, NamesHealth, NamesMode, StagingHealth};
pub use pod::{
    validate_namespace, validate_pod_id, validate_pod_name, FieldError, PodSpec, PortSpec,
    Protocol, DEFAULT_STAGING_PORT, MAX_POD_NAME_LEN, MAX_PORTS_PER_POD,
};
pub use push::{parse_pod, parse_pod_id_only, Action, PodRejection, PushResponse};
pub use tunnel::{
    ForwardingRequest, StagingVia, TargetRequest, TunnelState, TunnelTarget, UnknownWay, Way,
};
pub use views::{
    Activity, AssignedNames, MirrorView, PodList, PodView, PortTunnelView, PortUsage, Redirection,
    Snapshot, StatusReport, StatusResponse,
};
