//! The port-forward dialer for `local` tunnels: each connection resolves the
//! pod's mirror from what the watch last saw and opens a fresh stream to it
//! through the API server, so a replaced mirror or a cluster that went away
//! fails that one connection, never the listener.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use tokio::sync::watch;

use super::connection::{describe, ClusterStatus};
use super::port_forward;
use crate::state::Store;
use crate::tunnel::{DialError, DialFuture, LocalDialer, LocalStream};

/// Opens port-forward streams to mirrors, for tunnels whose target is `local`.
#[derive(Debug, Clone)]
pub struct MirrorDialer {
    pub(super) store: Store,
    pub(super) status: watch::Receiver<ClusterStatus>,
    pub(super) pods_api: Arc<parking_lot::RwLock<Option<Api<Pod>>>>,
    /// The local namespace the mirrors live in.
    pub(super) namespace: String,
}

impl LocalDialer for MirrorDialer {
    fn dial(&self, pod_id: &str, port: u16) -> DialFuture {
        let dialer = self.clone();
        let pod_id = pod_id.to_owned();
        Box::pin(async move {
            let api = dialer.pods_api.read().clone().ok_or_else(|| {
                match dialer.status.borrow().reason() {
                    Some(reason) => DialError::ClusterUnavailable(reason),
                    None => DialError::Disabled,
                }
            })?;
            // Resolved now, from what the watch last saw: a replaced mirror is
            // picked up without touching the listener.
            let name = dialer
                .store
                .pod_view(&pod_id)
                .and_then(|view| view.tunnel.mirror.map(|m| m.name).or(Some(view.pod.name)))
                .ok_or_else(|| DialError::UnknownPod(pod_id.clone()))?;
            let client = api.into_client();
            match port_forward::open(&client, &dialer.namespace, &name, port).await {
                Ok(stream) => Ok(LocalStream {
                    stream: Box::new(stream),
                }),
                Err(err) => Err(DialError::PortForward {
                    mirror: name,
                    port,
                    message: describe(&err),
                }),
            }
        })
    }
}
