//! Which pod answers to which name. Every pod may hold two: the short
//! `<name>-staging.local` and the long `<name>-<namespace>-staging.local`.
//! One name never maps to two addresses, and who holds it depends only on
//! the pods held (never on push order), so it is stable across restarts:
//!
//! - the long name goes to the most recently created pod with that name in
//!   that namespace (`created_at`, then `updated_at`, then the id): a
//!   StatefulSet pod replaced under the same name, whose new id is pushed
//!   before the old one is deleted, takes the names at once;
//! - the short name goes to the only pod with that name; when several in one
//!   namespace share it, to the most recent of them; when they are in several
//!   namespaces, to the most recent in the agent's own namespace, else to
//!   none of them (each keeps its long name);
//! - a long name that would pass a DNS label's 63 characters is shortened
//!   deterministically, with a short hash of the whole keeping it unique;
//! - names and namespaces hold '-', so one long name can spell another pod's
//!   short name (`api-team` alone and `api` in `team`) or another long one
//!   (`a-b` in `c` and `a` in `b-c`): the short name keeps it, else the pod
//!   first by (namespace, name); the others answer to their long name with a
//!   hash of (name, namespace) in it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::model::fnv1a_32;

/// What the assignment needs to know of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimant<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub namespace: &'a str,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
}

impl Claimant<'_> {
    /// Newer first: created later, then updated later, then the larger id.
    fn recency(&self) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>, &str) {
        (self.created_at, self.updated_at, self.id)
    }
}

pub use crate::model::AssignedNames as Assigned;

/// Longest first label of a DNS name.
const MAX_LABEL: usize = crate::model::MAX_LABEL_LEN;
const SUFFIX: &str = "-staging";

/// `<name>-staging.local`.
pub fn short_name(name: &str) -> String {
    format!("{}.local", label(name))
}

/// `<name>-<namespace>-staging.local`, shortened to a valid label when long;
/// a pod pushed without a namespace is in Kubernetes' `default`.
pub fn long_name(name: &str, namespace: &str) -> String {
    let namespace = if namespace.is_empty() {
        "default"
    } else {
        namespace
    };
    format!("{}.local", label(&format!("{name}-{namespace}")))
}

/// `<stem>-staging` as one DNS label: as it is when it fits, else cut and
/// given `-<8 hex digits>` of a hash of the whole stem, so two stems that
/// share their beginning still differ.
fn label(stem: &str) -> String {
    let whole = format!("{stem}{SUFFIX}");
    if whole.len() <= MAX_LABEL {
        return whole;
    }
    let hash = format!("{:08x}", fnv1a_32(stem.as_bytes()));
    let keep = MAX_LABEL - SUFFIX.len() - 1 - hash.len();
    // Stems are DNS labels joined by '-': ASCII, so any cut is a char boundary.
    let cut = stem.get(..keep).unwrap_or(stem).trim_end_matches('-');
    format!("{cut}-{hash}{SUFFIX}")
}

/// `<name>-<namespace>-<8 hex digits>-staging.local`: the long name made
/// unique by a hash of the pair, for a pod whose plain long name another
/// pod holds.
fn hashed_long_name(name: &str, namespace: &str) -> String {
    let namespace = if namespace.is_empty() {
        "default"
    } else {
        namespace
    };
    let stem = format!("{name}-{namespace}");
    let hash = format!("{:08x}", fnv1a_32(format!("{name}/{namespace}").as_bytes()));
    let keep = MAX_LABEL - SUFFIX.len() - 1 - hash.len();
    let cut = stem.get(..keep).unwrap_or(&stem).trim_end_matches('-');
    format!("{cut}-{hash}{SUFFIX}.local")
}

/// The most recent of `pods`.
fn newest<'p, 'a>(pods: impl Iterator<Item = &'p Claimant<'a>>) -> Option<&'p Claimant<'a>>
where
    'a: 'p,
{
    pods.max_by(|a, b| a.recency().cmp(&b.recency()))
}

