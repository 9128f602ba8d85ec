//! Objects for tests that play the cluster's controllers: builders for
//! Services, EndpointSlices and pods as the API returns them, and the
//! emulator's methods that write any object (each write a new
//! resourceVersion, seen by the watches of its resource and namespace) and
//! roll out Deployments, StatefulSets and DaemonSets with their pods.

use serde_json::{json, Map, Value};

use super::store::{self, DEPLOYMENTS, PODS, REPLICA_SETS};
use super::KubeEmulator;

/// Labels from pairs, as an object's `metadata.labels` holds them.
pub fn labels(pairs: &[(&str, &str)]) -> Value {
    Value::Object(
        pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), json!(value)))
            .collect::<Map<String, Value>>(),
    )
}

/// One port of a Service: its name, its port and the pod's port it leads
/// to (a number, or a container port's name).
#[derive(Debug, Clone)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub target_port: Value,
}

impl ServicePort {
    pub fn new(name: &str, port: u16, target_port: impl Into<Value>) -> Self {
        Self {
            name: name.to_owned(),
            port,
            target_port: target_port.into(),
        }
    }
}

/// A Service selecting pods with `selector`; its cluster IP is given when
/// it is applied, as the API server gives one.
pub fn service(
    namespace: &str,
    name: &str,
    selector: &[(&str, &str)],
    ports: &[ServicePort],
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|port| {
            json!({"name": port.name, "port": port.port, "targetPort": port.target_port,
                   "protocol": "TCP"})
        })
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"type": "ClusterIP", "selector": labels(selector), "ports": ports},
    })
}

/// A headless Service (`clusterIP: None`), as a StatefulSet's governing one.
pub fn headless_service(
    namespace: &str,
    name: &str,
    selector: &[(&str, &str)],
    ports: &[ServicePort],
) -> Value {
    let mut service = service(namespace, name, selector, ports);
    service["spec"]["clusterIP"] = json!("None");
    service["spec"]["clusterIPs"] = json!(["None"]);
    service
}

/// One endpoint of an EndpointSlice: a pod, its IP and its conditions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub pod: String,
    pub ip: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Endpoint {
    /// A pod that is ready.
    pub fn ready(pod: &str, ip: &str) -> Self {
        Self {
            pod: pod.to_owned(),
            ip: ip.to_owned(),
            ready: true,
            serving: true,
            terminating: false,
        }
    }

    /// A pod that is running but not ready.
    pub fn not_ready(pod: &str, ip: &str) -> Self {
        Self {
            ready: false,
            serving: false,
            ..Self::ready(pod, ip)
        }
    }

    /// A pod on its way out: not ready, terminating (still serving while
    /// it drains).
    pub fn terminating(pod: &str, ip: &str) -> Self {
        Self {
            ready: false,
            serving: true,
            terminating: true,
            ..Self::ready(pod, ip)
        }
    }
}

/// An EndpointSlice of Service `service` (labelled
/// `kubernetes.io/service-name`), with `ports` (name, port) for every
/// endpoint, as the EndpointSlice controller writes it.
pub fn endpoint_slice(
    namespace: &str,
    service: &str,
    slice: &str,
    ports: &[(&str, u16)],
    endpoints: &[Endpoint],
) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|endpoint| {
            json!({
                "addresses": [endpoint.ip],
                "conditions": {"ready": endpoint.ready, "serving": endpoint.serving,
                               "terminating": endpoint.terminating},
                "targetRef": {"kind": "Pod", "namespace": namespace, "name": endpoint.pod},
            })
        })
        .collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|(name, port)| json!({"name": name, "port": port, "protocol": "TCP"}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": slice, "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service,
                       "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    })
}

/// A running pod at `ip` with named container ports, ready or not.
pub fn pod(
    namespace: &str,
    name: &str,
    pod_labels: Value,
    ip: &str,
    ready: bool,
    ports: &[(&str, u16)],
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(name, port)| json!({"name": name, "containerPort": port, "protocol": "TCP"}))
        .collect();
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": pod_labels},
        "spec": {"containers": [{"name": "app", "image": "busybox", "ports": ports}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    });
    set_ready(&mut pod, ready);
    pod
}

