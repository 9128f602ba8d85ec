//! A Kubernetes API emulator for tests: a separate server on loopback that
//! speaks the real wire protocol for what the agent uses (Namespaces and Pods:
//! get, list with label selectors, create, server-side apply, delete, watch
//! streams with resourceVersion) and behaves as the API does where it matters:
//! 404 for what is missing, 409 on a create conflict, 422 for an invalid pod,
//! 410 Gone for a watch older than its history, and no new resourceVersion
//! for an apply that changes nothing. It can be stopped and started again on
//! the same port with its state, to play a cluster going away. Its SPDY
//! port-forwards can also misbehave on demand ([`Hostile`]), as a broken or
//! hostile API server would.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

mod spdy;

pub use spdy::{Flood, FloodEnd, Hostile};

use anyhow::{Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The emulator has no logger; a note on stderr is what a test reader sees.
fn tracing_free_note(message: &str) {
    eprintln!("kube emulator: {message}");
}

/// One change, as a watch stream carries it.
#[derive(Debug, Clone)]
struct Change {
    resource_version: u64,
    namespace: String,
    kind: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct Cluster {
    resource_version: u64,
    /// Oldest resourceVersion a watch may resume from (after a compaction).
    oldest: u64,
    namespaces: BTreeMap<String, Value>,
    pods: BTreeMap<(String, String), Value>,
    history: Vec<Change>,
    next_ip: u8,
    /// Every mutating request, as "VERB namespace/name", for assertions.
    requests: Vec<String>,
    /// Where each pod (by uid) "runs": the TCP server a port-forward reaches.
    backends: BTreeMap<String, SocketAddr>,
    /// Where one port of a pod (by uid) runs, when it has a server of its
    /// own; the pod's backend otherwise.
    port_backends: BTreeMap<(String, u16), SocketAddr>,
    /// "verb resource" pairs the caller may not do (SelfSubjectAccessReview).
    denied: Vec<String>,
    /// Bearer tokens the API takes, when the test asks for them (`None`:
    /// every caller is let in).
    accepted_tokens: Option<Vec<String>>,
    /// The bearer token of every request, in order (for assertions).
    tokens_seen: Vec<String>,
    /// Cancelled when the pod (by uid) goes: its port-forward streams end,
    /// as a kubelet ends a deleted pod's streams.
    pod_streams: BTreeMap<String, CancellationToken>,
    /// While set, the first port-forward stream to carry more than this
    /// many bytes to the pod is cut (a WebSocket dropped with no close
    /// frame; an SPDY stream reset).
    cut_next_after: Option<usize>,
    /// Answer SPDY upgrades with 400, as a proxy that passes only
    /// WebSockets does.
    refuse_spdy: bool,
    /// SPDY sessions upgraded so far.
    spdy_sessions: usize,
    /// How SPDY sessions upgraded from now on misbehave, if they do.
    hostile: Option<Hostile>,
    /// How far the hostile sessions' floods went.
    flood: Flood,
    /// The header bomb the next session sends, made when the mode was set.
    bomb: Option<spdy::Bomb>,
}

#[derive(Debug, Clone)]
struct Shared {
    cluster: Arc<Mutex<Cluster>>,
    changes: broadcast::Sender<Change>,
    /// Cancelled when the emulator stops: open watches end with it.
    running: Arc<Mutex<CancellationToken>>,
}

impl Shared {
    fn running(&self) -> CancellationToken {
        match self.running.lock() {
            Ok(token) => token.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Cluster> {
        match self.cluster.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Stamps a new resourceVersion on `object`, records and broadcasts the change.
    fn record(
        &self,
        cluster: &mut Cluster,
        namespace: &str,
        kind: &'static str,
        object: &mut Value,
    ) {
        cluster.resource_version += 1;
        let rv = cluster.resource_version;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let change = Change {
            resource_version: rv,
            namespace: namespace.to_owned(),
            kind,
            object: object.clone(),
        };
        cluster.history.push(change.clone());
        let _ = self.changes.send(change);
    }
}

fn status(code: StatusCode, reason: &str, message: impl Into<String>) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message.into(), "reason": reason, "code": code.as_u16(),
    });
    (code, Json(body)).into_response()
}

fn not_found(kind: &str, name: &str) -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("{kind} \"{name}\" not found"),
    )
}

