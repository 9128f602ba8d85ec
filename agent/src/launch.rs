//! Starting the whole agent the way every face does (the CLI's `run`, the
//! tray app, the tests): the core first, then its HTTP API on a listener the
//! caller bound, in the mini-redis shape; and, for the faces, the listener
//! on the configured address with the built-in demo when asked.

use std::net::SocketAddr;

use tokio::net::TcpListener;

use crate::agent::{Agent, AgentError};
use crate::config::Config;
use crate::model::PodSpec;
use crate::ops::{Demo, DemoError};

/// Starts the agent, serves its HTTP API on `listener` (bound by the
/// caller, so tests can pass port 0), then brings back the pods on disk.
/// Everything stops with [`Agent::shutdown`].
pub async fn start(config: Config, listener: TcpListener) -> Result<Agent, AgentError> {
    let local_addr = listener.local_addr().map_err(AgentError::Listener)?;
    let agent = Agent::start(config, local_addr).await?;
    crate::api::serve(&agent, listener);
    tracing::info!(
        agent_id = %agent.agent_id(),
        "listening on http://{local_addr}",
    );
    // After the API listens: it answers (`restoring`) however many pods
    // come back from disk.
    agent.restore().await?;
    Ok(agent)
}

/// Why the agent could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(
        "cannot listen on {address}: {source}; is another agent running? \
         Choose another port with --agent-port"
    )]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("invalid demo control plane URL {url}")]
    Url {
        url: String,
        source: <reqwest::Url as std::str::FromStr>::Err,
    },
    #[error(transparent)]
    Demo(#[from] DemoError),
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// Starts the agent on its configured address, the way both faces do: with
/// `with_demo`, behind the built-in stand-in control plane, in the demo's own
/// state dir (its pods never mix with real ones), with the demo pods pushed.
/// Returns the agent and the demo pods (none without the demo).
pub async fn launch(
    mut config: Config,
    with_demo: bool,
) -> Result<(Agent, Vec<PodSpec>), LaunchError> {
    let demo = if with_demo {
        let demo = Demo::bind().await?;
        let url = demo.control_plane_url()?;
        config.control_plane_url = url
            .parse()
            .map_err(|source| LaunchError::Url { url, source })?;
        config.state_dir = config.state_dir.join("demo");
        config.demo = true;
        Some(demo)
    } else {
        None
    };
    let address = SocketAddr::new(config.bind, config.agent_port);
    let listener = TcpListener::bind(address)
        .await
        .map_err(|source| LaunchError::Listen { address, source })?;
    let agent = start(config, listener).await?;
    let pods = match demo {
        Some(demo) => demo.start(&agent).await?,
        None => Vec::new(),
    };
    Ok((agent, pods))
}
