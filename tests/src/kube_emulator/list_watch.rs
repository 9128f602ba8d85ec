//! Reading any stored resource as the API server serves it: get by name,
//! list and watch (label and field selectors, resourceVersion, bookmarks,
//! streaming lists, timeouts), each behind the RBAC answers the test set
//! (a `Status` 403 worded as a real API server words it).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::store::{self, FieldSelector, LabelSelector, Resource, NAMESPACES};
use super::{async_stream, not_found, status, Change, Cluster, Shared};

/// The user every caller is, in the API's 403 messages.
pub(super) const USER: &str = "tester";

type Params = Query<BTreeMap<String, String>>;

/// `GET /api/v1/namespaces`.
pub(super) async fn core_namespaces(
    State(shared): State<Shared>,
    Query(query): Params,
) -> Response {
    list_or_watch(&shared, &NAMESPACES, None, &query)
}

/// `GET /api/v1/namespaces/{name}`.
pub(super) async fn get_namespace(
    State(shared): State<Shared>,
    Path(name): Path<String>,
) -> Response {
    get(&shared, &NAMESPACES, "", &name)
}

/// `GET /api/v1/{resource}`: a core resource in all namespaces.
pub(super) async fn core_all(
    State(shared): State<Shared>,
    Path(resource): Path<String>,
    Query(query): Params,
) -> Response {
    match store::by_path("v1", &resource) {
        Some(resource) => list_or_watch(&shared, resource, None, &query),
        None => no_such_resource(),
    }
}

/// `GET /api/v1/namespaces/{ns}/{resource}`.
pub(super) async fn core_in(
    State(shared): State<Shared>,
    Path((namespace, resource)): Path<(String, String)>,
    Query(query): Params,
) -> Response {
    match store::by_path("v1", &resource).filter(|r| r.namespaced) {
        Some(resource) => list_or_watch(&shared, resource, Some(&namespace), &query),
        None => no_such_resource(),
    }
}

/// `GET /api/v1/namespaces/{ns}/{resource}/{name}`.
pub(super) async fn core_get(
    State(shared): State<Shared>,
    Path((namespace, resource, name)): Path<(String, String, String)>,
) -> Response {
    match store::by_path("v1", &resource).filter(|r| r.namespaced) {
        Some(resource) => get(&shared, resource, &namespace, &name),
        None => no_such_resource(),
    }
}

/// `GET /apis/{group}/{version}/{resource}`: in all namespaces.
pub(super) async fn group_all(
    State(shared): State<Shared>,
    Path((group, version, resource)): Path<(String, String, String)>,
    Query(query): Params,
) -> Response {
    match store::by_path(&format!("{group}/{version}"), &resource) {
        Some(resource) => list_or_watch(&shared, resource, None, &query),
        None => no_such_resource(),
    }
}

/// `GET /apis/{group}/{version}/namespaces/{ns}/{resource}`.
pub(super) async fn group_in(
    State(shared): State<Shared>,
    Path((group, version, namespace, resource)): Path<(String, String, String, String)>,
    Query(query): Params,
) -> Response {
    match store::by_path(&format!("{group}/{version}"), &resource).filter(|r| r.namespaced) {
        Some(resource) => list_or_watch(&shared, resource, Some(&namespace), &query),
        None => no_such_resource(),
    }
}

/// `GET /apis/{group}/{version}/namespaces/{ns}/{resource}/{name}`.
pub(super) async fn group_get(
    State(shared): State<Shared>,
    Path((group, version, namespace, resource, name)): Path<(
        String,
        String,
        String,
        String,
        String,
    )>,
) -> Response {
    match store::by_path(&format!("{group}/{version}"), &resource).filter(|r| r.namespaced) {
        Some(resource) => get(&shared, resource, &namespace, &name),
        None => no_such_resource(),
    }
}

fn no_such_resource() -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        "the server could not find the requested resource",
    )
}

/// Whether the test denied `verb` on `resource` (a plural, or
/// "pods/portforward") in `namespace`, or everywhere. A request across all
/// namespaces (`None`) is denied when any namespace is: a caller allowed
/// cluster-wide is allowed in every namespace.
pub(super) fn denied(
    cluster: &Cluster,
    verb: &str,
    resource: &str,
    namespace: Option<&str>,
) -> bool {
    let everywhere = format!("{verb} {resource}");
    cluster.denied.iter().any(|entry| match namespace {
        Some(namespace) => *entry == everywhere || *entry == format!("{everywhere} {namespace}"),
        None => *entry == everywhere || entry.starts_with(&format!("{everywhere} ")),
    })
}

