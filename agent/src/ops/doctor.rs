//! `k3s-local-agent doctor`: checks the running agent (answering, each
//! tunnel's port ours, range use, names resolving, control plane, open-file
//! limit), the name ports, and the local mirror's setup (kubeconfig, context,
//! API, namespace, permissions); says what it found and, for what is wrong,
//! what to do. Where it looks for the agent: `--agent-url` (or
//! `K3S_LOCAL_AGENT_URL`), else the address the run settings give it, as
//! `status` finds it. The local cluster is reached through the agent's own
//! connection (`cluster::read_kubeconfig`, `cluster::client_for`), so what
//! `doctor` meets is what the agent would.

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};

use crate::cluster::{client_for, read_kubeconfig, ClusterError};
use crate::config::{ClusterSettings, Config};
use crate::ops::client::{AgentClient, ClientError};
use crate::state::Identity;

/// The verbs the mirror needs on pods, and on namespaces.
const POD_VERBS: [&str; 5] = ["get", "list", "watch", "patch", "delete"];

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

impl Check {
    pub(crate) fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            ok: true,
            detail: detail.into(),
        }
    }

    pub(crate) fn fail(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            ok: false,
            detail: detail.into(),
        }
    }
}

/// The agent's address as `doctor` looks for it: `explicit` (`--agent-url`,
/// else `K3S_LOCAL_AGENT_URL`; clap reads both, the flag first), else the
/// run settings' listener (its bind address, loopback when it binds every
/// address, and its port).
pub fn agent_url(explicit: Option<&str>, config: &Config) -> String {
    if let Some(url) = explicit {
        return url.to_owned();
    }
    let host = if config.bind.is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        config.bind
    };
    format!(
        "http://{}",
        std::net::SocketAddr::new(host, config.agent_port)
    )
}

/// Every check, in order: the agent at `agent_url` (with the token in the
/// state dir, when readable), the name ports, the local cluster, and the
/// staging cluster for the namespaces the agent holds pods in.
pub async fn run(config: &Config, agent_url: &str) -> Result<Vec<Check>, ClientError> {
    let token = Identity::read_token(&config.state_dir).ok();
    let client = AgentClient::new(agent_url, token)?;
    let mut checks = agent(config, &client, loopback_port(agent_url)).await;
    checks.push(name_ports(config));
    checks.extend(diagnose(&config.cluster).await);
    // An agent that does not answer holds no namespaces: the staging
    // checks then stop at the context and the API.
    let namespaces: Vec<String> = match client.status().await {
        Ok(status) => {
            let held: std::collections::BTreeSet<String> = status
                .redirections
                .into_values()
                .map(|tunnel| tunnel.namespace)
                .collect();
            held.into_iter().collect()
        }
        Err(_) => Vec::new(),
    };
    checks.extend(crate::ops::staging_doctor::diagnose(&config.staging, &namespaces).await);
    Ok(checks)
}

/// The port of a URL on this machine (a loopback address or `localhost`):
/// only there can the process holding it be named.
fn loopback_port(url: &str) -> Option<u16> {
    let url = reqwest::Url::parse(url).ok()?;
    let host = url.host_str()?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let local = bare == "localhost"
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback());
    local.then(|| url.port_or_known_default()).flatten()
}

/// The agent check when the agent did not answer: who holds its port when
/// something does (a program that is not the agent, or an agent that does
/// not answer as one), else how to start it.
fn not_answering(err: &ClientError, port: Option<u16>) -> Check {
    let holders: Vec<String> = port
        .map(crate::ops::sockets::listeners_on)
        .unwrap_or_default()
        .iter()
        .map(ToString::to_string)
        .collect();
    // What answered, in a few words: an HTTP server's error page can be a
    // whole document, which has no place on a check's line.
    let answer = match err {
        ClientError::Api { status, .. } => format!("it answers /health with {status}"),
        ClientError::Decode(_) => "its answer to /health is not the agent's".to_owned(),
        other => other.to_string(),
    };
    match port {
        Some(port) if !holders.is_empty() => Check::fail(
            "agent",
            format!(
                "port {port} is held by {}, which does not answer as the agent does ({answer}). Stop \
                 it, or start the agent on another port (`k3s-local-agent run --agent-port`) \
                 and point `--agent-url` at it",
                holders.join(", ")
            ),
        ),
        _ => Check::fail(
            "agent",
            format!(
                "not answering ({err}). Start it: `k3s-local-agent run` (or the tray app) \
                 with the same settings as this command"
            ),
        ),
    }
}

