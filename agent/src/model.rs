//! Wire types of the agent's HTTP API and of the status report, and the
//! validation that turns untrusted JSON into a [`PodSpec`] we can act on.
//!
//! The shapes follow the seed's contract exactly (DESIGN.md section 2); fields we
//! add are additive so an old control plane keeps working.

use std::collections::BTreeMap;
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The staging port a pod is forwarded to when the push names none.
pub const DEFAULT_STAGING_PORT: u16 = 80;

/// The longest pod name whose `<name>-staging` still fits one DNS label (63).
pub const MAX_POD_NAME_LEN: usize = 63 - "-staging".len();

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

/// One staging pod as the control plane describes it, after validation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSpec {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub image: String,
    #[serde(default)]
    pub status: String,
    pub ip: IpAddr,
    #[serde(default)]
    pub node_name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub updated_at: Option<DateTime<Utc>>,
    /// Every staging port the pod exposes, in the order given; each TCP one
    /// has a tunnel (the first is the one the seed's fields show). Never
    /// empty once validated.
    pub ports: Vec<PortSpec>,
}

/// Most ports one pod may list.
pub const MAX_PORTS_PER_POD: usize = 64;

/// A port's transport protocol, spelled as in a Kubernetes container port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_uppercase().as_str() {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }
}

/// One port of a pod: its number, its name when given, its protocol. Only
/// TCP ports are tunnelled; the others are kept and shown as not forwarded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "PortShape")]
pub struct PortSpec {
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub protocol: Protocol,
}

impl PortSpec {
    /// A TCP port with no name (the seed's `port`).
    pub fn tcp(port: u16) -> Self {
        Self {
            port,
            name: None,
            protocol: Protocol::Tcp,
        }
    }
}

/// How a port is kept on disk: a bare number (as the agent kept ports
/// before they had names and protocols), or the whole object.
#[derive(Deserialize)]
#[serde(untagged)]
enum PortShape {
    Number(u16),
    Object {
        port: u16,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        protocol: Protocol,
    },
}

impl From<PortShape> for PortSpec {
    fn from(shape: PortShape) -> Self {
        match shape {
            PortShape::Number(port) => Self::tcp(port),
            PortShape::Object {
                port,
                name,
                protocol,
            } => Self {
                port,
                name,
                protocol,
            },
        }
    }
}

impl PodSpec {
    /// The staging port the tunnel forwards to: the first TCP one.
    pub fn staging_port(&self) -> u16 {
        self.ports
            .iter()
            .find(|port| port.protocol == Protocol::Tcp)
            .map_or(DEFAULT_STAGING_PORT, |port| port.port)
    }

    /// Every TCP port, in the order pushed: each gets a tunnel of its own.
    pub fn tcp_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.ports
            .iter()
            .filter(|port| port.protocol == Protocol::Tcp)
            .map(|port| port.port)
    }

    /// `<name>-staging.local`, the name the seed promised.
    pub fn dns_name(&self) -> String {
        format!("{}-staging.local", self.name)
    }

    /// `<name>-staging.localhost`, which browsers resolve with no setup.
    pub fn localhost_name(&self) -> String {
        format!("{}-staging.localhost", self.name)
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

/// Checks a pod id: it keys our state and appears in URLs and the status JSON.
pub fn validate_pod_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("pod id must not be empty".into());
    }
    if id.len() > 253 {
        return Err(format!("pod id is {} characters; at most 253", id.len()));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(format!(
            "pod id {id:?} contains {bad:?}; allowed: letters, digits, '-', '_', '.', ':'"
        ));
    }
    Ok(())
}

