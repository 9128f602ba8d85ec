//! The agent's settings: defaults from the seed, a TOML file, `K3S_LOCAL_AGENT_*`
//! environment variables and command-line flags, layered in that order (flags win).
//! Each setting is declared once, in [`Settings`], which clap and serde both read.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::Deserialize;

use crate::model::StagingVia;
use crate::tunnel::AddressBlock;
pub use crate::tunnel::PortRange;

/// Default port of the agent's HTTP API (the seed's).
pub const DEFAULT_AGENT_PORT: u16 = 8082;
/// Default control plane address (the seed's).
pub const DEFAULT_CONTROL_PLANE_URL: &str = "http://localhost:8080";
/// Default interval between status reports.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(30);
/// Default kube context: Kind's name for the seed's cluster `staging-cluster`.
pub const DEFAULT_KUBE_CONTEXT: &str = "kind-staging-cluster";
/// Default namespace of the local mirror (the seed's).
pub const DEFAULT_NAMESPACE: &str = "staging";
/// How long an `auto` tunnel that fell back to the staging API waits before
/// it tries the pod IP again.
pub const DEFAULT_DIRECT_RETRY: Duration = Duration::from_secs(30);

/// Default cap on the pods held at once: ten times the default port range,
/// so every realistic staging set fits, and a runaway control plane cannot
/// fill memory, the disk and the hosts file without bound.
pub const DEFAULT_MAX_PODS: usize = 10_000;
/// Default cap on connections open at once through one tunnel port: far
/// beyond what a developer opens, low enough that a loop (a target that is
/// one of our own ports, through another forwarder) cannot take every
/// descriptor from the other tunnels.
pub const DEFAULT_MAX_TUNNEL_CONNECTIONS: usize = 4096;
/// Default cap on dashboard event streams open at once.
pub const DEFAULT_MAX_EVENT_STREAMS: usize = 64;

/// Most forwarding threads a setting may ask for.
const MAX_FORWARD_THREADS: usize = 64;

/// Default tunnel port range (the seed's).
pub const DEFAULT_PORT_RANGE: PortRange = PortRange {
    start: 8080,
    end: 9000,
};

/// Why the settings could not be put together.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid {setting}: {message}")]
    Invalid {
        setting: &'static str,
        message: String,
    },
    #[error("no data directory found for the state dir; pass --state-dir")]
    NoStateDir,
}

/// An on/off setting, spelled as the flag takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    On,
    Off,
}

