//! The local staging mirror: every pod the agent holds is server-side applied
//! as a Pod in a local cluster (Kind, k3s, any kube context), removed when the
//! pod goes, and watched so each pod's local phase, IP and restarts show next
//! to its tunnel. Only pods labelled as ours (managed-by and agent id) are ever
//! touched. The cluster being absent or going away stops nothing else: the
//! status says why, and the mirror retries with backoff and catches up.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Container, ContainerPort, Namespace, Pod, PodSpec as K8sPodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::Client;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::ClusterSettings;
use crate::events::AgentEvent;
use crate::forward::{DialError, LocalDialer, LocalStream};
use crate::model::{MirrorView, PodSpec};
use crate::store::Store;

/// Label every mirror carries, with [`MANAGED_BY_VALUE`].
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "k3s-local-agent";
/// Label naming the agent that owns a mirror (its id, or a hash when the id is
/// not a valid label value).
pub const AGENT_LABEL: &str = "k3s-local-agent.dev/agent";
/// Annotation carrying the staging pod id (ids need not be valid label values).
pub const POD_ID_ANNOTATION: &str = "k3s-local-agent.dev/staging-pod-id";
/// Our field manager for server-side apply.
pub const FIELD_MANAGER: &str = "k3s-local-agent";

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Why a session with the cluster could not start or ended.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClusterError {
    #[error("no kubeconfig: {0}")]
    NoKubeconfig(String),
    #[error("cannot read kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
    #[error(
        "context {context:?} is not in the kubeconfig; create the Kind cluster with \
         `kind create cluster --name {cluster}`"
    )]
    ContextMissing { context: String, cluster: String },
    #[error("cannot build a client for context {context:?}: {message}")]
    Client { context: String, message: String },
    #[error("cannot create namespace {namespace}: {message}")]
    Namespace { namespace: String, message: String },
    #[error("{0}")]
    Api(String),
    #[error("watch failed: {0}")]
    Watch(String),
    #[error("watch ended")]
    WatchEnded,
}

/// Whether the local cluster can be used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum ClusterStatus {
    /// `--no-cluster`.
    Disabled,
    /// Not tried yet.
    Connecting,
    /// Connected; mirrors are applied.
    Ready,
    /// No kubeconfig, context missing, API unreachable, forbidden: the reason says which.
    Unavailable(String),
}

impl ClusterStatus {
    /// The report's `kind_cluster_status` word.
    pub fn word(&self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::Connecting | Self::Unavailable(_) => "unavailable",
            Self::Ready => "ready",
        }
    }

    pub fn reason(&self) -> Option<String> {
        match self {
            Self::Connecting => Some("connecting".to_owned()),
            Self::Unavailable(reason) => Some(reason.clone()),
            Self::Disabled | Self::Ready => None,
        }
    }
}

/// A label value for `agent_id`: itself when valid, else a stable hash.
pub fn agent_label_value(agent_id: &str) -> String {
    let valid = !agent_id.is_empty()
        && agent_id.len() <= 63
        && agent_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && agent_id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && agent_id.ends_with(|c: char| c.is_ascii_alphanumeric());
    if valid {
        return agent_id.to_owned();
    }
    // FNV-1a: stable across runs and versions, unlike std's hasher.
    let hash = agent_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("agent-{hash:016x}")
}

/// The label selector matching every mirror of this agent.
pub fn selector(agent_label: &str) -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE},{AGENT_LABEL}={agent_label}")
}

