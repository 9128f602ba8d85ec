//! A push from the control plane: its [`Action`], turning each pushed pod
//! (untrusted JSON) into a [`PodSpec`] or a [`PodRejection`] that names the
//! field, and the [`PushResponse`] sent back.

use std::collections::BTreeMap;
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::pod::{
    validate_namespace, validate_pod_id, validate_pod_name, validate_port, validate_port_name,
    FieldError, PodSpec, PortSpec, Protocol, DEFAULT_STAGING_PORT, MAX_PORTS_PER_POD,
};

/// What a control plane asks of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Upsert the listed pods by id.
    Create,
    /// Same as create: upsert by id.
    Update,
    /// Remove the listed pods by id.
    Delete,
    /// The list is the whole desired set: upsert it, remove every pod not in it.
    Sync,
}

impl Action {
    /// Every action name a push may carry, for error messages.
    pub const NAMES: [&'static str; 4] = ["create", "update", "delete", "sync"];

    /// Parses an action name; `None` for anything not in [`Action::NAMES`].
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "create" => Some(Self::Create),
            "update" => Some(Self::Update),
            "delete" => Some(Self::Delete),
            "sync" => Some(Self::Sync),
            _ => None,
        }
    }
}

/// The raw pod as pushed: every field optional so that a missing one becomes a
/// clear per-pod error instead of failing the whole batch.
#[derive(Debug, Deserialize)]
struct RawPod {
    id: Option<String>,
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    status: Option<String>,
    ip: Option<String>,
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    created_at: Option<DateTime<Utc>>,
    #[serde(default)]
    updated_at: Option<DateTime<Utc>>,
    #[serde(default)]
    port: Option<u64>,
    /// Numbers or `{"name", "port", "protocol"}` objects, each checked in
    /// [`parse_ports`] so an error names the entry.
    #[serde(default)]
    ports: Option<Vec<serde_json::Value>>,
}

/// Why one pod of a push was turned away; sent back to the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRejection {
    /// The pod's id when it had a usable one, so the control plane can match it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Position of the pod in the pushed list.
    pub index: usize,
    /// The offending field, when one field is to blame.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub error: String,
}

impl PodRejection {
    fn new(id: Option<&str>, index: usize, field: Option<&str>, error: impl Into<String>) -> Self {
        Self {
            id: id.map(str::to_owned),
            index,
            field: field.map(str::to_owned),
            error: error.into(),
        }
    }
}

/// Turns one pushed pod (any JSON) into a [`PodSpec`], or says exactly what is
/// wrong with it.
pub fn parse_pod(index: usize, value: serde_json::Value) -> Result<PodSpec, PodRejection> {
    // The id first, leniently, so that every later error can name the pod.
    let loose_id = value
        .get("id")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned);
    let reject = |field: Option<&str>, error: String| {
        PodRejection::new(loose_id.as_deref(), index, field, error)
    };
    if !value.is_object() {
        return Err(reject(None, "each pod must be a JSON object".into()));
    }
    let raw: RawPod = serde_json::from_value(value).map_err(|err| {
        let field = field_named_in(&err.to_string());
        reject(field.as_deref(), format!("invalid pod: {err}"))
    })?;

    let id = raw
        .id
        .ok_or_else(|| reject(Some("id"), "missing field `id`".into()))?;
    validate_pod_id(&id).map_err(|e| reject(Some(&e.field), e.message))?;
    let name = raw
        .name
        .ok_or_else(|| reject(Some("name"), "missing field `name`".into()))?;
    validate_pod_name(&name).map_err(|e| reject(Some(&e.field), e.message))?;
    let ip_text = raw
        .ip
        .ok_or_else(|| reject(Some("ip"), "missing field `ip`".into()))?;
    let ip: IpAddr = ip_text.trim().parse().map_err(|_| {
        reject(
            Some("ip"),
            format!("ip {ip_text:?} is not an IPv4 or IPv6 address"),
        )
    })?;

    let first = match raw.port {
        Some(port) => {
            Some(validate_port(port, "port").map_err(|e| reject(Some(&e.field), e.message))?)
        }
        None => None,
    };
    let ports = parse_ports(first, raw.ports.unwrap_or_default())
        .map_err(|e| reject(Some(&e.field), e.message))?;
    let namespace = raw.namespace.unwrap_or_default();
    validate_namespace(&namespace).map_err(|e| reject(Some(&e.field), e.message))?;

    Ok(PodSpec {
        id,
        name,
        namespace,
        image: raw.image.unwrap_or_default(),
        status: raw.status.unwrap_or_default(),
        ip,
        node_name: raw.node_name.unwrap_or_default(),
        labels: raw.labels.unwrap_or_default(),
        created_at: raw.created_at,
        updated_at: raw.updated_at,
        ports,
    })
}

