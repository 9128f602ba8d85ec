//! The staging cluster, reached through its API server with the user's own
//! kubeconfig: the client (built when the agent starts, off any
//! connection's clock, with exec plugins resolved as a login shell would;
//! built again after a failed build, at most every few seconds, and after
//! the API server refused its credentials), and the dialer that opens a
//! fresh port-forward stream to a staging pod per connection, on the pod's
//! shared SPDY sessions (a WebSocket of its own where SPDY is refused), so
//! a stream error breaks that one connection, never the listener
//! (kubernetes#111825).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;

use super::connection::describe;
use super::credentials::{login_shell_path, resolve_plugins, PluginLookup};
use super::port_forward::{self, OpenError, Sessions};
use crate::config::StagingSettings;
use crate::tunnel::{DialError, LocalStream, StagingDialer, StagingPod};

/// Why the staging cluster's client could not be built.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StagingError {
    #[error("no staging context configured (--staging-kube-context)")]
    NotConfigured,
    #[error("cannot read the kubeconfig {source_name}: {message}")]
    Kubeconfig {
        source_name: String,
        message: String,
    },
    #[error(
        "context {context:?} is not in {source_name} (found: {known}); pick one with \
         --staging-kube-context, or name the file with --staging-kubeconfig"
    )]
    ContextMissing {
        context: String,
        source_name: String,
        known: String,
    },
    #[error("cannot build a client for context {context:?}: {message}")]
    Client { context: String, message: String },
}

/// A client for the staging context, with how its credentials were found.
#[derive(Clone)]
pub struct StagingClient {
    pub client: Client,
    pub context: String,
    /// Where the kubeconfig came from, as people read it.
    pub source_name: String,
    pub plugins: Vec<PluginLookup>,
}

impl std::fmt::Debug for StagingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagingClient")
            .field("context", &self.context)
            .field("plugins", &self.plugins)
            .finish_non_exhaustive()
    }
}

/// Builds a client for the staging context: reads the kubeconfig, checks
/// the context is there, resolves exec plugins on the login shell's PATH.
pub async fn staging_client(settings: &StagingSettings) -> Result<StagingClient, StagingError> {
    let context = settings
        .context
        .clone()
        .ok_or(StagingError::NotConfigured)?;
    let (read, source_name) = match &settings.kubeconfig {
        Some(path) => (Kubeconfig::read_from(path), path.display().to_string()),
        None => (
            Kubeconfig::read(),
            "$KUBECONFIG or ~/.kube/config".to_owned(),
        ),
    };
    let mut kubeconfig = read.map_err(|err| StagingError::Kubeconfig {
        source_name: source_name.clone(),
        message: err.to_string(),
    })?;
    if !kubeconfig.contexts.iter().any(|c| c.name == context) {
        let known: Vec<&str> = kubeconfig
            .contexts
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        return Err(StagingError::ContextMissing {
            context,
            source_name,
            known: if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            },
        });
    }
    // The login shell runs once per client, off the async threads.
    let login_path = tokio::task::spawn_blocking(login_shell_path)
        .await
        .ok()
        .flatten();
    let plugins = resolve_plugins(&mut kubeconfig, login_path.as_deref());
    let options = KubeConfigOptions {
        context: Some(context.clone()),
        ..KubeConfigOptions::default()
    };
    let client_error = |message: String| StagingError::Client {
        context: context.clone(),
        message,
    };
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|err| client_error(err.to_string()))?;
    let client = client_without_nagle(config).map_err(|err| client_error(err.to_string()))?;
    Ok(StagingClient {
        client,
        context,
        source_name,
        plugins,
    })
}

/// A client with kube's own layers (the server's address, credentials,
/// impersonation headers) on connections with TCP_NODELAY set, as Go's
/// API clients have them: an SPDY session carries many connections' small
/// frames, and with Nagle's algorithm each would wait behind the previous
/// one's acknowledgement (40 ms where the other side delays its ACKs).
fn client_without_nagle(config: kube::Config) -> Result<Client, kube::Error> {
    use kube::client::ConfigExt;
    use tower::{BoxError, ServiceBuilder};
    // kube's own client refuses a proxy for want of its proxy feature; so
    // does this one, rather than going around the proxy.
    if let Some(proxy_url) = &config.proxy_url {
        return Err(kube::Error::ProxyProtocolDisabled {
            proxy_url: Box::new(proxy_url.clone()),
            protocol_feature: "kube/http-proxy",
        });
    }
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.enforce_http(false);
    connector.set_nodelay(true);
    connector.set_connect_timeout(config.connect_timeout);
    let https = config.rustls_https_connector_with_connector(connector)?;
    let transport =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(BoxError::from)
        .service(transport);
    Ok(Client::new(service, config.default_namespace))
}