fn set_ready(pod: &mut Value, ready: bool) {
    let word = if ready { "True" } else { "False" };
    pod["status"]["conditions"] = json!([
        {"type": "Ready", "status": word},
        {"type": "ContainersReady", "status": word},
    ]);
    pod["status"]["containerStatuses"] = json!([{
        "name": "app", "image": "busybox", "imageID": "", "ready": ready,
        "restartCount": 0, "started": true, "state": {"running": {}},
    }]);
}

fn owner(object: &Value) -> Value {
    json!([{
        "apiVersion": object["apiVersion"], "kind": object["kind"],
        "name": object["metadata"]["name"], "uid": object["metadata"]["uid"],
        "controller": true, "blockOwnerDeletion": true,
    }])
}

/// A workload's spec: replicas, selector and pod template.
fn workload_spec(
    selector: &Value,
    replicas: usize,
    ports: &[(&str, u16)],
    revision: &str,
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(name, port)| json!({"name": name, "containerPort": port, "protocol": "TCP"}))
        .collect();
    json!({
        "replicas": replicas,
        "selector": {"matchLabels": selector},
        "template": {
            "metadata": {"labels": selector, "annotations": {"emulator/revision": revision}},
            "spec": {"containers": [{"name": "app", "image": "busybox", "ports": ports}]},
        },
    })
}

fn with_label(labels: &Value, key: &str, value: &str) -> Value {
    let mut labels = labels.clone();
    labels[key] = json!(value);
    labels
}

impl KubeEmulator {
    /// Writes any object the emulator serves (by `apiVersion` and `kind`):
    /// created with a uid, or updated keeping its uid and creation time;
    /// each change a new resourceVersion and an event to the watches of its
    /// resource and namespace, an unchanged object neither. A Service
    /// without a cluster IP gets one. The object as stored.
    ///
    /// Panics on a kind the emulator does not serve or an object without a
    /// name: a test's own mistake.
    pub fn apply_object(&self, mut object: Value) -> Value {
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let kind = object["kind"].as_str().unwrap_or_default();
        let resource = store::by_kind(api_version, kind)
            .unwrap_or_else(|| panic!("the emulator does not serve {api_version} {kind}"));
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("a {kind} without metadata.name"))
            .to_owned();
        let namespace = if resource.namespaced {
            let namespace = object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_owned();
            object["metadata"]["namespace"] = json!(namespace);
            namespace
        } else {
            String::new()
        };
        let mut cluster = self.shared.lock();
        match cluster.objects.get(resource, &namespace, &name) {
            Some(existing) => {
                for field in ["uid", "creationTimestamp", "resourceVersion", "generation"] {
                    object["metadata"][field] = existing["metadata"][field].clone();
                }
                if resource.kind == "Service" && object["spec"]["clusterIP"].is_null() {
                    object["spec"]["clusterIP"] = existing["spec"]["clusterIP"].clone();
                    object["spec"]["clusterIPs"] = existing["spec"]["clusterIPs"].clone();
                }
                if object == *existing {
                    return object;
                }
                if object["spec"] != existing["spec"] {
                    let generation = existing["metadata"]["generation"].as_u64().unwrap_or(1);
                    object["metadata"]["generation"] = json!(generation + 1);
                }
            }
            None => {
                let next = cluster.resource_version + 1;
                object["metadata"]["uid"] = json!(format!("uid-{name}-{next}"));
                object["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
                object["metadata"]["generation"] = json!(1);
                if resource.kind == "Service" && object["spec"]["clusterIP"].is_null() {
                    let ip = format!("10.96.{}.{}", next / 250 % 250, next % 250 + 1);
                    object["spec"]["clusterIP"] = json!(ip);
                    object["spec"]["clusterIPs"] = json!([ip]);
                }
            }
        }
        self.shared
            .put(&mut cluster, resource, &namespace, &name, object)
    }