/// The Pod we apply for a staging pod: its image and ports, its labels plus ours.
pub fn mirror_manifest(spec: &PodSpec, agent_label: &str, namespace: &str) -> Pod {
    let mut labels: BTreeMap<String, String> = spec.labels.clone();
    labels.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY_VALUE.to_owned());
    labels.insert(AGENT_LABEL.to_owned(), agent_label.to_owned());
    Pod {
        metadata: ObjectMeta {
            name: Some(spec.name.clone()),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(
                POD_ID_ANNOTATION.to_owned(),
                spec.id.clone(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(K8sPodSpec {
            containers: vec![Container {
                name: "app".to_owned(),
                image: Some(spec.image.clone()),
                ports: Some(
                    spec.ports
                        .iter()
                        .map(|port| ContainerPort {
                            container_port: i32::from(*port),
                            ..ContainerPort::default()
                        })
                        .collect(),
                ),
                ..Container::default()
            }],
            ..K8sPodSpec::default()
        }),
        status: None,
    }
}

/// What the cluster says of one mirror.
fn view_of(pod: &Pod) -> MirrorView {
    let status = pod.status.as_ref();
    MirrorView {
        name: pod.metadata.name.clone().unwrap_or_default(),
        phase: status.and_then(|s| s.phase.clone()),
        pod_ip: status.and_then(|s| s.pod_ip.clone()),
        restarts: status
            .and_then(|s| s.container_statuses.as_ref())
            .map_or(0, |all| all.iter().map(|c| c.restart_count).sum()),
        last_event: last_event_of(pod),
        error: None,
    }
}

/// What a user would look for with `kubectl describe`: a container's waiting
/// or terminated reason, else the message of a condition that is not true.
fn last_event_of(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let from_container = status.container_statuses.iter().flatten().find_map(|c| {
        let state = c.state.as_ref()?;
        let (reason, message) = match (&state.waiting, &state.terminated) {
            (Some(waiting), _) => (waiting.reason.clone(), waiting.message.clone()),
            (None, Some(terminated)) => (terminated.reason.clone(), terminated.message.clone()),
            (None, None) => return None,
        };
        let reason = reason?;
        Some(match message {
            Some(message) if !message.is_empty() => format!("{reason}: {message}"),
            _ => reason,
        })
    });
    from_container.or_else(|| {
        status.conditions.iter().flatten().find_map(|c| {
            (c.status != "True")
                .then(|| c.message.clone().or_else(|| c.reason.clone()))
                .flatten()
        })
    })
}

fn pod_id_of(pod: &Pod) -> Option<String> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(POD_ID_ANNOTATION).cloned())
}

/// A short reason for a kube error, as the status shows it.
fn describe(err: &kube::Error) -> String {
    match err {
        kube::Error::Api(status) if status.code == 403 => format!("forbidden: {}", status.message),
        kube::Error::Api(status) => format!("{} ({})", status.message, status.code),
        other => other.to_string(),
    }
}

/// Errors that end a session (the cluster is away) rather than one pod's apply.
fn is_cluster_fault(err: &kube::Error) -> bool {
    match err {
        kube::Error::Api(status) => status.code >= 500 || status.code == 401 || status.code == 403,
        _ => true,
    }
}

/// Connects to the configured context.
async fn connect(settings: &ClusterSettings) -> Result<Client, ClusterError> {
    let kubeconfig = match &settings.kubeconfig {
        Some(path) => Kubeconfig::read_from(path).map_err(|err| ClusterError::Kubeconfig {
            path: path.display().to_string(),
            message: err.to_string(),
        })?,
        None => Kubeconfig::read().map_err(|err| ClusterError::NoKubeconfig(err.to_string()))?,
    };
    if !kubeconfig
        .contexts
        .iter()
        .any(|c| c.name == settings.context)
    {
        return Err(ClusterError::ContextMissing {
            context: settings.context.clone(),
            cluster: settings
                .context
                .strip_prefix("kind-")
                .unwrap_or(&settings.context)
                .to_owned(),
        });
    }
    let options = KubeConfigOptions {
        context: Some(settings.context.clone()),
        ..KubeConfigOptions::default()
    };
    let client_error = |message: String| ClusterError::Client {
        context: settings.context.clone(),
        message,
    };
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|err| client_error(err.to_string()))?;
    Client::try_from(config).map_err(|err| client_error(err.to_string()))
}

