//! The staging cluster, reached through its API server with the user's own
//! kubeconfig: the client (built when the agent starts, off any
//! connection's clock, with exec plugins resolved as a login shell would;
//! built again after a failed build or the API server's refusal of its
//! credentials, at most every few seconds; its exec plugin run by us under
//! a deadline, never by kube on a runtime thread), and the dialer that
//! opens a fresh port-forward stream to a staging pod per connection, on
//! the pod's shared SPDY sessions (a WebSocket of its own where SPDY is
//! refused), so a stream error breaks that one connection, never the
//! listener (kubernetes#111825).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use chrono::Utc;
use hyper::http::header::AUTHORIZATION;
use hyper::http::{HeaderValue, Request};
use kube::config::{ExecConfig, KubeConfigOptions, Kubeconfig};
use kube::Client;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tower::BoxError;

use super::connection::describe;
use super::credentials::{
    resolve_plugins, CredentialProcesses, ExecCredentialError, PluginCredentials, PluginError,
    PluginLookup, PLUGIN_TIMEOUT,
};
use super::port_forward::{self, OpenError, Sessions};
use crate::config::StagingSettings;
use crate::model::StagingHealth;
use crate::tunnel::{DialError, DialFuture, LocalStream, StagingDialer, StagingPod};

/// Least time between two builds of the client after one failed or the
/// API server refused its credentials: each reads the kubeconfig and runs
/// the credential plugins.
const BUILD_BACKOFF: Duration = Duration::from_secs(5);
/// Most time the file-bound parts of a build (the kubeconfig, certificates)
/// get on their thread: a file on a hung network mount must not hold the
/// client's lock, and every connection behind it, for good.
const BUILD_DEADLINE: Duration = Duration::from_secs(10);
/// How long before its expiry a plugin's token is asked for again (kube's
/// and client-go's margin).
const REFRESH_BEFORE: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// Why the staging cluster's client could not be built.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StagingError {
    #[error("no staging context configured (--staging-kube-context)")]
    NotConfigured,
    #[error("cannot read the kubeconfig {source_name}: {source}")]
    Kubeconfig {
        source_name: String,
        // Shared: the error is cloned to every connection waiting on a build.
        source: Arc<kube::config::KubeconfigError>,
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
    #[error("cannot build a client for context {context:?}: {source}")]
    Client {
        context: String,
        // Shared: the error is cloned to every connection waiting on a build.
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot build a client for context {context:?}: the plugin's certificate: {source}")]
    Certificate {
        context: String,
        source: Arc<serde_json::Error>,
    },
    #[error("cannot build a client for context {context:?}: the thread building it ended early")]
    BuildThread { context: String },
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error(
        "reading the kubeconfig and certificates for context {context:?} took over {} s \
         (a file on a network mount that hangs?)",
        .after.as_secs()
    )]
    Slow { context: String, after: Duration },
    #[error(
        "credentials refused: the staging API server answered 401 to context {context:?}; \
         the kubeconfig and its credential plugins are read again in {} s",
        .retry.as_secs()
    )]
    Refused { context: String, retry: Duration },
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

/// Builds a client for the staging context once (`doctor`): its own
/// credential processes, ended as it returns or with the process.
pub async fn staging_client(settings: &StagingSettings) -> Result<StagingClient, StagingError> {
    build(settings, &Arc::default(), &Arc::default()).await
}

/// A client for `context` could not be built, for `source`'s reason.
fn client_error(
    context: &str,
    source: impl std::error::Error + Send + Sync + 'static,
) -> StagingError {
    StagingError::Client {
        context: context.to_owned(),
        source: Arc::new(source),
    }
}

