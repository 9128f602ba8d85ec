//! What the agent applies to the local cluster and what it reads back: the
//! labels and annotation that mark a mirror as ours, the Pod manifest made
//! from a staging pod, and the view of a mirror that shows beside its tunnel.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, ContainerPort, Pod, PodSpec as K8sPodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::model::{is_label_value, MirrorView, PodSpec};

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

/// A label value for `agent_id`: itself when valid, else a stable hash.
pub fn agent_label_value(agent_id: &str) -> String {
    if is_label_value(agent_id) {
        return agent_id.to_owned();
    }
    let hash = crate::model::fnv1a_64(agent_id.as_bytes());
    format!("agent-{hash:016x}")
}

/// The label selector matching every mirror of this agent.
pub fn selector(agent_label: &str) -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE},{AGENT_LABEL}={agent_label}")
}

/// The mirror's name for each pod id: the pod's own name when no other held
/// pod has it (two staging namespaces may both have a `web`), else
/// `<name>-<7 hex digits of a hash of the pod id>`, which fits the 63
/// characters of a Pod name (pod names are at most 55). It depends only on
/// the pods held: not on their order, the same after a restart.
pub fn mirror_names(specs: &[PodSpec]) -> BTreeMap<String, String> {
    let mut by_name: BTreeMap<&str, usize> = BTreeMap::new();
    for spec in specs {
        *by_name.entry(spec.name.as_str()).or_default() += 1;
    }
    specs
        .iter()
        .map(|spec| {
            let name = if by_name.get(spec.name.as_str()).copied().unwrap_or(0) > 1 {
                let hash = crate::model::fnv1a_32(spec.id.as_bytes());
                format!("{}-{:07x}", spec.name, hash & 0x0fff_ffff)
            } else {
                spec.name.clone()
            };
            (spec.id.clone(), name)
        })
        .collect()
}

/// The Pod we apply for a staging pod, named `name`: its image and ports,
/// its labels plus ours, and its staging id in an annotation.
pub fn mirror_manifest(spec: &PodSpec, name: &str, agent_label: &str, namespace: &str) -> Pod {
    let mut labels: BTreeMap<String, String> = spec.labels.clone();
    labels.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY_VALUE.to_owned());
    labels.insert(AGENT_LABEL.to_owned(), agent_label.to_owned());
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
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
                            container_port: i32::from(port.port),
                            name: port.name.clone(),
                            protocol: Some(port.protocol.as_str().to_owned()),
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
pub(super) fn view_of(pod: &Pod) -> MirrorView {
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

pub(super) fn pod_id_of(pod: &Pod) -> Option<String> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(POD_ID_ANNOTATION).cloned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{is_dns_label, parse_pod};

    #[test]
    fn manifests_carry_our_labels_and_the_pod_id() {
        let spec = parse_pod(
            0,
            serde_json::json!({"id": "pod:1", "name": "my-app", "ip": "10.0.0.1",
                               "image": "nginx:1", "labels": {"app": "my-app"},
                               "ports": [80, {"name": "metrics", "port": 9090},
                                         {"name": "dns", "port": 53, "protocol": "UDP"}]}),
        )
        .expect("pod");
        let pod = mirror_manifest(&spec, "my-app", "agent-a", "staging");
        let labels = pod.metadata.labels.clone().expect("labels");
        assert_eq!(labels["app"], "my-app");
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY_VALUE);
        assert_eq!(labels[AGENT_LABEL], "agent-a");
        assert_eq!(pod_id_of(&pod).as_deref(), Some("pod:1"));
        let container = &pod.spec.expect("spec").containers[0];
        assert_eq!(container.image.as_deref(), Some("nginx:1"));
        let ports = container.ports.clone().expect("ports");
        let shown: Vec<(i32, Option<&str>, Option<&str>)> = ports
            .iter()
            .map(|p| (p.container_port, p.name.as_deref(), p.protocol.as_deref()))
            .collect();
        assert_eq!(
            shown,
            vec![
                (80, None, Some("TCP")),
                (9090, Some("metrics"), Some("TCP")),
                (53, Some("dns"), Some("UDP")),
            ],
            "every port of the pod, named, with its protocol"
        );
    }

    #[test]
    fn mirrors_of_pods_that_share_a_name_get_names_of_their_own() {
        let pod = |id: &str, name: &str, namespace: &str| {
            parse_pod(
                0,
                serde_json::json!({"id": id, "name": name, "namespace": namespace, "ip": "10.0.0.1"}),
            )
            .expect("pod")
        };
        let specs = vec![
            pod("a-1", "web", "team-a"),
            pod("b-1", "web", "team-b"),
            pod("c-1", "api", "team-a"),
            pod("d-1", &"x".repeat(55), "team-a"),
            pod("e-1", &"x".repeat(55), "team-b"),
        ];
        let names = mirror_names(&specs);
        assert_eq!(names["c-1"], "api", "a unique name stays");
        assert!(names["a-1"].starts_with("web-") && names["b-1"].starts_with("web-"));
        assert_ne!(names["a-1"], names["b-1"]);
        assert!(names.values().all(|name| is_dns_label(name)), "{names:?}");
        let mut reversed = specs.clone();
        reversed.reverse();
        assert_eq!(mirror_names(&reversed), names, "order does not matter");
        // The staging id stays in the annotation.
        let manifest = mirror_manifest(&specs[0], &names["a-1"], "agent-a", "staging");
        assert_eq!(pod_id_of(&manifest).as_deref(), Some("a-1"));
        assert_eq!(
            manifest.metadata.name.as_deref(),
            Some(names["a-1"].as_str())
        );
    }

    #[test]
    fn agent_ids_become_valid_label_values() {
        assert_eq!(
            agent_label_value("staging-agent-box-1"),
            "staging-agent-box-1"
        );
        let long = "x".repeat(80);
        let hashed = agent_label_value(&long);
        assert!(hashed.starts_with("agent-") && is_label_value(&hashed));
        assert_eq!(hashed, agent_label_value(&long), "stable");
        assert_ne!(agent_label_value("a:b"), "a:b");
    }
}