    /// Deletes an object as its controller or a user would (a pod's
    /// port-forward streams end with it); whether it was there.
    pub fn delete_object(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> bool {
        let Some(resource) = store::by_kind(api_version, kind) else {
            return false;
        };
        let namespace = if resource.namespaced { namespace } else { "" };
        let mut cluster = self.shared.lock();
        self.shared
            .take(&mut cluster, resource, namespace, name)
            .is_some()
    }

    /// An object as stored, if any.
    pub fn object(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        let resource = store::by_kind(api_version, kind)?;
        let namespace = if resource.namespaced { namespace } else { "" };
        self.shared
            .lock()
            .objects
            .get(resource, namespace, name)
            .cloned()
    }

    /// Makes a pod ready or not, as its kubelet reports readiness.
    pub fn set_pod_ready(&self, namespace: &str, name: &str, ready: bool) -> bool {
        let mut cluster = self.shared.lock();
        let Some(mut pod) = cluster.objects.get(&PODS, namespace, name).cloned() else {
            return false;
        };
        set_ready(&mut pod, ready);
        self.shared.put(&mut cluster, &PODS, namespace, name, pod);
        true
    }

    /// The next address of a pod the emulator's controllers start.
    fn next_pod_ip(&self) -> String {
        let mut cluster = self.shared.lock();
        cluster.controller_ips = cluster.controller_ips.wrapping_add(1);
        let n = cluster.controller_ips;
        format!("10.245.{}.{}", n / 250 % 250, n % 250 + 1)
    }

    /// Starts ready pods `names` with `pod_labels`, owned by `owner`; what
    /// each name gets from its index is `adjust`'s (a hostname, a node).
    fn start_pods(
        &self,
        namespace: &str,
        names: &[String],
        pod_labels: &Value,
        ports: &[(&str, u16)],
        owner_object: &Value,
        adjust: impl Fn(usize, &mut Value),
    ) {
        for (index, name) in names.iter().enumerate() {
            let ip = self.next_pod_ip();
            let mut pod = pod(namespace, name, pod_labels.clone(), &ip, true, ports);
            pod["metadata"]["ownerReferences"] = owner(owner_object);
            adjust(index, &mut pod);
            self.apply_object(pod);
        }
    }

    /// A Deployment at revision `template_hash`, as its controller and the
    /// ReplicaSet controller leave it: the Deployment (selector `selector`),
    /// its ReplicaSet `<name>-<hash>` and `replicas` ready pods
    /// `<name>-<hash>-<i>`, labelled `selector` and `pod-template-hash`.
    /// Applied again with another hash, it is a rollout's first step: the
    /// new ReplicaSet and pods come, the old ones stay until the test
    /// takes them away ([`KubeEmulator::set_pod_ready`],
    /// [`KubeEmulator::delete_pod`], [`KubeEmulator::scale_replica_set`]).
    /// The new pods' names.
    pub fn apply_deployment(
        &self,
        namespace: &str,
        name: &str,
        selector: &[(&str, &str)],
        replicas: usize,
        ports: &[(&str, u16)],
        template_hash: &str,
    ) -> Vec<String> {
        let selector = labels(selector);
        let deployment = self.apply_object(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": namespace, "labels": selector},
            "spec": workload_spec(&selector, replicas, ports, template_hash),
            "status": {"replicas": replicas, "readyReplicas": replicas,
                       "updatedReplicas": replicas, "availableReplicas": replicas},
        }));
        let pod_labels = with_label(&selector, "pod-template-hash", template_hash);
        let set_name = format!("{name}-{template_hash}");
        let mut set_spec = workload_spec(&pod_labels, replicas, ports, template_hash);
        set_spec["template"]["metadata"]["labels"] = pod_labels.clone();
        let replica_set = self.apply_object(json!({
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": set_name, "namespace": namespace, "labels": pod_labels,
                         "ownerReferences": owner(&deployment)},
            "spec": set_spec,
            "status": {"replicas": replicas, "readyReplicas": replicas,
                       "availableReplicas": replicas},
        }));
        let names: Vec<String> = (0..replicas)
            .map(|index| format!("{set_name}-{}", pod_suffix(index)))
            .collect();
        self.start_pods(
            namespace,
            &names,
            &pod_labels,
            ports,
            &replica_set,
            |_, _| {},
        );
        names
    }

    /// Sets a ReplicaSet's replicas (spec and status), as the Deployment
    /// controller scales an old one down; its pods are the test's to delete.
    pub fn scale_replica_set(&self, namespace: &str, name: &str, replicas: usize) -> bool {
        let Some(mut set) = self.object("apps/v1", "ReplicaSet", namespace, name) else {
            return false;
        };
        set["spec"]["replicas"] = json!(replicas);
        set["status"] = json!({"replicas": replicas, "readyReplicas": replicas,
                               "availableReplicas": replicas});
        self.apply_object(set);
        true
    }

    /// A StatefulSet governed by Service `service_name`, with ready pods
    /// `<name>-0` .. `<name>-<replicas - 1>` (labelled `selector` and
    /// `statefulset.kubernetes.io/pod-name`, hostname and subdomain set).
    /// The pods' names.
    pub fn apply_stateful_set(
        &self,
        namespace: &str,
        name: &str,
        service_name: &str,
        selector: &[(&str, &str)],
        replicas: usize,
        ports: &[(&str, u16)],
    ) -> Vec<String> {
        let selector = labels(selector);
        let revision = format!("{name}-rev1");
        let mut spec = workload_spec(&selector, replicas, ports, &revision);
        spec["serviceName"] = json!(service_name);
        let set = self.apply_object(json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": name, "namespace": namespace, "labels": selector},
            "spec": spec,
            "status": {"replicas": replicas, "readyReplicas": replicas,
                       "currentReplicas": replicas, "updatedReplicas": replicas,
                       "currentRevision": revision, "updateRevision": revision},
        }));
        let names: Vec<String> = (0..replicas).map(|i| format!("{name}-{i}")).collect();
        let pod_labels = with_label(&selector, "controller-revision-hash", &revision);
        self.start_pods(namespace, &names, &pod_labels, ports, &set, |index, pod| {
            let hostname = format!("{name}-{index}");
            pod["metadata"]["labels"]["statefulset.kubernetes.io/pod-name"] = json!(hostname);
            pod["spec"]["hostname"] = json!(hostname);
            pod["spec"]["subdomain"] = json!(service_name);
        });
        names
    }

    /// A DaemonSet with one ready pod `<name>-<node>` on each of `nodes`
    /// (labelled `selector`, `spec.nodeName` set). The pods' names.
    pub fn apply_daemon_set(
        &self,
        namespace: &str,
        name: &str,
        selector: &[(&str, &str)],
        nodes: &[&str],
        ports: &[(&str, u16)],
    ) -> Vec<String> {
        let selector = labels(selector);
        let mut spec = workload_spec(&selector, nodes.len(), ports, "1");
        if let Some(spec) = spec.as_object_mut() {
            spec.remove("replicas");
        }
        let set = self.apply_object(json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": name, "namespace": namespace, "labels": selector},
            "spec": spec,
            "status": {"currentNumberScheduled": nodes.len(), "desiredNumberScheduled": nodes.len(),
                       "numberMisscheduled": 0, "numberReady": nodes.len()},
        }));
        let names: Vec<String> = nodes.iter().map(|node| format!("{name}-{node}")).collect();
        self.start_pods(namespace, &names, &selector, ports, &set, |index, pod| {
            pod["spec"]["nodeName"] = json!(nodes[index]);
        });
        names
    }

    /// The names of a namespace's objects of `api_version` `kind`.
    pub fn object_names(&self, api_version: &str, kind: &str, namespace: &str) -> Vec<String> {
        let Some(resource) = store::by_kind(api_version, kind) else {
            return Vec::new();
        };
        let namespace = if resource.namespaced { namespace } else { "" };
        self.shared
            .lock()
            .objects
            .list(resource, Some(namespace))
            .map(|(_, name, _)| name.to_owned())
            .collect()
    }

    /// A Deployment's ReplicaSets' names (those it owns).
    pub fn replica_sets_of(&self, namespace: &str, deployment: &str) -> Vec<String> {
        let cluster = self.shared.lock();
        let Some(uid) = cluster
            .objects
            .get(&DEPLOYMENTS, namespace, deployment)
            .map(|d| d["metadata"]["uid"].clone())
        else {
            return Vec::new();
        };
        cluster
            .objects
            .list(&REPLICA_SETS, Some(namespace))
            .filter(|(_, _, set)| set["metadata"]["ownerReferences"][0]["uid"] == uid)
            .map(|(_, name, _)| name.to_owned())
            .collect()
    }
}

/// A pod name's last part, five characters as the ReplicaSet controller's
/// are (stable here, so tests can name the pods).
fn pod_suffix(index: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut n = index;
    (0..5)
        .map(|_| {
            let c = ALPHABET[n % ALPHABET.len()] as char;
            n /= ALPHABET.len();
            c
        })
        .collect()
}