/// Declares the settings struct and derives its merge from the same field
/// list, so that a new setting is one field here and nothing else: clap, serde
/// and the layering all read the one declaration.
macro_rules! settings {
    (
        $(#[$outer:meta])*
        pub struct $name:ident {
            $(
                $(#[$inner:meta])*
                pub $field:ident: $ty:ty,
            )*
        }
    ) => {
        $(#[$outer])*
        pub struct $name {
            $(
                $(#[$inner])*
                pub $field: $ty,
            )*
        }

        impl $name {
            /// These settings over `lower`: each one set here wins, each one
            /// unset here falls through (an on-only switch is on when either
            /// layer turns it on).
            #[must_use]
            pub fn merge(self, lower: Self) -> Self {
                Self {
                    $($field: Layer::over(self.$field, lower.$field),)*
                }
            }
        }
    };
}

/// How one setting's value lies over the same setting of a lower layer.
trait Layer {
    fn over(self, lower: Self) -> Self;
}

impl<T> Layer for Option<T> {
    fn over(self, lower: Self) -> Self {
        self.or(lower)
    }
}

/// `--demo` and `--no-cluster` are bare flags (no value), so a flag can only
/// turn them on; the file may too.
impl Layer for bool {
    fn over(self, lower: Self) -> Self {
        self || lower
    }
}

settings! {
    /// Every setting of `run`, declared once: clap reads it as flags and
    /// `K3S_LOCAL_AGENT_*` variables (a flag over its variable), serde as the
    /// keys of a TOML file. Each is unset unless given, so that one layer
    /// falls through to the next; [`Config::layer`] merges the layers once and
    /// fills in the defaults.
    #[derive(Debug, Clone, Default, Args, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub struct Settings {
        /// TOML file with any of the settings below (keys as the flags, with '_').
        #[arg(long, env = "K3S_LOCAL_AGENT_CONFIG")]
        #[serde(skip)]
        pub config: Option<PathBuf>,
        /// This agent's id; made once and kept in the state dir when not given.
        #[arg(long, env = "K3S_LOCAL_AGENT_AGENT_ID")]
        pub agent_id: Option<String>,
        /// Port of the agent's HTTP API [default: 8082; 0 picks a free one].
        #[arg(long, env = "K3S_LOCAL_AGENT_AGENT_PORT")]
        pub agent_port: Option<u16>,
        /// Address the HTTP API listens on [default: 127.0.0.1]. Beyond loopback
        /// every request but /health needs the bearer token.
        #[arg(long, env = "K3S_LOCAL_AGENT_BIND")]
        pub bind: Option<IpAddr>,
        /// Where status reports go [default: http://localhost:8080].
        #[arg(long, env = "K3S_LOCAL_AGENT_CONTROL_PLANE_URL")]
        pub control_plane_url: Option<String>,
        /// Seconds between status reports [default: 30].
        #[arg(long, env = "K3S_LOCAL_AGENT_SYNC_INTERVAL")]
        pub sync_interval: Option<u64>,
        /// Local ports handed to tunnels, A-B [default: 8080-9000].
        #[arg(long, env = "K3S_LOCAL_AGENT_PORT_RANGE")]
        pub port_range: Option<PortRange>,
        /// Host the tunnels listen on: localhost or an IP address [default: localhost].
        #[arg(long, env = "K3S_LOCAL_AGENT_LOCAL_HOST")]
        pub local_host: Option<String>,
        /// Loopback block that pod addresses come from [default: this user's own
        /// block, 127.128.0.0/9 carved into one /24 per uid unless root's
        /// /etc/k3s-local-agent/bind-helper.conf says otherwise].
        #[arg(long, env = "K3S_LOCAL_AGENT_ADDRESS_BLOCK")]
        #[serde(deserialize_with = "parsed")]
        pub address_block: Option<AddressBlock>,
        /// Give each pod its own loopback address, with its names pointing there
        /// and the pod's own port listening there [default: on].
        #[arg(long, env = "K3S_LOCAL_AGENT_NAME_PORTS")]
        pub name_ports: Option<Switch>,
        /// Whether tunnel ports listen at all [default: on]. Off: pods are still
        /// received, stored, mirrored and reported, but no port listens (the
        /// seed's EnablePortForward).
        #[arg(long, env = "K3S_LOCAL_AGENT_FORWARDING")]
        pub forwarding: Option<Switch>,
        /// Whether pod names are written [default: on]. Off: no name is written
        /// anywhere, and addresses show as localhost:<range port> (the seed's
        /// EnableDNSProxy).
        #[arg(long, env = "K3S_LOCAL_AGENT_NAMES")]
        pub names: Option<Switch>,
        /// Threads that forward tunnel traffic [default: one per core, at most 8].
        #[arg(long, env = "K3S_LOCAL_AGENT_FORWARD_THREADS")]
        pub forward_threads: Option<NonZeroUsize>,
        /// Most pods the agent holds; a push past it is refused whole [default: 10000].
        #[arg(long, env = "K3S_LOCAL_AGENT_MAX_PODS")]
        pub max_pods: Option<NonZeroUsize>,
        /// Most connections open at once through one tunnel port; more wait for
        /// one to close [default: 4096].
        #[arg(long, env = "K3S_LOCAL_AGENT_MAX_TUNNEL_CONNECTIONS")]
        pub max_tunnel_connections: Option<NonZeroUsize>,
        /// Most dashboard event streams open at once; more are refused 503 [default: 64].
        #[arg(long, env = "K3S_LOCAL_AGENT_MAX_EVENT_STREAMS")]
        pub max_event_streams: Option<NonZeroUsize>,
        /// Hosts file for the pod names [default: the NSS module's file when the
        /// package is installed, else /etc/hosts when writable, else <state-dir>/hosts].
        #[arg(long, env = "K3S_LOCAL_AGENT_HOSTS_FILE")]
        pub hosts_file: Option<PathBuf>,
        /// The helper that binds a pod's own port below 1024 when the agent may
        /// not [default: the package's, /usr/libexec/k3s-local-agent/k3s-local-agent-bind,
        /// else k3s-local-agent-bind beside this program].
        #[arg(long, env = "K3S_LOCAL_AGENT_BIND_HELPER")]
        pub bind_helper: Option<PathBuf>,
        /// Where the agent keeps its id, token and pods [default: <data dir>/k3s-local-agent].
        #[arg(long, env = "K3S_LOCAL_AGENT_STATE_DIR")]
        pub state_dir: Option<PathBuf>,
        /// Start a built-in stand-in control plane and three demo pods.
        #[arg(long, env = "K3S_LOCAL_AGENT_DEMO")]
        pub demo: bool,
        /// Kube context of the local mirror cluster [default: kind-staging-cluster].
        #[arg(long, env = "K3S_LOCAL_AGENT_KUBE_CONTEXT")]
        pub kube_context: Option<String>,
        /// Kubeconfig file [default: $KUBECONFIG, else ~/.kube/config].
        #[arg(long, env = "K3S_LOCAL_AGENT_KUBECONFIG")]
        pub kubeconfig: Option<PathBuf>,
        /// Namespace of the local mirror, created when missing [default: staging].
        #[arg(long, env = "K3S_LOCAL_AGENT_NAMESPACE")]
        pub namespace: Option<String>,
        /// Do not mirror pods into a local cluster.
        #[arg(long, env = "K3S_LOCAL_AGENT_NO_CLUSTER")]
        pub no_cluster: bool,
        /// Kube context of the staging cluster, for tunnels that reach pods
        /// through its API server's port-forward [default: none: direct only].
        #[arg(long, env = "K3S_LOCAL_AGENT_STAGING_KUBE_CONTEXT")]
        pub staging_kube_context: Option<String>,
        /// Kubeconfig with the staging context [default: $KUBECONFIG, else ~/.kube/config].
        #[arg(long, env = "K3S_LOCAL_AGENT_STAGING_KUBECONFIG")]
        pub staging_kubeconfig: Option<PathBuf>,
        /// How staging tunnels reach their pods: direct (TCP to the pod IP), api
        /// (the staging API server's port-forward) or auto (direct, else the API
        /// when the pod IP is unreachable) [default: auto with a staging context,
        /// else direct].
        #[arg(long, env = "K3S_LOCAL_AGENT_STAGING_VIA")]
        pub staging_via: Option<StagingVia>,
        /// Seconds an `auto` tunnel that fell back to the API waits before it
        /// tries the pod IP again [default: 30].
        #[arg(long, env = "K3S_LOCAL_AGENT_STAGING_DIRECT_RETRY")]
        pub staging_direct_retry: Option<u64>,
    }
}

/// The settings as the CLI and the tray app flatten them into `run`.
pub type RunOverrides = Settings;
/// The settings as a TOML file holds them: the same struct.
pub type FileSettings = Settings;

impl Settings {
    /// Reads and parses a TOML settings file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        // toml's message quotes the offending line, so it names the key.
        toml::from_str(&text).map_err(|err| ConfigError::Parse {
            path: path.to_owned(),
            message: err.to_string(),
        })
    }
}

/// A file's text setting parsed as the flag parses it (`FromStr`), so both
/// take the same spellings and refuse with the same words.
fn parsed<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: FromStr,
    T::Err: std::fmt::Display,
{
    let text = String::deserialize(deserializer)?;
    text.parse().map(Some).map_err(serde::de::Error::custom)
}

/// The resolved settings the agent runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub agent_id: Option<String>,
    pub agent_port: u16,
    pub bind: IpAddr,
    pub control_plane_url: reqwest::Url,
    pub sync_interval: Duration,
    pub port_range: PortRange,
    pub local_host: String,
    /// Where pod addresses come from, when `name_ports` is on: this
    /// user's own block unless set; none when this user has no block.
    pub address_block: Option<AddressBlock>,
    /// Why pods get no address of their own although name ports were asked
    /// for (this user has no block of their own), said once at start.
    pub address_block_note: Option<String>,
    /// Each pod on its own loopback address, with its own port there
    /// (never with names off: no name would lead there).
    pub name_ports: bool,
    /// Whether tunnel ports listen at all.
    pub forwarding: bool,
    /// Whether pod names are written.
    pub names: bool,
    /// Forwarding threads (each a single-threaded runtime).
    pub forward_threads: usize,
    /// Most pods held at once.
    pub max_pods: usize,
    /// Most connections open at once through one tunnel port.
    pub max_tunnel_connections: usize,
    /// Most dashboard event streams open at once.
    pub max_event_streams: usize,
    pub hosts_file: Option<PathBuf>,
    /// The low-port bind helper, when one is installed or named.
    pub bind_helper: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub demo: bool,
    /// Whether a control plane URL was given at all (flag, env or file): the
    /// desktop app runs the demo when none was.
    pub control_plane_configured: bool,
    /// The local mirror cluster.
    pub cluster: ClusterSettings,
    /// The staging cluster, reached through its API server.
    pub staging: StagingSettings,
}

/// The staging cluster: where its API server is, and how tunnels reach pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagingSettings {
    /// `None`: no staging cluster; every tunnel is direct.
    pub context: Option<String>,
    /// `None`: kube's own lookup ($KUBECONFIG, then ~/.kube/config).
    pub kubeconfig: Option<PathBuf>,
    /// How a pod with no choice of its own is reached.
    pub via: StagingVia,
    /// How long an `auto` tunnel on the API waits before trying direct again.
    pub direct_retry: Duration,
}