/// Who holds which name, by pod id; `own_namespace` decides a short name
/// shared across namespaces.
pub fn assign(pods: &[Claimant<'_>], own_namespace: &str) -> BTreeMap<String, Assigned> {
    let mut by_name: BTreeMap<&str, Vec<&Claimant<'_>>> = BTreeMap::new();
    let mut by_long: BTreeMap<(&str, &str), Vec<&Claimant<'_>>> = BTreeMap::new();
    for pod in pods {
        by_name.entry(pod.name).or_default().push(pod);
        by_long
            .entry((pod.name, pod.namespace))
            .or_default()
            .push(pod);
    }
    let mut assigned: BTreeMap<String, Assigned> = pods
        .iter()
        .map(|pod| (pod.id.to_owned(), Assigned::default()))
        .collect();

    for (name, holders) in &by_name {
        let first_namespace = holders.first().map(|pod| pod.namespace);
        let one_namespace = holders
            .iter()
            .all(|pod| Some(pod.namespace) == first_namespace);
        let winner = if one_namespace {
            newest(holders.iter().copied())
        } else {
            newest(
                holders
                    .iter()
                    .copied()
                    .filter(|pod| pod.namespace == own_namespace),
            )
        };
        let short = short_name(name);
        for pod in holders {
            let Some(entry) = assigned.get_mut(pod.id) else {
                continue;
            };
            match winner {
                Some(winner) if winner.id == pod.id => entry.names.push(short.clone()),
                Some(winner) => {
                    entry.note = Some(format!(
                        "{short} belongs to pod {} ({}, the newest{})",
                        winner.id,
                        winner.namespace,
                        if one_namespace {
                            ""
                        } else {
                            " in the agent's namespace"
                        }
                    ))
                }
                None => {
                    entry.note = Some(format!(
                        "{short} is shared by pods in several namespaces, none of them the \
                         agent's own ({own_namespace})"
                    ))
                }
            }
        }
    }
    for ((name, namespace), holders) in &by_long {
        let Some(winner) = newest(holders.iter().copied()) else {
            continue;
        };
        if let Some(entry) = assigned.get_mut(winner.id) {
            entry.names.push(long_name(name, namespace));
        }
    }
    settle_clashes(pods, &mut assigned);
    // A pod that lost its short name is told which name is its own.
    for entry in assigned.values_mut() {
        if let Some(note) = entry.note.take() {
            entry.note = Some(match entry.names.first() {
                Some(own) => format!("{note}: use {own} (or the range port)"),
                None => format!("{note}: use the range port"),
            });
        }
    }
    assigned
}

/// One name, one pod: where a long name spells a name another pod holds,
/// the short holder keeps it, else the pod first by (namespace, name); the
/// others take their hashed long name instead.
fn settle_clashes(pods: &[Claimant<'_>], assigned: &mut BTreeMap<String, Assigned>) {
    let by_id: BTreeMap<&str, &Claimant<'_>> = pods.iter().map(|pod| (pod.id, pod)).collect();
    let mut holders: BTreeMap<String, Vec<(&str, bool)>> = BTreeMap::new();
    for (id, entry) in assigned.iter() {
        let Some(pod) = by_id.get(id.as_str()) else {
            continue;
        };
        for name in &entry.names {
            let is_short = *name == short_name(pod.name);
            holders
                .entry(name.clone())
                .or_default()
                .push((pod.id, is_short));
        }
    }
    for (name, claims) in holders {
        if claims.len() < 2 {
            continue;
        }
        let keeper = claims
            .iter()
            .find(|(_, is_short)| *is_short)
            .or_else(|| {
                claims.iter().min_by_key(|(id, _)| {
                    by_id.get(id).map(|pod| (pod.namespace, pod.name, pod.id))
                })
            })
            .map(|(id, _)| *id);
        for (id, _) in claims {
            if Some(id) == keeper {
                continue;
            }
            let (Some(pod), Some(entry)) = (by_id.get(id), assigned.get_mut(id)) else {
                continue;
            };
            for held in entry.names.iter_mut().filter(|held| **held == name) {
                *held = hashed_long_name(pod.name, pod.namespace);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn at(seconds: i64) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp(seconds, 0)
    }

    fn pod<'a>(id: &'a str, name: &'a str, namespace: &'a str, created: i64) -> Claimant<'a> {
        Claimant {
            id,
            name,
            namespace,
            created_at: at(created),
            updated_at: at(created),
        }
    }

    #[test]
    fn a_lone_pod_has_its_short_name() {
        let names = assign(&[pod("a", "web", "staging", 1)], "staging");
        assert_eq!(
            names["a"].names,
            ["web-staging.local", "web-staging-staging.local"]
        );
        assert_eq!(names["a"].note, None);
    }

    #[test]
    fn a_replaced_pod_yields_its_names_to_the_newer_one() {
        let pods = [
            pod("old", "same", "staging", 1),
            pod("new", "same", "staging", 2),
        ];
        let names = assign(&pods, "staging");
        assert_eq!(
            names["new"].names,
            ["same-staging.local", "same-staging-staging.local"]
        );
        assert!(names["old"].names.is_empty());
        assert!(names["old"]
            .note
            .as_deref()
            .is_some_and(|n| n.contains("new")));
    }

    #[test]
    fn across_namespaces_the_short_name_goes_to_the_agents_own_or_to_none() {
        let pods = [pod("a", "api", "staging", 1), pod("b", "api", "team-b", 9)];
        let names = assign(&pods, "staging");
        assert_eq!(names["a"].names[0], "api-staging.local");
        assert_eq!(names["b"].names, ["api-team-b-staging.local"]);
        let pods = [pod("a", "api", "team-a", 1), pod("b", "api", "team-b", 9)];
        let names = assign(&pods, "staging");
        assert_eq!(names["a"].names, ["api-team-a-staging.local"]);
        assert_eq!(names["b"].names, ["api-team-b-staging.local"]);
        // Each is told which name is its own.
        assert!(
            names["a"]
                .note
                .as_deref()
                .is_some_and(|note| note.contains("use api-team-a-staging.local")),
            "{:?}",
            names["a"].note
        );
    }

    #[test]
    fn a_long_name_that_spells_another_pods_name_is_made_unique() {
        // `api` in `team` spells the short name of `api-team`, which keeps it.
        let pods = [
            pod("a", "api-team", "staging", 1),
            pod("b", "api", "team", 1),
        ];
        let names = assign(&pods, "staging");
        assert!(names["a"]
            .names
            .contains(&"api-team-staging.local".to_owned()));
        assert!(!names["b"]
            .names
            .contains(&"api-team-staging.local".to_owned()));
        let b_long = names["b"].names.last().cloned().unwrap_or_default();
        assert!(
            b_long.starts_with("api-team-") && b_long.ends_with("-staging.local"),
            "{b_long}"
        );
        // `a-b` in `c` and `a` in `b-c`: two long names alike.
        let pods = [pod("x", "a-b", "c", 1), pod("y", "a", "b-c", 1)];
        let names = assign(&pods, "staging");
        let all: Vec<&String> = names.values().flat_map(|a| &a.names).collect();
        let unique: BTreeSet<&String> = all.iter().copied().collect();
        assert_eq!(all.len(), unique.len(), "{names:?}");
    }

    #[test]
    fn long_names_are_shortened_to_a_valid_unique_label() {
        let name = "n".repeat(55);
        let namespace = "s".repeat(63);
        let long = long_name(&name, &namespace);
        let first = long.split('.').next().unwrap_or_default();
        assert!(first.len() <= MAX_LABEL, "{long}");
        assert!(first.ends_with("-staging"), "{long}");
        assert!(crate::model::is_dns_label(first), "a DNS label: {long}");
        assert_ne!(long, long_name(&name, &"s".repeat(62)));
        assert_eq!(long, long_name(&name, &namespace), "deterministic");
    }

    fn claimants() -> impl Strategy<Value = Vec<(String, String, String, i64)>> {
        prop::collection::vec(
            (
                "[a-z]{1,6}",
                prop::sample::select(vec!["web", "api", "db", "api-team", "a-b", "a"]),
                prop::sample::select(vec!["staging", "team-a", "team-b", "team", "c", "b-c"]),
                0i64..5,
            ),
            1..12,
        )
        .prop_map(|pods| {
            let mut seen = BTreeSet::new();
            pods.into_iter()
                .filter(|(id, _, _, _)| seen.insert(id.clone()))
                .map(|(id, name, ns, created)| (id, name.to_owned(), ns.to_owned(), created))
                .collect()
        })
    }

    proptest! {
        #[test]
        fn names_are_unique_and_do_not_depend_on_order(
            pods in claimants(),
            rotate in 0usize..12,
        ) {
            let as_claims = |pods: &[(String, String, String, i64)]| -> BTreeMap<String, Assigned> {
                let claims: Vec<Claimant<'_>> = pods
                    .iter()
                    .map(|(id, name, ns, created)| pod(id, name, ns, *created))
                    .collect();
                assign(&claims, "staging")
            };
            let first = as_claims(&pods);
            let mut turned = pods.clone();
            let len = turned.len();
            turned.rotate_left(rotate % len);
            turned.reverse();
            prop_assert_eq!(&first, &as_claims(&turned));
            // One name, one pod.
            let mut holders: BTreeMap<&str, &str> = BTreeMap::new();
            for (id, assigned) in &first {
                for name in &assigned.names {
                    prop_assert!(holders.insert(name, id).is_none(), "{} twice", name);
                }
            }
            // Every (name, namespace) has a long name of its own: the newest
            // pod of the pair holds one.
            for (_, name, ns, _) in &pods {
                let reachable = first.iter().any(|(id, assigned)| {
                    pods.iter().any(|(pid, pname, pns, _)| pid == id && pname == name && pns == ns)
                        && assigned.names.iter().any(|held| *held != short_name(name))
                });
                prop_assert!(reachable, "{}/{} has no long name", ns, name);
            }
            // Every name is a valid DNS label under .local.
            for name in holders.keys() {
                let label = name.strip_suffix(".local").unwrap_or_default();
                prop_assert!(label.len() <= MAX_LABEL && label.ends_with("-staging"), "{}", name);
            }
        }
    }
}