/// Checks that a pod name is a DNS-1123 label short enough that
/// `<name>-staging` is one too, so it is safe in a hosts file and a cluster.
pub fn validate_pod_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("pod name must not be empty".into());
    }
    if name.len() > MAX_POD_NAME_LEN {
        return Err(format!(
            "pod name {name:?} is {} characters; at most {MAX_POD_NAME_LEN} so that \
             \"<name>-staging\" fits one DNS label",
            name.len()
        ));
    }
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let alnum_ends = name
        .bytes()
        .next()
        .zip(name.bytes().last())
        .is_some_and(|(first, last)| first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric());
    if !valid_chars || !alnum_ends {
        return Err(format!(
            "pod name {name:?} is not a DNS-1123 label: lowercase letters, digits and '-', \
             starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// What is wrong with one field of a pushed pod, naming the field
/// (`ports[2].protocol`); it goes back to the control plane as the
/// rejection's `field` and `error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A namespace as Kubernetes takes it: a DNS-1123 label of at most 63
/// characters (it goes into every pod's long name, and so into a hosts
/// file: nothing else may pass). Empty is Kubernetes' `default`.
pub fn validate_namespace(namespace: &str) -> Result<(), FieldError> {
    if namespace.is_empty() {
        return Ok(());
    }
    let valid = namespace.len() <= 63
        && namespace
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && namespace.starts_with(|c: char| c.is_ascii_alphanumeric())
        && namespace.ends_with(|c: char| c.is_ascii_alphanumeric());
    if valid {
        Ok(())
    } else {
        Err(FieldError::new(
            "namespace",
            format!(
                "namespace {namespace:?} is not a DNS-1123 label of at most 63 characters: \
             lowercase letters, digits and '-', starting and ending with a letter or digit"
            ),
        ))
    }
}

fn validate_port(value: u64, field: &str) -> Result<u16, String> {
    match u16::try_from(value) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(format!("{field} {value} is out of range 1-65535")),
    }
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
            .and_then(|n| validate_port(n, field).map_err(|e| FieldError::new(field, e)))
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

/// A port name as Kubernetes takes it (IANA_SVC_NAME): 1-15 lowercase
/// letters, digits and '-', with a letter, not starting or ending with '-'.
fn validate_port_name(name: &str, field: &str) -> Result<(), FieldError> {
    let ok = (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!(
                "port name {name:?} must be 1-15 lowercase letters, digits and '-', with a letter"
            ),
        ))
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
    validate_pod_id(&id).map_err(|e| reject(Some("id"), e))?;
    let name = raw
        .name
        .ok_or_else(|| reject(Some("name"), "missing field `name`".into()))?;
    validate_pod_name(&name).map_err(|e| reject(Some("name"), e))?;
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
        Some(port) => Some(validate_port(port, "port").map_err(|e| reject(Some("port"), e))?),
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
    validate_pod_id(id).map_err(|e| PodRejection::new(Some(id), index, Some("id"), e))?;
    Ok(id.to_owned())
}

/// Where a pod's tunnel leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelTarget {
    /// Direct TCP to the staging pod's `ip:port`.
    #[default]
    Staging,
    /// To the pod's mirror in the local cluster, through the Kubernetes API port-forward.
    Local,
}

impl TunnelTarget {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "staging" => Some(Self::Staging),
            "local" => Some(Self::Local),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Staging => "staging",
            Self::Local => "local",
        }
    }
}

/// How a `staging` tunnel reaches its pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StagingVia {
    /// TCP to the pod's `ip:port` (the laptop routes to pod IPs).
    #[default]
    Direct,
    /// The staging cluster's API server port-forward, with the user's kubeconfig.
    Api,
    /// Direct while the pod IP answers, the API when it is unreachable.
    Auto,
}

impl StagingVia {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Api => "api",
            Self::Auto => "auto",
        }
    }
}

/// A way that is none of `direct`, `api`, `auto`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a way: direct, api or auto")]
pub struct UnknownWay(pub String);

impl std::str::FromStr for StagingVia {
    type Err = UnknownWay;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "direct" => Ok(Self::Direct),
            "api" => Ok(Self::Api),
            "auto" => Ok(Self::Auto),
            other => Err(UnknownWay(other.to_owned())),
        }
    }
}

/// The way a tunnel's connections take now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Way {
    /// TCP straight to the staging pod.
    #[default]
    Direct,
    /// The staging cluster's API server port-forward.
    Api,
    /// The pod's mirror in the local cluster.
    Mirror,
}

