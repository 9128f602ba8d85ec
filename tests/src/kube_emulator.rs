//! A Kubernetes API emulator for tests: a separate server on loopback that
//! speaks the real wire protocol for what the agent uses and behaves as the
//! API does where it matters. Every resource it serves (Namespaces, Pods,
//! Services, EndpointSlices, Deployments, ReplicaSets, StatefulSets,
//! DaemonSets) lives in one store (`store`) and is read through one handler
//! (`list_watch`): get by name, list and watch with label and field
//! selectors and resourceVersions, streaming lists, across all namespaces
//! too, each answered 403 where the test denied it. Pods can also be created
//! by server-side apply and deleted; tests write the other objects, playing
//! the controllers (`objects`). 404 for what is missing, 409 on a create
//! conflict, 422 for an invalid pod, 410 Gone for a watch older than its
//! history, and no new resourceVersion for an apply that changes nothing.
//! It can be stopped and started again on the same port with its state, to
//! play a cluster going away. Its SPDY port-forwards can also misbehave on
//! demand ([`Hostile`]), as a broken or hostile API server would.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

mod list_watch;
pub mod objects;
mod spdy;
mod store;

pub use objects::{Endpoint, ServicePort};
pub use spdy::{Flood, FloodEnd, Hostile};
use store::{Objects, Resource, NAMESPACES, PODS};

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
    resource: &'static Resource,
    namespace: String,
    /// ADDED, MODIFIED or DELETED.
    event: &'static str,
    object: Value,
    /// The object before a MODIFIED change (a watch with a selector sees an
    /// object that leaves it as DELETED, one that comes as ADDED).
    previous: Option<Value>,
}

#[derive(Debug, Default)]
struct Cluster {
    resource_version: u64,
    /// Oldest resourceVersion a watch may resume from (after a compaction).
    oldest: u64,
    /// Every object, namespaces and pods among them.
    objects: Objects,
    history: Vec<Change>,
    next_ip: u8,
    /// Pods the test's controllers started so far (their addresses).
    controller_ips: u32,
    /// Every mutating request, as "VERB namespace/name", for assertions.
    requests: Vec<String>,
    /// Where each pod (by uid) "runs": the TCP server a port-forward reaches.
    backends: BTreeMap<String, SocketAddr>,
    /// Where one port of a pod (by uid) runs, when it has a server of its
    /// own; the pod's backend otherwise.
    port_backends: BTreeMap<(String, u16), SocketAddr>,
    /// "verb resource" and "verb resource namespace" the caller may not do:
    /// access reviews say so, and lists, watches, gets and port-forwards are
    /// answered 403.
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
        resource: &'static Resource,
        namespace: &str,
        event: &'static str,
        object: &mut Value,
        previous: Option<Value>,
    ) {
        cluster.resource_version += 1;
        let rv = cluster.resource_version;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let change = Change {
            resource_version: rv,
            resource,
            namespace: namespace.to_owned(),
            event,
            object: object.clone(),
            previous,
        };
        cluster.history.push(change.clone());
        let _ = self.changes.send(change);
    }

    /// Stores `object` as `resource` `namespace`/`name` with a new
    /// resourceVersion (ADDED or MODIFIED, as it was there or not) and
    /// tells the watchers; the object as stored.
    fn put(
        &self,
        cluster: &mut Cluster,
        resource: &'static Resource,
        namespace: &str,
        name: &str,
        mut object: Value,
    ) -> Value {
        let previous = cluster.objects.get(resource, namespace, name).cloned();
        let event = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.record(cluster, resource, namespace, event, &mut object, previous);
        cluster
            .objects
            .insert(resource, namespace, name, object.clone());
        object
    }

    /// Removes an object and tells the watchers (DELETED, with a new
    /// resourceVersion); a pod's port-forward streams end with it.
    fn take(
        &self,
        cluster: &mut Cluster,
        resource: &'static Resource,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        let mut object = cluster.objects.remove(resource, namespace, name)?;
        if *resource == PODS {
            end_streams(cluster, &object);
        }
        self.record(cluster, resource, namespace, "DELETED", &mut object, None);
        Some(object)
    }
}

fn status(code: StatusCode, reason: &str, message: impl Into<String>) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message.into(), "reason": reason, "code": code.as_u16(),
    });
    (code, Json(body)).into_response()
}

fn method_not_allowed() -> Response {
    status(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        "the server does not allow this method on the requested resource",
    )
}

