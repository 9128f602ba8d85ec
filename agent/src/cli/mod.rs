//! What each command of the CLI does and prints: `main.rs` parses the
//! arguments and dispatches here. `status` has a file of its own, the tables
//! and sizes one (`table`), a pod's tunnel rows one (`tunnels`); the other
//! commands, short, are in `commands`.

mod commands;
mod status;
mod table;
mod tunnels;

use std::path::PathBuf;

use anyhow::Result;
use k3s_local_agent::ops::AgentClient;
use k3s_local_agent::state::Identity;

pub use commands::{doctor, forward, pods, push, run, system_setup, target, token};
pub use status::status;

use crate::ClientArgs;

/// A client of the agent the arguments name, with their token, else the
/// one in the state dir when readable.
fn client(args: &ClientArgs) -> Result<AgentClient> {
    let token = args.token.clone().or_else(|| {
        let dir = args.state_dir.clone().or_else(default_state_dir)?;
        Identity::read_token(&dir).ok()
    });
    Ok(AgentClient::new(&args.agent_url, token)?)
}

/// Where the agent keeps its state when no `--state-dir` says otherwise.
fn default_state_dir() -> Option<PathBuf> {
    Some(dirs::data_dir()?.join("k3s-local-agent"))
}
