//! The Kubernetes API emulator driven by kube-rs as the agent drives a
//! developer's context: typed lists with label selectors, `watcher`s on
//! EndpointSlices and pods through a rollout (list then watch, and streaming
//! lists), workloads with their pods, two clusters for two contexts, and
//! RBAC's 403 per namespace as kube-rs surfaces it. Real HTTP on loopback.

use std::collections::BTreeSet;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use k3s_local_agent_e2e::kube_emulator::{objects, Endpoint, KubeEmulator, ServicePort};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(10);

/// A kube-rs client for `context` of a kubeconfig naming `emulators`.
async fn client_for(
    emulators: &[(&KubeEmulator, &str)],
    context: &str,
) -> (Client, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config");
    k3s_local_agent_e2e::kube_emulator::write_kubeconfig(&path, emulators).expect("kubeconfig");
    let kubeconfig = Kubeconfig::read_from(&path).expect("kubeconfig read");
    let options = KubeConfigOptions {
        context: Some(context.to_owned()),
        ..KubeConfigOptions::default()
    };
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .expect("config");
    (Client::try_from(config).expect("client"), dir)
}

async fn client(emulator: &KubeEmulator) -> (Client, tempfile::TempDir) {
    client_for(&[(emulator, "dev")], "dev").await
}

/// The next watcher event, within the deadline.
async fn next<K, S>(stream: &mut S, waiting_for: &str) -> Event<K>
where
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Unpin,
{
    match tokio::time::timeout(DEADLINE, stream.next()).await {
        Ok(Some(Ok(event))) => event,
        Ok(Some(Err(err))) => panic!("watcher error waiting for {waiting_for}: {err}"),
        Ok(None) => panic!("watcher ended waiting for {waiting_for}"),
        Err(_) => panic!("no event within {DEADLINE:?} waiting for {waiting_for}"),
    }
}

/// The initial list a watcher reports: the objects' names, once it is done.
async fn initial<K, S>(stream: &mut S) -> BTreeSet<String>
where
    K: kube::Resource,
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Unpin,
{
    assert!(matches!(next(stream, "Init").await, Event::Init));
    let mut names = BTreeSet::new();
    loop {
        match next(stream, "the initial list").await {
            Event::InitApply(object) => {
                names.insert(object.name_any());
            }
            Event::InitDone => return names,
            _ => panic!("not an initial-list event"),
        }
    }
}