/// Equality-based label selectors ("a=b,c=d"), what the agent sends.
fn matches_selector(object: &Value, selector: Option<&str>) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    let labels = &object["metadata"]["labels"];
    selector.split(',').all(|term| match term.split_once('=') {
        Some((key, value)) => {
            labels[key.trim()].as_str() == Some(value.trim_start_matches('=').trim())
        }
        None => labels.get(term.trim()).is_some(),
    })
}

async fn get_namespace(State(shared): State<Shared>, Path(name): Path<String>) -> Response {
    match shared.lock().namespaces.get(&name) {
        Some(ns) => Json(ns.clone()).into_response(),
        None => not_found("namespaces", &name),
    }
}

async fn create_namespace(State(shared): State<Shared>, Json(mut body): Json<Value>) -> Response {
    let Some(name) = body["metadata"]["name"].as_str().map(str::to_owned) else {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "metadata.name: Required value",
        );
    };
    let mut cluster = shared.lock();
    if cluster.namespaces.contains_key(&name) {
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("namespaces \"{name}\" already exists"),
        );
    }
    body["apiVersion"] = json!("v1");
    body["kind"] = json!("Namespace");
    body["metadata"]["uid"] = json!(format!("ns-{name}"));
    body["status"] = json!({"phase": "Active"});
    cluster.requests.push(format!("CREATE namespace/{name}"));
    shared.record(&mut cluster, &name, "ADDED", &mut body);
    cluster.namespaces.insert(name, body.clone());
    (StatusCode::CREATED, Json(body)).into_response()
}

async fn list_or_watch_pods(
    State(shared): State<Shared>,
    Path(namespace): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let selector = query.get("labelSelector").cloned();
    if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        let since: u64 = query
            .get("resourceVersion")
            .and_then(|rv| rv.parse().ok())
            .unwrap_or(0);
        return watch_pods(shared, namespace, selector, since);
    }
    let cluster = shared.lock();
    let items: Vec<Value> = cluster
        .pods
        .iter()
        .filter(|((ns, _), pod)| *ns == namespace && matches_selector(pod, selector.as_deref()))
        .map(|(_, pod)| pod.clone())
        .collect();
    Json(json!({
        "apiVersion": "v1", "kind": "PodList",
        "metadata": {"resourceVersion": cluster.resource_version.to_string()},
        "items": items,
    }))
    .into_response()
}

