//! `k3s-local-agent doctor`: checks the running agent (answering, each
//! tunnel's port ours, range use, names resolving, control plane, open-file
//! limit), the name ports, and the local mirror's setup (kubeconfig, context,
//! API, namespace, permissions); says what it found and, for what is wrong,
//! what to do.

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

fn kind_hint(context: &str) -> String {
    match context.strip_prefix("kind-") {
        Some(cluster) => format!(" Create it with: kind create cluster --name {cluster}"),
        None => String::new(),
    }
}

/// Checks the agent that `config` describes, through its API: that it
/// answers, that each tunnel's port is its own (and who holds it when not),
/// how full the port range is, that names resolve to the pods' addresses,
/// that the control plane takes reports, and the open-file limit.
pub async fn agent(
    config: &crate::config::Config,
    client: &crate::ops::client::AgentClient,
) -> Vec<Check> {
    let health = match client.health().await {
        Ok(health) => health,
        // Something answers, but it is not this user's: say whose it is.
        Err(err @ crate::ops::ClientError::ForeignListener { .. }) => {
            return vec![Check::fail("agent", err.to_string())]
        }
        Err(err) => {
            return vec![Check::fail(
                "agent",
                format!(
                    "not answering ({err}). Start it: `k3s-local-agent run` (or the tray app) \
                     with the same settings as this command"
                ),
            )]
        }
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