/// Runs `work` on a thread of its own and waits at most [`BUILD_DEADLINE`]
/// for it. Not tokio's blocking pool: the runtime waits for those tasks
/// as it shuts down, and this one may never end; a thread left behind
/// here ends with the process.
async fn off_thread<T: Send + 'static>(
    context: &str,
    work: impl FnOnce() -> Result<T, StagingError> + Send + 'static,
) -> Result<T, StagingError> {
    let (sender, receiver) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("staging-client".to_owned())
        .spawn(move || {
            let _ = sender.send(work());
        })
        .map_err(|err| client_error(context, err))?;
    match tokio::time::timeout(BUILD_DEADLINE, receiver).await {
        Ok(Ok(built)) => built,
        Ok(Err(_)) => Err(StagingError::BuildThread {
            context: context.to_owned(),
        }),
        Err(_) => Err(StagingError::Slow {
            context: context.to_owned(),
            after: BUILD_DEADLINE,
        }),
    }
}

/// The kubeconfig read, its context checked, its plugins resolved on
/// `login_path`, and kube's config for the context (blocking: on a thread).
fn load_config(
    settings: &StagingSettings,
    context: &str,
    login_path: Option<&str>,
) -> Result<(kube::Config, String, Vec<PluginLookup>, String), StagingError> {
    let (read, source_name) = match &settings.kubeconfig {
        Some(path) => (Kubeconfig::read_from(path), path.display().to_string()),
        None => (
            Kubeconfig::read(),
            "$KUBECONFIG or ~/.kube/config".to_owned(),
        ),
    };
    let mut kubeconfig = read.map_err(|err| StagingError::Kubeconfig {
        source_name: source_name.clone(),
        source: Arc::new(err),
    })?;
    if !kubeconfig.contexts.iter().any(|c| c.name == context) {
        let known: Vec<&str> = kubeconfig
            .contexts
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        return Err(StagingError::ContextMissing {
            context: context.to_owned(),
            source_name,
            known: if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            },
        });
    }
    let user = kubeconfig
        .contexts
        .iter()
        .find(|c| c.name == context)
        .and_then(|c| c.context.as_ref())
        .and_then(|c| c.user.clone())
        .unwrap_or_default();
    let plugins = resolve_plugins(&mut kubeconfig, login_path);
    let options = KubeConfigOptions {
        context: Some(context.to_owned()),
        ..KubeConfigOptions::default()
    };
    // kube's loader is async in name only (it reads files): a runtime of
    // this thread's own runs it.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| client_error(context, err))?;
    let config = runtime
        .block_on(kube::Config::from_custom_kubeconfig(kubeconfig, &options))
        .map_err(|err| client_error(context, err))?;
    Ok((config, source_name, plugins, user))
}

/// Builds a client for the staging context: reads the kubeconfig, checks
/// the context is there, resolves exec plugins on the login shell's PATH
/// and runs the context's plugin. The files are read on a thread under a
/// deadline, the login shell and the plugin run as async processes under
/// theirs: nothing here holds a runtime thread.
async fn build(
    settings: &StagingSettings,
    processes: &Arc<CredentialProcesses>,
    health: &Arc<HealthCell>,
) -> Result<StagingClient, StagingError> {
    let context = settings
        .context
        .clone()
        .ok_or(StagingError::NotConfigured)?;
    let login_path = processes.login_path().await;
    let (read_settings, read_context) = (settings.clone(), context.clone());
    let (mut config, source_name, plugins, user) = off_thread(&context, move || {
        load_config(&read_settings, &read_context, login_path.as_deref())
    })
    .await?;
    // The plugin is ours to run, never kube's. kube runs it synchronously
    // wherever the client is built (twice: for the TLS identity and for the
    // token) and on its blocking pool at each refresh, which the runtime
    // waits for at exit, with no deadline; nothing could stop it. Wrapping
    // the kubeconfig's command in a timeout program would bound it but
    // still hold those threads, needs a program every face ships (the tray
    // app is another binary; timeout(1) is not everywhere), and could not
    // say in /health why it failed. So it runs here, once now (the client
    // starts with credentials, and a certificate when that is what the
    // plugin gives) and again when its token expires. A user with a token
    // or a password of its own never runs it (kube's order).
    let own_credentials = config.auth_info.token.is_some()
        || config.auth_info.token_file.is_some()
        || config.auth_info.username.is_some()
        || config.auth_info.auth_provider.is_some();
    let exec = config.auth_info.exec.take().filter(|_| !own_credentials);
    let mut exec_token = None;
    if let Some(exec) = exec {
        let credentials = processes.run_plugin(&user, &exec, PLUGIN_TIMEOUT).await?;
        if let (Some(certificate), Some(key)) =
            (&credentials.client_certificate, &credentials.client_key)
        {
            use_certificate(&mut config, &context, certificate, key)?;
        }
        if credentials.token.is_some() {
            exec_token = Some(Arc::new(ExecToken {
                user,
                exec,
                processes: Arc::clone(processes),
                health: Arc::clone(health),
                state: tokio::sync::Mutex::new(TokenState::issued(credentials)),
            }));
        }
    }
    // Certificates are read here: on a thread too. kube's Client takes
    // the service back on this runtime, where its buffer's task runs.
    let parts_context = context.clone();
    let (service, namespace) = off_thread(&context, move || {
        let service =
            client_service(&config, exec_token).map_err(|err| client_error(&parts_context, err))?;
        Ok((service, config.default_namespace))
    })
    .await?;
    let client = Client::new(service, namespace);
    Ok(StagingClient {
        client,
        context,
        source_name,
        plugins,
    })
}

