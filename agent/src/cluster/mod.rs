//! The cluster: the local staging mirror. Every pod the agent holds is
//! server-side applied as a Pod in a local cluster (Kind, k3s, any kube
//! context), garbage-collected when it goes, and watched so its local phase,
//! IP and restarts show beside its tunnel; `local` tunnels reach mirrors
//! through the API server's port-forward. The staging cluster too, when
//! its context is configured: `api` tunnels reach staging pods through its
//! API server's port-forward, with the user's own credentials.
//!
//! May use: `state` (the store it mirrors and annotates), `tunnel` (the
//! dialer contract it fulfils), `config`, `events`, `model`. Must never
//! touch: the HTTP API, the operator's tools. A cluster fault stops nothing
//! outside this folder.

mod connection;
mod credentials;
mod dialer;
mod manifest;
mod mirror;
mod port_forward;
mod staging;

pub use connection::{client_for, read_kubeconfig, ClusterError, ClusterStatus};
pub use credentials::{PluginError, PluginLookup};
pub use dialer::MirrorDialer;
pub use manifest::{
    agent_label_value, mirror_manifest, mirror_names, selector, AGENT_LABEL, FIELD_MANAGER,
    MANAGED_BY_LABEL, MANAGED_BY_VALUE, POD_ID_ANNOTATION,
};
pub use mirror::Mirror;
pub use staging::{staging_client, StagingClient, StagingCluster, StagingError};
