//! The agent's HTTP API (DESIGN.md section 2): the router, request parsing
//! that names whatever is wrong, and JSON errors for every failure.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Extension, Json, Router};
use serde_json::{json, Value};
use tower_http::timeout::TimeoutLayer;

use super::error::ApiError;
use super::{auth, metrics, ui};
use crate::agent::{Agent, AgentError};
use crate::model::{
    parse_pod, parse_pod_id_only, Action, ForwardingRequest, PodList, PodRejection, PodSpec,
    PushResponse, TargetRequest,
};

/// Largest request body accepted (1 MiB).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Most pods one push may carry: far more than a port range holds (921 by
/// default), few enough that a runaway control plane cannot stall the agent.
pub const MAX_PODS_PER_PUSH: usize = 5_000;
/// Longest a request may take before it is answered 408.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds the agent's router. State-changing local endpoints are behind
/// [`auth::local_only`]; everything is behind [`auth::check_caller`].
pub fn router(agent: Agent) -> Router {
    let registry = Arc::new(metrics::registry(&agent));
    let local = Router::new()
        .route("/api/v1/pods/{id}/forwarding", post(set_forwarding))
        .route("/api/v1/pods/{id}/stop", post(stop_tunnel))
        .route("/api/v1/pods/{id}/target", post(set_target))
        .route_layer(middleware::from_fn(auth::local_only));
    Router::new()
        .route("/health", get(health))
        .route(
            "/metrics",
            get(move || metrics::endpoint(Arc::clone(&registry))),
        )
        .route("/api/v1/pods", post(push_pods).get(list_pods))
        .route("/api/v1/pods/status", get(pod_status))
        .route("/api/v1/pods/{id}", get(one_pod))
        .merge(local)
        .merge(ui::routes(&agent))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            agent.clone(),
            auth::check_caller,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .with_state(agent)
}

/// The seed's health check; a caller that is not trusted (another user of
/// this machine without the token) learns that the agent lives, not what it
/// holds.
async fn health(State(agent): State<Agent>, caller: Option<Extension<auth::Caller>>) -> Response {
    let health = agent.health();
    match caller {
        Some(Extension(auth::Caller::Stranger)) => Json(health.for_strangers()).into_response(),
        _ => Json(health).into_response(),
    }
}

async fn pod_status(State(agent): State<Agent>) -> Response {
    Json(agent.status()).into_response()
}

async fn list_pods(State(agent): State<Agent>) -> Response {
    Json(PodList {
        pods: agent.pods(),
        timestamp: chrono::Utc::now(),
    })
    .into_response()
}

async fn one_pod(State(agent): State<Agent>, Path(id): Path<String>) -> Result<Response, ApiError> {
    agent
        .pod(&id)
        .map(|view| Json(view).into_response())
        .ok_or_else(|| AgentError::UnknownPod(id).into())
}

async fn set_forwarding(
    State(agent): State<Agent>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(body_error)?;
    let request: ForwardingRequest = serde_json::from_slice(&body).map_err(|err| {
        ApiError::bad_request(format!(
            "body must be {{\"enabled\": true|false}}, with \"port\": <staging port> for one \
             port alone: {err}"
        ))
        .with("field", "enabled")
    })?;
    let tunnel = agent
        .set_forwarding(&id, request.enabled, request.port)
        .await?;
    Ok(Json(tunnel).into_response())
}

async fn set_target(
    State(agent): State<Agent>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(body_error)?;
    let request: TargetRequest = serde_json::from_slice(&body).map_err(|err| {
        ApiError::bad_request(format!(
            "body must be {{\"target\": \"staging\"|\"local\"}}, with \"via\": \
             \"direct\"|\"api\"|\"auto\" for how staging is reached: {err}"
        ))
        .with("field", "target")
    })?;
    let tunnel = agent.set_target(&id, request.target, request.via).await?;
    Ok(Json(tunnel).into_response())
}

