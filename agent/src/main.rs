//! The headless agent's command line, its arguments: `run` the agent, or
//! talk to a running one (`status`, `pods`, `push`, `forward`, `target`,
//! `doctor`, `token`), or make the package's system changes. What each
//! command does and prints is in `cli/`.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand, ValueEnum};
use k3s_local_agent::config::{RunOverrides, DEFAULT_AGENT_PORT};
use k3s_local_agent::model::{StagingVia, TunnelTarget};

/// glibc's allocator spent up to 90 ms in one `malloc` building a status
/// report of 921 pods (its bins had filled with the small blocks earlier
/// reports and pushes freed), which alone took the idle agent past half a
/// percent of a core; mimalloc has no such slow path.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        #[arg(value_parser = target_parser())]
        target: TunnelTarget,
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
        /// The running agent's address [default: the one the settings give
        /// it, as `run` would listen].
        #[arg(long, env = "K3S_LOCAL_AGENT_URL")]
        agent_url: Option<String>,
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

/// `staging` or `local`, parsed into the model's own `TunnelTarget` (the
/// words are its `as_str`), each with its help.
fn target_parser() -> impl TypedValueParser<Value = TunnelTarget> {
    let help = |target: TunnelTarget| match target {
        TunnelTarget::Staging => "The staging pod, the way --via says",
        TunnelTarget::Local => "The mirror in the local cluster, through the Kubernetes API",
    };
    PossibleValuesParser::new(
        [TunnelTarget::Staging, TunnelTarget::Local]
            .map(|target| PossibleValue::new(target.as_str()).help(help(target))),
    )
    // The possible values admit only the target's own words, so parse finds one.
    .map(|word| TunnelTarget::parse(&word).unwrap_or_default())
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum SetupAction {
    Install,
    Remove,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ClientArgs {
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
        Command::Run(overrides) => cli::run(overrides).await,
        Command::Status(args) => cli::status(args).await,
        Command::Pods(args) => cli::pods(args).await,
        Command::Push { file, client } => cli::push(file, client).await,
        Command::Forward {
            pod_id,
            state,
            port,
            client,
        } => cli::forward(&pod_id, matches!(state, OnOff::On), port, client).await,
        Command::Target {
            pod_id,
            target,
            via,
            client,
        } => cli::target(&pod_id, target, via, client).await,
        Command::Doctor {
            settings,
            agent_url,
            json,
        } => cli::doctor(&settings, agent_url.as_deref(), json).await,
        Command::SystemSetup { action, root } => cli::system_setup(action, &root),
        Command::Token { state_dir } => cli::token(state_dir),
    }
}
