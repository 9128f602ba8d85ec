//! The local staging mirror: every pod the agent holds is server-side applied
//! as a Pod in a local cluster (Kind, k3s, any kube context), removed when the
//! pod goes, and watched so each pod's local phase, IP and restarts show next
//! to its tunnel. Only pods labelled as ours (managed-by and agent id) are ever
//! touched. The cluster being absent or going away stops nothing else: the
//! status says why, and the mirror retries with backoff and catches up.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::field::Empty;

use super::connection::{connect, describe, is_cluster_fault, ClusterError, ClusterStatus};
use super::dialer::MirrorDialer;
use super::manifest::{
    agent_label_value, mirror_manifest, mirror_names, pod_id_of, selector, view_of, FIELD_MANAGER,
};
use crate::config::ClusterSettings;
use crate::events::AgentEvent;
use crate::model::{MirrorView, PodSpec};
use crate::state::Store;
use crate::tunnel::LocalDialer;

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The delays between sessions with the cluster: each between half the plain
/// doubling (1 s, 2 s, ... up to 30 s) and all of it, at random, so agents
/// that lost one shared cluster do not come back to it in lockstep.
fn retry_delays() -> backon::ExponentialBackoff {
    use backon::BackoffBuilder as _;
    // backon adds between 0 and all of the delay again: halving both ends
    // gives [d/2, d). Its `std` feature seeds each process's generator apart.
    backon::ExponentialBuilder::default()
        .with_min_delay(FIRST_BACKOFF / 2)
        .with_max_delay(MAX_BACKOFF / 2)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Mirrors the store's pods into the cluster until cancelled.
#[derive(Debug, Clone)]
pub struct Mirror {
    settings: ClusterSettings,
    agent_label: String,
    store: Store,
    status: watch::Sender<ClusterStatus>,
    /// The pods API of the current session, for port-forwards; `None` while away.
    pods_api: Arc<parking_lot::RwLock<Option<Api<Pod>>>>,
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
                pods_api: Arc::new(parking_lot::RwLock::new(None)),
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
            namespace: self.settings.namespace.clone(),
        })
    }

    fn set_pods_api(&self, api: Option<Api<Pod>>) {
        *self.pods_api.write() = api;
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
        let mut backoff = retry_delays();
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
                // Never ends (no most attempts); the longest delay if it did.
                _ = tokio::time::sleep(backoff.next().unwrap_or(MAX_BACKOFF)) => {}
            }
            if matches!(*self.status.borrow(), ClusterStatus::Ready) {
                backoff = retry_delays();
            }
        }
    }

    /// One connection's life: ensure the namespace, then keep the mirrors in
    /// step with the store and the watch. Returns the reason it ended.
    #[tracing::instrument(
        name = "mirror",
        skip_all,
        fields(context = %self.settings.context, namespace = %self.settings.namespace)
    )]
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
                        Some(Err(err)) => return Err(ClusterError::Watch(Arc::new(err))),
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
    #[tracing::instrument(name = "reconcile", skip_all, fields(pods = Empty, listed = actual.len()))]
    async fn reconcile(
        &self,
        pods: &Api<Pod>,
        actual: &mut HashMap<String, Pod>,
        applied: &mut HashMap<String, String>,
    ) -> Result<(), ClusterError> {
        let desired: Vec<PodSpec> = self.store.read().values().map(|e| e.spec.clone()).collect();
        tracing::Span::current().record("pods", desired.len());
        let mirror_names = mirror_names(&desired);
        let wanted_names: HashMap<&str, &str> = mirror_names
            .iter()
            .map(|(id, name)| (name.as_str(), id.as_str()))
            .collect();
        // Each with the pod id it carries, if any, for the warning below.
        let unwanted: Vec<(String, Option<String>)> = actual
            .iter()
            .map(|(name, pod)| (name, pod_id_of(pod)))
            .filter(|(name, id)| {
                id.as_ref()
                    .is_none_or(|id| wanted_names.get(name.as_str()) != Some(&id.as_str()))
            })
            .map(|(name, id)| (name.clone(), id))
            .collect();
        for (name, pod_id) in unwanted {
            match pods.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {
                    tracing::info!(mirror = %name, "removed a mirror that is no longer wanted")
                }
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(err) if is_cluster_fault(&err) => {
                    return Err(ClusterError::Api(describe(&err)))
                }
                Err(err) => {
                    tracing::warn!(mirror = %name, pod_id = pod_id.as_deref().unwrap_or("unknown"), error = %describe(&err), "cannot remove mirror");
                    continue;
                }
            }
            // Gone as far as we know; the watch confirms it.
            actual.remove(&name);
        }
        applied.retain(|id, _| desired.iter().any(|spec| &spec.id == id));
        for spec in &desired {
            let name = mirror_names.get(&spec.id).unwrap_or(&spec.name);
            let manifest = mirror_manifest(spec, name, &self.agent_label, &self.settings.namespace);
            let json = serde_json::to_string(&manifest).unwrap_or_default();
            let present = actual.contains_key(name);
            if present && applied.get(&spec.id) == Some(&json) {
                continue;
            }
            let params = PatchParams::apply(FIELD_MANAGER).force();
            match pods.patch(name, &params, &Patch::Apply(&manifest)).await {
                Ok(pod) => {
                    applied.insert(spec.id.clone(), json);
                    self.observe(&pod);
                    // Present as far as we know; the watch brings the rest.
                    actual.insert(name.clone(), pod);
                }
                Err(err) if is_cluster_fault(&err) => {
                    return Err(ClusterError::Api(describe(&err)))
                }
                Err(err) => {
                    // Refused by the cluster: shown on this pod only, retried on its next change.
                    applied.insert(spec.id.clone(), json);
                    let reason = describe(&err);
                    tracing::warn!(pod_id = %spec.id, mirror = %name, error = %reason, "the cluster refused the mirror");
                    self.store.set_mirror(
                        &spec.id,
                        Some(MirrorView {
                            name: name.clone(),
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
