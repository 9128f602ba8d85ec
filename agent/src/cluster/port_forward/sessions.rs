//! The SPDY sessions to staging pods: per pod, the sessions its
//! connections share (each carrying at most [`CONNECTIONS_PER_SESSION`]),
//! a new one upgraded only when none can take another connection, and the
//! upgrade itself (`POST .../portforward`, `Upgrade: SPDY/3.1`), through
//! the kube client's connections and credentials.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use hyper::http::{self, header, StatusCode};
use hyper_util::rt::TokioIo;
use kube::Client;

use super::spdy::{PairStream, Session};

/// How many connections one session carries before another is opened: a
/// connection whose client stops reading holds up its session's others.
pub const CONNECTIONS_PER_SESSION: usize = 32;

/// The most of a refusal's body kept for its message.
const REFUSAL_BODY: usize = 4096;

/// Why no SPDY connection to a pod was opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The API server answered the upgrade with this status.
    #[error("{message} ({code})")]
    Refused { code: u16, message: String },
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("the port-forward upgrade failed: {0}")]
    Upgrade(String),
}

impl OpenError {
    /// Whether the answer says SPDY itself is not spoken there (a proxy in
    /// front of the API server, say), so a WebSocket may do instead.
    pub fn no_spdy(&self) -> bool {
        matches!(self, OpenError::Refused { code, .. } if matches!(code, 400 | 405 | 426 | 501))
    }
}

/// One pod's sessions, locked while a connection picks one (or upgrades).
type PodSessions = Arc<tokio::sync::Mutex<Vec<Session>>>;

/// The sessions, by pod (namespace, name).
#[derive(Debug, Default)]
pub struct Sessions {
    by_pod: Mutex<HashMap<(String, String), PodSessions>>,
    /// The API server refused SPDY: connections go by WebSocket from now on.
    refused: AtomicBool,
}

impl Sessions {
    /// Whether the API server refused SPDY once (then the caller uses a
    /// WebSocket per connection).
    pub fn refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }

    /// A connection to `port` of pod `namespace/name`: on a session of the
    /// pod's that has room, else on a new one.
    pub async fn open(
        &self,
        client: &Client,
        namespace: &str,
        name: &str,
        port: u16,
    ) -> Result<PairStream, OpenError> {
        let slot = {
            let mut by_pod = match self.by_pod.lock() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            // Pods whose sessions all ended are forgotten.
            by_pod.retain(|_, sessions| {
                Arc::strong_count(sessions) > 1
                    || sessions
                        .try_lock()
                        .map_or(true, |sessions| sessions.iter().any(Session::is_usable))
            });
            by_pod
                .entry((namespace.to_owned(), name.to_owned()))
                .or_default()
                .clone()
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
        let session = match upgrade(client, namespace, name).await {
            Ok(session) => session,
            Err(err) => {
                if err.no_spdy() {
                    self.refused.store(true, Ordering::Relaxed);
                }
                return Err(err);
            }
        };
        let stream = session
            .open(port)
            .map_err(|err| OpenError::Upgrade(err.to_string()))?;
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
    .header("X-Stream-Protocol-Version", "portforward.k8s.io")
    .body(kube::client::Body::empty())
    .map_err(|err| OpenError::Upgrade(err.to_string()))?;
    let response = client.send(request).await?;
    let code = response.status();
    if code != StatusCode::SWITCHING_PROTOCOLS {
        let body = response
            .into_body()
            .collect_bytes()
            .await
            .unwrap_or_default();
        return Err(OpenError::Refused {
            code: code.as_u16(),
            message: refusal_message(code, &body),
        });
    }
    let upgraded = hyper::upgrade::on(response)
        .await
        .map_err(|err| OpenError::Upgrade(err.to_string()))?;
    Ok(Session::start(TokioIo::new(upgraded)))
}

/// A refusal's words: the `message` of the API's Status, else the start of
/// the body, else the status's reason.
fn refusal_message(code: StatusCode, body: &[u8]) -> String {
    let body = &body[..body.len().min(REFUSAL_BODY)];
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|status| status["message"].as_str().map(str::to_owned))
        .or_else(|| {
            let text = String::from_utf8_lossy(body).trim().to_owned();
            (!text.is_empty()).then_some(text)
        })
        .unwrap_or_else(|| code.canonical_reason().unwrap_or("refused").to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_says_what_the_api_server_said() {
        let status = br#"{"kind":"Status","message":"pods \"web\" not found","code":404}"#;
        assert_eq!(
            refusal_message(StatusCode::NOT_FOUND, status),
            "pods \"web\" not found"
        );
        assert_eq!(
            refusal_message(StatusCode::BAD_REQUEST, b"  upgrade not allowed\n"),
            "upgrade not allowed"
        );
        assert_eq!(
            refusal_message(StatusCode::UPGRADE_REQUIRED, b""),
            "Upgrade Required"
        );
    }

    #[test]
    fn only_answers_about_the_protocol_fall_back_to_a_websocket() {
        let refused = |code| OpenError::Refused {
            code,
            message: String::new(),
        };
        assert!(refused(400).no_spdy());
        assert!(refused(426).no_spdy());
        assert!(
            !refused(404).no_spdy(),
            "a missing pod is missing either way"
        );
        assert!(!refused(403).no_spdy());
        assert!(!refused(401).no_spdy());
        assert!(!refused(503).no_spdy());
    }
}