async fn stop_tunnel(
    State(agent): State<Agent>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    agent.stop_tunnel(&id).await?;
    Ok(Json(json!({"status": "stopped", "id": id})).into_response())
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

fn body_error(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than the {MAX_BODY_BYTES}-byte limit"),
        )
        .with("limit_bytes", MAX_BODY_BYTES)
    } else {
        ApiError::new(
            rejection.status(),
            format!("cannot read request body: {rejection}"),
        )
    }
}

/// A push, parsed and checked: what to apply and what was turned away.
#[derive(Debug)]
pub struct ParsedPush {
    pub action: Action,
    pub upserts: Vec<PodSpec>,
    /// Where each of `upserts` stood in the pushed list.
    pub indices: Vec<usize>,
    pub delete_ids: Vec<String>,
    pub rejected: Vec<PodRejection>,
}

/// Moves the pods whose target is the agent itself (a loop) from the
/// upserts to the rejected, each naming the field to fix.
fn refuse_loops(agent: &Agent, parsed: &mut ParsedPush) {
    let upserts = std::mem::take(&mut parsed.upserts);
    let indices = std::mem::take(&mut parsed.indices);
    for (spec, index) in upserts.into_iter().zip(indices) {
        match agent.target_loops_back(&spec) {
            Some((field, error)) => parsed.rejected.push(PodRejection {
                id: Some(spec.id.clone()),
                index,
                field: Some(field.to_owned()),
                error,
            }),
            None => {
                parsed.upserts.push(spec);
                parsed.indices.push(index);
            }
        }
    }
}

/// Parses a `PodUpdateRequest`. Errors that spoil the whole request (bad JSON,
/// wrong agent, unknown action) fail it; a bad pod only rejects that pod.
pub fn parse_push(body: &[u8], our_agent_id: &str) -> Result<ParsedPush, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|err| {
        ApiError::bad_request(format!("request body is not valid JSON: {err}"))
            .with("line", err.line())
            .with("column", err.column())
    })?;
    let Value::Object(mut request) = value else {
        return Err(ApiError::bad_request(
            "request body must be a JSON object (a PodUpdateRequest)",
        ));
    };
    match request.get("agent_id") {
        None => {
            return Err(ApiError::bad_request("missing field `agent_id`").with("field", "agent_id"))
        }
        Some(Value::String(id)) if id == our_agent_id => {}
        Some(Value::String(_)) => {
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "Invalid agent ID"))
        }
        Some(_) => {
            return Err(ApiError::bad_request("field `agent_id` must be a string")
                .with("field", "agent_id"))
        }
    }
    let valid_actions = json!(Action::NAMES);
    let action = match request.get("action") {
        None => {
            return Err(ApiError::bad_request(format!(
                "missing field `action`; valid actions: {}",
                Action::NAMES.join(", ")
            ))
            .with("field", "action")
            .with("valid_actions", valid_actions))
        }
        Some(Value::String(name)) => Action::parse(name).ok_or_else(|| {
            ApiError::bad_request(format!(
                "unknown action {name:?}; valid actions: {}",
                Action::NAMES.join(", ")
            ))
            .with("field", "action")
            .with("valid_actions", valid_actions.clone())
        })?,
        Some(_) => {
            return Err(ApiError::bad_request("field `action` must be a string")
                .with("field", "action")
                .with("valid_actions", valid_actions))
        }
    };
    let pods = match request.remove("pods") {
        Some(Value::Array(pods)) => pods,
        Some(Value::Null) | None => {
            return Err(
                ApiError::bad_request("missing field `pods` (a list of pods)")
                    .with("field", "pods"),
            )
        }
        Some(_) => {
            return Err(ApiError::bad_request("field `pods` must be a list").with("field", "pods"))
        }
    };
    if pods.len() > MAX_PODS_PER_PUSH {
        return Err(ApiError::bad_request(format!(
            "field `pods` holds {} pods; at most {MAX_PODS_PER_PUSH} in one push (split it)",
            pods.len()
        ))
        .with("field", "pods")
        .with("limit", MAX_PODS_PER_PUSH));
    }

    let mut parsed = ParsedPush {
        action,
        upserts: Vec::new(),
        indices: Vec::new(),
        delete_ids: Vec::new(),
        rejected: Vec::new(),
    };
    let mut first_seen: BTreeMap<String, usize> = BTreeMap::new();
    for (index, pod) in pods.into_iter().enumerate() {
        let result = match action {
            Action::Delete => parse_pod_id_only(index, &pod).map(Err),
            _ => parse_pod(index, pod).map(Ok),
        };
        let item = match result {
            Ok(item) => item,
            Err(rejection) => {
                parsed.rejected.push(rejection);
                continue;
            }
        };
        let id = match &item {
            Ok(spec) => spec.id.clone(),
            Err(id) => id.clone(),
        };
        if let Some(first) = first_seen.get(&id) {
            parsed.rejected.push(PodRejection {
                id: Some(id),
                index,
                field: Some("id".into()),
                error: format!("duplicate pod id in this push (first at index {first})"),
            });
            continue;
        }
        first_seen.insert(id, index);
        match item {
            Ok(spec) => {
                parsed.upserts.push(spec);
                parsed.indices.push(index);
            }
            Err(id) => parsed.delete_ids.push(id),
        }
    }
    Ok(parsed)
}