/// Where and whether pods are mirrored into a local cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    pub enabled: bool,
    pub context: String,
    /// `None`: kube's own lookup ($KUBECONFIG, then ~/.kube/config).
    pub kubeconfig: Option<PathBuf>,
    pub namespace: String,
}

impl Config {
    /// Layers flags/env over the file (when `--config` names one) over the defaults.
    pub fn resolve(flags: &Settings) -> Result<Self, ConfigError> {
        let file = match &flags.config {
            Some(path) => Settings::load(path)?,
            None => Settings::default(),
        };
        Self::layer(flags, &file)
    }

    /// Layers flags/env over already-read file settings over the defaults.
    pub fn layer(flags: &Settings, file: &Settings) -> Result<Self, ConfigError> {
        Self::from_settings(flags.clone().merge(file.clone()))
    }

    /// The merged settings with the defaults filled in, each checked.
    fn from_settings(settings: Settings) -> Result<Self, ConfigError> {
        let control_plane_configured = settings.control_plane_url.is_some();
        let control_plane_url = parse_control_plane_url(
            settings
                .control_plane_url
                .as_deref()
                .unwrap_or(DEFAULT_CONTROL_PLANE_URL),
        )?;

        let sync_secs = settings
            .sync_interval
            .unwrap_or(DEFAULT_SYNC_INTERVAL.as_secs());
        if sync_secs == 0 {
            return Err(ConfigError::Invalid {
                setting: "sync_interval",
                message: "must be at least 1 second".into(),
            });
        }

        let local_host = settings
            .local_host
            .clone()
            .unwrap_or_else(|| "localhost".to_owned());
        listen_ip_for(&local_host)?;

        if let Some(id) = &settings.agent_id {
            if id.trim().is_empty() || id.chars().any(char::is_control) {
                return Err(ConfigError::Invalid {
                    setting: "agent_id",
                    message: format!("{id:?} must be non-empty printable text"),
                });
            }
        }

        let namespace = settings
            .namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        check_namespace(&namespace)?;
        let cluster = ClusterSettings {
            enabled: !settings.no_cluster,
            context: settings
                .kube_context
                .clone()
                .unwrap_or_else(|| DEFAULT_KUBE_CONTEXT.to_owned()),
            kubeconfig: settings.kubeconfig.clone(),
            namespace,
        };

        let staging = staging_settings(&settings)?;

        let mut address_block_note = None;
        let address_block = match settings.address_block {
            Some(block) => Some(block),
            None => match AddressBlock::of_this_user() {
                Ok(block) => Some(block),
                Err(why) => {
                    address_block_note = Some(format!(
                        "pods get no address of their own (names lead to their range port): {why}"
                    ));
                    None
                }
            },
        };
        let on = |switch: Option<Switch>| switch.unwrap_or(Switch::On) == Switch::On;
        let names = on(settings.names);
        let forwarding = on(settings.forwarding);
        let name_ports = names && on(settings.name_ports) && address_block_note.is_none();

        let forward_threads = settings
            .forward_threads
            .map_or_else(crate::tunnel::default_forward_threads, NonZeroUsize::get);
        if forward_threads > MAX_FORWARD_THREADS {
            return Err(ConfigError::Invalid {
                setting: "forward_threads",
                message: format!(
                    "{forward_threads} is too many: at most {MAX_FORWARD_THREADS} (every tunnel listens once per thread)"
                ),
            });
        }

        let state_dir = match settings.state_dir {
            Some(dir) => dir,
            None => dirs::data_dir()
                .ok_or(ConfigError::NoStateDir)?
                .join("k3s-local-agent"),
        };

        Ok(Self {
            agent_id: settings.agent_id,
            agent_port: settings.agent_port.unwrap_or(DEFAULT_AGENT_PORT),
            bind: settings.bind.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            control_plane_url,
            sync_interval: Duration::from_secs(sync_secs),
            port_range: settings.port_range.unwrap_or(DEFAULT_PORT_RANGE),
            local_host,
            address_block,
            address_block_note,
            name_ports,
            forwarding,
            names,
            forward_threads,
            max_pods: settings
                .max_pods
                .map_or(DEFAULT_MAX_PODS, NonZeroUsize::get),
            max_tunnel_connections: settings
                .max_tunnel_connections
                .map_or(DEFAULT_MAX_TUNNEL_CONNECTIONS, NonZeroUsize::get),
            max_event_streams: settings
                .max_event_streams
                .map_or(DEFAULT_MAX_EVENT_STREAMS, NonZeroUsize::get),
            hosts_file: settings.hosts_file,
            bind_helper: settings.bind_helper.or_else(installed_bind_helper),
            state_dir,
            demo: settings.demo,
            control_plane_configured,
            cluster,
            staging,
        })
    }

