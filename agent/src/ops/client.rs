//! A client of a running agent's HTTP API, for the CLI (`status`, `pods`,
//! `push`, `forward`): one place that knows the paths and the error shape,
//! and that sends the bearer token on loopback only to a listener of this
//! user's.

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::{StatusCode, Url};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::model::{
    ForwardingRequest, HealthResponse, PodList, Redirection, StagingVia, StatusResponse,
    TargetRequest, TunnelTarget,
};

/// Why a call to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid agent URL {url:?}: {source}")]
    Url { url: String, source: BoxedError },
    #[error("cannot reach the agent at {url}: {source} (is `k3s-local-agent run` running?)")]
    Unreachable { url: String, source: reqwest::Error },
    /// The agent's loopback port is held by another user: whoever it is
    /// would get the token, and with it this user's agent.
    #[error(
        "refusing to send the bearer token to {url}: the socket listening on {bound} belongs \
         to uid {uid}, not to this user (uid {own}). Another user's program holds the agent's \
         port; start your agent on another one (`--agent-port`) and point `--agent-url` at it"
    )]
    ForeignListener {
        url: String,
        bound: SocketAddr,
        uid: u32,
        own: u32,
    },
    #[error("agent answered {status}: {message}")]
    Api { status: StatusCode, message: String },
    #[error("unexpected answer from the agent: {0}")]
    Decode(#[source] BoxedError),
}

/// A cause of more than one kind (a URL's parse, the HTTP client's build),
/// kept whole as the error's source.
pub type BoxedError = Box<dyn std::error::Error + Send + Sync>;

/// Talks to one agent.
#[derive(Debug, Clone)]
pub struct AgentClient {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
}

impl AgentClient {
    /// A client for the agent at `base_url`, sending `token` when given.
    pub fn new(base_url: &str, token: Option<String>) -> Result<Self, ClientError> {
        let url_error = |source: BoxedError| ClientError::Url {
            url: base_url.to_owned(),
            source,
        };
        let base = Url::parse(base_url).map_err(|err| url_error(err.into()))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|err| url_error(err.into()))?;
        Ok(Self { http, base, token })
    }

    fn url(&self, path: &str) -> Result<Url, ClientError> {
        self.base.join(path).map_err(|err| ClientError::Url {
            url: self.base.to_string(),
            source: err.into(),
        })
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, Value), ClientError> {
        let request = match &self.token {
            Some(token) => match self.check_listener().await? {
                Listener::Ours => request.bearer_auth(token),
                // Whoever binds the port next would get it: the request goes
                // without (and most likely finds nobody).
                Listener::None => request,
            },
            None => request,
        };
        let response = request
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: self.base.to_string(),
                source,
            })?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|err| ClientError::Decode(err.into()))?;
        let value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
        Ok((status, value))
    }

    /// Before the token goes to a loopback address: every listener the URL
    /// could reach there (each address a name resolves to) must be this
    /// user's, or root's (who can read the token anyway). Any user can
    /// listen on a free loopback port, the agent's when it is not running,
    /// and the token would make them a trusted caller of this user's agent.
    /// Checked right before each request, so the window between the check
    /// and the connection is as short as the client makes it.
    async fn check_listener(&self) -> Result<Listener, ClientError> {
        let Some(own) = super::own_uid() else {
            return Ok(Listener::Ours);
        };
        let port = self.base.port_or_known_default().unwrap_or(80);
        let host = self.base.host_str().unwrap_or_default();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let targets: Vec<SocketAddr> = match bare.parse::<std::net::IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            // A name that does not resolve fails the request on its own.
            Err(_) => tokio::net::lookup_host((bare, port))
                .await
                .map(Iterator::collect)
                .unwrap_or_default(),
        };
        // Beyond loopback (another machine) the kernel here cannot tell.
        let mut found = if targets.iter().all(|t| !t.ip().to_canonical().is_loopback()) {
            Listener::Ours
        } else {
            Listener::None
        };
        for target in targets {
            if !target.ip().to_canonical().is_loopback() {
                continue;
            }
            let owner = tokio::task::spawn_blocking(move || super::listener_owner(target))
                .await
                .ok()
                .flatten();
            if let Some(owner) = owner {
                if owner.uid != own && owner.uid != 0 {
                    return Err(ClientError::ForeignListener {
                        url: self.base.to_string(),
                        bound: owner.bound,
                        uid: owner.uid,
                        own,
                    });
                }
                found = Listener::Ours;
            }
        }
        Ok(found)
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let (status, value) = self.send(self.http.get(self.url(path)?)).await?;
        decode(status, value)
    }

    pub async fn health(&self) -> Result<HealthResponse, ClientError> {
        self.get("health").await
    }

    pub async fn status(&self) -> Result<StatusResponse, ClientError> {
        self.get("api/v1/pods/status").await
    }

    /// Health, every pod with its tunnel and last minute, and port use.
    pub async fn snapshot(&self) -> Result<crate::model::Snapshot, ClientError> {
        self.get("api/v1/snapshot").await
    }

    pub async fn pods(&self) -> Result<PodList, ClientError> {
        self.get("api/v1/pods").await
    }

    /// Sends a `PodUpdateRequest` as a control plane would; returns the
    /// agent's answer whatever its status, so partial rejections can be shown.
    pub async fn push(&self, request: &Value) -> Result<(StatusCode, Value), ClientError> {
        self.send(self.http.post(self.url("api/v1/pods")?).json(request))
            .await
    }

    /// `api/v1/pods/{pod_id}/{action}`, with the id escaped.
    fn pod_url(&self, pod_id: &str, action: &str) -> Result<Url, ClientError> {
        let mut url = self.url("api/v1/pods/")?;
        url.path_segments_mut()
            .map_err(|()| ClientError::Url {
                url: self.base.to_string(),
                source: "cannot be a base URL".into(),
            })?
            .pop_if_empty()
            .push(pod_id)
            .push(action);
        Ok(url)
    }

    pub async fn set_forwarding(
        &self,
        pod_id: &str,
        enabled: bool,
        port: Option<u16>,
    ) -> Result<Redirection, ClientError> {
        let url = self.pod_url(pod_id, "forwarding")?;
        let (status, value) = self
            .send(
                self.http
                    .post(url)
                    .json(&ForwardingRequest { enabled, port }),
            )
            .await?;
        decode(status, value)
    }

    pub async fn set_target(
        &self,
        pod_id: &str,
        target: TunnelTarget,
        via: Option<StagingVia>,
    ) -> Result<Redirection, ClientError> {
        let url = self.pod_url(pod_id, "target")?;
        let (status, value) = self
            .send(self.http.post(url).json(&TargetRequest { target, via }))
            .await?;
        decode(status, value)
    }
}

/// Who listens where a request would go, as far as the token is concerned.
enum Listener {
    /// This user's agent (or root's), or an address beyond this machine.
    Ours,
    /// Nothing on loopback yet.
    None,
}

fn decode<T: DeserializeOwned>(status: StatusCode, value: Value) -> Result<T, ClientError> {
    if !status.is_success() {
        let message = value
            .get("error")
            .and_then(Value::as_str)
            .map_or_else(|| value.to_string(), str::to_owned);
        return Err(ClientError::Api { status, message });
    }
    serde_json::from_value(value).map_err(|err| ClientError::Decode(err.into()))
}