fn kind_hint(context: &str) -> String {
    match context.strip_prefix("kind-") {
        Some(cluster) => format!(" Create it with: kind create cluster --name {cluster}"),
        None => String::new(),
    }
}

/// Checks the agent `client` talks to, through its API: that it answers
/// (who holds `port` when what answers is not the agent), that each
/// tunnel's port is its own (and who holds it when not), how full the port
/// range is, that names resolve to the pods' addresses, that the control
/// plane takes reports, and the open-file limit.
async fn agent(config: &Config, client: &AgentClient, port: Option<u16>) -> Vec<Check> {
    let health = match client.health().await {
        Ok(health) => health,
        // Something answers, but it is not this user's: say whose it is.
        Err(err @ ClientError::ForeignListener { .. }) => {
            return vec![Check::fail("agent", err.to_string())]
        }
        Err(err) => return vec![not_answering(&err, port)],
    };
    let status = match client.status().await {
        Ok(status) => status,
        Err(err) => {
            return vec![Check::fail(
                "agent",
                format!("answers /health but not the status: {err}"),
            )]
        }
    };
    let mut checks = vec![Check::ok(
        "agent",
        format!(
            "answering (pid {}, version {}, {} pods)",
            health.pid, health.version, health.pod_count
        ),
    )];
    if health.forwarding {
        checks.extend(tunnel_ports(&status, health.pid));
    } else {
        checks.push(Check::ok(
            "tunnels",
            format!(
                "forwarding is off (--forwarding off): {} pods held, mirrored and reported; \
                 no port listens",
                health.pod_count
            ),
        ));
    }
    checks.push(range_use(config, &status));
    checks.push(names(&health, &status).await);
    checks.push(control_plane(&health));
    if let Some(staging) = &health.staging {
        checks.push(crate::ops::staging_doctor::agent_view(staging));
    }
    checks.push(open_files(health.pid, each_port(&status).count()));
    checks
}

/// One tunnelled port of a pod, as the checks see it.
struct PortCheck<'a> {
    /// The pod's id for its first port, `<id> port <n>` for the others.
    label: String,
    /// What `forward` takes to toggle this port: `<id>` or `<id> --port <n>`.
    toggle: String,
    local_port: Option<u16>,
    state: crate::model::TunnelState,
    error: Option<&'a str>,
}

/// Every tunnelled port of every pod.
fn each_port(status: &crate::model::StatusResponse) -> impl Iterator<Item = PortCheck<'_>> {
    status.redirections.iter().flat_map(|(id, tunnel)| {
        let tcp: Vec<_> = tunnel
            .ports
            .iter()
            .filter(|port| port.protocol == crate::model::Protocol::Tcp)
            .collect();
        // An agent that lists no ports (older than per-port tunnels): its one.
        if tcp.is_empty() {
            return vec![PortCheck {
                label: id.clone(),
                toggle: id.clone(),
                local_port: tunnel.local_port,
                state: tunnel.status,
                error: tunnel.error.as_deref(),
            }];
        }
        tcp.into_iter()
            .map(|port| {
                let (label, toggle) = if port.staging_port == tunnel.staging_port {
                    (id.clone(), id.clone())
                } else {
                    (
                        format!("{id} port {}", port.staging_port),
                        format!("{id} --port {}", port.staging_port),
                    )
                };
                PortCheck {
                    label,
                    toggle,
                    local_port: port.local_port,
                    state: port.status,
                    error: port.error.as_deref(),
                }
            })
            .collect()
    })
}