    /// The address tunnels listen on, from `local_host`.
    pub fn listen_ip(&self) -> IpAddr {
        // Validated in `layer`; loopback is the safe fallback.
        listen_ip_for(&self.local_host).unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
    }

    /// The control plane's port, which the allocator must never hand out.
    pub fn control_plane_port(&self) -> Option<u16> {
        self.control_plane_url.port_or_known_default()
    }

    /// True when the HTTP API is reachable from other machines.
    pub fn binds_beyond_loopback(&self) -> bool {
        !self.bind.is_loopback()
    }
}

/// The mirror's namespace is checked as Kubernetes checks a namespace (a
/// DNS-1123 label of at most 63 characters), by the rule pushed namespaces
/// are checked with; a pod name's shorter limit is no concern of it.
fn check_namespace(namespace: &str) -> Result<(), ConfigError> {
    // A pushed pod's empty namespace means Kubernetes' `default`; the
    // mirror's is written into every mirrored pod, so it is named.
    if namespace.is_empty() {
        return Err(ConfigError::Invalid {
            setting: "namespace",
            message: "must not be empty".into(),
        });
    }
    crate::model::validate_namespace(namespace).map_err(|err| ConfigError::Invalid {
        setting: "namespace",
        message: err.message,
    })
}

/// The staging cluster's settings: `api` and `auto` need its context.
fn staging_settings(settings: &Settings) -> Result<StagingSettings, ConfigError> {
    let context = settings
        .staging_kube_context
        .clone()
        .filter(|context| !context.trim().is_empty());
    let via = settings.staging_via.unwrap_or(if context.is_some() {
        StagingVia::Auto
    } else {
        StagingVia::Direct
    });
    if via != StagingVia::Direct && context.is_none() {
        return Err(ConfigError::Invalid {
            setting: "staging_via",
            message: format!(
                "{} reaches pods through the staging cluster's API: name its context \
                 with --staging-kube-context",
                via.as_str()
            ),
        });
    }
    let retry = settings
        .staging_direct_retry
        .unwrap_or(DEFAULT_DIRECT_RETRY.as_secs());
    if retry == 0 {
        return Err(ConfigError::Invalid {
            setting: "staging_direct_retry",
            message: "must be at least 1 second".into(),
        });
    }
    Ok(StagingSettings {
        context,
        kubeconfig: settings.staging_kubeconfig.clone(),
        via,
        direct_retry: Duration::from_secs(retry),
    })
}