fn not_found(kind: &str, name: &str) -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("{kind} \"{name}\" not found"),
    )
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
    if cluster.objects.contains(&NAMESPACES, "", &name) {
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
    let body = shared.put(&mut cluster, &NAMESPACES, "", &name, body);
    (StatusCode::CREATED, Json(body)).into_response()
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

/// Server-side apply: creates the pod, or replaces the fields the applier
/// owns (labels, annotations, spec) and keeps uid, creation and status.
async fn apply_pod(
    State(shared): State<Shared>,
    Path((namespace, resource, name)): Path<(String, String, String)>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if resource != "pods" {
        return method_not_allowed();
    }
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
    if !cluster.objects.contains(&NAMESPACES, "", &namespace) {
        return not_found("namespaces", &namespace);
    }
    cluster.requests.push(format!("APPLY {namespace}/{name}"));
    let pod = match cluster.objects.get(&PODS, &namespace, &name) {
        Some(existing) => {
            let mut updated = existing.clone();
            updated["metadata"]["labels"] = applied["metadata"]["labels"].clone();
            updated["metadata"]["annotations"] = applied["metadata"]["annotations"].clone();
            updated["spec"] = applied["spec"].clone();
            if &updated == existing {
                // Nothing changed: no new resourceVersion, no watch event.
                return Json(updated).into_response();
            }
            updated
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
            created
        }
    };
    let pod = shared.put(&mut cluster, &PODS, &namespace, &name, pod);
    Json(pod).into_response()
}

async fn delete_pod(
    State(shared): State<Shared>,
    Path((namespace, resource, name)): Path<(String, String, String)>,
) -> Response {
    if resource != "pods" {
        return method_not_allowed();
    }
    let mut cluster = shared.lock();
    cluster.requests.push(format!("DELETE {namespace}/{name}"));
    match shared.take(&mut cluster, &PODS, &namespace, &name) {
        Some(pod) => Json(pod).into_response(),
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
        let verb = if request.method() == axum::http::Method::GET {
            "get"
        } else {
            "create"
        };
        for verb in ["create", verb] {
            if list_watch::denied(&cluster, verb, "pods/portforward", Some(&namespace)) {
                return list_watch::forbidden_subresource(
                    verb,
                    &PODS,
                    "portforward",
                    &namespace,
                    &name,
                );
            }
        }
        let Some(pod) = cluster.objects.get(&PODS, &namespace, &name) else {
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
            .route(
                "/api/v1/namespaces",
                get(list_watch::core_namespaces).post(create_namespace),
            )
            .route("/api/v1/{resource}", get(list_watch::core_all))
            .route("/api/v1/namespaces/{ns}", get(list_watch::get_namespace))
            .route(
                "/api/v1/namespaces/{ns}/{resource}",
                get(list_watch::core_in),
            )
            .route(
                "/api/v1/namespaces/{ns}/{resource}/{name}",
                get(list_watch::core_get)
                    .patch(apply_pod)
                    .delete(delete_pod),
            )
            .route(
                "/apis/{group}/{version}/{resource}",
                get(list_watch::group_all),
            )
            .route(
                "/apis/{group}/{version}/namespaces/{ns}/{resource}",
                get(list_watch::group_in),
            )
            .route(
                "/apis/{group}/{version}/namespaces/{ns}/{resource}/{name}",
                get(list_watch::group_get),
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
        let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name},
                          "status": {"phase": "Active"}});
        self.shared.put(&mut cluster, &NAMESPACES, "", name, body);
    }

    pub fn has_namespace(&self, name: &str) -> bool {
        self.shared.lock().objects.contains(&NAMESPACES, "", name)
    }

    /// Puts a pod in directly (as another tool would), with `labels`.
    pub fn insert_pod(&self, namespace: &str, name: &str, labels: Value, annotations: Value) {
        let mut cluster = self.shared.lock();
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"),
                         "labels": labels, "annotations": annotations},
            "spec": {"containers": [{"name": "app", "image": "busybox"}]},
            "status": {"phase": "Running", "podIP": "10.244.9.9"},
        });
        self.shared.put(&mut cluster, &PODS, namespace, name, pod);
    }

    /// The pod as stored, if any.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.shared
            .lock()
            .objects
            .get(&PODS, namespace, name)
            .cloned()
    }

    pub fn pod_names(&self, namespace: &str) -> Vec<String> {
        self.shared
            .lock()
            .objects
            .list(&PODS, Some(namespace))
            .map(|(_, name, _)| name.to_owned())
            .collect()
    }

    /// Sets a pod's phase and restart count, as a kubelet would.
    pub fn set_pod_status(&self, namespace: &str, name: &str, phase: &str, restarts: i32) {
        let mut cluster = self.shared.lock();
        let Some(mut pod) = cluster.objects.get(&PODS, namespace, name).cloned() else {
            return;
        };
        pod["status"]["phase"] = json!(phase);
        pod["status"]["containerStatuses"][0]["restartCount"] = json!(restarts);
        self.shared.put(&mut cluster, &PODS, namespace, name, pod);
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
        self.shared.take(&mut cluster, &PODS, namespace, name);
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
        let Some(mut pod) = cluster.objects.get(&PODS, namespace, name).cloned() else {
            return;
        };
        pod["status"]["phase"] = json!("Pending");
        pod["status"]["containerStatuses"][0]["ready"] = json!(false);
        pod["status"]["containerStatuses"][0]["state"] =
            json!({"waiting": {"reason": reason, "message": message}});
        self.shared.put(&mut cluster, &PODS, namespace, name, pod);
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
