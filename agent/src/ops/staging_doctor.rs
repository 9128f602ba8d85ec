//! `doctor`'s checks of the staging cluster, for tunnels that reach pods
//! through its API server: the context is there, credential plugins are
//! found as a login shell would find them, the API answers, and
//! `pods/portforward` is allowed in every namespace the agent holds pods
//! in (a SelfSubjectAccessReview each); each failure with its fix. A
//! credential plugin that does not answer is stopped after its deadline
//! and named, so `doctor` itself never hangs on one.

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};

use crate::cluster::{staging_client, PluginLookup, StagingError};
use crate::config::StagingSettings;
use crate::model::StagingHealth;
use crate::ops::doctor::Check;

/// One credential plugin: found (where), or what to do.
fn plugin_check(plugin: &PluginLookup) -> Check {
    match (&plugin.found, plugin.missing()) {
        (Some(found), _) => Check::ok(
            "credentials",
            format!("plugin {} found at {}", plugin.command, found.display()),
        ),
        (None, why) => Check::fail("credentials", why.unwrap_or_default()),
    }
}

/// What the running agent last met on the staging cluster (a plugin that
/// did not answer, credentials refused), beside what `doctor` finds itself.
pub fn agent_view(staging: &StagingHealth) -> Check {
    match &staging.problem {
        Some(problem) => Check::fail("staging now", format!("the agent says: {problem}")),
        None => Check::ok(
            "staging now",
            format!("the agent's client is {}", staging.status),
        ),
    }
}

/// The staging cluster's checks for an agent holding pods in `namespaces`.
pub async fn diagnose(settings: &StagingSettings, namespaces: &[String]) -> Vec<Check> {
    let Some(context) = settings.context.as_deref() else {
        return vec![Check::ok(
            "staging",
            "no staging cluster (--staging-kube-context): tunnels reach pod IPs directly",
        )];
    };
    let built = match staging_client(settings).await {
        Ok(built) => built,
        // A plugin that hung or failed is the credentials' fault, said so
        // (its deadline already passed: doctor never hangs on it).
        Err(StagingError::Plugin(err)) => {
            return vec![
                Check::ok("staging", format!("context {context}")),
                Check::fail("credentials", err.to_string()),
            ]
        }
        Err(err) => return vec![Check::fail("staging", err.to_string())],
    };
    let mut checks = vec![Check::ok(
        "staging",
        format!(
            "context {context} in {}; tunnels go {}",
            built.source_name,
            settings.via.as_str()
        ),
    )];
    for plugin in &built.plugins {
        checks.push(plugin_check(plugin));
    }
    match built.client.apiserver_version().await {
        Ok(info) => checks.push(Check::ok(
            "staging api",
            format!("reachable, Kubernetes {}", info.git_version),
        )),
        Err(err) => {
            checks.push(Check::fail(
                "staging api",
                format!(
                    "unreachable: {err}. Is the cluster's VPN up and are the credentials valid? \
                     Try `kubectl --context {context} get --raw /version`"
                ),
            ));
            return checks;
        }
    }
    let reviews: Api<SelfSubjectAccessReview> = Api::all(built.client);
    for namespace in namespaces {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(namespace.clone()),
                    verb: Some("create".to_owned()),
                    resource: Some("pods".to_owned()),
                    subresource: Some("portforward".to_owned()),
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        checks.push(
            match reviews.create(&PostParams::default(), &review).await {
                Ok(answer) if answer.status.as_ref().is_some_and(|s| s.allowed) => {
                    Check::ok("port-forward", format!("allowed in {namespace}"))
                }
                Ok(_) => Check::fail(
                    "port-forward",
                    format!(
                    "forbidden in {namespace}: tunnels via the staging API fail there. Ask for \
                     `create` on `pods/portforward` in {namespace} (a Role bound to you), or \
                     use --staging-via direct where the pod IPs are routable"
                ),
                ),
                Err(err) => Check::fail(
                    "port-forward",
                    format!("cannot ask whether it is allowed in {namespace}: {err}"),
                ),
            },
        );
    }
    checks
}