fn parse_control_plane_url(text: &str) -> Result<reqwest::Url, ConfigError> {
    let url = reqwest::Url::parse(text).map_err(|err| ConfigError::Invalid {
        setting: "control_plane_url",
        message: format!("{text:?}: {err}"),
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ConfigError::Invalid {
            setting: "control_plane_url",
            message: format!("{text:?} must be an http or https URL"),
        });
    }
    Ok(url)
}

fn listen_ip_for(local_host: &str) -> Result<IpAddr, ConfigError> {
    match local_host {
        "localhost" => Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        "ip6-localhost" => Ok(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        other => other.parse().map_err(|_| ConfigError::Invalid {
            setting: "local_host",
            message: format!("{other:?} is neither localhost nor an IP address"),
        }),
    }
}

/// Where the package puts the low-port bind helper.
pub const PACKAGED_BIND_HELPER: &str = "/usr/libexec/k3s-local-agent/k3s-local-agent-bind";

/// The package's bind helper, else one beside this program (a build tree).
fn installed_bind_helper() -> Option<PathBuf> {
    let packaged = PathBuf::from(PACKAGED_BIND_HELPER);
    if packaged.is_file() {
        return Some(packaged);
    }
    let beside = std::env::current_exe()
        .ok()?
        .parent()?
        .join("k3s-local-agent-bind");
    beside.is_file().then_some(beside)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> RunOverrides {
        RunOverrides {
            state_dir: Some(PathBuf::from("/tmp/state")),
            ..RunOverrides::default()
        }
    }

    #[test]
    fn defaults_are_the_seeds() {
        let config = Config::layer(&flags(), &FileSettings::default()).expect("defaults");
        assert_eq!(config.agent_port, 8082);
        assert_eq!(config.control_plane_port(), Some(8080));
        assert_eq!(
            config.port_range,
            PortRange {
                start: 8080,
                end: 9000
            }
        );
        assert_eq!(config.port_range.len(), 921);
        assert_eq!(config.sync_interval, Duration::from_secs(30));
        assert_eq!(config.listen_ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert!(!config.binds_beyond_loopback());
        assert!(config.cluster.enabled);
        assert_eq!(config.cluster.context, "kind-staging-cluster");
        assert_eq!(config.cluster.namespace, "staging");
    }

    #[test]
    fn forward_threads_default_to_the_cores_and_are_bounded() {
        let config = Config::layer(&flags(), &FileSettings::default()).expect("defaults");
        assert_eq!(
            config.forward_threads,
            crate::tunnel::default_forward_threads()
        );
        assert!((1..=8).contains(&config.forward_threads));

        let file: FileSettings = toml::from_str("forward_threads = 3").expect("toml");
        let config = Config::layer(&flags(), &file).expect("from the file");
        assert_eq!(config.forward_threads, 3);

        let mut overrides = flags();
        overrides.forward_threads = NonZeroUsize::new(65);
        let err = Config::layer(&overrides, &FileSettings::default()).expect_err("too many");
        assert!(err.to_string().contains("forward_threads"), "{err}");
        assert!(err.to_string().contains("at most 64"), "{err}");

        let zero = toml::from_str::<FileSettings>("forward_threads = 0");
        assert!(zero.is_err(), "zero threads cannot forward anything");
    }

    #[test]
    fn flags_win_over_file() {
        let file: FileSettings =
            toml::from_str("agent_port = 9100\nport_range = \"20000-20010\"\nsync_interval = 5")
                .expect("toml");
        let mut overrides = flags();
        overrides.agent_port = Some(9200);
        let config = Config::layer(&overrides, &file).expect("layered");
        assert_eq!(config.agent_port, 9200);
        assert_eq!(
            config.port_range,
            PortRange {
                start: 20000,
                end: 20010
            }
        );
        assert_eq!(config.sync_interval, Duration::from_secs(5));
    }

    #[test]
    fn bad_settings_are_named() {
        let err = toml::from_str::<FileSettings>("agent_prot = 1").expect_err("typo");
        assert!(err.to_string().contains("agent_prot"), "{err}");
        let err = "9000-8080".parse::<PortRange>().expect_err("reversed");
        assert!(err.contains("starts after"));
        let mut overrides = flags();
        overrides.control_plane_url = Some("ftp://x".into());
        let err = Config::layer(&overrides, &FileSettings::default()).expect_err("scheme");
        assert!(err.to_string().contains("control_plane_url"));
        let mut overrides = flags();
        overrides.local_host = Some("example.com".into());
        let err = Config::layer(&overrides, &FileSettings::default()).expect_err("host");
        assert!(err.to_string().contains("local_host"));
    }

    #[test]
    fn the_settings_make_a_sound_command() {
        use clap::CommandFactory as _;
        #[derive(clap::Parser)]
        struct Run {
            #[command(flatten)]
            settings: Settings,
        }
        Run::command().debug_assert();
    }

    /// clap folds in the environment itself, reading this process's, so the
    /// env layer is shown in a child: this test runs itself again with the
    /// variables set rather than change the environment other tests share.
    #[test]
    fn a_flag_beats_the_environment_beats_the_file_beats_the_default() {
        use clap::{FromArgMatches as _, Parser as _};
        const CHILD: &str = "K3S_LOCAL_AGENT_TEST_LAYERS_CHILD";
        if std::env::var_os(CHILD).is_none() {
            let path = concat!(
                module_path!(),
                "::a_flag_beats_the_environment_beats_the_file_beats_the_default"
            );
            // Test names leave out the crate.
            let name = path.split_once("::").map_or(path, |(_, name)| name);
            let mut child = std::process::Command::new(std::env::current_exe().expect("exe"));
            child.args([name, "--exact", "--nocapture", "--test-threads=1"]);
            for (key, _) in std::env::vars_os() {
                if key.to_string_lossy().starts_with("K3S_LOCAL_AGENT_") {
                    child.env_remove(key);
                }
            }
            let out = child
                .env(CHILD, "1")
                .env("K3S_LOCAL_AGENT_AGENT_PORT", "9200")
                .env("K3S_LOCAL_AGENT_SYNC_INTERVAL", "7")
                .env("K3S_LOCAL_AGENT_NAMESPACE", "from-env")
                .env("K3S_LOCAL_AGENT_NAMES", "off")
                .env("K3S_LOCAL_AGENT_DEMO", "true")
                .output()
                .expect("run the test again");
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{stdout}\n{stderr}");
            assert!(
                stdout.contains("1 passed"),
                "the child ran nothing: {stdout}"
            );
            return;
        }

        #[derive(clap::Parser)]
        struct Run {
            #[command(flatten)]
            settings: Settings,
        }
        let flags = Run::try_parse_from([
            "run",
            "--agent-port",
            "9300",
            "--names",
            "on",
            "--state-dir",
            "/tmp/state",
        ])
        .expect("flags")
        .settings;
        let file: Settings = toml::from_str(
            "agent_port = 9100\nsync_interval = 5\nnamespace = \"from-file\"\n\
             names = \"off\"\nmax_pods = 50\ndemo = false",
        )
        .expect("toml");
        let config = Config::layer(&flags, &file).expect("layered");
        // agent_port: flag 9300, env 9200, file 9100.
        assert_eq!(config.agent_port, 9300);
        // names: flag on, env off, file off.
        assert!(config.names);
        // sync_interval: env 7, file 5.
        assert_eq!(config.sync_interval, Duration::from_secs(7));
        // namespace: env over file.
        assert_eq!(config.cluster.namespace, "from-env");
        // max_pods: the file's; max_event_streams: the default.
        assert_eq!(config.max_pods, 50);
        assert_eq!(config.max_event_streams, DEFAULT_MAX_EVENT_STREAMS);
        // An on-only switch stays on when any layer turns it on.
        assert!(config.demo);

        // The same parse as the derive's, through the matches.
        let matches = <Settings as clap::Args>::augment_args(clap::Command::new("run"))
            .try_get_matches_from(["run"])
            .expect("no flags");
        let env_only = Settings::from_arg_matches(&matches).expect("settings");
        assert_eq!(env_only.agent_port, Some(9200));
        assert_eq!(env_only.max_pods, None);
    }

    #[test]
    fn the_file_beats_the_default() {
        let file: Settings = toml::from_str(
            "no_cluster = true\nforwarding = \"off\"\naddress_block = \"127.77.0.0/16\"\n\
             staging_kube_context = \"stage\"",
        )
        .expect("toml");
        let config = Config::layer(&flags(), &file).expect("layered");
        assert!(!config.cluster.enabled);
        assert!(!config.forwarding);
        assert_eq!(
            config.address_block,
            Some("127.77.0.0/16".parse().expect("block"))
        );
        assert_eq!(config.address_block_note, None);
        assert_eq!(config.staging.context.as_deref(), Some("stage"));
        assert_eq!(config.staging.via, StagingVia::Auto);

        let mut overrides = flags();
        overrides.address_block = Some("127.99.0.0/16".parse().expect("block"));
        let config = Config::layer(&overrides, &file).expect("layered");
        assert_eq!(
            config.address_block,
            Some("127.99.0.0/16".parse().expect("block"))
        );
    }

    #[test]
    fn the_mirror_namespace_is_checked_as_a_namespace() {
        let mut overrides = flags();
        let long = format!("mirror-{}", "n".repeat(53));
        assert_eq!(long.len(), 60);
        overrides.namespace = Some(long.clone());
        let config = Config::layer(&overrides, &FileSettings::default()).expect("60 characters");
        assert_eq!(config.cluster.namespace, long);

        for bad in ["Staging", "-staging", "staging_x", "", &"n".repeat(64)] {
            overrides.namespace = Some(bad.to_owned());
            let err = Config::layer(&overrides, &FileSettings::default()).expect_err(bad);
            assert!(err.to_string().starts_with("invalid namespace: "), "{err}");
            assert!(!err.to_string().contains("pod name"), "{err}");
        }
    }

    #[test]
    fn a_bad_file_is_refused_naming_the_key() {
        let dir = tempfile::tempdir().expect("dir");
        let load = |text: &str| {
            let path = dir.path().join("agent.toml");
            std::fs::write(&path, text).expect("write");
            Settings::load(&path).expect_err(text).to_string()
        };
        let err = load("agent_prot = 8082\n");
        assert!(err.contains("agent.toml"), "{err}");
        assert!(err.contains("agent_prot"), "{err}");
        let err = load("agent_port = \"eighty\"\n");
        assert!(err.contains("agent_port"), "{err}");
        let err = load("name_ports = \"maybe\"\n");
        assert!(err.contains("name_ports"), "{err}");
        // The flag's words: the same FromStr reads both.
        let err = load("address_block = \"10.0.0.0/8\"\n");
        assert!(err.contains("address_block"), "{err}");
        assert!(err.contains("outside 127.0.0.0/8"), "{err}");
        // The file cannot name another file.
        let err = load("config = \"other.toml\"\n");
        assert!(err.contains("config"), "{err}");
    }
}
