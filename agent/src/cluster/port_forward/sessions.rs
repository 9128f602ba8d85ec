//! The SPDY sessions to staging pods: per pod (its namespace, name and IP
//! as pushed, so a pod replaced under the same name gets sessions of its
//! own), the sessions its connections share (each carrying at most [`CONNECTIONS_PER_SESSION`]),
//! a new one upgraded only when none can take another connection, and the
//! upgrade itself (`POST .../portforward`, `Upgrade: SPDY/3.1`), through
//! the kube client's connections and credentials.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use hyper::http::{self, header, StatusCode};
use hyper_util::rt::TokioIo;
use kube::Client;
use parking_lot::Mutex;
use tracing::Instrument as _;

use super::spdy::{PairStream, Session, SessionRetired};
use crate::tunnel::StagingPod;

/// How many connections one session carries before another is opened: a
/// connection whose client stops reading holds up its session's others.
pub const CONNECTIONS_PER_SESSION: usize = 32;

/// The most of a refusal's body read for its message.
const REFUSAL_BODY: usize = 4096;

/// The port-forward protocol spoken on the sessions, and where it is named.
const PROTOCOL: &str = "portforward.k8s.io";
const PROTOCOL_HEADER: &str = "X-Stream-Protocol-Version";

/// Why no SPDY connection to a pod was opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The API server (or something in front of it) answered the upgrade
    /// with this status.
    #[error("{message} ({code})")]
    Refused {
        code: u16,
        message: String,
        /// The answer is a Kubernetes `Status`: the API server's own words.
        from_api: bool,
    },
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("the port-forward request cannot be built: {0}")]
    Request(#[from] http::Error),
    #[error("the port-forward upgrade failed: {0}")]
    Upgrade(#[from] hyper::Error),
    #[error("the server upgraded to {0:?}, not portforward.k8s.io")]
    Protocol(String),
    #[error(transparent)]
    Retired(#[from] SessionRetired),
}

impl OpenError {
    /// Whether the answer says SPDY itself is not spoken there: a refusal
    /// of the upgrade by something in front of the API server (a proxy that
    /// passes only WebSockets), not the API's own words (its 400 for a pod
    /// not yet scheduled is about the pod).
    pub fn no_spdy(&self) -> bool {
        matches!(
            self,
            OpenError::Refused { code, from_api: false, .. } if matches!(code, 400 | 405 | 426 | 501)
        )
    }
}

/// One pod's sessions, locked while a connection picks one (or upgrades).
type PodSessions = Arc<tokio::sync::Mutex<Vec<Session>>>;

/// The sessions, by pod.
#[derive(Debug, Default)]
pub struct Sessions {
    by_pod: Mutex<HashMap<StagingPod, PodSessions>>,
    /// The API server refused SPDY: connections go by WebSocket from now on.
    refused: AtomicBool,
    /// The last session's number: the logs tell a pod's sessions apart by it.
    last_id: AtomicU64,
}

impl Sessions {
    /// Whether the API server refused SPDY once (then the caller uses a
    /// WebSocket per connection).
    pub fn refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }

    /// A connection to `port` of `pod`: on a session of the pod's that has
    /// room, else on a new one.
    pub async fn open(
        &self,
        client: &Client,
        pod: &StagingPod,
        port: u16,
    ) -> Result<PairStream, OpenError> {
        let slot = {
            let mut by_pod = self.by_pod.lock();
            // Pods whose sessions all ended are forgotten.
            by_pod.retain(|_, sessions| {
                Arc::strong_count(sessions) > 1
                    || sessions
                        .try_lock()
                        .map_or(true, |sessions| sessions.iter().any(Session::is_usable))
            });
            by_pod.entry(pod.clone()).or_default().clone()
        };
        // Held across an upgrade: connections arriving meanwhile share it.
        let mut sessions = slot.lock().await;
        sessions.retain(Session::is_usable);
        for session in sessions.iter() {
            if session.connections() < CONNECTIONS_PER_SESSION {
                if let Ok(stream) = session.open(port) {
                    return Ok(stream);
                }
            }
        }
        let id = self.last_id.fetch_add(1, Ordering::Relaxed) + 1;
        let span = tracing::info_span!(
            "staging_session",
            namespace = %pod.namespace,
            pod = %pod.name,
            session = id,
        );
        let session = match upgrade(client, &pod.namespace, &pod.name)
            .instrument(span)
            .await
        {
            Ok(session) => session,
            Err(err) => {
                if err.no_spdy() {
                    self.refused.store(true, Ordering::Relaxed);
                }
                return Err(err);
            }
        };
        let stream = session.open(port)?;
        sessions.push(session);
        Ok(stream)
    }
}

/// Upgrades a connection to pod `namespace/name`'s port-forward to SPDY.
async fn upgrade(client: &Client, namespace: &str, name: &str) -> Result<Session, OpenError> {
    let request = http::Request::post(format!(
        "/api/v1/namespaces/{namespace}/pods/{name}/portforward"
    ))
    .header(header::CONNECTION, "Upgrade")
    .header(header::UPGRADE, "SPDY/3.1")
    .header(PROTOCOL_HEADER, PROTOCOL)
    .body(kube::client::Body::empty())?;
    let response = client.send(request).await?;
    let code = response.status();
    if code != StatusCode::SWITCHING_PROTOCOLS {
        let body = start_of(response.into_body()).await;
        let (message, from_api) = refusal_message(code, &body);
        return Err(OpenError::Refused {
            code: code.as_u16(),
            message,
            from_api,
        });
    }
    if let Some(answered) = response.headers().get(PROTOCOL_HEADER) {
        if answered.as_bytes() != PROTOCOL.as_bytes() {
            return Err(OpenError::Protocol(
                String::from_utf8_lossy(answered.as_bytes()).into_owned(),
            ));
        }
    }
    let upgraded = hyper::upgrade::on(response).await?;
    // Within the caller's span: the session's tasks keep it.
    Ok(Session::start(TokioIo::new(upgraded)))
}

/// The first [`REFUSAL_BODY`] bytes of a refusal's body, read no further.
async fn start_of(mut body: kube::client::Body) -> Vec<u8> {
    use http_body_util::BodyExt;
    let mut start = Vec::new();
    while start.len() < REFUSAL_BODY {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    start.extend_from_slice(data);
                }
            }
            _ => break,
        }
    }
    start.truncate(REFUSAL_BODY);
    start
}