/// Mirrors the store's pods into the cluster until cancelled.
#[derive(Debug, Clone)]
pub struct Mirror {
    settings: ClusterSettings,
    agent_label: String,
    store: Store,
    status: watch::Sender<ClusterStatus>,
    /// The pods API of the current session, for port-forwards; `None` while away.
    pods_api: Arc<RwLock<Option<Api<Pod>>>>,
}

/// Opens port-forward streams to mirrors, for tunnels whose target is `local`.
#[derive(Debug, Clone)]
pub struct MirrorDialer {
    store: Store,
    status: watch::Receiver<ClusterStatus>,
    pods_api: Arc<RwLock<Option<Api<Pod>>>>,
}

impl LocalDialer for MirrorDialer {
    fn dial(
        &self,
        pod_id: &str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = Result<LocalStream, DialError>> + Send>> {
        let dialer = self.clone();
        let pod_id = pod_id.to_owned();
        Box::pin(async move {
            let api = dialer
                .pods_api
                .read()
                .ok()
                .and_then(|api| api.clone())
                .ok_or_else(|| match dialer.status.borrow().reason() {
                    Some(reason) => DialError::ClusterUnavailable(reason),
                    None => DialError::Disabled,
                })?;
            // Resolved now, from what the watch last saw: a replaced mirror is
            // picked up without touching the listener.
            let name = dialer
                .store
                .pod_view(&pod_id)
                .and_then(|view| view.tunnel.mirror.map(|m| m.name).or(Some(view.pod.name)))
                .ok_or_else(|| DialError::UnknownPod(pod_id.clone()))?;
            let failed = |message: String| DialError::PortForward {
                mirror: name.clone(),
                port,
                message,
            };
            let mut forwarder = api
                .portforward(&name, &[port])
                .await
                .map_err(|err| failed(describe(&err)))?;
            let stream = forwarder
                .take_stream(port)
                .ok_or_else(|| failed("no stream for the port".to_owned()))?;
            Ok(LocalStream {
                stream,
                guard: Box::new(forwarder),
            })
        })
    }
}

impl Mirror {
    /// A mirror for `settings` and a receiver of its status.
    pub fn new(
        settings: ClusterSettings,
        agent_id: &str,
        store: Store,
    ) -> (Self, watch::Receiver<ClusterStatus>) {
        let initial = if settings.enabled {
            ClusterStatus::Connecting
        } else {
            ClusterStatus::Disabled
        };
        let (status, receiver) = watch::channel(initial);
        (
            Self {
                settings,
                agent_label: agent_label_value(agent_id),
                store,
                status,
                pods_api: Arc::new(RwLock::new(None)),
            },
            receiver,
        )
    }

    /// What tunnels use to reach mirrors.
    pub fn dialer(&self) -> Arc<dyn LocalDialer> {
        Arc::new(MirrorDialer {
            store: self.store.clone(),
            status: self.status.subscribe(),
            pods_api: Arc::clone(&self.pods_api),
        })
    }

    fn set_pods_api(&self, api: Option<Api<Pod>>) {
        if let Ok(mut slot) = self.pods_api.write() {
            *slot = api;
        }
    }

    fn set_status(&self, status: ClusterStatus) {
        let changed = self.status.send_if_modified(|current| {
            let changed = *current != status;
            *current = status.clone();
            changed
        });
        if changed {
            self.store.events().publish(AgentEvent::Cluster {
                status: status.word().to_owned(),
                reason: status.reason(),
            });
        }
    }