/// Picks the field name out of a serde error such as
/// "invalid type: string \"x\", expected u64" (none) or "... at `port`".
fn field_named_in(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let end = start + message[start..].find('`')?;
    Some(message[start..end].to_owned())
}

/// What a pod id alone identifies in a `delete` push.
pub fn parse_pod_id_only(index: usize, value: &serde_json::Value) -> Result<String, PodRejection> {
    let Some(id) = value.get("id") else {
        return Err(PodRejection::new(
            None,
            index,
            Some("id"),
            "missing field `id`",
        ));
    };
    let Some(id) = id.as_str() else {
        return Err(PodRejection::new(
            None,
            index,
            Some("id"),
            "field `id` must be a string",
        ));
    };
    validate_pod_id(id)
        .map_err(|e| PodRejection::new(Some(id), index, Some(&e.field), e.message))?;
    Ok(id.to_owned())
}

/// A pod's ports from the seed's `port` (the first, when given) and the
/// `ports` list (numbers or `{name, port, protocol}` objects). With neither,
/// the seed's default, 80. An error names the field: `ports[2].protocol`.
fn parse_ports(
    first: Option<u16>,
    listed: Vec<serde_json::Value>,
) -> Result<Vec<PortSpec>, FieldError> {
    if listed.len() > MAX_PORTS_PER_POD {
        return Err(FieldError::new(
            "ports".to_owned(),
            format!(
                "a pod may list at most {MAX_PORTS_PER_POD} ports; this one lists {}",
                listed.len()
            ),
        ));
    }
    let mut ports: Vec<PortSpec> = Vec::with_capacity(listed.len() + 1);
    for (at, entry) in listed.into_iter().enumerate() {
        let field = format!("ports[{at}]");
        let port = parse_port_entry(&field, entry)?;
        if let Some(same) = ports
            .iter()
            .find(|p| p.port == port.port && p.protocol == port.protocol)
        {
            return Err(FieldError::new(
                field,
                format!(
                    "port {}/{} is listed twice{}",
                    port.port,
                    port.protocol.as_str(),
                    same.name
                        .as_deref()
                        .map(|name| format!(" (already as {name:?})"))
                        .unwrap_or_default()
                ),
            ));
        }
        if let Some(name) = &port.name {
            if ports.iter().any(|p| p.name.as_ref() == Some(name)) {
                return Err(FieldError::new(
                    format!("{field}.name"),
                    format!("port name {name:?} is used twice"),
                ));
            }
        }
        ports.push(port);
    }
    // The seed's `port` is the first port; listed again in `ports`, it is
    // one port (with the list's name), not two.
    if let Some(first) = first {
        let listed_at = ports
            .iter()
            .position(|p| p.port == first && p.protocol == Protocol::Tcp);
        let port = match listed_at {
            Some(at) => ports.remove(at),
            None => PortSpec::tcp(first),
        };
        ports.insert(0, port);
    }
    if ports.is_empty() {
        ports.push(PortSpec::tcp(DEFAULT_STAGING_PORT));
    }
    if !ports.iter().any(|p| p.protocol == Protocol::Tcp) {
        return Err(FieldError::new(
            "ports".to_owned(),
            "the pod lists no TCP port: its tunnel needs one (UDP and SCTP are not tunnelled)"
                .to_owned(),
        ));
    }
    Ok(ports)
}