/// A 403 as the API server words it: `what` is "services" or
/// `pods "web-0"`, the resource as RBAC names it ("pods/portforward").
fn forbidden_status(
    what: &str,
    verb: &str,
    resource: &str,
    group: &str,
    namespace: Option<&str>,
    details: Value,
) -> Response {
    let scope = match namespace {
        Some(namespace) => format!("in the namespace \"{namespace}\""),
        None => "at the cluster scope".to_owned(),
    };
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!(
            "{what} is forbidden: User \"{USER}\" cannot {verb} resource \"{resource}\" \
             in API group \"{group}\" {scope}"
        ),
        "reason": "Forbidden", "details": details, "code": 403,
    });
    (StatusCode::FORBIDDEN, Json(body)).into_response()
}

fn details(resource: &Resource, name: Option<&str>) -> Value {
    let mut details = json!({});
    if let Some(name) = name {
        details["name"] = json!(name);
    }
    if !resource.group().is_empty() {
        details["group"] = json!(resource.group());
    }
    details["kind"] = json!(resource.plural);
    details
}

/// 403 for a list, watch (no name) or get (a name) of `resource`.
fn forbidden(
    verb: &str,
    resource: &Resource,
    namespace: Option<&str>,
    name: Option<&str>,
) -> Response {
    let what = match name {
        Some(name) => format!("{} \"{name}\"", resource.plural),
        None => resource.plural.to_owned(),
    };
    let namespace = namespace.filter(|_| resource.namespaced);
    forbidden_status(
        &what,
        verb,
        resource.plural,
        resource.group(),
        namespace,
        details(resource, name),
    )
}

/// 403 for a subresource of one object: `pods "web" is forbidden: ...
/// cannot create resource "pods/portforward" ...`.
pub(super) fn forbidden_subresource(
    verb: &str,
    resource: &Resource,
    subresource: &str,
    namespace: &str,
    name: &str,
) -> Response {
    forbidden_status(
        &format!("{} \"{name}\"", resource.plural),
        verb,
        &format!("{}/{subresource}", resource.plural),
        resource.group(),
        Some(namespace),
        details(resource, Some(name)),
    )
}

fn get(shared: &Shared, resource: &'static Resource, namespace: &str, name: &str) -> Response {
    let cluster = shared.lock();
    let scope = Some(namespace).filter(|_| resource.namespaced);
    if denied(&cluster, "get", resource.plural, scope) {
        return forbidden("get", resource, scope, Some(name));
    }
    match cluster.objects.get(resource, namespace, name) {
        Some(object) => Json(object.clone()).into_response(),
        None => not_found(resource.plural, name),
    }
}

fn bad_request(message: String) -> Response {
    status(StatusCode::BAD_REQUEST, "BadRequest", message)
}

fn invalid(message: &str) -> Response {
    status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message)
}

/// A list, or with `watch=true` a watch, of `resource` in `namespace` (all
/// namespaces: `None`).
fn list_or_watch(
    shared: &Shared,
    resource: &'static Resource,
    namespace: Option<&str>,
    query: &BTreeMap<String, String>,
) -> Response {
    let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let verb = if watching { "watch" } else { "list" };
    if denied(&shared.lock(), verb, resource.plural, namespace) {
        return forbidden(verb, resource, namespace, None);
    }
    let labels = match LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str)) {
        Ok(labels) => labels,
        Err(message) => return bad_request(message),
    };
    let fields = match FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str)) {
        Ok(fields) => fields,
        Err(message) => return bad_request(message),
    };
    let selected = Selected {
        resource,
        namespace: namespace.map(str::to_owned),
        labels,
        fields,
    };
    if watching {
        return watch(shared, selected, query);
    }
    let cluster = shared.lock();
    let items: Vec<Value> = cluster
        .objects
        .list(resource, namespace)
        .filter(|(_, _, object)| selected.matches(object))
        .map(|(_, _, object)| object.clone())
        .collect();
    Json(json!({
        "apiVersion": resource.group_version,
        "kind": format!("{}List", resource.kind),
        "metadata": {"resourceVersion": cluster.resource_version.to_string()},
        "items": items,
    }))
    .into_response()
}

/// What one list or watch asked for.
struct Selected {
    resource: &'static Resource,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Selected {
    fn matches(&self, object: &Value) -> bool {
        self.labels.matches(object) && self.fields.matches(object)
    }