async fn push_pods(
    State(agent): State<Agent>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(body_error)?;
    let parsed = parse_push(&body, agent.agent_id())?;
    // Who first (a wrong agent id is 401 however it was sent), then how: a
    // page could post a form with the right id, which is public.
    if auth::has_form_content_type(&headers) {
        return Err(auth::form_refused());
    }
    let mut parsed = parsed;
    refuse_loops(&agent, &mut parsed);
    // A rejected pod's id must survive a sync: losing it would punish a
    // typo with a deleted tunnel.
    let keep: BTreeSet<String> = parsed
        .rejected
        .iter()
        .filter_map(|r| r.id.clone())
        .collect();
    let total = parsed.upserts.len() + parsed.delete_ids.len() + parsed.rejected.len();
    // The push runs to its end as a task of the agent's own, off this
    // request: a client that gives up, or the request timeout, cannot stop
    // it between the disk and the names.
    let applying = {
        let applier = agent.clone();
        agent.tracker().spawn(async move {
            applier
                .apply(parsed.action, parsed.upserts, parsed.delete_ids, keep)
                .await
        })
    };
    let outcome = applying.await.map_err(|err| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the push stopped: {err}"),
        )
    })??;
    for rejection in &parsed.rejected {
        tracing::warn!(
            pod_id = rejection.id.as_deref().unwrap_or("?"),
            index = rejection.index,
            error = %rejection.error,
            "pod rejected"
        );
    }
    let rejected = parsed.rejected;
    let nothing_applied = outcome.applied.is_empty() && outcome.removed.is_empty();
    let (code, status, error) = if rejected.is_empty() {
        (StatusCode::OK, "success", None)
    } else {
        let status = if nothing_applied {
            "rejected"
        } else {
            "partial"
        };
        let error = match rejected.as_slice() {
            [one] => format!(
                "pod {} rejected: {}",
                one.id
                    .as_deref()
                    .map_or_else(|| format!("at index {}", one.index), |id| format!("{id:?}")),
                one.error
            ),
            many => format!("{} of {total} pods rejected", many.len()),
        };
        (StatusCode::BAD_REQUEST, status, Some(error))
    };
    let response = PushResponse {
        status: status.to_owned(),
        action: parsed.action,
        applied: outcome.applied,
        removed: outcome.removed,
        rejected,
        pod_count: agent.store().len(),
        error,
    };
    Ok((code, Json(response)).into_response())
}