/// A refusal's words: the `message` of the API's Status (and that it is
/// one), else the start of the body, else the status's reason.
fn refusal_message(code: StatusCode, body: &[u8]) -> (String, bool) {
    if let Some(message) = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .filter(|status| status["kind"] == "Status")
        .and_then(|status| status["message"].as_str().map(str::to_owned))
    {
        return (message, true);
    }
    let text = String::from_utf8_lossy(body).trim().to_owned();
    let message = if text.is_empty() {
        code.canonical_reason().unwrap_or("refused").to_owned()
    } else {
        text
    };
    (message, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_says_what_the_api_server_said() {
        let status = br#"{"kind":"Status","message":"pods \"web\" not found","code":404}"#;
        assert_eq!(
            refusal_message(StatusCode::NOT_FOUND, status),
            ("pods \"web\" not found".to_owned(), true)
        );
        assert_eq!(
            refusal_message(StatusCode::BAD_REQUEST, b"  upgrade not allowed\n"),
            ("upgrade not allowed".to_owned(), false)
        );
        assert_eq!(
            refusal_message(StatusCode::UPGRADE_REQUIRED, b""),
            ("Upgrade Required".to_owned(), false)
        );
    }

    #[test]
    fn only_a_refusal_of_the_protocol_falls_back_to_a_websocket() {
        let refused = |code, from_api| OpenError::Refused {
            code,
            message: String::new(),
            from_api,
        };
        assert!(refused(400, false).no_spdy(), "a proxy's 400");
        assert!(refused(426, false).no_spdy());
        assert!(
            !refused(400, true).no_spdy(),
            "the API's 400 (a pod not scheduled yet) is about the pod"
        );
        assert!(
            !refused(404, false).no_spdy(),
            "a missing pod is missing either way"
        );
        assert!(!refused(403, true).no_spdy());
        assert!(!refused(401, true).no_spdy());
        assert!(!refused(503, false).no_spdy());
    }
}
