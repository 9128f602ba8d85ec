//! The headless agent's command line: `run` the agent, or talk to a running
//! one (`status`, `pods`, `push`, `forward`, `token`).

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use k3s_local_agent::config::{Config, RunOverrides, DEFAULT_AGENT_PORT};
use k3s_local_agent::model::{
    PortTunnelView, Protocol, Redirection, StagingVia, TunnelState, TunnelTarget, Way,
};
use k3s_local_agent::ops::AgentClient;
use k3s_local_agent::state::Identity;
use k3s_local_agent::Agent;

/// glibc's allocator spent up to 90 ms in one `malloc` building a status
/// report of 921 pods (its bins had filled with the small blocks earlier
/// reports and pushes freed), which alone took the idle agent past half a
/// percent of a core; mimalloc has no such slow path.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Hard limit on a clean shutdown after Ctrl-C / SIGTERM.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(5);

#[derive(Debug, Parser)]
#[command(
    name = "k3s-local-agent",
    version,
    about = "Reach staging Kubernetes pods from your machine: \
    receives pods from a control plane, tunnels each to a local port, names it \
    <name>-staging.local, and reports back."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent (Ctrl-C to stop).
    Run(RunOverrides),
    /// Show the agent's health and tunnel counts.
    Status(ClientArgs),
    /// List the pods the agent holds, with their tunnels.
    Pods(ClientArgs),
    /// Send a PodUpdateRequest (JSON file, or - for stdin) as a control plane would.
    Push {
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Turn forwarding for one pod on or off (every port, or `--port` alone).
    Forward {
        pod_id: String,
        state: OnOff,
        /// One staging port of the pod alone (e.g. 9090), not all of them.
        #[arg(long)]
        port: Option<u16>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Point one pod's tunnel at the staging pod or at its local mirror.
    Target {
        pod_id: String,
        target: TargetArg,
        /// How a staging target is reached: direct (TCP to the pod IP), api
        /// (the staging API server's port-forward) or auto (direct, else the API).
        #[arg(long)]
        via: Option<StagingVia>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Check the running agent (tunnel ports, names, control plane, limits),
    /// the name ports and the local mirror's setup; exits non-zero when
    /// something is broken. Takes the same settings as `run`.
    Doctor {
        #[command(flatten)]
        settings: RunOverrides,
        /// Print the checks as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make (install) or undo (remove) the package's system changes: the
    /// k3slocal NSS module on the hosts line of /etc/nsswitch.conf, and the
    /// bind helper's capability. The package's maintainer scripts run this.
    SystemSetup {
        action: SetupAction,
        /// The root of the system to change.
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Print the bearer token a remote control plane must send.
    Token {
        /// The agent's state dir [default: <data dir>/k3s-local-agent].
        #[arg(long, env = "K3S_LOCAL_AGENT_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TargetArg {
    /// Direct TCP to the staging pod.
    Staging,
    /// The mirror in the local cluster, through the Kubernetes API.
    Local,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SetupAction {
    Install,
    Remove,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Debug, clap::Args)]
struct ClientArgs {
    /// The running agent's address.
    #[arg(long, env = "K3S_LOCAL_AGENT_URL", default_value_t = format!("http://127.0.0.1:{DEFAULT_AGENT_PORT}"))]
    agent_url: String,
    /// Bearer token [default: the one in the state dir, when readable].
    #[arg(long, env = "K3S_LOCAL_AGENT_TOKEN")]
    token: Option<String>,
    /// The agent's state dir, to find the token.
    #[arg(long, env = "K3S_LOCAL_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Print the raw JSON answer.
    #[arg(long)]
    json: bool,
}

impl ClientArgs {
    fn client(&self) -> Result<AgentClient> {
        let token = self.token.clone().or_else(|| {
            let dir = self.state_dir.clone().or_else(default_state_dir)?;
            Identity::read_token(&dir).ok()
        });
        Ok(AgentClient::new(&self.agent_url, token)?)
    }
}

fn default_state_dir() -> Option<PathBuf> {
    Some(dirs::data_dir()?.join("k3s-local-agent"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    k3s_local_agent::init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Run(overrides) => run(overrides).await,
        Command::Status(args) => status(args).await,
        Command::Pods(args) => pods(args).await,
        Command::Push { file, client } => push(file, client).await,
        Command::Forward {
            pod_id,
            state,
            port,
            client,
        } => forward(pod_id, state, port, client).await,
        Command::Target {
            pod_id,
            target,
            via,
            client,
        } => {
            let target = match target {
                TargetArg::Staging => TunnelTarget::Staging,
                TargetArg::Local => TunnelTarget::Local,
            };
            let tunnel = client.client()?.set_target(&pod_id, target, via).await?;
            println!("{}", describe_tunnel(&tunnel));
            Ok(())
        }
        Command::Doctor { settings, json } => {
            let config = Config::resolve(&settings)?;
            let host = if config.bind.is_unspecified() {
                std::net::IpAddr::from([127, 0, 0, 1])
            } else {
                config.bind
            };
            let url = format!(
                "http://{}",
                std::net::SocketAddr::new(host, config.agent_port)
            );
            let token = Identity::read_token(&config.state_dir).ok();
            let client = AgentClient::new(&url, token)?;
            let mut checks = k3s_local_agent::ops::doctor::agent(&config, &client).await;
            checks.push(k3s_local_agent::ops::doctor::name_ports(&config));
            checks.extend(k3s_local_agent::ops::doctor::diagnose(&config.cluster).await);
            // The staging cluster, for the namespaces the agent holds pods in.
            let namespaces: Vec<String> = client
                .status()
                .await
                .map(|status| {
                    let held: std::collections::BTreeSet<String> = status
                        .redirections
                        .values()
                        .map(|tunnel| tunnel.namespace.clone())
                        .collect();
                    held.into_iter().collect()
                })
                .unwrap_or_default();
            checks.extend(
                k3s_local_agent::ops::staging_doctor::diagnose(&config.staging, &namespaces).await,
            );
            if json {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else {
                for check in &checks {
                    let mark = if check.ok { "ok" } else { "FAIL" };
                    println!("{:<12} {mark:<4}  {}", check.name, check.detail);
                }
            }
            if checks.iter().any(|c| !c.ok) {
                bail!("something above needs fixing");
            }
            Ok(())
        }
        Command::SystemSetup { action, root } => {
            use k3s_local_agent::ops::system_setup;
            let steps = match action {
                SetupAction::Install => system_setup::install(&root)?,
                SetupAction::Remove => system_setup::remove(&root)?,
            };
            for step in steps {
                let word = if step.changed {
                    "changed"
                } else {
                    "already so"
                };
                println!("{word:<10}  {}", step.what);
            }
            Ok(())
        }
        Command::Token { state_dir } => {
            let dir = state_dir
                .or_else(default_state_dir)
                .context("no data directory; pass --state-dir")?;
            println!("{}", Identity::read_token(&dir)?);
            Ok(())
        }
    }
}

async fn run(overrides: RunOverrides) -> Result<()> {
    let config = Config::resolve(&overrides)?;
    let with_demo = config.demo;
    let (agent, demo_pods) = k3s_local_agent::launch(config, with_demo).await?;
    if with_demo {
        println!(
            "DEMO MODE: {} demo pods, served through tunnels:",
            demo_pods.len()
        );
        for view in agent.pods() {
            println!("  {}", describe_tunnel(&view.tunnel));
        }
    }

    wait_for_stop_signal(&agent).await;
    tracing::info!("stopping");
    if tokio::time::timeout(SHUTDOWN_LIMIT, agent.shutdown())
        .await
        .is_err()
    {
        bail!("shutdown took longer than {SHUTDOWN_LIMIT:?}");
    }
    Ok(())
}

async fn wait_for_stop_signal(agent: &Agent) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                    _ = agent.stopped() => {}
                }
                return;
            }
            Err(err) => tracing::warn!(error = %err, "cannot watch for SIGTERM"),
        }
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = agent.stopped() => {}
    }
}

fn describe_tunnel(tunnel: &Redirection) -> String {
    let local = match tunnel.local_port {
        Some(port) => format!("http://{}:{port}/", tunnel.localhost_name),
        None => "-".to_owned(),
    };
    let state = match tunnel.status {
        TunnelState::Active => "active",
        TunnelState::Stopped => "stopped",
        TunnelState::Failed => "FAILED",
    };
    let to = match (tunnel.target, tunnel.way) {
        (TunnelTarget::Local, _) => format!("local mirror :{}", tunnel.staging_port),
        (TunnelTarget::Staging, Way::Api) => format!(
            "{}/{}:{} via staging API",
            tunnel.namespace, tunnel.staging_pod_name, tunnel.staging_port
        ),
        (TunnelTarget::Staging, _) => format!(
            "{}:{} via staging (direct)",
            tunnel.staging_pod_ip, tunnel.staging_port
        ),
    };
    let mut line = format!(
        "{:<24} {local:<48} -> {to}  {state}",
        tunnel.staging_pod_name
    );
    if let Some(error) = &tunnel.error {
        line.push_str(&format!("  ({error})"));
    }
    // The pod's other ports, one line each under it.
    for port in tunnel.ports.iter().filter(|port| {
        !(port.staging_port == tunnel.staging_port && port.protocol == Protocol::Tcp)
    }) {
        line.push('\n');
        line.push_str(&describe_port(tunnel, port));
    }
    line
}

/// One of a pod's ports beyond its first: where it listens and its state.
fn describe_port(tunnel: &Redirection, port: &PortTunnelView) -> String {
    let local = match port.local_port {
        Some(number) => format!("http://{}:{number}/", tunnel.localhost_name),
        None => "-".to_owned(),
    };
    let label = port_label(port);
    let state = match (port.protocol, port.status) {
        (Protocol::Tcp, TunnelState::Failed) => "FAILED",
        (Protocol::Tcp, status) => status.as_str(),
        _ => "not forwarded",
    };
    let mut line = format!("  {label:<22} {local:<48}    {state}");
    if let Some(error) = &port.error {
        line.push_str(&format!("  ({error})"));
    }
    line
}

/// `:9090 metrics` / `:53/UDP dns`: a port as the tables name it.
fn port_label(port: &PortTunnelView) -> String {
    format!(":{}", port.label())
}

async fn status(args: ClientArgs) -> Result<()> {
    let client = args.client()?;
    let snapshot = client.snapshot().await?;
    let status = client.status().await?;
    if args.json {
        let both = serde_json::json!({
            "health": snapshot.health,
            "status": status,
            "ports": snapshot.ports,
            "activity": snapshot.pods.iter().map(|v| (v.pod.id.clone(), v.activity.clone()))
                .collect::<std::collections::BTreeMap<_, _>>(),
        });
        println!("{}", serde_json::to_string_pretty(&both)?);
        return Ok(());
    }
    let health = &snapshot.health;
    println!(
        "agent {} (pid {}){}",
        health.agent_id,
        health.pid,
        if health.demo { " (DEMO MODE)" } else { "" }
    );
    let (tried, failed) = snapshot.pods.iter().fold((0, 0), |(tried, failed), view| {
        (
            tried + view.activity.connections,
            failed + view.activity.errors,
        )
    });
    let error_rate = if tried == 0 {
        "no connections in the last minute".to_owned()
    } else {
        format!(
            "{:.1} % of {tried} connections failed in the last minute",
            100.0 * failed as f64 / tried as f64
        )
    };
    println!(
        "tunnels: {} total, {} active, {} stopped, {} failed; ports {}/{} in use; {error_rate}",
        status.total_redirections,
        status.active_redirections,
        status.stopped_redirections,
        status.failed_redirections,
        snapshot.ports.used,
        snapshot.ports.size,
    );
    let cp = &health.control_plane;
    let reach = match cp.reachable {
        Some(true) => "reachable",
        Some(false) => "UNREACHABLE",
        None => "not yet contacted",
    };
    println!("control plane {}: {reach}", cp.url);
    if let Some(at) = cp.last_sync {
        println!("last sync: {at}");
    }
    if health.names.mode == k3s_local_agent::model::NamesMode::Off {
        println!("names: off (--names off): addresses are localhost:<range port>");
    } else {
        println!("names: {}", health.names.hosts_file);
    }
    if !health.forwarding {
        println!(
            "forwarding: off (--forwarding off): pods are held, mirrored and reported; no port listens"
        );
    }
    if let Some(warning) = &health.names.warning {
        println!("warning: {warning}");
    }
    if snapshot.pods.is_empty() {
        return Ok(());
    }
    println!();
    println!(
        "{:<24} {:>6} {:>9} {:<8} {:>11} {:>19} {:>17} {:>6}",
        "POD",
        "PORT",
        "NAME PORT",
        "STATE",
        "OPEN/TOTAL",
        "TO/FROM POD",
        "CONNECT P50/P99",
        "ERRORS"
    );
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
    for view in &snapshot.pods {
        let (tunnel, activity) = (&view.tunnel, &view.activity);
        println!(
            "{:<24} {:>6} {:>9} {:<8} {:>11} {:>19} {:>17} {:>6}",
            view.pod.name,
            tunnel
                .local_port
                .map_or_else(|| "-".to_owned(), |p| p.to_string()),
            tunnel
                .name_port
                .map_or_else(|| "-".to_owned(), |p| format!(":{p}")),
            tunnel.status.as_str(),
            format!("{}/{}", tunnel.open_connections, tunnel.total_connections),
            format!(
                "{}/{}",
                human_bytes(tunnel.bytes_to_pod),
                human_bytes(tunnel.bytes_from_pod)
            ),
            format!(
                "{}/{} ms",
                ms(activity.connect_p50_ms),
                ms(activity.connect_p99_ms)
            ),
            activity.errors,
        );
        // A pod with several ports: one row more per port, counters its own.
        if tunnel.ports.len() > 1 {
            for port in &tunnel.ports {
                let state = match port.protocol {
                    Protocol::Tcp => port.status.as_str(),
                    _ => "not fwd",
                };
                println!(
                    "{:<24} {:>6} {:>9} {:<8} {:>11} {:>19} {:>17} {:>6}",
                    format!("  {}", port_label(port)),
                    port.local_port
                        .map_or_else(|| "-".to_owned(), |p| p.to_string()),
                    port.name_port
                        .map_or_else(|| "-".to_owned(), |p| format!(":{p}")),
                    state,
                    format!("{}/{}", port.open_connections, port.total_connections),
                    format!(
                        "{}/{}",
                        human_bytes(port.bytes_to_pod),
                        human_bytes(port.bytes_from_pod)
                    ),
                    "",
                    "",
                );
            }
        }
    }
    Ok(())
}

/// Bytes in the largest unit that keeps the number small.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

async fn pods(args: ClientArgs) -> Result<()> {
    let list = args.client()?.pods().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if list.pods.is_empty() {
        println!("no pods: push some with `k3s-local-agent push FILE`, or run with --demo");
    }
    for view in &list.pods {
        println!("{:<20} {}", view.pod.id, describe_tunnel(&view.tunnel));
    }
    Ok(())
}

async fn push(file: PathBuf, args: ClientArgs) -> Result<()> {
    let text = if file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        text
    } else {
        std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?
    };
    let mut request: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", file.display()))?;
    let client = args.client()?;
    // A file without an agent id is meant for whatever agent we talk to.
    if let Some(object) = request.as_object_mut() {
        if !object.contains_key("agent_id") {
            let health = client.health().await?;
            object.insert("agent_id".into(), health.agent_id.into());
        }
    }
    let (code, answer) = client.push(&request).await?;
    println!("{}", serde_json::to_string_pretty(&answer)?);
    if !code.is_success() {
        bail!("agent answered {code}");
    }
    Ok(())
}

async fn forward(pod_id: String, state: OnOff, port: Option<u16>, args: ClientArgs) -> Result<()> {
    let enabled = matches!(state, OnOff::On);
    let tunnel = args
        .client()?
        .set_forwarding(&pod_id, enabled, port)
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&tunnel)?);
    } else {
        println!("{}", describe_tunnel(&tunnel));
    }
    Ok(())
}