impl Way {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Api => "api",
            Self::Mirror => "mirror",
        }
    }

    /// As people read it: "via staging API", "via staging (direct)", "via mirror".
    pub fn describe(self) -> &'static str {
        match self {
            Self::Direct => "via staging (direct)",
            Self::Api => "via staging API",
            Self::Mirror => "via mirror",
        }
    }
}

/// Body of `POST /api/v1/pods/{id}/target`: where the tunnel leads, and
/// for `staging` optionally how it gets there.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct TargetRequest {
    pub target: TunnelTarget,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<StagingVia>,
}

/// State of one pod's tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelState {
    /// Listening and forwarding.
    Active,
    /// Forwarding turned off by the user: the port refuses connections.
    Stopped,
    /// Could not listen (no port, bind error); see the error.
    Failed,
}

impl TunnelState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
        }
    }
}

/// The pod's mirror in the local cluster, as its watch last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MirrorView {
    /// The mirror's name in the local namespace.
    pub name: String,
    /// `Pending`, `Running`, ... (`None` until the cluster reports it).
    pub phase: Option<String>,
    pub pod_ip: Option<String>,
    pub restarts: i32,
    /// The latest thing the cluster said about it: a container waiting or
    /// terminated with a reason (`ImagePullBackOff: ...`), or a failing condition.
    #[serde(default)]
    pub last_event: Option<String>,
    /// Why the cluster refused the mirror (bad image, quota, ...).
    pub error: Option<String>,
}

/// One pod's tunnel as the status endpoint and the report show it.
/// Field names up to `error` are the seed's `PodRedirection`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Redirection {
    pub staging_pod_id: String,
    pub staging_pod_name: String,
    pub staging_pod_ip: IpAddr,
    pub staging_port: u16,
    pub local_port: Option<u16>,
    pub local_host: String,
    pub dns_name: String,
    pub localhost_name: String,
    pub status: TunnelState,
    pub error: Option<String>,
    pub forwarding: bool,
    /// `staging` (direct) or `local` (the mirror, through the Kubernetes API).
    #[serde(default)]
    pub target: TunnelTarget,
    /// How a `staging` target is reached: `direct`, `api` or `auto`.
    #[serde(default)]
    pub via: StagingVia,
    /// The way connections take now (for `auto`, the one that last worked).
    #[serde(default)]
    pub way: Way,
    /// `way` as people read it: "via staging API", "via staging (direct)",
    /// "via mirror".
    #[serde(default)]
    pub way_label: String,
    pub namespace: String,
    pub pod_status: String,
    pub open_connections: u64,
    pub total_connections: u64,
    pub bytes_to_pod: u64,
    pub bytes_from_pod: u64,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    /// Notes on how the port was chosen, e.g. which port was held by another process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_note: Option<String>,
    /// The pod's mirror in the local cluster, when mirroring is on.
    #[serde(default)]
    pub mirror: Option<MirrorView>,
    /// The pod's own loopback address, where its names point.
    #[serde(default)]
    pub address: Option<std::net::Ipv4Addr>,
    /// The pod's own port, while it listens on `address` (the second way in:
    /// `<dns_name>:<name_port>`).
    #[serde(default)]
    pub name_port: Option<u16>,
    /// Why the pod's own port cannot listen there, with the fix.
    #[serde(default)]
    pub name_port_error: Option<String>,
    /// `http://<dns_name>/` while the name port listens.
    #[serde(default)]
    pub name_url: Option<String>,
    /// The `.local` names that resolve to this pod (the first to use).
    #[serde(default)]
    pub names: Vec<String>,
    /// Why `dns_name` is not this pod's (another pod holds it), and what to
    /// use instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_note: Option<String>,
    /// Every port of the pod, in the order pushed, each with its own
    /// tunnel (the fields above are the first TCP port's).
    #[serde(default)]
    pub ports: Vec<PortTunnelView>,
}

