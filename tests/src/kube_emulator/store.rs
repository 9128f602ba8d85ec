//! The emulator's objects: every resource it serves, stored by (group/version,
//! resource, namespace, name), and the label and field selectors a list or a
//! watch filters them with, as the API server parses them.

use std::collections::BTreeMap;

use serde_json::Value;

/// One resource the emulator serves, as its API path and its objects name it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Resource {
    /// "v1", "apps/v1", "discovery.k8s.io/v1": the objects' `apiVersion`.
    pub group_version: &'static str,
    /// The path segment: "pods", "endpointslices".
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
}

impl Resource {
    /// The API group, "" for the core group (as RBAC messages say it).
    pub fn group(&self) -> &'static str {
        self.group_version
            .rsplit_once('/')
            .map_or("", |(group, _)| group)
    }
}

pub(super) const NAMESPACES: Resource = Resource {
    group_version: "v1",
    plural: "namespaces",
    kind: "Namespace",
    namespaced: false,
};
pub(super) const PODS: Resource = Resource {
    group_version: "v1",
    plural: "pods",
    kind: "Pod",
    namespaced: true,
};
pub(super) const SERVICES: Resource = Resource {
    group_version: "v1",
    plural: "services",
    kind: "Service",
    namespaced: true,
};
pub(super) const ENDPOINT_SLICES: Resource = Resource {
    group_version: "discovery.k8s.io/v1",
    plural: "endpointslices",
    kind: "EndpointSlice",
    namespaced: true,
};
pub(super) const DEPLOYMENTS: Resource = Resource {
    group_version: "apps/v1",
    plural: "deployments",
    kind: "Deployment",
    namespaced: true,
};
pub(super) const REPLICA_SETS: Resource = Resource {
    group_version: "apps/v1",
    plural: "replicasets",
    kind: "ReplicaSet",
    namespaced: true,
};
pub(super) const STATEFUL_SETS: Resource = Resource {
    group_version: "apps/v1",
    plural: "statefulsets",
    kind: "StatefulSet",
    namespaced: true,
};
pub(super) const DAEMON_SETS: Resource = Resource {
    group_version: "apps/v1",
    plural: "daemonsets",
    kind: "DaemonSet",
    namespaced: true,
};

static RESOURCES: [&Resource; 8] = [
    &NAMESPACES,
    &PODS,
    &SERVICES,
    &ENDPOINT_SLICES,
    &DEPLOYMENTS,
    &REPLICA_SETS,
    &STATEFUL_SETS,
    &DAEMON_SETS,
];

/// The resource at `group_version`/`plural` in an API path, if served.
pub(super) fn by_path(group_version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .copied()
        .find(|r| r.group_version == group_version && r.plural == plural)
}

/// The resource an object's `apiVersion` and `kind` name, if served.
pub(super) fn by_kind(api_version: &str, kind: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .copied()
        .find(|r| r.group_version == api_version && r.kind == kind)
}

type Key = (&'static str, &'static str, String, String);

/// Every stored object; cluster-scoped ones under the namespace "".
#[derive(Debug, Default)]
pub(super) struct Objects(BTreeMap<Key, Value>);

fn key(resource: &Resource, namespace: &str, name: &str) -> Key {
    (
        resource.group_version,
        resource.plural,
        namespace.to_owned(),
        name.to_owned(),
    )
}

impl Objects {
    pub fn get(&self, resource: &Resource, namespace: &str, name: &str) -> Option<&Value> {
        self.0.get(&key(resource, namespace, name))
    }

    pub fn contains(&self, resource: &Resource, namespace: &str, name: &str) -> bool {
        self.get(resource, namespace, name).is_some()
    }

    pub fn insert(&mut self, resource: &Resource, namespace: &str, name: &str, object: Value) {
        self.0.insert(key(resource, namespace, name), object);
    }

    pub fn remove(&mut self, resource: &Resource, namespace: &str, name: &str) -> Option<Value> {
        self.0.remove(&key(resource, namespace, name))
    }