/// One entry of `ports`: a number, or an object with `port` and optionally
/// `name` (an IANA service name, as in Kubernetes) and `protocol`.
fn parse_port_entry(field: &str, entry: serde_json::Value) -> Result<PortSpec, FieldError> {
    let number = |value: &serde_json::Value, field: &str| {
        value
            .as_u64()
            .ok_or_else(|| {
                FieldError::new(field, format!("{field} must be a port number, not {value}"))
            })
            .and_then(|n| validate_port(n, field))
    };
    match entry {
        serde_json::Value::Number(_) => Ok(PortSpec::tcp(number(&entry, field)?)),
        serde_json::Value::Object(object) => {
            if let Some(unknown) = object
                .keys()
                .find(|key| !matches!(key.as_str(), "port" | "name" | "protocol"))
            {
                return Err(FieldError::new(
                    format!("{field}.{unknown}"),
                    format!("unknown field {unknown:?} in {field}: expected port, name, protocol"),
                ));
            }
            let port_field = format!("{field}.port");
            let port = match object.get("port") {
                Some(value) => number(value, &port_field)?,
                None => {
                    return Err(FieldError::new(
                        port_field,
                        format!("{field} has no `port`"),
                    ));
                }
            };
            let name = match object.get("name") {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(name)) => {
                    validate_port_name(name, &format!("{field}.name"))?;
                    Some(name.clone())
                }
                Some(other) => {
                    return Err(FieldError::new(
                        format!("{field}.name"),
                        format!("{field}.name must be a string, not {other}"),
                    ))
                }
            };
            let protocol = match object.get("protocol") {
                None | Some(serde_json::Value::Null) => Protocol::Tcp,
                Some(serde_json::Value::String(text)) => {
                    Protocol::parse(text).ok_or_else(|| {
                        FieldError::new(
                            format!("{field}.protocol"),
                            format!("{field}.protocol {text:?} is not TCP, UDP or SCTP"),
                        )
                    })?
                }
                Some(other) => {
                    return Err(FieldError::new(
                        format!("{field}.protocol"),
                        format!("{field}.protocol must be a string, not {other}"),
                    ))
                }
            };
            Ok(PortSpec {
                port,
                name,
                protocol,
            })
        }
        other => Err(FieldError::new(
            field.to_owned(),
            format!(
                "{field} must be a port number or an object {{port, name, protocol}}, not {other}"
            ),
        )),
    }
}