/// One port of a pod and its tunnel: its own range port, toggle, state,
/// errors and counters. A port that is not TCP is listed, never tunnelled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortTunnelView {
    pub staging_port: u16,
    pub local_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub protocol: Protocol,
    pub forwarding: bool,
    pub status: TunnelState,
    pub error: Option<String>,
    /// The pod's own port while it listens on the pod's address
    /// (`<dns_name>:<name_port>`).
    #[serde(default)]
    pub name_port: Option<u16>,
    /// `http://<name>:<port>/` while the name port listens.
    #[serde(default)]
    pub name_url: Option<String>,
    pub open_connections: u64,
    pub total_connections: u64,
    pub bytes_to_pod: u64,
    pub bytes_from_pod: u64,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_note: Option<String>,
}

impl PortTunnelView {
    /// A listed port with no tunnel: no range port, off, nothing counted.
    pub fn without_tunnel(spec: &PortSpec) -> Self {
        Self {
            staging_port: spec.port,
            local_port: None,
            name: spec.name.clone(),
            protocol: spec.protocol,
            forwarding: false,
            status: TunnelState::Stopped,
            error: None,
            name_port: None,
            name_url: None,
            open_connections: 0,
            total_connections: 0,
            bytes_to_pod: 0,
            bytes_from_pod: 0,
            last_error: None,
            last_error_at: None,
            port_note: None,
        }
    }

    /// The port as tables and menus name it: `9090 metrics`, `53/UDP dns`
    /// (the protocol only when it is not TCP).
    pub fn label(&self) -> String {
        let mut label = self.staging_port.to_string();
        if self.protocol != Protocol::Tcp {
            label.push('/');
            label.push_str(self.protocol.as_str());
        }
        if let Some(name) = &self.name {
            label.push(' ');
            label.push_str(name);
        }
        label
    }
}

/// `GET /api/v1/pods/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusResponse {
    pub total_redirections: usize,
    pub active_redirections: usize,
    pub failed_redirections: usize,
    pub stopped_redirections: usize,
    pub redirections: BTreeMap<String, Redirection>,
    pub timestamp: DateTime<Utc>,
    /// True when the pods come from the built-in demo, not a control plane.
    #[serde(default)]
    pub demo: bool,
}

/// One entry of `GET /api/v1/pods`: the pod as pushed, with its tunnel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodView {
    pub pod: PodSpec,
    pub tunnel: Redirection,
    /// The last minute of the tunnel, for the dashboard.
    #[serde(default)]
    pub activity: Activity,
}

/// What a tunnel did over the last minute.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Activity {
    /// Bytes per second, both ways together, one sample every
    /// `sample_seconds`, oldest first.
    pub throughput: Vec<u64>,
    pub sample_seconds: u64,
    /// Time to reach the pod, over the connections of the last minute.
    pub connect_p50_ms: Option<f64>,
    pub connect_p99_ms: Option<f64>,
    /// Connections tried, and those that failed, in the last minute.
    pub connections: u64,
    pub errors: u64,
}

/// How much of the port range the tunnels hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortUsage {
    pub used: usize,
    pub size: usize,
}

/// `GET /api/v1/pods`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodList {
    pub pods: Vec<PodView>,
    pub timestamp: DateTime<Utc>,
}

/// The names one pod answers to (decided over every pod by
/// `names::assign`), and why it lacks one it might expect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AssignedNames {
    /// `.local` names that resolve to this pod, the one to show first.
    pub names: Vec<String>,
    /// Why `<name>-staging.local` is not this pod's, when it is not.
    pub note: Option<String>,
}

/// Where names are written and whether the system resolver sees them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct NamesHealth {
    /// The file the names are written to.
    pub hosts_file: String,
    /// Whether every program of this user resolves them.
    pub system_wide: bool,
    /// Which of the places was chosen.
    #[serde(default)]
    pub mode: NamesMode,
    /// Why that place: what was found on this machine.
    #[serde(default)]
    pub why: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// Where the agent writes its names.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum NamesMode {
    /// This user's file, answered by the package's NSS module.
    NssModule,
    /// A block of the system hosts file.
    #[default]
    SystemHosts,
    /// A private file in the state dir that the system resolver does not read.
    PrivateFile,
    /// The file `--hosts-file` names.
    File,
    /// `--names off`: no names anywhere.
    Off,
}