/// Puts the client certificate and key a plugin printed (PEM) where kube
/// reads a kubeconfig's own (base64 in `client-certificate-data`).
fn use_certificate(
    config: &mut kube::Config,
    context: &str,
    certificate: &str,
    key: &str,
) -> Result<(), StagingError> {
    let base64 = |pem: &str| serde_json::to_value(k8s_openapi::ByteString(pem.as_bytes().to_vec()));
    let client_error = |err: serde_json::Error| StagingError::Certificate {
        context: context.to_owned(),
        source: Arc::new(err),
    };
    let certificate = base64(certificate).map_err(client_error)?;
    config.auth_info.client_certificate_data = certificate.as_str().map(str::to_owned);
    // The key's field is a secret kube keeps out of logs, made only as a
    // kubeconfig's user is read: from its text.
    let key = serde_json::json!({ "client-key-data": base64(key).map_err(client_error)? });
    config.auth_info.client_key_data = serde_json::from_value::<kube::config::AuthInfo>(key)
        .map_err(client_error)?
        .client_key_data;
    Ok(())
}

/// The service under a client: kube's own layers (the server's address,
/// credentials, impersonation headers) on connections with TCP_NODELAY
/// set, as Go's API clients have them: an SPDY session carries many
/// connections' small frames, and with Nagle's algorithm each would wait
/// behind the previous one's acknowledgement (40 ms where the other side
/// delays its ACKs). An exec plugin's token is added by [`ExecAuth`], not
/// by kube. Blocking: it reads certificates.
fn client_service(
    config: &kube::Config,
    exec_token: Option<Arc<ExecToken>>,
) -> Result<ClientService, kube::Error> {
    use kube::client::ConfigExt;
    use tower::{ServiceBuilder, ServiceExt};
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
    Ok(ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .option_layer(exec_token.map(ExecAuthLayer))
        .layer(config.extra_headers_layer()?)
        .map_err(BoxError::from)
        .service(transport)
        .boxed())
}

/// The service a staging client sends its requests through.
type ClientService = tower::util::BoxService<
    Request<kube::client::Body>,
    hyper::http::Response<hyper::body::Incoming>,
    BoxError,
>;

/// An exec plugin's token, asked for again (our way: a deadline, its
/// process group killed) when less than a minute of it is left.
struct ExecToken {
    user: String,
    exec: ExecConfig,
    processes: Arc<CredentialProcesses>,
    health: Arc<HealthCell>,
    state: tokio::sync::Mutex<TokenState>,
}