/// Opens port-forward streams to staging pods through the staging API. One
/// client for every connection: its connection pool and TLS sessions are
/// reused, and its exec credentials refreshed when they expire.
#[derive(Clone)]
pub struct StagingCluster {
    settings: StagingSettings,
    client: Arc<tokio::sync::Mutex<ClientState>>,
    /// The SPDY sessions to staging pods, shared by their connections.
    sessions: Arc<Sessions>,
}

/// Least time between two builds of the client after one failed: each runs
/// the login shell and reads the kubeconfig.
const BUILD_BACKOFF: Duration = Duration::from_secs(5);

/// The client, or why the last build failed and when.
#[derive(Default)]
struct ClientState {
    client: Option<Client>,
    failed: Option<(Instant, StagingError)>,
}

impl std::fmt::Debug for StagingCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagingCluster")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl StagingCluster {
    pub fn new(settings: StagingSettings) -> Self {
        Self {
            settings,
            client: Arc::default(),
            sessions: Arc::default(),
        }
    }

    /// Builds the client now (the agent calls it at start, on its own
    /// runtime), so no connection waits for the login shell.
    pub async fn prepare(&self) {
        if let Err(err) = self.client().await {
            tracing::warn!(error = %err, "the staging cluster's client cannot be built yet");
        }
    }

    /// The client: the one built, else built now, unless a build failed
    /// less than [`BUILD_BACKOFF`] ago (then that failure again).
    async fn client(&self) -> Result<Client, StagingError> {
        let mut state = self.client.lock().await;
        if let Some(client) = &state.client {
            return Ok(client.clone());
        }
        if let Some((at, why)) = &state.failed {
            if at.elapsed() < BUILD_BACKOFF {
                return Err(why.clone());
            }
        }
        match staging_client(&self.settings).await {
            Ok(built) => {
                for missing in built.plugins.iter().filter_map(PluginLookup::missing) {
                    tracing::warn!("{missing}");
                }
                tracing::info!(context = %built.context, "staging cluster client ready");
                state.client = Some(built.client.clone());
                state.failed = None;
                Ok(built.client)
            }
            Err(why) => {
                state.failed = Some((Instant::now(), why.clone()));
                Err(why)
            }
        }
    }

    /// Drops the client after the API server refused its credentials: the
    /// next connection builds one from the kubeconfig as it is now.
    async fn forget_client(&self) {
        self.client.lock().await.client = None;
    }

    /// A connection to `port` of a staging pod: on an SPDY session of the
    /// pod's (opened once, shared by its connections), or a WebSocket of
    /// its own where the API server refused SPDY.
    async fn connect(&self, pod: StagingPod, port: u16) -> Result<LocalStream, DialError> {
        let client = self
            .client()
            .await
            .map_err(|err| DialError::StagingUnavailable(err.to_string()))?;
        if !self.sessions.refused() {
            match self.sessions.open(&client, &pod, port).await {
                Ok(stream) => {
                    return Ok(LocalStream {
                        stream: Box::new(stream),
                    })
                }
                Err(err) if err.no_spdy() => tracing::warn!(
                    error = %err,
                    "the staging API server refused SPDY; port-forwards go by WebSocket, \
                     one upgrade per connection"
                ),
                Err(OpenError::Refused { code, message, .. }) => {
                    return Err(self.refusal(pod, port, code, message).await)
                }
                Err(err) => {
                    return Err(DialError::StagingPortForward {
                        namespace: pod.namespace,
                        name: pod.name,
                        port,
                        message: match err {
                            OpenError::Kube(err) => describe(&err),
                            other => other.to_string(),
                        },
                    })
                }
            }
        }
        match port_forward::open(&client, &pod.namespace, &pod.name, port).await {
            Ok(stream) => Ok(LocalStream {
                stream: Box::new(stream),
            }),
            Err(kube::Error::Api(status)) => {
                Err(self.refusal(pod, port, status.code, status.message).await)
            }
            Err(err) => Err(DialError::StagingPortForward {
                namespace: pod.namespace,
                name: pod.name,
                port,
                message: describe(&err),
            }),
        }
    }

    /// What the API server's refusal of a port-forward means for the
    /// tunnel: a pod that is gone, credentials to read again, or its words.
    async fn refusal(&self, pod: StagingPod, port: u16, code: u16, message: String) -> DialError {
        let StagingPod {
            namespace, name, ..
        } = pod;
        match code {
            404 => DialError::StagingPodGone { namespace, name },
            401 => {
                self.forget_client().await;
                DialError::StagingPortForward {
                    namespace,
                    name,
                    port,
                    message: format!(
                        "{message} (401): the credentials were refused; the next connection \
                         reads the kubeconfig again"
                    ),
                }
            }
            _ => DialError::StagingPortForward {
                namespace,
                name,
                port,
                message: format!("{message} ({code})"),
            },
        }
    }
}

impl StagingDialer for StagingCluster {
    fn dial(
        &self,
        pod: &StagingPod,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = Result<LocalStream, DialError>> + Send>> {
        let cluster = self.clone();
        let pod = pod.clone();
        Box::pin(async move { cluster.connect(pod, port).await })
    }
}