impl NamesMode {
    /// How the dashboard and `doctor` say it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::NssModule => "the system resolver, through the k3slocal NSS module",
            Self::SystemHosts => "the system hosts file",
            Self::PrivateFile => "a private file the system resolver does not read",
            Self::File => "the file --hosts-file names",
            Self::Off => "nowhere: names are off (--names off)",
        }
    }
}

/// Whether the control plane took our last report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ControlPlaneHealth {
    pub url: String,
    pub reachable: Option<bool>,
    pub last_sync: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

/// `GET /health`: the seed's four fields plus what a user needs to trust it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealthResponse {
    pub status: String,
    pub agent_id: String,
    /// The agent's process id (so `doctor` can tell its ports from others').
    #[serde(default)]
    pub pid: u32,
    pub timestamp: DateTime<Utc>,
    pub pod_count: usize,
    pub version: String,
    pub demo: bool,
    /// Where this agent's API answers (`http://127.0.0.1:8082`): what the
    /// tray app's window, which has no HTTP origin, shows in its examples.
    #[serde(default)]
    pub api_url: String,
    pub names: NamesHealth,
    /// Whether tunnel ports listen (`--forwarding off`: said here once,
    /// each pod's tunnel then simply `stopped`).
    #[serde(default = "forwarding_default")]
    pub forwarding: bool,
    pub control_plane: ControlPlaneHealth,
    /// The local cluster mirror: `ready`, `unavailable` or `disabled`.
    pub cluster_status: String,
    /// Why the cluster is unavailable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_reason: Option<String>,
    /// The staging cluster's API, when a staging context is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging: Option<StagingHealth>,
}

/// The staging cluster's API as the agent reaches it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StagingHealth {
    /// `ready`, `connecting` (no client yet) or `unavailable`.
    pub status: String,
    /// What is wrong, with what to do: a credential plugin that did not
    /// answer, credentials refused, a kubeconfig that cannot be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// An agent that does not say has forwarding on (older agents).
fn forwarding_default() -> bool {
    true
}

impl HealthResponse {
    /// What a caller that is not trusted may see: that the agent lives, and
    /// its id (which a push must carry anyway), but no pods, no names, no
    /// control plane.
    pub fn for_strangers(self) -> Self {
        Self {
            pid: 0,
            pod_count: 0,
            names: NamesHealth::default(),
            control_plane: ControlPlaneHealth::default(),
            cluster_reason: None,
            staging: None,
            ..self
        }
    }
}

/// Everything the dashboard shows, in one value: sent whole on every change
/// (`GET /api/v1/snapshot`, the SSE stream, the tray app's events).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub health: HealthResponse,
    pub pods: Vec<PodView>,
    #[serde(default)]
    pub ports: PortUsage,
}

/// Body of `POST /api/v1/pods/{id}/forwarding`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ForwardingRequest {
    pub enabled: bool,
    /// One staging port of the pod alone; every port when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
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

/// The status report we POST to `{control_plane_url}/api/v1/staging/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub agent_id: String,
    pub status: String,
    pub total_pods: usize,
    pub running_pods: usize,
    pub failed_pods: usize,
    pub staging_pods: BTreeMap<String, Redirection>,
    pub kind_cluster_status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind_cluster_reason: Option<String>,
    pub last_sync: Option<DateTime<Utc>>,
    pub timestamp: DateTime<Utc>,
    pub demo: bool,
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
    fn names_must_be_dns_labels() {
        for bad in [
            "My-App",
            "my.app",
            "my app",
            "my\napp",
            "#x",
            "-a",
            "a-",
            "",
            &"a".repeat(56),
        ] {
            assert!(validate_pod_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["a", "my-app", "a1", &"a".repeat(55)] {
            assert!(validate_pod_name(good).is_ok(), "{good:?} rejected");
        }
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
    fn ports_kept_as_numbers_on_disk_still_read() {
        let ports: Vec<PortSpec> =
            serde_json::from_value(json!([8080, {"port":9090,"name":"metrics"}]))
                .expect("both shapes");
        assert_eq!(ports[0], PortSpec::tcp(8080));
        assert_eq!(ports[1].name.as_deref(), Some("metrics"));
        assert_eq!(ports[1].protocol, Protocol::Tcp);
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