fn names<K: kube::Resource>(objects: impl IntoIterator<Item = K>) -> BTreeSet<String> {
    objects.into_iter().map(|o| o.name_any()).collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn web_ports() -> Vec<ServicePort> {
    vec![
        ServicePort::new("http", 80, "http"),
        ServicePort::new("metrics", 9090, 9090),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn services_are_listed_by_label_selector_in_a_namespace_and_in_all() {
    let emulator = KubeEmulator::start().await.expect("emulator");
    for (namespace, name, team, tier) in [
        ("staging", "web", "a", "front"),
        ("staging", "api", "a", "back"),
        ("staging", "db", "b", "data"),
        ("dev", "web", "a", "front"),
    ] {
        let mut service = objects::service(namespace, name, &[("app", name)], &web_ports());
        service["metadata"]["labels"] = json!({"team": team, "tier": tier});
        emulator.apply_object(service);
    }
    let (client, _dir) = client(&emulator).await;
    let staging: Api<Service> = Api::namespaced(client.clone(), "staging");

    let all = staging.list(&ListParams::default()).await.expect("list");
    assert_eq!(names(all.items.clone()), set(&["api", "db", "web"]));
    assert!(all.metadata.resource_version.is_some());
    let team_a = staging
        .list(&ListParams::default().labels("team=a"))
        .await
        .expect("list team=a");
    assert_eq!(names(team_a), set(&["api", "web"]));
    let not_a = staging
        .list(&ListParams::default().labels("team!=a"))
        .await
        .expect("list team!=a");
    assert_eq!(names(not_a), set(&["db"]));
    let set_based = staging
        .list(&ListParams::default().labels("tier in (front,data),team"))
        .await
        .expect("list set-based");
    assert_eq!(names(set_based), set(&["db", "web"]));

    let everywhere: Api<Service> = Api::all(client.clone());
    let fronts = everywhere
        .list(&ListParams::default().labels("tier=front"))
        .await
        .expect("list all namespaces");
    let found: BTreeSet<(String, String)> = fronts
        .into_iter()
        .map(|s| (s.namespace().unwrap_or_default(), s.name_any()))
        .collect();
    assert_eq!(
        found,
        [("dev", "web"), ("staging", "web")]
            .into_iter()
            .map(|(n, s)| (n.to_owned(), s.to_owned()))
            .collect()
    );

    // Got by name, with what the API server filled in.
    let web = staging.get("web").await.expect("get web");
    let spec = web.spec.expect("spec");
    assert!(spec.cluster_ip.is_some_and(|ip| ip.starts_with("10.96.")));
    let ports = spec.ports.expect("ports");
    assert_eq!(ports[0].name.as_deref(), Some("http"));
    assert_eq!(
        ports[0].target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("http".into()))
    );
    let missing = staging.get("nope").await.expect_err("a missing service");
    assert!(
        matches!(missing, kube::Error::Api(ref s) if s.code == 404),
        "{missing:?}"
    );

    // A field selector on the name, as a watcher of one object sends it.
    let one = staging
        .list(&ListParams::default().fields("metadata.name=api"))
        .await
        .expect("list by name");
    assert_eq!(names(one), set(&["api"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watcher_of_one_services_endpoint_slices_sees_the_list_an_update_and_a_deletion() {
    let emulator = KubeEmulator::start().await.expect("emulator");
    let ports = [("http", 8080u16)];
    emulator.apply_object(objects::endpoint_slice(
        "staging",
        "web",
        "web-abcde",
        &ports,
        &[
            Endpoint::ready("web-1", "10.244.1.1"),
            Endpoint::ready("web-2", "10.244.1.2"),
        ],
    ));
    emulator.apply_object(objects::endpoint_slice(
        "staging",
        "api",
        "api-fghij",
        &ports,
        &[Endpoint::ready("api-1", "10.244.2.1")],
    ));
    let (client, _dir) = client(&emulator).await;
    let slices: Api<EndpointSlice> = Api::namespaced(client, "staging");

    for streaming in [false, true] {
        let mut config = watcher::Config::default().labels("kubernetes.io/service-name=web");
        if streaming {
            config = config.streaming_lists();
        }
        let mut stream = watcher::watcher(slices.clone(), config).boxed();
        assert_eq!(
            initial(&mut stream).await,
            set(&["web-abcde"]),
            "streaming: {streaming}"
        );

        // web-1 goes not ready: the slice is updated.
        emulator.apply_object(objects::endpoint_slice(
            "staging",
            "web",
            "web-abcde",
            &ports,
            &[
                Endpoint::terminating("web-1", "10.244.1.1"),
                Endpoint::ready("web-2", "10.244.1.2"),
            ],
        ));
        // Another Service's slice changes: not this watcher's business.
        emulator.apply_object(objects::endpoint_slice(
            "staging",
            "api",
            "api-fghij",
            &ports,
            &[Endpoint::not_ready("api-1", "10.244.2.1")],
        ));
        let Event::Apply(updated) = next(&mut stream, "the update").await else {
            panic!("not an update");
        };
        assert_eq!(updated.name_any(), "web-abcde");
        let conditions = updated.endpoints[0].conditions.clone().expect("conditions");
        assert_eq!(conditions.ready, Some(false));
        assert_eq!(conditions.terminating, Some(true));
        assert_eq!(
            updated.endpoints[0]
                .target_ref
                .as_ref()
                .and_then(|r| r.name.clone()),
            Some("web-1".to_owned())
        );
        assert_eq!(updated.ports.as_ref().expect("ports")[0].port, Some(8080));

        assert!(emulator.delete_object(
            "discovery.k8s.io/v1",
            "EndpointSlice",
            "staging",
            "web-abcde"
        ));
        let Event::Delete(deleted) = next(&mut stream, "the deletion").await else {
            panic!("not a deletion");
        };
        assert_eq!(deleted.name_any(), "web-abcde");

        // Back for the next round.
        emulator.apply_object(objects::endpoint_slice(
            "staging",
            "web",
            "web-abcde",
            &ports,
            &[Endpoint::ready("web-1", "10.244.1.1")],
        ));
        let Event::Apply(again) = next(&mut stream, "the slice again").await else {
            panic!("not an apply");
        };
        assert_eq!(again.name_any(), "web-abcde");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deployment_rollout_is_seen_by_watchers_of_its_pods_and_of_it_by_name() {
    let emulator = KubeEmulator::start().await.expect("emulator");
    let selector = [("app", "web")];
    let ports = [("http", 8080u16)];
    let old = emulator.apply_deployment("staging", "web", &selector, 2, &ports, "6d4f8b7c9");
    assert_eq!(old.len(), 2);
    assert!(old.iter().all(|name| name.starts_with("web-6d4f8b7c9-")));
    // A pod of another app, outside the selection.
    emulator.apply_deployment("staging", "api", &[("app", "api")], 1, &ports, "11111111");

    let (client, _dir) = client(&emulator).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "staging");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "staging");
    let mut pod_stream =
        watcher::watcher(pods.clone(), watcher::Config::default().labels("app=web")).boxed();
    let mut deployment_stream = watcher::watcher(
        deployments.clone(),
        watcher::Config::default().fields("metadata.name=web"),
    )
    .boxed();
    assert_eq!(
        initial(&mut pod_stream).await,
        old.iter().cloned().collect()
    );
    assert_eq!(initial(&mut deployment_stream).await, set(&["web"]));

    // The rollout: a new ReplicaSet and its pods, then the old pods go
    // not ready and are deleted, the old ReplicaSet scaled to none.
    let new = emulator.apply_deployment("staging", "web", &selector, 2, &ports, "7f9c5d2a1");
    let Event::Apply(deployment) = next(&mut deployment_stream, "the new revision").await else {
        panic!("not an apply");
    };
    assert_eq!(deployment.metadata.generation, Some(2));
    let mut seen = BTreeSet::new();
    while seen.len() < new.len() {
        let Event::Apply(pod) = next(&mut pod_stream, "the new pods").await else {
            panic!("not an apply");
        };
        assert_eq!(pod.labels()["pod-template-hash"], "7f9c5d2a1");
        let status = pod.status.expect("status");
        assert!(status.pod_ip.is_some());
        seen.insert(pod.metadata.name.expect("name"));
    }
    assert_eq!(seen, new.iter().cloned().collect());
    for name in &old {
        assert!(emulator.set_pod_ready("staging", name, false));
        let Event::Apply(pod) = next(&mut pod_stream, "an old pod not ready").await else {
            panic!("not an apply");
        };
        assert_eq!(&pod.name_any(), name);
        let ready = pod.status.and_then(|s| s.conditions).expect("conditions");
        assert!(ready
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "False"));
        emulator.delete_pod("staging", name);
        let Event::Delete(pod) = next(&mut pod_stream, "an old pod deleted").await else {
            panic!("not a deletion");
        };
        assert_eq!(&pod.name_any(), name);
    }
    assert!(emulator.scale_replica_set("staging", "web-6d4f8b7c9", 0));

    let now = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .expect("pods");
    assert_eq!(names(now), new.iter().cloned().collect());
    let sets: Api<ReplicaSet> = Api::namespaced(client, "staging");
    let web_sets = sets
        .list(&ListParams::default().labels("app=web"))
        .await
        .expect("replica sets");
    let replicas: BTreeSet<(String, i32)> = web_sets
        .into_iter()
        .map(|s| (s.name_any(), s.spec.and_then(|s| s.replicas).unwrap_or(-1)))
        .collect();
    assert_eq!(
        replicas,
        [
            ("web-6d4f8b7c9".to_owned(), 0),
            ("web-7f9c5d2a1".to_owned(), 2)
        ]
        .into_iter()
        .collect()
    );
    assert_eq!(
        emulator.replica_sets_of("staging", "web"),
        vec!["web-6d4f8b7c9".to_owned(), "web-7f9c5d2a1".to_owned()]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_whose_labels_leave_a_watched_selection_is_deleted_for_that_watch() {
    let emulator = KubeEmulator::start().await.expect("emulator");
    let pod = objects::pod(
        "staging",
        "web-1",
        json!({"app": "web"}),
        "10.244.3.1",
        true,
        &[],
    );
    emulator.apply_object(pod.clone());
    let (client, _dir) = client(&emulator).await;
    let pods: Api<Pod> = Api::namespaced(client, "staging");
    let listed = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .expect("list");
    let version = listed.metadata.resource_version.expect("resourceVersion");
    let mut stream = pods
        .watch(&WatchParams::default().labels("app=web"), &version)
        .await
        .expect("watch")
        .boxed();
    let mut relabelled = pod.clone();
    relabelled["metadata"]["labels"] = json!({"app": "other"});
    emulator.apply_object(relabelled);
    emulator.apply_object(pod);
    for expected in ["DELETED", "ADDED"] {
        let event = tokio::time::timeout(DEADLINE, stream.next())
            .await
            .expect("an event in time")
            .expect("the stream goes on")
            .expect("an event");
        let kind = match event {
            WatchEvent::Added(_) => "ADDED",
            WatchEvent::Modified(_) => "MODIFIED",
            WatchEvent::Deleted(_) => "DELETED",
            WatchEvent::Bookmark(_) => "BOOKMARK",
            WatchEvent::Error(_) => "ERROR",
        };
        assert_eq!(kind, expected);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stateful_set_behind_a_headless_service_and_a_daemon_set_have_their_pods() {
    let emulator = KubeEmulator::start().await.expect("emulator");
    let ports = [("pg", 5432u16)];
    emulator.apply_object(objects::headless_service(
        "staging",
        "db",
        &[("app", "db")],
        &[ServicePort::new("pg", 5432, "pg")],
    ));
    let db = emulator.apply_stateful_set("staging", "db", "db", &[("app", "db")], 3, &ports);
    assert_eq!(db, vec!["db-0", "db-1", "db-2"]);
    let agents = emulator.apply_daemon_set(
        "staging",
        "agent",
        &[("app", "agent")],
        &["node-a", "node-b"],
        &ports,
    );
    assert_eq!(agents, vec!["agent-node-a", "agent-node-b"]);

    let (client, _dir) = client(&emulator).await;
    let services: Api<Service> = Api::namespaced(client.clone(), "staging");
    let headless = services.get("db").await.expect("db service");
    assert_eq!(
        headless.spec.and_then(|s| s.cluster_ip).as_deref(),
        Some("None")
    );
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "staging");
    let stateful = sets.get("db").await.expect("db set");
    assert_eq!(
        stateful.spec.as_ref().map(|s| s.service_name.clone()),
        Some(Some("db".to_owned()))
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), "staging");
    let db_pods = pods
        .list(&ListParams::default().labels("app=db"))
        .await
        .expect("db pods");
    let ips: BTreeSet<String> = db_pods
        .iter()
        .filter_map(|p| p.status.as_ref().and_then(|s| s.pod_ip.clone()))
        .collect();
    assert_eq!(ips.len(), 3, "three pods, three addresses");
    assert_eq!(
        db_pods.items[1].labels()["statefulset.kubernetes.io/pod-name"],
        "db-1"
    );
    assert_eq!(
        db_pods.items[1]
            .metadata
            .owner_references
            .as_ref()
            .expect("owner")[0]
            .kind,
        "StatefulSet"
    );
    let daemons: Api<DaemonSet> = Api::namespaced(client.clone(), "staging");
    assert_eq!(
        names(
            daemons
                .list(&ListParams::default())
                .await
                .expect("daemon sets")
        ),
        set_of("agent")
    );
    let on_b = pods
        .list(&ListParams::default().fields("spec.nodeName=node-b"))
        .await
        .expect("pods on node-b");
    assert_eq!(names(on_b), set(&["agent-node-b"]));
}

fn set_of(name: &str) -> BTreeSet<String> {
    set(&[name])
}

#[tokio::test(flavor = "multi_thread")]
async fn two_emulators_are_two_contexts_of_one_kubeconfig() {
    let kind = KubeEmulator::start().await.expect("kind");
    let cloud = KubeEmulator::start().await.expect("cloud");
    kind.apply_object(objects::service(
        "default",
        "local-web",
        &[("app", "web")],
        &web_ports(),
    ));
    cloud.apply_object(objects::service(
        "default",
        "cloud-web",
        &[("app", "web")],
        &web_ports(),
    ));
    let contexts = [(&kind, "kind-dev"), (&cloud, "cloud")];
    for (context, expected) in [("kind-dev", "local-web"), ("cloud", "cloud-web")] {
        let (client, _dir) = client_for(&contexts, context).await;
        let services: Api<Service> = Api::default_namespaced(client);
        let listed = services.list(&ListParams::default()).await.expect("list");
        assert_eq!(names(listed), set_of(expected), "context {context}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_denied_namespace_answers_403_as_the_api_server_words_it() {
    let emulator = KubeEmulator::start().await.expect("emulator");
    emulator.apply_object(objects::service(
        "staging",
        "web",
        &[("app", "web")],
        &web_ports(),
    ));
    emulator.apply_object(objects::service(
        "dev",
        "web",
        &[("app", "web")],
        &web_ports(),
    ));
    emulator.apply_deployment(
        "staging",
        "web",
        &[("app", "web")],
        1,
        &[("http", 80)],
        "abc",
    );
    emulator.deny_in("list", "services", "staging");
    emulator.deny_in("watch", "endpointslices", "staging");
    emulator.deny_in("list", "deployments", "staging");
    emulator.deny_in("create", "pods/portforward", "staging");
    let (client, _dir) = client(&emulator).await;

    let staging: Api<Service> = Api::namespaced(client.clone(), "staging");
    let err = staging
        .list(&ListParams::default())
        .await
        .expect_err("forbidden");
    let kube::Error::Api(status) = err else {
        panic!("not an API error: {err:?}");
    };
    assert_eq!(status.code, 403);
    assert_eq!(status.reason, "Forbidden");
    assert!(status.is_forbidden());
    assert_eq!(
        status.message,
        "services is forbidden: User \"tester\" cannot list resource \"services\" in API group \"\" in the namespace \"staging\""
    );
    // Another namespace is allowed; all namespaces are not.
    let dev: Api<Service> = Api::namespaced(client.clone(), "dev");
    assert_eq!(
        names(dev.list(&ListParams::default()).await.expect("dev")),
        set_of("web")
    );
    let all: Api<Service> = Api::all(client.clone());
    let err = all
        .list(&ListParams::default())
        .await
        .expect_err("cluster-wide");
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 403 && s.message.ends_with("at the cluster scope")),
        "{err:?}"
    );

    // A group's resource names its group.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "staging");
    let err = deployments
        .list(&ListParams::default())
        .await
        .expect_err("forbidden");
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 403 && s.message.contains("in API group \"apps\"")),
        "{err:?}"
    );

    // A watcher lists first (allowed), then its watch is refused.
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "staging");
    let mut stream = watcher::watcher(slices, watcher::Config::default()).boxed();
    assert!(initial(&mut stream).await.is_empty());
    match tokio::time::timeout(DEADLINE, stream.next()).await {
        Ok(Some(Err(watcher::Error::WatchStartFailed(kube::Error::Api(status))))) => {
            assert_eq!((status.code, status.reason.as_str()), (403, "Forbidden"));
            assert!(
                status.message.contains(
                    "cannot watch resource \"endpointslices\" in API group \"discovery.k8s.io\""
                ),
                "{}",
                status.message
            );
        }
        other => panic!("not a refused watch: {other:?}"),
    }

    // The port-forward subresource, as an upgrade request meets it.
    let pod = emulator.pod_names("staging").remove(0);
    let response = reqwest::Client::new()
        .post(format!(
            "{}/api/v1/namespaces/staging/pods/{pod}/portforward?ports=80",
            emulator.url()
        ))
        .header("Connection", "Upgrade")
        .header("Upgrade", "SPDY/3.1")
        .send()
        .await
        .expect("port-forward request");
    assert_eq!(response.status().as_u16(), 403);
    let body: serde_json::Value = response.json().await.expect("a Status");
    assert_eq!(body["kind"], "Status");
    assert_eq!(body["reason"], "Forbidden");
    assert_eq!(body["details"], json!({"name": pod, "kind": "pods"}));
    assert_eq!(
        body["message"],
        format!("pods \"{pod}\" is forbidden: User \"tester\" cannot create resource \"pods/portforward\" in API group \"\" in the namespace \"staging\"")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watcher_resuming_after_a_compaction_is_told_410_and_lists_again() {
    let mut emulator = KubeEmulator::start().await.expect("emulator");
    emulator.apply_object(objects::service(
        "staging",
        "web",
        &[("app", "web")],
        &web_ports(),
    ));
    let (client, _dir) = client(&emulator).await;
    let services: Api<Service> = Api::namespaced(client, "staging");
    let mut stream = watcher::watcher(services, watcher::Config::default()).boxed();
    assert_eq!(initial(&mut stream).await, set_of("web"));

    // The API server restarts with its history gone, and a Service came
    // meanwhile: the watch resumes from a version too old.
    emulator.stop().await;
    emulator.apply_object(objects::service(
        "staging",
        "api",
        &[("app", "api")],
        &web_ports(),
    ));
    emulator.compact();
    emulator.restart().await.expect("restart");
    match tokio::time::timeout(DEADLINE, stream.next()).await {
        Ok(Some(Err(watcher::Error::WatchError(status)))) => assert_eq!(status.code, 410),
        other => panic!("not a 410: {other:?}"),
    }
    assert_eq!(initial(&mut stream).await, set(&["api", "web"]));
}
