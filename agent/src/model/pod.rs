//! What a staging pod is once accepted: [`PodSpec`], its ports and their
//! protocols, and the rules each field must meet (id, DNS-1123 name,
//! namespace, port numbers and names), failing with a [`FieldError`].

use std::collections::BTreeMap;
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::dns::{is_dns_label, MAX_LABEL_LEN};

/// The staging port a pod is forwarded to when the push names none.
pub const DEFAULT_STAGING_PORT: u16 = 80;

/// The longest pod name whose `<name>-staging` still fits one DNS label (63).
pub const MAX_POD_NAME_LEN: usize = MAX_LABEL_LEN - "-staging".len();

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

    pub(super) fn parse(text: &str) -> Option<Self> {
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
    pub(super) fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Checks a pod id: it keys our state and appears in URLs and the status JSON.
pub fn validate_pod_id(id: &str) -> Result<(), FieldError> {
    let refuse = |message: String| Err(FieldError::new("id", message));
    if id.is_empty() {
        return refuse("pod id must not be empty".into());
    }
    if id.len() > 253 {
        return refuse(format!("pod id is {} characters; at most 253", id.len()));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return refuse(format!(
            "pod id {id:?} contains {bad:?}; allowed: letters, digits, '-', '_', '.', ':'"
        ));
    }
    Ok(())
}

/// Checks that a pod name is a DNS-1123 label short enough that
/// `<name>-staging` is one too, so it is safe in a hosts file and a cluster.
pub fn validate_pod_name(name: &str) -> Result<(), FieldError> {
    let refuse = |message: String| Err(FieldError::new("name", message));
    if name.is_empty() {
        return refuse("pod name must not be empty".into());
    }
    if name.len() > MAX_POD_NAME_LEN {
        return refuse(format!(
            "pod name {name:?} is {} characters; at most {MAX_POD_NAME_LEN} so that \
             \"<name>-staging\" fits one DNS label",
            name.len()
        ));
    }
    if !is_dns_label(name) {
        return refuse(format!(
            "pod name {name:?} is not a DNS-1123 label: lowercase letters, digits and '-', \
             starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// A namespace as Kubernetes takes it: a DNS-1123 label of at most 63
/// characters (it goes into every pod's long name, and so into a hosts
/// file: nothing else may pass). Empty is Kubernetes' `default`.
pub fn validate_namespace(namespace: &str) -> Result<(), FieldError> {
    if namespace.is_empty() {
        return Ok(());
    }
    if is_dns_label(namespace) {
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

/// A port number as pushed, 1-65535; `field` says where it stood (`port`,
/// `ports[2].port`).
pub(super) fn validate_port(value: u64, field: &str) -> Result<u16, FieldError> {
    match u16::try_from(value) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(FieldError::new(
            field,
            format!("{field} {value} is out of range 1-65535"),
        )),
    }
}

/// A port name as Kubernetes takes it (IANA_SVC_NAME): 1-15 lowercase
/// letters, digits and '-', with a letter, not starting or ending with '-'.
pub(super) fn validate_port_name(name: &str, field: &str) -> Result<(), FieldError> {
    // A DNS label, shorter, with a letter, and no "--" (IANA's own rules).
    let ok = name.len() <= 15
        && is_dns_label(name)
        && name.bytes().any(|b| b.is_ascii_lowercase())
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
    fn id_and_name_errors_name_their_field() {
        let err = validate_pod_id("a b").expect_err("space");
        assert_eq!(err.field, "id");
        assert!(
            err.message.starts_with("pod id \"a b\" contains ' '"),
            "{err}"
        );
        assert_eq!(
            validate_pod_id("").expect_err("empty").message,
            "pod id must not be empty"
        );
        let err = validate_pod_name("My-App").expect_err("capitals");
        assert_eq!(err.field, "name");
        assert!(err.message.contains("is not a DNS-1123 label"), "{err}");
        let err = validate_pod_name(&"a".repeat(56)).expect_err("long");
        assert!(err.message.contains("at most 55"), "{err}");
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
}