/// A watch: the changes after `since` from history, then live ones, as
/// newline-delimited JSON; a `since` older than the history gets 410 Gone.
fn watch_pods(shared: Shared, namespace: String, selector: Option<String>, since: u64) -> Response {
    let running = shared.running();
    let (backlog, mut live, gone) = {
        let cluster = shared.lock();
        let gone = since != 0 && since < cluster.oldest;
        let backlog: Vec<Change> = cluster
            .history
            .iter()
            .filter(|c| c.resource_version > since)
            .cloned()
            .collect();
        (backlog, shared.changes.subscribe(), gone)
    };
    let wanted = move |change: &Change| {
        change.namespace == namespace
            && change.object["kind"] == "Pod"
            && matches_selector(&change.object, selector.as_deref())
    };
    let line = |kind: &str, object: &Value| {
        let mut text = json!({"type": kind, "object": object}).to_string();
        text.push('\n');
        Ok::<_, Infallible>(Bytes::from(text))
    };
    let stream = async_stream(move |sender| async move {
        if gone {
            let expired = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "too old resource version", "reason": "Expired", "code": 410});
            let _ = sender.send(line("ERROR", &expired)).await;
            return;
        }
        let mut last = since;
        for change in backlog.iter().filter(|c| wanted(c)) {
            last = change.resource_version;
            if sender
                .send(line(change.kind, &change.object))
                .await
                .is_err()
            {
                return;
            }
        }
        loop {
            let received = tokio::select! {
                _ = running.cancelled() => return,
                received = live.recv() => received,
            };
            match received {
                Ok(change) if change.resource_version > last && wanted(&change) => {
                    last = change.resource_version;
                    if sender
                        .send(line(change.kind, &change.object))
                        .await
                        .is_err()
                    {
                        return;
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

/// A stream fed by a task through a channel: enough for a watch body.
fn async_stream<F, Fut>(produce: F) -> impl futures_stream::Stream<Item = Result<Bytes, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Bytes, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (sender, receiver) = tokio::sync::mpsc::channel(64);
    tokio::spawn(produce(sender));
    futures_stream::ReceiverStream::new(receiver)
}

/// Minimal stream adapter so the emulator needs no extra crates.
mod futures_stream {
    pub use futures_util::Stream;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    pub struct ReceiverStream<T>(tokio::sync::mpsc::Receiver<T>);

    impl<T> ReceiverStream<T> {
        pub fn new(receiver: tokio::sync::mpsc::Receiver<T>) -> Self {
            Self(receiver)
        }
    }

    impl<T> Stream for ReceiverStream<T> {
        type Item = T;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
}

async fn get_pod(
    State(shared): State<Shared>,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    match shared.lock().pods.get(&(namespace, name.clone())) {
        Some(pod) => Json(pod.clone()).into_response(),
        None => not_found("pods", &name),
    }
}

/// Server-side apply: creates the pod, or replaces the fields the applier
/// owns (labels, annotations, spec) and keeps uid, creation and status.
async fn apply_pod(
    State(shared): State<Shared>,
    Path((namespace, name)): Path<(String, String)>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !content_type.starts_with("application/apply-patch") {
        return status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!("the emulator takes server-side apply only, not {content_type}"),
        );
    }
    if query.get("fieldManager").is_none_or(|m| m.is_empty()) {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "fieldManager is required for apply",
        );
    }
    let Ok(applied) = serde_json::from_slice::<Value>(&body) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "apply body is not JSON",
        );
    };
    let image = applied["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap_or_default();
    if image.is_empty() || image.contains(char::is_whitespace) {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!("Pod \"{name}\" is invalid: spec.containers[0].image: Required value"),
        );
    }
    let mut cluster = shared.lock();
    if !cluster.namespaces.contains_key(&namespace) {
        return not_found("namespaces", &namespace);
    }
    cluster.requests.push(format!("APPLY {namespace}/{name}"));
    let key = (namespace.clone(), name.clone());
    let (mut pod, kind) = match cluster.pods.get(&key) {
        Some(existing) => {
            let mut updated = existing.clone();
            updated["metadata"]["labels"] = applied["metadata"]["labels"].clone();
            updated["metadata"]["annotations"] = applied["metadata"]["annotations"].clone();
            updated["spec"] = applied["spec"].clone();
            if &updated == existing {
                // Nothing changed: no new resourceVersion, no watch event.
                return Json(updated).into_response();
            }
            (updated, "MODIFIED")
        }
        None => {
            cluster.next_ip = cluster.next_ip.wrapping_add(1).max(2);
            let mut created = applied.clone();
            created["apiVersion"] = json!("v1");
            created["kind"] = json!("Pod");
            created["metadata"]["name"] = json!(name);
            created["metadata"]["namespace"] = json!(namespace);
            created["metadata"]["uid"] =
                json!(format!("uid-{name}-{}", cluster.resource_version + 1));
            created["status"] = json!({
                "phase": "Running",
                "podIP": format!("10.244.0.{}", cluster.next_ip),
                "containerStatuses": [{"name": "app", "image": image, "imageID": "",
                                       "ready": true, "restartCount": 0}],
            });
            (created, "ADDED")
        }
    };
    shared.record(&mut cluster, &namespace, kind, &mut pod);
    cluster.pods.insert(key, pod.clone());
    Json(pod).into_response()
}

async fn delete_pod(
    State(shared): State<Shared>,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    let mut cluster = shared.lock();
    cluster.requests.push(format!("DELETE {namespace}/{name}"));
    match cluster.pods.remove(&(namespace.clone(), name.clone())) {
        Some(mut pod) => {
            end_streams(&mut cluster, &pod);
            shared.record(&mut cluster, &namespace, "DELETED", &mut pod);
            Json(pod).into_response()
        }
        None => not_found("pods", &name),
    }
}

/// Ends the port-forward streams of a pod that went.
fn end_streams(cluster: &mut Cluster, pod: &Value) {
    if let Some(uid) = pod["metadata"]["uid"].as_str() {
        if let Some(streams) = cluster.pod_streams.remove(uid) {
            streams.cancel();
        }
    }
}

/// The port-forward subresource: SPDY/3 (`Upgrade: SPDY/3.1`, what kubectl
/// and kubelets speak; see `spdy`), or a WebSocket speaking
/// `v4.channel.k8s.io` (a channel byte before every frame; data on channel
/// 0, errors on 1; each channel opens with the port number, little-endian),
/// either bridged to the TCP server that plays the pod.
async fn port_forward(
    State(shared): State<Shared>,
    Path((namespace, name)): Path<(String, String)>,
    Query(query): Query<BTreeMap<String, String>>,
    mut request: axum::extract::Request,
) -> Response {
    let spdy = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.eq_ignore_ascii_case("SPDY/3.1"));
    let port = query
        .get("ports")
        .and_then(|ports| ports.split(',').next())
        .and_then(|port| port.trim().parse::<u16>().ok());
    let (uid, backend, pod_gone) = {
        let mut cluster = shared.lock();
        if spdy && cluster.refuse_spdy {
            // A proxy's words, not the API's: plain text.
            return (
                StatusCode::BAD_REQUEST,
                "upgrade to SPDY/3.1 is not allowed here\n",
            )
                .into_response();
        }
        let Some(pod) = cluster.pods.get(&(namespace, name.clone())) else {
            return not_found("pods", &name);
        };
        let uid = pod["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let backend = port.and_then(|port| {
            cluster
                .port_backends
                .get(&(uid.clone(), port))
                .or_else(|| cluster.backends.get(&uid))
                .copied()
        });
        if spdy {
            cluster.spdy_sessions += 1;
        }
        let pod_gone = cluster.pod_streams.entry(uid.clone()).or_default().clone();
        (uid, backend, pod_gone)
    };
    if spdy {
        // As a kubelet's: the session outlives its pod (its streams end,
        // new ones get the runtime's words), and ends with the emulator.
        let upgrading = hyper::upgrade::on(&mut request);
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrading.await {
                let pod = spdy::Pod {
                    uid,
                    name,
                    gone: pod_gone,
                };
                spdy::serve(
                    TokioIo::new(upgraded),
                    shared.clone(),
                    pod,
                    shared.running(),
                )
                .await;
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "SPDY/3.1")
            .header("X-Stream-Protocol-Version", "portforward.k8s.io")
            .body(Body::empty())
            .unwrap_or_default();
    }
    let Some(port) = port else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "query parameter ports is required",
        );
    };
    // The stream ends with the emulator, or with its pod.
    let running = shared.running().child_token();
    let ends_with_pod = running.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = pod_gone.cancelled() => ends_with_pod.cancel(),
            _ = ends_with_pod.cancelled() => {}
        }
    });
    let (mut parts, _) = request.into_parts();
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &shared).await {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let cutter = shared.clone();
    upgrade
        .protocols(["v4.channel.k8s.io"])
        .on_upgrade(move |socket| bridge(socket, port, backend, running, cutter))
}