/// Each tunnel's port: listening and ours when forwarding, free for it when
/// not; who holds it otherwise.
fn tunnel_ports(status: &crate::model::StatusResponse, agent_pid: u32) -> Vec<Check> {
    use crate::model::TunnelState;
    let mut problems = Vec::new();
    let mut ports = 0;
    for PortCheck {
        label: id,
        toggle,
        local_port,
        state,
        error,
    } in each_port(status)
    {
        ports += 1;
        let Some(port) = local_port else {
            problems.push(Check::fail(
                "tunnel",
                format!("{id} has no port: {}", error.unwrap_or("none free")),
            ));
            continue;
        };
        let holders = crate::ops::sockets::listeners_on(port);
        let others: Vec<String> = holders
            .iter()
            .filter(|h| h.pid != agent_pid)
            .map(ToString::to_string)
            .collect();
        match state {
            TunnelState::Active if !others.is_empty() => problems.push(Check::fail(
                "tunnel",
                format!(
                    "{id}: port {port} is also held by {}; stop it or move the pod (`k3s-local-agent forward {toggle} off` then `on`)",
                    others.join(", ")
                ),
            )),
            // Asked of the kernel's socket table, not of the holders found:
            // another user's process hides its descriptors from us.
            TunnelState::Active if cfg!(target_os = "linux") && !crate::ops::sockets::is_listening(port) => {
                problems.push(Check::fail(
                    "tunnel",
                    format!("{id}: port {port} is not listening; turn it off and on again"),
                ))
            }
            TunnelState::Stopped if !others.is_empty() => problems.push(Check::fail(
                "tunnel",
                format!(
                    "{id}: its port {port} is held by {} while forwarding is off; turning it on \
                     will move the pod to another port (or stop that process first)",
                    others.join(", ")
                ),
            )),
            TunnelState::Failed => problems.push(Check::fail(
                "tunnel",
                format!(
                    "{id}: {}{}",
                    error.unwrap_or("failed"),
                    if others.is_empty() {
                        String::new()
                    } else {
                        format!(" (port {port} held by {})", others.join(", "))
                    }
                ),
            )),
            _ => {}
        }
    }
    if problems.is_empty() {
        vec![Check::ok(
            "tunnels",
            format!(
                "{} pods, {ports} tunnelled ports, every active port held by the agent alone; {}",
                status.redirections.len(),
                ways_in_use(status)
            ),
        )]
    } else {
        problems
    }
}