    /// The objects of `resource`, in `namespace` or in all (`None`), by name.
    pub fn list<'a>(
        &'a self,
        resource: &'a Resource,
        namespace: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a str, &'a str, &'a Value)> + 'a {
        self.0
            .iter()
            .filter(move |((gv, plural, ns, _), _)| {
                *gv == resource.group_version
                    && *plural == resource.plural
                    && namespace.is_none_or(|wanted| wanted == ns)
            })
            .map(|((_, _, ns, name), object)| (ns.as_str(), name.as_str(), object))
    }
}

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A parsed label selector: `a=b`, `a==b`, `a!=b`, `a in (x,y)`,
/// `a notin (x,y)`, `a`, `!a`, joined by commas; every requirement must hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct LabelSelector(Vec<Requirement>);

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for term in split_terms(text) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            requirements.push(parse_requirement(term)?);
        }
        Ok(Self(requirements))
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let label = |key: &str| labels.get(key).and_then(Value::as_str);
        self.0.iter().all(|requirement| match requirement {
            Requirement::Equals(key, value) => label(key) == Some(value.as_str()),
            Requirement::NotEquals(key, value) => label(key) != Some(value.as_str()),
            Requirement::In(key, values) => {
                label(key).is_some_and(|v| values.iter().any(|w| w == v))
            }
            Requirement::NotIn(key, values) => {
                label(key).is_none_or(|v| !values.iter().any(|w| w == v))
            }
            Requirement::Exists(key) => label(key).is_some(),
            Requirement::DoesNotExist(key) => label(key).is_none(),
        })
    }
}

/// Splits at commas outside parentheses.
fn split_terms(text: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (at, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&text[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    terms.push(&text[start..]);
    terms
}

fn parse_requirement(term: &str) -> Result<Requirement, String> {
    if let Some((key, value)) = term.split_once("!=") {
        return Ok(Requirement::NotEquals(
            key.trim().to_owned(),
            value.trim().to_owned(),
        ));
    }
    if let Some((key, value)) = term.split_once('=') {
        let value = value.strip_prefix('=').unwrap_or(value);
        return Ok(Requirement::Equals(
            key.trim().to_owned(),
            value.trim().to_owned(),
        ));
    }
    if let Some(key) = term.strip_prefix('!') {
        return Ok(Requirement::DoesNotExist(key.trim().to_owned()));
    }
    let words: Vec<&str> = term.splitn(2, char::is_whitespace).collect();
    if let [key, rest] = words.as_slice() {
        let rest = rest.trim();
        let (operator, values) = rest
            .split_once('(')
            .ok_or_else(|| format!("unable to parse requirement: {term:?}"))?;
        let values = values
            .strip_suffix(')')
            .ok_or_else(|| format!("unable to parse requirement: {term:?}: missing ')'"))?;
        let values: Vec<String> = values
            .split(',')
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect();
        return match operator.trim() {
            "in" => Ok(Requirement::In((*key).to_owned(), values)),
            "notin" => Ok(Requirement::NotIn((*key).to_owned(), values)),
            other => Err(format!(
                "unable to parse requirement: unknown operator {other:?}"
            )),
        };
    }
    Ok(Requirement::Exists(term.to_owned()))
}

/// A parsed field selector: `path=value`, `path==value`, `path!=value`,
/// joined by commas, where the path is a field of the object
/// (`metadata.name`, `metadata.namespace`, `spec.nodeName`, `status.phase`).
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, equal, value) = if let Some((field, value)) = term.split_once("!=") {
                (field, false, value)
            } else if let Some((field, value)) = term.split_once('=') {
                (field, true, value.strip_prefix('=').unwrap_or(value))
            } else {
                return Err(format!(
                    "invalid selector: '{term}'; can't understand '{term}'"
                ));
            };
            terms.push((field.trim().to_owned(), equal, value.trim().to_owned()));
        }
        Ok(Self(terms))
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            let pointer = format!("/{}", field.replace('.', "/"));
            let actual = object
                .pointer(&pointer)
                .and_then(Value::as_str)
                .unwrap_or("");
            (actual == value) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labelled(labels: Value) -> Value {
        json!({"metadata": {"name": "web-1", "labels": labels}})
    }

    #[test]
    fn label_selectors_match_as_the_api_server_does() {
        let object = labelled(json!({"app": "web", "tier": "front"}));
        let matches = |text: &str| LabelSelector::parse(text).expect(text).matches(&object);
        assert!(matches(""));
        assert!(matches("app=web"));
        assert!(matches("app==web,tier=front"));
        assert!(!matches("app=web,tier=back"));
        assert!(matches("app!=api"));
        assert!(matches("missing!=x"));
        assert!(matches("app in (api, web)"));
        assert!(!matches("app notin (api,web)"));
        assert!(matches("tier notin (back),app"));
        assert!(matches("!missing"));
        assert!(!matches("!app"));
        assert!(LabelSelector::parse("app in api").is_err());
    }

    #[test]
    fn field_selectors_read_the_named_field() {
        let object = labelled(json!({}));
        let matches = |text: &str| FieldSelector::parse(text).expect(text).matches(&object);
        assert!(matches("metadata.name=web-1"));
        assert!(!matches("metadata.name=web-2"));
        assert!(matches("metadata.name!=web-2"));
        assert!(FieldSelector::parse("metadata.name").is_err());
    }
}
