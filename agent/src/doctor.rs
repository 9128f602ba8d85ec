//! `k3s-local-agent doctor`: checks the local mirror's setup one step at a
//! time (kubeconfig, context, API, namespace, permissions) and says what it
//! found and, for what is wrong, what to do.

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;

use crate::config::ClusterSettings;

/// The verbs the mirror needs on pods, and on namespaces.
const POD_VERBS: [&str; 5] = ["get", "list", "watch", "patch", "delete"];

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            ok: true,
            detail: detail.into(),
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            ok: false,
            detail: detail.into(),
        }
    }
}

fn kind_hint(context: &str) -> String {
    match context.strip_prefix("kind-") {
        Some(cluster) => format!(" Create it with: kind create cluster --name {cluster}"),
        None => String::new(),
    }
}

/// Whether pods' own ports below 1024 (80 for most) can listen on their
/// addresses for this binary, and if not, the one command that allows it.
/// Without it names still work with the range port, so this is never a
/// failure, only a limit worth knowing.
pub fn name_ports(config: &crate::config::Config) -> Check {
    if !config.name_ports {
        return Check::ok(
            "name ports",
            "off (--name-ports off): names point at the tunnels' host",
        );
    }
    let Some(address) = config
        .address_block
        .allocate("doctor", None, &Default::default())
    else {
        return Check::fail(
            "name ports",
            format!("no address in {}", config.address_block),
        );
    };
    let probe = std::net::SocketAddr::from((address, 80));
    match std::net::TcpListener::bind(probe) {
        Ok(_) => Check::ok(
            "name ports",
            format!(
                "pods get their own address in {} and their own port there (port 80 can listen)",
                config.address_block
            ),
        ),
        Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => {
            let binary = std::env::current_exe()
                .map(|path| path.display().to_string())
                .unwrap_or_else(|_| "k3s-local-agent".to_owned());
            Check::ok(
                "name ports",
                format!(
                    "limited: ports below 1024 cannot listen on pod addresses, so pods on port 80 \
                     are reached by their range port only. To allow it: sudo setcap \
                     cap_net_bind_service=+ep {binary}   (or: sudo sysctl -w \
                     net.ipv4.ip_unprivileged_port_start=80)"
                ),
            )
        }
        Err(err) => Check::fail("name ports", format!("cannot listen on {probe}: {err}")),
    }
}

/// Runs every check it can; stops at the first one the rest depend on.
pub async fn diagnose(settings: &ClusterSettings) -> Vec<Check> {
    let mut checks = Vec::new();
    if !settings.enabled {
        checks.push(Check::ok(
            "cluster",
            "mirroring is off (--no-cluster): nothing to check",
        ));
        return checks;
    }
    let read = match &settings.kubeconfig {
        Some(path) => Kubeconfig::read_from(path).map(|k| (k, path.display().to_string())),
        None => Kubeconfig::read().map(|k| (k, "$KUBECONFIG or ~/.kube/config".to_owned())),
    };
    let kubeconfig = match read {
        Ok((kubeconfig, source)) => {
            checks.push(Check::ok(
                "kubeconfig",
                format!("{source}: {} context(s)", kubeconfig.contexts.len()),
            ));
            kubeconfig
        }
        Err(err) => {
            checks.push(Check::fail(
                "kubeconfig",
                format!("none found ({err}).{}", kind_hint(&settings.context)),
            ));
            return checks;
        }
    };
    if !kubeconfig
        .contexts
        .iter()
        .any(|c| c.name == settings.context)
    {
        let known: Vec<&str> = kubeconfig
            .contexts
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        checks.push(Check::fail(
            "context",
            format!(
                "{:?} is missing (found: {}).{} Or pick one with --kube-context.",
                settings.context,
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                },
                kind_hint(&settings.context)
            ),
        ));
        return checks;
    }
    checks.push(Check::ok("context", settings.context.clone()));

    let options = KubeConfigOptions {
        context: Some(settings.context.clone()),
        ..KubeConfigOptions::default()
    };
    let client = match kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|err| err.to_string())
        .and_then(|config| Client::try_from(config).map_err(|err| err.to_string()))
    {
        Ok(client) => client,
        Err(err) => {
            checks.push(Check::fail("api", format!("cannot build a client: {err}")));
            return checks;
        }
    };
    match client.apiserver_version().await {
        Ok(info) => checks.push(Check::ok(
            "api",
            format!("reachable, Kubernetes {}", info.git_version),
        )),
        Err(err) => {
            checks.push(Check::fail(
                "api",
                format!(
                    "unreachable: {err}. Is the cluster running?{}",
                    kind_hint(&settings.context)
                ),
            ));
            return checks;
        }
    }

    let namespace = &settings.namespace;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace_exists = match namespaces.get_opt(namespace).await {
        Ok(Some(_)) => {
            checks.push(Check::ok("namespace", format!("{namespace} exists")));
            true
        }
        Ok(None) => {
            checks.push(Check::ok(
                "namespace",
                format!("{namespace} does not exist yet: the agent creates it"),
            ));
            false
        }
        Err(err) => {
            checks.push(Check::fail(
                "namespace",
                format!("cannot read {namespace}: {err}"),
            ));
            false
        }
    };

    let reviews: Api<SelfSubjectAccessReview> = Api::all(client);
    let mut missing = Vec::new();
    let mut wanted: Vec<(&str, &str)> = POD_VERBS.iter().map(|verb| (*verb, "pods")).collect();
    if !namespace_exists {
        wanted.push(("create", "namespaces"));
    }
    for (verb, resource) in wanted {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    namespace: (resource == "pods").then(|| namespace.clone()),
                    verb: Some(verb.to_owned()),
                    resource: Some(resource.to_owned()),
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        match reviews.create(&PostParams::default(), &review).await {
            Ok(answer) if answer.status.as_ref().is_some_and(|s| s.allowed) => {}
            Ok(_) => missing.push(format!("{verb} {resource}")),
            Err(err) => missing.push(format!("{verb} {resource} (cannot ask: {err})")),
        }
    }
    if missing.is_empty() {
        checks.push(Check::ok(
            "permissions",
            format!("may {} pods in {namespace}", POD_VERBS.join("/")),
        ));
    } else {
        checks.push(Check::fail(
            "permissions",
            format!("not allowed: {}", missing.join(", ")),
        ));
    }
    checks
}