    /// Runs sessions with the cluster, with backoff between them, until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        if !self.settings.enabled {
            return;
        }
        let mut backoff = FIRST_BACKOFF;
        let mut failures = 0u32;
        loop {
            let outcome = tokio::select! {
                _ = cancel.cancelled() => return,
                outcome = self.session() => outcome,
            };
            self.set_pods_api(None);
            let reason = match outcome {
                Ok(()) => return,
                Err(err) => err.to_string(),
            };
            if failures == 0 {
                tracing::warn!(context = %self.settings.context, %reason, "local cluster unavailable; retrying with backoff");
            } else {
                tracing::debug!(%reason, attempt = failures + 1, "local cluster still unavailable");
            }
            failures = failures.saturating_add(1);
            self.set_status(ClusterStatus::Unavailable(reason));
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            if matches!(*self.status.borrow(), ClusterStatus::Ready) {
                backoff = FIRST_BACKOFF;
            }
        }
    }

    /// One connection's life: ensure the namespace, then keep the mirrors in
    /// step with the store and the watch. Returns the reason it ended.
    async fn session(&self) -> Result<(), ClusterError> {
        let client = connect(&self.settings).await?;
        let namespace = &self.settings.namespace;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        match namespaces.get_opt(namespace).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                let wanted = Namespace {
                    metadata: ObjectMeta {
                        name: Some(namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    ..Namespace::default()
                };
                match namespaces.create(&PostParams::default(), &wanted).await {
                    Ok(_) => tracing::info!(%namespace, "created the mirror namespace"),
                    Err(kube::Error::Api(status)) if status.code == 409 => {}
                    Err(err) => {
                        return Err(ClusterError::Namespace {
                            namespace: namespace.clone(),
                            message: describe(&err),
                        })
                    }
                }
            }
            Err(err) => return Err(ClusterError::Api(describe(&err))),
        }
        let pods: Api<Pod> = Api::namespaced(client, namespace);
        self.set_pods_api(Some(pods.clone()));
        let config = watcher::Config::default().labels(&selector(&self.agent_label));
        let mut events = watcher(pods.clone(), config).boxed();
        let mut changes = self.store.events().watch_revision();
        // What the cluster holds of ours (by mirror name), complete once listed.
        let mut actual: HashMap<String, Pod> = HashMap::new();
        let mut listing: HashMap<String, Pod> = HashMap::new();
        let mut listed = false;
        // What we applied, by pod id: the manifest as JSON, to skip no-op applies.
        let mut applied: HashMap<String, String> = HashMap::new();
        loop {
            tokio::select! {
                event = events.next() => {
                    match event {
                        Some(Ok(watcher::Event::Init)) => listing.clear(),
                        Some(Ok(watcher::Event::InitApply(pod))) => {
                            listing.insert(pod.metadata.name.clone().unwrap_or_default(), pod);
                        }
                        Some(Ok(watcher::Event::InitDone)) => {
                            actual = std::mem::take(&mut listing);
                            if !listed {
                                listed = true;
                                self.set_status(ClusterStatus::Ready);
                                tracing::info!(context = %self.settings.context, namespace = %namespace, "local cluster ready");
                            }
                            for pod in actual.values() {
                                self.observe(pod);
                            }
                        }
                        Some(Ok(watcher::Event::Apply(pod))) => {
                            self.observe(&pod);
                            actual.insert(pod.metadata.name.clone().unwrap_or_default(), pod);
                        }
                        Some(Ok(watcher::Event::Delete(pod))) => {
                            let name = pod.metadata.name.clone().unwrap_or_default();
                            actual.remove(&name);
                            if let Some(id) = pod_id_of(&pod) {
                                self.store.set_mirror(&id, None);
                            }
                        }
                        Some(Err(err)) => return Err(ClusterError::Watch(err.to_string())),
                        None => return Err(ClusterError::WatchEnded),
                    }
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    changes.mark_unchanged();
                }
            }
            if listed {
                self.reconcile(&pods, &mut actual, &mut applied).await?;
            }
        }
    }

    /// Shows what the cluster says of a mirror on its pod.
    fn observe(&self, pod: &Pod) {
        if let Some(id) = pod_id_of(pod) {
            self.store.set_mirror(&id, Some(view_of(pod)));
        }
    }

    /// Applies what the store wants and the cluster lacks, and deletes ours
    /// that the store no longer holds. A pod the cluster refuses gets the error
    /// on its own mirror; a cluster fault ends the session.
    async fn reconcile(
        &self,
        pods: &Api<Pod>,
        actual: &mut HashMap<String, Pod>,
        applied: &mut HashMap<String, String>,
    ) -> Result<(), ClusterError> {
        let desired: Vec<PodSpec> = self.store.read().values().map(|e| e.spec.clone()).collect();
        let wanted_names: HashMap<&str, &str> = desired
            .iter()
            .map(|spec| (spec.name.as_str(), spec.id.as_str()))
            .collect();
        let unwanted: Vec<String> = actual
            .iter()
            .filter(|(name, pod)| {
                pod_id_of(pod)
                    .is_none_or(|id| wanted_names.get(name.as_str()) != Some(&id.as_str()))
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in unwanted {
            match pods.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {
                    tracing::info!(mirror = %name, "removed a mirror that is no longer wanted")
                }
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(err) if is_cluster_fault(&err) => {
                    return Err(ClusterError::Api(describe(&err)))
                }
                Err(err) => {
                    tracing::warn!(mirror = %name, error = %describe(&err), "cannot remove mirror");
                    continue;
                }
            }
            // Gone as far as we know; the watch confirms it.
            actual.remove(&name);
        }
        applied.retain(|id, _| desired.iter().any(|spec| &spec.id == id));
        for spec in &desired {
            let manifest = mirror_manifest(spec, &self.agent_label, &self.settings.namespace);
            let json = serde_json::to_string(&manifest).unwrap_or_default();
            let present = actual.contains_key(&spec.name);
            if present && applied.get(&spec.id) == Some(&json) {
                continue;
            }
            let params = PatchParams::apply(FIELD_MANAGER).force();
            match pods
                .patch(&spec.name, &params, &Patch::Apply(&manifest))
                .await
            {
                Ok(pod) => {
                    applied.insert(spec.id.clone(), json);
                    self.observe(&pod);
                    // Present as far as we know; the watch brings the rest.
                    actual.insert(spec.name.clone(), pod);
                }
                Err(err) if is_cluster_fault(&err) => {
                    return Err(ClusterError::Api(describe(&err)))
                }
                Err(err) => {
                    // Refused by the cluster: shown on this pod only, retried on its next change.
                    applied.insert(spec.id.clone(), json);
                    let reason = describe(&err);
                    tracing::warn!(pod_id = %spec.id, error = %reason, "the cluster refused the mirror");
                    self.store.set_mirror(
                        &spec.id,
                        Some(MirrorView {
                            name: spec.name.clone(),
                            error: Some(reason),
                            ..MirrorView::default()
                        }),
                    );
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_pod;

    #[test]
    fn manifests_carry_our_labels_and_the_pod_id() {
        let spec = parse_pod(
            0,
            serde_json::json!({"id": "pod:1", "name": "my-app", "ip": "10.0.0.1",
                               "image": "nginx:1", "ports": [80, 9090], "labels": {"app": "my-app"}}),
        )
        .expect("pod");
        let pod = mirror_manifest(&spec, "agent-a", "staging");
        let labels = pod.metadata.labels.clone().expect("labels");
        assert_eq!(labels["app"], "my-app");
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY_VALUE);
        assert_eq!(labels[AGENT_LABEL], "agent-a");
        assert_eq!(pod_id_of(&pod).as_deref(), Some("pod:1"));
        let container = &pod.spec.expect("spec").containers[0];
        assert_eq!(container.image.as_deref(), Some("nginx:1"));
        assert_eq!(container.ports.as_ref().map(Vec::len), Some(2));
    }

    #[test]
    fn agent_ids_become_valid_label_values() {
        assert_eq!(
            agent_label_value("staging-agent-box-1"),
            "staging-agent-box-1"
        );
        let long = "x".repeat(80);
        let hashed = agent_label_value(&long);
        assert!(hashed.starts_with("agent-") && hashed.len() <= 63);
        assert_eq!(hashed, agent_label_value(&long), "stable");
        assert_ne!(agent_label_value("a:b"), "a:b");
    }
}