async fn bridge(
    socket: WebSocket,
    port: u16,
    backend: Option<SocketAddr>,
    running: CancellationToken,
    cutter: Shared,
) {
    use futures_util::{SinkExt, StreamExt};
    let cut = CancellationToken::new();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut sink, mut source) = socket.split();
    let prefix = |channel: u8, data: &[u8]| {
        let mut frame = Vec::with_capacity(data.len() + 1);
        frame.push(channel);
        frame.extend_from_slice(data);
        Message::Binary(frame.into())
    };
    for channel in [0u8, 1] {
        if sink
            .send(prefix(channel, &port.to_le_bytes()))
            .await
            .is_err()
        {
            return;
        }
    }
    let hostile = cutter.lock().hostile;
    if let Some(Hostile::DataFrames { size, count }) = hostile {
        // As large as asked, whatever the client reads; then the stream
        // stays open with nothing more, as a stalled server's would.
        for _ in 0..count {
            if sink.send(prefix(0, &vec![0u8; size])).await.is_err() {
                return;
            }
        }
        running.cancelled().await;
        return;
    }
    let tcp = match backend {
        Some(address) => tokio::net::TcpStream::connect(address).await.ok(),
        None => None,
    };
    let Some(tcp) = tcp else {
        let message = format!("error forwarding port {port} to pod: connection refused");
        let _ = sink.send(prefix(1, message.as_bytes())).await;
        let _ = sink.close().await;
        return;
    };
    let (mut from_pod, mut to_pod) = tcp.into_split();
    let upstream = async {
        let mut sent = 0usize;
        while let Some(Ok(message)) = source.next().await {
            match message {
                Message::Binary(data) if data.first() == Some(&0) => {
                    sent += data.len() - 1;
                    if spdy::cut_due(&cutter, sent) {
                        // A stream reset mid-transfer: dropped, no close frame.
                        cut.cancel();
                        return;
                    }
                    let written = to_pod.write_all(&data[1..]).await;
                    if written.is_err() {
                        break;
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = to_pod.shutdown().await;
    };
    let downstream = async {
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            match from_pod.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink.send(prefix(0, &buffer[..n])).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = sink.close().await;
    };
    tokio::select! {
        _ = running.cancelled() => {}
        _ = cut.cancelled() => {}
        _ = async { tokio::join!(upstream, downstream) } => {}
    }
}

async fn version() -> Response {
    Json(
        json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-emulator",
                "gitCommit": "", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
                "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"}),
    )
    .into_response()
}

/// Lets a request in only with an accepted bearer token, when the test set
/// some; remembers every token seen.
async fn check_token(
    State(shared): State<Shared>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned();
    let allowed = {
        let mut cluster = shared.lock();
        cluster.tokens_seen.push(token.clone());
        cluster
            .accepted_tokens
            .as_ref()
            .is_none_or(|accepted| accepted.contains(&token))
    };
    if !allowed {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    next.run(request).await
}

/// SelfSubjectAccessReview: allowed unless the test denied that verb on that resource.
async fn access_review(State(shared): State<Shared>, Json(mut review): Json<Value>) -> Response {
    let attributes = &review["spec"]["resourceAttributes"];
    let resource = match attributes["subresource"].as_str().filter(|s| !s.is_empty()) {
        Some(subresource) => format!(
            "{}/{subresource}",
            attributes["resource"].as_str().unwrap_or_default()
        ),
        None => attributes["resource"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    };
    // Denied by verb and resource, or in one namespace alone ("verb
    // resource namespace").
    let asked = format!(
        "{} {resource}",
        attributes["verb"].as_str().unwrap_or_default()
    );
    let in_namespace = format!(
        "{asked} {}",
        attributes["namespace"].as_str().unwrap_or_default()
    );
    let allowed = {
        let cluster = shared.lock();
        !cluster.denied.contains(&asked) && !cluster.denied.contains(&in_namespace)
    };
    review["status"] = json!({"allowed": allowed});
    (StatusCode::CREATED, Json(review)).into_response()
}

/// The emulator: a server on loopback, and handles for tests to look and poke.
#[derive(Debug)]
pub struct KubeEmulator {
    address: SocketAddr,
    shared: Shared,
    server: Option<JoinHandle<()>>,
}

impl KubeEmulator {
    /// Starts on a fresh loopback port.
    pub async fn start() -> Result<Self> {
        let (changes, _) = broadcast::channel(1024);
        let shared = Shared {
            cluster: Arc::new(Mutex::new(Cluster::default())),
            changes,
            running: Arc::new(Mutex::new(CancellationToken::new())),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let mut emulator = Self {
            address,
            shared,
            server: None,
        };
        emulator.serve(listener);
        Ok(emulator)
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let app = Router::new()
            .route("/api/v1/namespaces", axum::routing::post(create_namespace))
            .route("/api/v1/namespaces/{ns}", get(get_namespace))
            .route("/api/v1/namespaces/{ns}/pods", get(list_or_watch_pods))
            .route(
                "/api/v1/namespaces/{ns}/pods/{name}",
                get(get_pod).patch(apply_pod).delete(delete_pod),
            )
            .route(
                "/api/v1/namespaces/{ns}/pods/{name}/portforward",
                get(port_forward).post(port_forward),
            )
            .route("/version", get(version))
            .route(
                "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                axum::routing::post(access_review),
            )
            .layer(axum::middleware::from_fn_with_state(
                self.shared.clone(),
                check_token,
            ))
            .with_state(self.shared.clone());
        let running = self.shared.running();
        self.server = Some(tokio::spawn(async move {
            // As Go's servers do: no Nagle delay on small writes.
            let listener = axum::serve::ListenerExt::tap_io(listener, |socket| {
                let _ = socket.set_nodelay(true);
            });
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(running.cancelled_owned())
                .await;
        }));
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Stops answering: open watches end, the server closes, the port refuses.
    pub async fn stop(&mut self) {
        self.shared.running().cancel();
        if let Some(server) = self.server.take() {
            if tokio::time::timeout(std::time::Duration::from_secs(5), server)
                .await
                .is_err()
            {
                tracing_free_note("emulator connections did not close within 5 s");
            }
        }
    }

    /// Starts again on the same port, with the same state.
    pub async fn restart(&mut self) -> Result<()> {
        if let Ok(mut running) = self.shared.running.lock() {
            *running = CancellationToken::new();
        }
        let listener = tokio::net::TcpListener::bind(self.address)
            .await
            .context("rebinding the emulator's port")?;
        self.serve(listener);
        Ok(())
    }

    /// A kubeconfig file (YAML) whose context `context` points here.
    pub fn write_kubeconfig(&self, path: &std::path::Path, context: &str) -> Result<()> {
        write_kubeconfig(path, &[(self, context)])
    }

    pub fn create_namespace(&self, name: &str) {
        let mut cluster = self.shared.lock();
        let mut body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
        self.shared.record(&mut cluster, name, "ADDED", &mut body);
        cluster.namespaces.insert(name.to_owned(), body);
    }

    pub fn has_namespace(&self, name: &str) -> bool {
        self.shared.lock().namespaces.contains_key(name)
    }

    /// Puts a pod in directly (as another tool would), with `labels`.
    pub fn insert_pod(&self, namespace: &str, name: &str, labels: Value, annotations: Value) {
        let mut cluster = self.shared.lock();
        let mut pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"),
                         "labels": labels, "annotations": annotations},
            "spec": {"containers": [{"name": "app", "image": "busybox"}]},
            "status": {"phase": "Running", "podIP": "10.244.9.9"},
        });
        self.shared
            .record(&mut cluster, namespace, "ADDED", &mut pod);
        cluster
            .pods
            .insert((namespace.to_owned(), name.to_owned()), pod);
    }

    /// The pod as stored, if any.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.shared
            .lock()
            .pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    pub fn pod_names(&self, namespace: &str) -> Vec<String> {
        self.shared
            .lock()
            .pods
            .keys()
            .filter(|(ns, _)| ns == namespace)
            .map(|(_, name)| name.clone())
            .collect()
    }

    /// Sets a pod's phase and restart count, as a kubelet would.
    pub fn set_pod_status(&self, namespace: &str, name: &str, phase: &str, restarts: i32) {
        let mut cluster = self.shared.lock();
        let key = (namespace.to_owned(), name.to_owned());
        let Some(mut pod) = cluster.pods.get(&key).cloned() else {
            return;
        };
        pod["status"]["phase"] = json!(phase);
        pod["status"]["containerStatuses"][0]["restartCount"] = json!(restarts);
        self.shared
            .record(&mut cluster, namespace, "MODIFIED", &mut pod);
        cluster.pods.insert(key, pod);
    }

    /// Makes one port of the pod as it is now "run" at `backend` (its other
    /// ports stay at the pod's backend).
    pub fn set_port_backend(
        &self,
        namespace: &str,
        name: &str,
        port: u16,
        backend: SocketAddr,
    ) -> bool {
        let Some(uid) = self.uid(namespace, name) else {
            return false;
        };
        self.shared
            .lock()
            .port_backends
            .insert((uid, port), backend);
        true
    }

    /// Makes the pod as it is now (its uid) "run" at `backend`: port-forwards
    /// to it reach that TCP server. A replaced pod (new uid) needs its own.
    pub fn set_backend(&self, namespace: &str, name: &str, backend: SocketAddr) -> bool {
        let Some(uid) = self.uid(namespace, name) else {
            return false;
        };
        self.shared.lock().backends.insert(uid, backend);
        true
    }

    /// Deletes a pod as another tool would (the agent sees it go by its watch).
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        let mut cluster = self.shared.lock();
        if let Some(mut pod) = cluster
            .pods
            .remove(&(namespace.to_owned(), name.to_owned()))
        {
            end_streams(&mut cluster, &pod);
            self.shared
                .record(&mut cluster, namespace, "DELETED", &mut pod);
        }
    }

    /// The pod's uid now, if it exists.
    pub fn uid(&self, namespace: &str, name: &str) -> Option<String> {
        self.pod(namespace, name)
            .and_then(|pod| pod["metadata"]["uid"].as_str().map(str::to_owned))
    }

    /// Makes access reviews answer "not allowed" for `verb` on `resource`.
    pub fn deny(&self, verb: &str, resource: &str) {
        self.shared.lock().denied.push(format!("{verb} {resource}"));
    }

    /// Makes access reviews answer "not allowed" for `verb` on `resource`
    /// (`pods/portforward` for a subresource) in `namespace` alone.
    pub fn deny_in(&self, verb: &str, resource: &str, namespace: &str) {
        self.shared
            .lock()
            .denied
            .push(format!("{verb} {resource} {namespace}"));
    }

    /// From now on the API takes only these bearer tokens; any other
    /// request is answered 401, as an API server answers an expired token.
    pub fn accept_only_tokens(&self, tokens: &[&str]) {
        self.shared.lock().accepted_tokens =
            Some(tokens.iter().map(|token| (*token).to_owned()).collect());
    }

    /// Cuts the first port-forward stream (from now on, opened before or
    /// after) that carries more than `bytes` to the pod: its connection is
    /// dropped with no close frame, as a stream reset mid-transfer looks to
    /// the client.
    pub fn cut_next_stream_after(&self, bytes: usize) {
        self.shared.lock().cut_next_after = Some(bytes);
    }

    /// Answers SPDY upgrades with 400 from now on (WebSockets still pass).
    pub fn refuse_spdy(&self) {
        self.shared.lock().refuse_spdy = true;
    }

    /// Makes the SPDY sessions upgraded from now on misbehave as `mode`
    /// says (`None`: well again). Sessions already up keep their ways. A
    /// header bomb is made here, ahead of the session that sends it.
    pub fn hostile(&self, mode: Option<Hostile>) {
        let bomb = match mode {
            Some(Hostile::HeaderBomb { inflated }) => spdy::Bomb::new(inflated).ok(),
            _ => None,
        };
        let mut cluster = self.shared.lock();
        cluster.hostile = mode;
        cluster.flood = Flood::default();
        cluster.bomb = bomb;
    }

    /// How far the hostile sessions' floods went since the mode was set.
    pub fn flood(&self) -> Flood {
        self.shared.lock().flood
    }

    /// How many SPDY sessions port-forwards have upgraded so far.
    pub fn spdy_sessions(&self) -> usize {
        self.shared.lock().spdy_sessions
    }

    /// Every bearer token the API was called with, in order.
    pub fn tokens_seen(&self) -> Vec<String> {
        self.shared.lock().tokens_seen.clone()
    }

    /// Puts a pod's container in a waiting state, as a kubelet does when an
    /// image cannot be pulled.
    pub fn set_container_waiting(&self, namespace: &str, name: &str, reason: &str, message: &str) {
        let mut cluster = self.shared.lock();
        let key = (namespace.to_owned(), name.to_owned());
        let Some(mut pod) = cluster.pods.get(&key).cloned() else {
            return;
        };
        pod["status"]["phase"] = json!("Pending");
        pod["status"]["containerStatuses"][0]["ready"] = json!(false);
        pod["status"]["containerStatuses"][0]["state"] =
            json!({"waiting": {"reason": reason, "message": message}});
        self.shared
            .record(&mut cluster, namespace, "MODIFIED", &mut pod);
        cluster.pods.insert(key, pod);
    }

    /// Every mutating request so far ("APPLY ns/name", "DELETE ns/name", ...).
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// Forgets the history: watches resuming from before now get 410 Gone.
    pub fn compact(&self) {
        let mut cluster = self.shared.lock();
        cluster.oldest = cluster.resource_version + 1;
        cluster.history.clear();
    }
}

/// One kubeconfig file (YAML) with a context per emulator, as a developer's
/// own file holds a kind cluster beside a cloud one; the first context is
/// the current one.
pub fn write_kubeconfig(path: &std::path::Path, contexts: &[(&KubeEmulator, &str)]) -> Result<()> {
    let mut clusters = String::new();
    let mut named = String::new();
    for (emulator, context) in contexts {
        clusters.push_str(&format!(
            "- name: {context}-cluster\n  cluster:\n    server: {}\n",
            emulator.url()
        ));
        named.push_str(&format!(
            "- name: {context}\n  context:\n    cluster: {context}-cluster\n    user: tester\n"
        ));
    }
    let current = contexts.first().map_or("", |(_, context)| *context);
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n{clusters}\
         users:\n- name: tester\n  user:\n    token: emulator-token\n\
         contexts:\n{named}current-context: {current}\n"
    );
    std::fs::write(path, text)?;
    Ok(())
}

impl Drop for KubeEmulator {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}