/// The token in use, and the last failure to get a new one (not asked
/// again for [`BUILD_BACKOFF`]: every connection would run the plugin).
struct TokenState {
    token: String,
    expires: Option<chrono::DateTime<Utc>>,
    failed: Option<(Instant, PluginError)>,
}

impl TokenState {
    fn issued(credentials: PluginCredentials) -> Self {
        Self {
            token: credentials.token.unwrap_or_default(),
            expires: credentials.expires,
            failed: None,
        }
    }

    fn fresh(&self) -> bool {
        self.expires
            .is_none_or(|expires| Utc::now() + REFRESH_BEFORE < expires)
    }
}

impl ExecToken {
    /// `Authorization: Bearer …`, the plugin run first when the token expires.
    async fn header(&self) -> Result<HeaderValue, PluginError> {
        let mut state = self.state.lock().await;
        if !state.fresh() {
            if let Some((at, why)) = &state.failed {
                if at.elapsed() < BUILD_BACKOFF {
                    return Err(why.clone());
                }
            }
            match self
                .processes
                .run_plugin(&self.user, &self.exec, PLUGIN_TIMEOUT)
                .await
            {
                Ok(credentials) if credentials.token.is_some() => {
                    *state = TokenState::issued(credentials);
                    self.health.clear(Problem::Client);
                }
                Ok(_) => {
                    let why = PluginError::Output {
                        command: self.exec.command.clone().unwrap_or_default(),
                        user: self.user.clone(),
                        source: ExecCredentialError::NoToken,
                    };
                    self.health.set(Problem::Client, why.to_string());
                    state.failed = Some((Instant::now(), why.clone()));
                    return Err(why);
                }
                Err(why) => {
                    self.health.set(Problem::Client, why.to_string());
                    state.failed = Some((Instant::now(), why.clone()));
                    return Err(why);
                }
            }
        }
        let mut value =
            HeaderValue::try_from(format!("Bearer {}", state.token)).map_err(|err| {
                PluginError::Output {
                    command: self.exec.command.clone().unwrap_or_default(),
                    user: self.user.clone(),
                    source: ExecCredentialError::Unsendable(Arc::new(err)),
                }
            })?;
        value.set_sensitive(true);
        Ok(value)
    }
}

/// Adds the exec plugin's token to every request.
#[derive(Clone)]
struct ExecAuthLayer(Arc<ExecToken>);

impl<S> tower::Layer<S> for ExecAuthLayer {
    type Service = ExecAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ExecAuth {
            inner,
            token: Arc::clone(&self.0),
        }
    }
}

#[derive(Clone)]
struct ExecAuth<S> {
    inner: S,
    token: Arc<ExecToken>,
}

impl<S, B> tower::Service<Request<B>> for ExecAuth<S>
where
    S: tower::Service<Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        // The service made ready goes into the future; a clone stays for
        // the next call (tower's rule for a call finished asynchronously).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let token = Arc::clone(&self.token);
        Box::pin(async move {
            let value = token.header().await?;
            request.headers_mut().insert(AUTHORIZATION, value);
            inner.call(request).await.map_err(Into::into)
        })
    }
}

/// What is wrong with reaching the staging cluster, for `/health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Problem {
    /// The client could not be built, or its plugin gave no token.
    Client,
    /// The API server refused the credentials (401).
    Refused,
}

#[derive(Debug, Default)]
struct HealthCell(Mutex<HealthState>);

#[derive(Debug, Default)]
struct HealthState {
    built: bool,
    problem: Option<(Problem, String)>,
}