/// How many pods go each way now: "2 via staging API, 1 via mirror".
fn ways_in_use(status: &crate::model::StatusResponse) -> String {
    let mut counts: std::collections::BTreeMap<&'static str, usize> = Default::default();
    for tunnel in status.redirections.values() {
        *counts.entry(tunnel.way.describe()).or_default() += 1;
    }
    if counts.is_empty() {
        return "no pods held".to_owned();
    }
    counts
        .iter()
        .map(|(way, count)| format!("{count} {way}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn range_use(config: &crate::config::Config, status: &crate::model::StatusResponse) -> Check {
    let range = config.port_range;
    let size = range.len();
    let used = each_port(status)
        .filter(|port| port.local_port.is_some_and(|p| range.contains(p)))
        .count();
    let share = used * 100 / size.max(1);
    let detail = format!("{used} of {size} ports of {range} in use ({share} %)");
    if used >= size {
        Check::fail(
            "port range",
            format!("{detail}: full; widen it with --port-range"),
        )
    } else if share >= 90 {
        Check::ok(
            "port range",
            format!("{detail}: nearly full; widen it with --port-range"),
        )
    } else {
        Check::ok("port range", detail)
    }
}

/// Where glibc's clients find nscd.
const NSCD_SOCKET: &str = "/var/run/nscd/socket";

/// Names resolve, through the system resolver, to each pod's address.
async fn names(
    health: &crate::model::HealthResponse,
    status: &crate::model::StatusResponse,
) -> Check {
    if health.names.mode == crate::model::NamesMode::Off {
        return Check::ok("names", health.names.why.clone());
    }
    if !health.names.system_wide {
        return Check::ok(
            "names",
            format!(
                "limited: names go to {}, which the system resolver does not read ({}). \
                 Install the package: its NSS module gives this user system-wide names with \
                 no root. Browsers still reach <name>-staging.localhost",
                health.names.hosts_file, health.names.why
            ),
        );
    }
    let nss = health.names.mode == crate::model::NamesMode::NssModule;
    if let Some(problem) = health.names.warning.as_ref().filter(|_| nss) {
        // Names left out past the module's size, or no lock: the agent
        // said what it could not do.
        return Check::fail("names", problem.clone());
    }
    if nss && std::path::Path::new(NSCD_SOCKET).exists() {
        // nscd's cache is shared by every user; the module answers it
        // nothing, and programs that ask nscd first get nothing back.
        return Check::fail(
            "names",
            format!(
                "nscd runs ({NSCD_SOCKET}) and caches host names for every user, so this \
                 user's names do not resolve through it: set `enable-cache hosts no` in \
                 /etc/nscd.conf and restart nscd"
            ),
        );
    }
    let mut wrong = Vec::new();
    let mut checked = 0;
    // A paused pod's names are withdrawn, and through the NSS module a pod
    // without an address of its own has none: only the others must resolve.
    let named = status.redirections.values().filter(|tunnel| {
        tunnel.status == crate::model::TunnelState::Active && (tunnel.address.is_some() || !nss)
    });
    for tunnel in named.take(20) {
        let expected = tunnel
            .address
            .map_or(std::net::IpAddr::from([127, 0, 0, 1]), std::net::IpAddr::V4);
        checked += 1;
        match tokio::net::lookup_host((tunnel.dns_name.as_str(), 0)).await {
            Ok(found) => {
                let found: Vec<std::net::IpAddr> = found.map(|a| a.ip()).collect();
                if !found.contains(&expected) {
                    wrong.push(format!(
                        "{} resolves to {found:?}, not {expected}",
                        tunnel.dns_name
                    ));
                }
            }
            Err(err) => wrong.push(format!("{} does not resolve: {err}", tunnel.dns_name)),
        }
    }
    if wrong.is_empty() {
        Check::ok(
            "names",
            format!(
                "{checked} names resolve to their pods, through {} ({})",
                health.names.mode.describe(),
                health.names.hosts_file
            ),
        )
    } else {
        Check::fail(
            "names",
            format!(
                "{}; is something else managing {}?",
                wrong.join("; "),
                health.names.hosts_file
            ),
        )
    }
}

fn control_plane(health: &crate::model::HealthResponse) -> Check {
    let cp = &health.control_plane;
    match cp.reachable {
        Some(true) => Check::ok("control plane", format!("{} takes our reports", cp.url)),
        Some(false) => Check::fail(
            "control plane",
            format!(
                "{} does not take our reports ({}); check --control-plane-url and that it runs",
                cp.url,
                cp.last_error.as_deref().unwrap_or("unreachable")
            ),
        ),
        None => Check::ok("control plane", format!("{}: no report sent yet", cp.url)),
    }
}

/// The agent's open-file limit against what its tunnels hold now.
fn open_files(pid: u32, tunnels: usize) -> Check {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let soft: Option<u64> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok());
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .ok();
    match (soft, open) {
        (Some(limit), Some(open)) => {
            let detail =
                format!("{open} of {limit} open ({tunnels} tunnels; each connection takes two)");
            if (open as u64) * 10 >= limit * 9 {
                Check::fail(
                    "open files",
                    format!("{detail}: nearly out; raise the hard limit (`ulimit -Hn`, or LimitNOFILE= for a service)"),
                )
            } else {
                Check::ok("open files", detail)
            }
        }
        _ => Check::ok(
            "open files",
            "cannot read the agent's limits (not Linux, or another user's process)",
        ),
    }
}

/// Whether pods' own ports below 1024 (80 for most) can listen on their
/// addresses for this binary, and if not, the one command that allows it.
/// Without it names still work with the range port, so this is never a
/// failure, only a limit worth knowing.
pub fn name_ports(config: &crate::config::Config) -> Check {
    if let Some(note) = &config.address_block_note {
        return Check::fail("name ports", note.clone());
    }
    let Some(block) = config.address_block.filter(|_| config.name_ports) else {
        return Check::ok(
            "name ports",
            "off (--name-ports off): names point at the tunnels' host",
        );
    };
    let Some(address) = block.allocate("doctor", None, &Default::default()) else {
        return Check::fail("name ports", format!("no address in {block}"));
    };
    let probe = std::net::SocketAddr::from((address, 80));
    // The same path a tunnel takes: a direct bind, else the bind helper.
    let ports = crate::tunnel::AddressPorts::new(config.bind_helper.clone());
    let how = match &config.bind_helper {
        Some(helper) => format!(
            " (through the bind helper {} when needed)",
            helper.display()
        ),
        None => String::new(),
    };
    match ports.bind(probe) {
        Ok(_) => Check::ok(
            "name ports",
            format!(
                "pods get their own address in {block} (this user's own) and their own port \
                 there (port 80 can listen{how})"
            ),
        ),
        // Without the privilege (or the alias) names still work with the
        // range port: a limit worth knowing, not a failure.
        Err(why) => Check::ok("name ports", format!("limited: {why}")),
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
    let (kubeconfig, source) = match read_kubeconfig(settings) {
        Ok(read) => read,
        Err(err) => {
            checks.push(Check::fail(
                "kubeconfig",
                format!("{err}.{}", kind_hint(&settings.context)),
            ));
            return checks;
        }
    };
    checks.push(Check::ok(
        "kubeconfig",
        format!("{source}: {} context(s)", kubeconfig.contexts.len()),
    ));
    // Kept for the words when the context is missing: the client takes the
    // kubeconfig.
    let known: Vec<String> = kubeconfig.contexts.iter().map(|c| c.name.clone()).collect();
    let client = match client_for(kubeconfig, settings).await {
        Ok(client) => {
            checks.push(Check::ok("context", settings.context.clone()));
            client
        }
        Err(ClusterError::ContextMissing { .. }) => {
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
        Err(err) => {
            checks.push(Check::ok("context", settings.context.clone()));
            checks.push(Check::fail("api", err.to_string()));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FileSettings, RunOverrides};

    fn config(agent_port: u16, bind: Option<std::net::IpAddr>) -> Config {
        let flags = RunOverrides {
            state_dir: Some(std::path::PathBuf::from("/tmp/state")),
            agent_port: Some(agent_port),
            bind,
            ..RunOverrides::default()
        };
        Config::layer(&flags, &FileSettings::default()).expect("config")
    }

    #[test]
    fn the_agent_url_given_beats_the_run_settings() {
        let config = config(9123, None);
        assert_eq!(
            agent_url(Some("http://127.0.0.1:7000"), &config),
            "http://127.0.0.1:7000"
        );
        assert_eq!(agent_url(None, &config), "http://127.0.0.1:9123");
    }

    #[test]
    fn the_run_settings_give_the_bound_address_loopback_for_every_address() {
        let every = config(9124, Some(std::net::IpAddr::from([0, 0, 0, 0])));
        assert_eq!(agent_url(None, &every), "http://127.0.0.1:9124");
        let one = config(9125, Some(std::net::IpAddr::from([127, 0, 0, 2])));
        assert_eq!(agent_url(None, &one), "http://127.0.0.2:9125");
    }

    #[test]
    fn only_a_port_on_this_machine_has_a_holder_to_name() {
        assert_eq!(loopback_port("http://127.0.0.1:8082"), Some(8082));
        assert_eq!(loopback_port("http://localhost:8083/"), Some(8083));
        assert_eq!(loopback_port("http://[::1]:8084"), Some(8084));
        assert_eq!(loopback_port("http://localhost"), Some(80));
        assert_eq!(loopback_port("http://10.0.0.5:8082"), None);
        assert_eq!(loopback_port("http://agent.example:8082"), None);
        assert_eq!(loopback_port("not a url"), None);
    }
}