    /// The event a watcher of this selection sees for `change`, if any: an
    /// object that comes into the selection is ADDED for it, one that
    /// leaves it DELETED, as the API server's watch cache does.
    fn event(&self, change: &Change) -> Option<&'static str> {
        if *change.resource != *self.resource
            || self
                .namespace
                .as_ref()
                .is_some_and(|namespace| *namespace != change.namespace)
        {
            return None;
        }
        let now = self.matches(&change.object);
        let before = change
            .previous
            .as_ref()
            .map(|previous| self.matches(previous));
        match (change.event, before, now) {
            ("MODIFIED", Some(true), true) | ("MODIFIED", None, true) => Some("MODIFIED"),
            ("MODIFIED", Some(false), true) => Some("ADDED"),
            ("MODIFIED", Some(true), false) => Some("DELETED"),
            (event, _, true) if event != "MODIFIED" => Some(event),
            _ => None,
        }
    }
}

fn line(event: &str, object: &Value) -> Result<Bytes, Infallible> {
    let mut text = json!({"type": event, "object": object}).to_string();
    text.push('\n');
    Ok(Bytes::from(text))
}

/// A watch: with `resourceVersion` unset or "0" (or `sendInitialEvents`) the
/// selection as it is now as ADDED events (then, for a streaming list, a
/// BOOKMARK marking the initial events' end), else the changes after that
/// resourceVersion from history (410 Gone when older than the history);
/// then live changes, as newline-delimited JSON, until `timeoutSeconds` or
/// the emulator stops.
fn watch(shared: &Shared, selected: Selected, query: &BTreeMap<String, String>) -> Response {
    let send_initial = query.get("sendInitialEvents").is_some_and(|v| v == "true");
    let version_match = query.get("resourceVersionMatch").map(String::as_str);
    if send_initial && version_match != Some("NotOlderThan") {
        return invalid(
            "resourceVersionMatch: Forbidden: sendInitialEvents requires setting \
             resourceVersionMatch to NotOlderThan",
        );
    }
    if !send_initial && version_match.is_some_and(|v| !v.is_empty()) {
        return invalid(
            "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch \
             unless sendInitialEvents is provided",
        );
    }
    let since = match query.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(text) => match text.parse::<u64>() {
            Ok(version) => Some(version),
            Err(_) => return bad_request(format!("resourceVersion: Invalid value: \"{text}\"")),
        },
    };
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|t| *t > 0);
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let resource = selected.resource;
    let running = shared.running();
    let (first, start, mut live, gone) = {
        let cluster = shared.lock();
        let gone = !send_initial && since.is_some_and(|since| since < cluster.oldest);
        let first: Vec<(&'static str, Value)> = if send_initial || since.is_none() {
            cluster
                .objects
                .list(resource, selected.namespace.as_deref())
                .filter(|(_, _, object)| selected.matches(object))
                .map(|(_, _, object)| ("ADDED", object.clone()))
                .collect()
        } else {
            cluster
                .history
                .iter()
                .filter(|change| since.is_some_and(|since| change.resource_version > since))
                .filter_map(|change| Some((selected.event(change)?, change.object.clone())))
                .collect()
        };
        let start = match since {
            Some(since) if !send_initial => since,
            _ => cluster.resource_version,
        };
        (first, start, shared.changes.subscribe(), gone)
    };
    let bookmark = move |version: u64, initial_end: bool| {
        let mut object = json!({
            "kind": resource.kind, "apiVersion": resource.group_version,
            "metadata": {"resourceVersion": version.to_string()},
        });
        if initial_end {
            object["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        object
    };
    let stream = async_stream(move |sender| async move {
        if gone {
            let expired = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": "too old resource version",
                "reason": "Expired", "code": 410});
            let _ = sender.send(line("ERROR", &expired)).await;
            return;
        }
        let mut last = start;
        for (event, object) in &first {
            if let Some(version) = object["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse::<u64>().ok())
            {
                last = last.max(version);
            }
            if sender.send(line(event, object)).await.is_err() {
                return;
            }
        }
        if send_initial
            && sender
                .send(line("BOOKMARK", &bookmark(start, true)))
                .await
                .is_err()
        {
            return;
        }
        let deadline = async {
            match timeout {
                Some(seconds) => tokio::time::sleep(Duration::from_secs(seconds)).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        loop {
            let received = tokio::select! {
                _ = running.cancelled() => return,
                _ = &mut deadline => {
                    if bookmarks {
                        let _ = sender.send(line("BOOKMARK", &bookmark(last, false))).await;
                    }
                    return;
                }
                received = live.recv() => received,
            };
            match received {
                Ok(change) if change.resource_version > last => {
                    last = change.resource_version;
                    if let Some(event) = selected.event(&change) {
                        if sender.send(line(event, &change.object)).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}