impl HealthCell {
    fn lock(&self) -> parking_lot::MutexGuard<'_, HealthState> {
        self.0.lock()
    }

    fn set(&self, problem: Problem, why: String) {
        self.lock().problem = Some((problem, why));
    }

    /// Clears a problem of this kind; a refusal stays until the API
    /// server takes the credentials (a client built is no proof of that).
    fn clear(&self, problem: Problem) {
        let mut state = self.lock();
        if state
            .problem
            .as_ref()
            .is_some_and(|(kind, _)| *kind == problem)
        {
            state.problem = None;
        }
    }

    fn built(&self) {
        self.lock().built = true;
        self.clear(Problem::Client);
    }

    /// The API server took a port-forward: nothing is wrong.
    fn answered(&self) {
        let mut state = self.lock();
        state.built = true;
        state.problem = None;
    }

    fn view(&self) -> StagingHealth {
        let state = self.lock();
        StagingHealth {
            status: match (&state.problem, state.built) {
                (Some(_), _) => "unavailable",
                (None, true) => "ready",
                (None, false) => "connecting",
            }
            .to_owned(),
            problem: state.problem.as_ref().map(|(_, why)| why.clone()),
        }
    }
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
    /// The login shell's PATH as last found, and the credential processes
    /// running (killed when the agent stops).
    processes: Arc<CredentialProcesses>,
    health: Arc<HealthCell>,
}

/// The client, or why the last build failed (or the API server refused
/// its credentials) and when.
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
            processes: Arc::default(),
            health: Arc::default(),
        }
    }

    /// Builds the client now (at start), so no connection waits for the
    /// login shell; then, once `cancel` fires, kills every credential
    /// process still running (those connections started too) and starts
    /// no more, so the agent's exit waits on none.
    pub async fn run(&self, cancel: CancellationToken) {
        tokio::select! {
            () = self.prepare() => {}
            () = cancel.cancelled() => {}
        }
        cancel.cancelled().await;
        self.processes.stop();
    }

    /// Builds the client now, so no connection waits for the login shell.
    pub async fn prepare(&self) {
        if let Err(err) = self.client().await {
            tracing::warn!(error = %err, "the staging cluster's client cannot be built yet");
        }
    }

    /// The staging cluster as `/health` shows it: ready, or what is wrong.
    pub fn health(&self) -> StagingHealth {
        self.health.view()
    }

    /// The client: the one built, else built now, unless a build failed or
    /// the API server refused the credentials less than [`BUILD_BACKOFF`]
    /// ago (then that again).
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
        match build(&self.settings, &self.processes, &self.health).await {
            Ok(built) => {
                for missing in built.plugins.iter().filter_map(PluginLookup::missing) {
                    tracing::warn!("{missing}");
                }
                tracing::info!(context = %built.context, "staging cluster client ready");
                self.health.built();
                state.client = Some(built.client.clone());
                state.failed = None;
                Ok(built.client)
            }
            Err(why) => {
                self.health.set(Problem::Client, why.to_string());
                state.failed = Some((Instant::now(), why.clone()));
                Err(why)
            }
        }
    }

    /// Drops the client after the API server refused its credentials; the
    /// first connection after [`BUILD_BACKOFF`] builds one from the
    /// kubeconfig as it is then. Those before are told at once: a refusal
    /// rebuilt per connection ran the plugins for every one of them.
    async fn credentials_refused(&self) -> StagingError {
        let why = StagingError::Refused {
            context: self.settings.context.clone().unwrap_or_default(),
            retry: BUILD_BACKOFF,
        };
        self.health.set(Problem::Refused, why.to_string());
        let mut state = self.client.lock().await;
        state.client = None;
        state.failed = Some((Instant::now(), why.clone()));
        why
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
                    self.health.answered();
                    return Ok(LocalStream {
                        stream: Box::new(stream),
                    });
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
            Ok(stream) => {
                self.health.answered();
                Ok(LocalStream {
                    stream: Box::new(stream),
                })
            }
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
                let why = self.credentials_refused().await;
                DialError::StagingPortForward {
                    namespace,
                    name,
                    port,
                    message: format!("{message} (401): {why}"),
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
    fn dial(&self, pod: &StagingPod, port: u16) -> DialFuture {
        let cluster = self.clone();
        let pod = pod.clone();
        Box::pin(async move { cluster.connect(pod, port).await })
    }
}
