//! A session with the local cluster: connecting to the configured context,
//! why a session could not start or ended, and the cluster's status as the
//! agent shows it.

use std::sync::Arc;

use kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};
use kube::Client;
use serde::Serialize;

use crate::config::ClusterSettings;

/// Why a session with the cluster could not start or ended. Causes are
/// shared (`Arc`): the error is cloned into the status the agent shows.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClusterError {
    #[error("no kubeconfig: {0}")]
    NoKubeconfig(#[source] Arc<KubeconfigError>),
    #[error("cannot read kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        source: Arc<KubeconfigError>,
    },
    #[error(
        "context {context:?} is not in the kubeconfig; create the Kind cluster with \
         `kind create cluster --name {cluster}`"
    )]
    ContextMissing { context: String, cluster: String },
    #[error("cannot build a client for context {context:?}: {source}")]
    Client {
        context: String,
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot create namespace {namespace}: {message}")]
    Namespace { namespace: String, message: String },
    #[error("{0}")]
    Api(String),
    #[error("watch failed: {0}")]
    Watch(#[source] Arc<kube::runtime::watcher::Error>),
    #[error("watch ended")]
    WatchEnded,
}

/// Whether the local cluster can be used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum ClusterStatus {
    /// `--no-cluster`.
    Disabled,
    /// Not tried yet.
    Connecting,
    /// Connected; mirrors are applied.
    Ready,
    /// No kubeconfig, context missing, API unreachable, forbidden: the reason says which.
    Unavailable(String),
}

impl ClusterStatus {
    /// The report's `kind_cluster_status` word.
    pub fn word(&self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::Connecting | Self::Unavailable(_) => "unavailable",
            Self::Ready => "ready",
        }
    }

    pub fn reason(&self) -> Option<String> {
        match self {
            Self::Connecting => Some("connecting".to_owned()),
            Self::Unavailable(reason) => Some(reason.clone()),
            Self::Disabled | Self::Ready => None,
        }
    }
}

/// A short reason for a kube error, as the status shows it.
pub(super) fn describe(err: &kube::Error) -> String {
    match err {
        kube::Error::Api(status) if status.code == 403 => format!("forbidden: {}", status.message),
        kube::Error::Api(status) => format!("{} ({})", status.message, status.code),
        other => other.to_string(),
    }
}

/// Errors that end a session (the cluster is away) rather than one pod's apply.
pub(super) fn is_cluster_fault(err: &kube::Error) -> bool {
    match err {
        kube::Error::Api(status) => status.code >= 500 || status.code == 401 || status.code == 403,
        _ => true,
    }
}

/// Connects to the configured context: the kubeconfig read, then a client
/// for the context. The agent's mirror and `doctor` both come through here,
/// so what doctor finds is what the agent would meet.
pub(super) async fn connect(settings: &ClusterSettings) -> Result<Client, ClusterError> {
    let (kubeconfig, _) = read_kubeconfig(settings)?;
    client_for(kubeconfig, settings).await
}

/// The kubeconfig the settings name (`--kubeconfig`, else `$KUBECONFIG` or
/// `~/.kube/config`), and where it came from as people read it. The first
/// half of [`connect`], apart so `doctor` can say what it read before it
/// tries the context.
pub fn read_kubeconfig(settings: &ClusterSettings) -> Result<(Kubeconfig, String), ClusterError> {
    match &settings.kubeconfig {
        Some(path) => Kubeconfig::read_from(path)
            .map(|kubeconfig| (kubeconfig, path.display().to_string()))
            .map_err(|err| ClusterError::Kubeconfig {
                path: path.display().to_string(),
                source: Arc::new(err),
            }),
        None => Kubeconfig::read()
            .map(|kubeconfig| (kubeconfig, "$KUBECONFIG or ~/.kube/config".to_owned()))
            .map_err(|err| ClusterError::NoKubeconfig(Arc::new(err))),
    }
}

/// A client for the configured context of `kubeconfig`: the second half of
/// [`connect`].
pub async fn client_for(
    kubeconfig: Kubeconfig,
    settings: &ClusterSettings,
) -> Result<Client, ClusterError> {
    if !kubeconfig
        .contexts
        .iter()
        .any(|c| c.name == settings.context)
    {
        return Err(ClusterError::ContextMissing {
            context: settings.context.clone(),
            cluster: settings
                .context
                .strip_prefix("kind-")
                .unwrap_or(&settings.context)
                .to_owned(),
        });
    }
    let options = KubeConfigOptions {
        context: Some(settings.context.clone()),
        ..KubeConfigOptions::default()
    };
    let client_error = |source: Arc<dyn std::error::Error + Send + Sync>| ClusterError::Client {
        context: settings.context.clone(),
        source,
    };
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|err| client_error(Arc::new(err)))?;
    Client::try_from(config).map_err(|err| client_error(Arc::new(err)))
}
