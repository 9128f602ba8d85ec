//! The API's errors: every failure is a JSON body `{"error": "...",
//! ...details}` with its status, and the core's errors map to one here.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;

use crate::agent::AgentError;

/// A JSON error response: `{"error": "...", ...details}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: serde_json::Map<String, Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        let mut body = serde_json::Map::new();
        body.insert("error".into(), Value::String(message.into()));
        Self { status, body }
    }

    /// Adds a detail field (the bad field, the valid actions, ...).
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.body.insert(key.into(), value.into());
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The `error` text the caller reads.
    pub fn message(&self) -> &str {
        self.body
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(Value::Object(self.body))).into_response()
    }
}

impl From<AgentError> for ApiError {
    fn from(err: AgentError) -> Self {
        match err {
            AgentError::TooManyPods { would_hold, limit } => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                AgentError::TooManyPods { would_hold, limit }.to_string(),
            )
            .with("field", "pods")
            .with("limit", limit),
            AgentError::ForwardingOff => {
                Self::new(StatusCode::CONFLICT, AgentError::ForwardingOff.to_string())
            }
            AgentError::NoStagingCluster => Self::new(
                StatusCode::CONFLICT,
                AgentError::NoStagingCluster.to_string(),
            )
            .with("field", "via"),
            AgentError::UnknownPod(id) => {
                Self::new(StatusCode::NOT_FOUND, format!("no pod with id {id:?}")).with("id", id)
            }
            AgentError::UnknownPort { id, port, why } => Self::new(
                StatusCode::NOT_FOUND,
                AgentError::UnknownPort {
                    id: id.clone(),
                    port,
                    why,
                }
                .to_string(),
            )
            .with("field", "port")
            .with("id", id),
            other => {
                tracing::error!(error = %other, "request failed");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, other.to_string())
            }
        }
    }
}