/// Answer to a push: what was applied and what was turned away, by id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PushResponse {
    pub status: String,
    pub action: Action,
    pub applied: Vec<String>,
    pub removed: Vec<String>,
    pub rejected: Vec<PodRejection>,
    pub pod_count: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn seed_pod_parses_with_default_port() {
        let pod = parse_pod(
            0,
            json!({"id":"pod-123","name":"my-app","namespace":"staging","image":"nginx:latest",
                   "status":"running","ip":"10.0.1.100","node_name":"gke-node-1",
                   "labels":{"app":"my-app"},"created_at":"2024-01-15T10:30:00Z",
                   "updated_at":"2024-01-15T10:30:00Z","extra":"ignored"}),
        )
        .expect("seed pod is valid");
        assert_eq!(pod.staging_port(), 80);
        assert_eq!(pod.dns_name(), "my-app-staging.local");
        assert_eq!(pod.localhost_name(), "my-app-staging.localhost");
    }

    #[test]
    fn missing_fields_are_named() {
        let err = parse_pod(2, json!({"id":"p","ip":"10.0.0.1"})).expect_err("no name");
        assert_eq!(err.field.as_deref(), Some("name"));
        assert_eq!(err.id.as_deref(), Some("p"));
        assert_eq!(err.index, 2);
        let err = parse_pod(0, json!({"name":"a","ip":"10.0.0.1"})).expect_err("no id");
        assert_eq!(err.field.as_deref(), Some("id"));
        let err = parse_pod(0, json!({"id":"p","name":"a"})).expect_err("no ip");
        assert_eq!(err.field.as_deref(), Some("ip"));
    }

    #[test]
    fn wrong_types_and_values_are_named() {
        let err = parse_pod(0, json!({"id":"p","name":"a","ip":"10.0.0.1","port":"80"}))
            .expect_err("port as string");
        assert!(err.error.contains("invalid"), "{err:?}");
        for port in [0u64, 65536] {
            let err = parse_pod(0, json!({"id":"p","name":"a","ip":"10.0.0.1","port":port}))
                .expect_err("port out of range");
            assert_eq!(err.field.as_deref(), Some("port"));
            assert!(err.error.contains("1-65535"));
        }
        let err = parse_pod(0, json!({"id":"p","name":"a","ip":"10.0.0.300"})).expect_err("ip");
        assert_eq!(err.field.as_deref(), Some("ip"));
    }

    #[test]
    fn ports_list_keeps_order_without_duplicates() {
        let pod = parse_pod(
            0,
            json!({"id":"p","name":"a","ip":"::1","port":8443,"ports":[8443,9090]}),
        )
        .expect("valid");
        assert_eq!(pod.ports, vec![PortSpec::tcp(8443), PortSpec::tcp(9090)]);
        assert_eq!(pod.staging_port(), 8443);
    }

    #[test]
    fn ports_may_be_objects_with_names_and_protocols() {
        let pod = parse_pod(
            0,
            json!({"id":"p","name":"a","ip":"10.0.0.1","ports":[
                {"name":"dns","port":53,"protocol":"UDP"},
                {"name":"http","port":8080,"protocol":"TCP"},
                9090,
            ]}),
        )
        .expect("valid");
        assert_eq!(pod.ports.len(), 3);
        assert_eq!(pod.ports[0].protocol, Protocol::Udp);
        assert_eq!(pod.ports[1].name.as_deref(), Some("http"));
        // The tunnel goes to the first TCP port; the UDP one is kept.
        assert_eq!(pod.staging_port(), 8080);
        let shown = serde_json::to_value(&pod.ports).expect("json");
        assert_eq!(shown[0], json!({"port":53,"name":"dns","protocol":"UDP"}));
    }

    #[test]
    fn bad_ports_are_refused_with_the_field_named() {
        let many: Vec<u16> = (1000..1065).collect();
        for (ports, field, says) in [
            (json!([8080, 8080]), "ports[1]", "listed twice"),
            (json!([0]), "ports[0]", "out of range"),
            (json!(many), "ports", "at most 64"),
            (
                json!([{"port":80,"protocol":"HTTP"}]),
                "ports[0].protocol",
                "not TCP, UDP or SCTP",
            ),
            (json!([{"name":"web"}]), "ports[0].port", "no `port`"),
            (
                json!([{"port":80,"name":"Web_1"}]),
                "ports[0].name",
                "lowercase",
            ),
            (
                json!([{"port":80,"name":"a"},{"port":81,"name":"a"}]),
                "ports[1].name",
                "used twice",
            ),
            (json!(["80"]), "ports[0]", "port number or an object"),
            (
                json!([{"port":80,"proto":"TCP"}]),
                "ports[0].proto",
                "unknown field",
            ),
            (
                json!([{"port":53,"protocol":"UDP"}]),
                "ports",
                "no TCP port",
            ),
        ] {
            let rejection = parse_pod(
                0,
                json!({"id":"p","name":"a","ip":"10.0.0.1","ports":ports}),
            )
            .expect_err("refused");
            assert_eq!(rejection.field.as_deref(), Some(field), "{rejection:?}");
            assert!(rejection.error.contains(says), "{rejection:?}");
        }
        // The same number over two protocols is two ports.
        let pod = parse_pod(
            0,
            json!({"id":"p","name":"a","ip":"10.0.0.1","ports":[53,{"port":53,"protocol":"UDP"}]}),
        )
        .expect("valid");
        assert_eq!(pod.ports.len(), 2);
    }
}
