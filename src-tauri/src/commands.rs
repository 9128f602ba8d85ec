//! The dashboard's commands: one-line calls into the agent, with typed errors
//! that reach the page as `{kind, message}`.

use k3s_local_agent::model::{Redirection, Snapshot, StagingVia, TunnelTarget};
use k3s_local_agent::{Agent, AgentError};
use serde::Serialize;
use tauri::{AppHandle, State};
use tauri_plugin_opener::OpenerExt;

/// Stops the agent cleanly (listeners, hosts block, last report), then exits.
pub fn quit(app: AppHandle, agent: Agent) {
    crate::window::remember_open_size(&app);
    tauri::async_runtime::spawn(async move {
        agent.shutdown().await;
        app.exit(0);
    });
}

/// Why a command failed, as the page sees it.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("no pod with id {0:?}")]
    UnknownPod(String),
    #[error("pod {0:?} has no local port to open")]
    NoPort(String),
    #[error("cannot open {url}: {message}")]
    Open { url: String, message: String },
    #[error("{0}")]
    Agent(String),
    #[error("cannot hide the window: {0}")]
    Window(String),
}

impl CommandError {
    fn kind(&self) -> &'static str {
        match self {
            Self::UnknownPod(_) => "unknown_pod",
            Self::NoPort(_) => "no_port",
            Self::Open { .. } => "open",
            Self::Agent(_) => "agent",
            Self::Window(_) => "window",
        }
    }
}

impl Serialize for CommandError {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut error = serializer.serialize_struct("CommandError", 2)?;
        error.serialize_field("kind", self.kind())?;
        error.serialize_field("message", &self.to_string())?;
        error.end()
    }
}

impl From<AgentError> for CommandError {
    fn from(err: AgentError) -> Self {
        match err {
            AgentError::UnknownPod(id) => Self::UnknownPod(id),
            other => Self::Agent(other.to_string()),
        }
    }
}

#[tauri::command]
pub async fn snapshot(agent: State<'_, Agent>) -> Result<Snapshot, CommandError> {
    Ok(agent.snapshot())
}

#[tauri::command]
pub async fn set_forwarding(
    agent: State<'_, Agent>,
    pod_id: String,
    enabled: bool,
    port: Option<u16>,
) -> Result<Redirection, CommandError> {
    Ok(agent.set_forwarding(&pod_id, enabled, port).await?)
}

#[tauri::command]
pub async fn set_target(
    agent: State<'_, Agent>,
    pod_id: String,
    target: TunnelTarget,
    via: Option<StagingVia>,
) -> Result<Redirection, CommandError> {
    Ok(agent.set_target(&pod_id, target, via).await?)
}

#[tauri::command]
pub async fn stop_tunnel(agent: State<'_, Agent>, pod_id: String) -> Result<(), CommandError> {
    Ok(agent.stop_tunnel(&pod_id).await?)
}

#[tauri::command]
pub async fn open_pod(
    app: AppHandle,
    agent: State<'_, Agent>,
    pod_id: String,
) -> Result<(), CommandError> {
    open_in_browser(&app, &agent, &pod_id)
}

/// Opens a pod at `http://<name>-staging.localhost:<port>/` in the default
/// browser; shared by the command and the tray menu.
pub fn open_in_browser(app: &AppHandle, agent: &Agent, pod_id: &str) -> Result<(), CommandError> {
    if agent.pod(pod_id).is_none() {
        return Err(CommandError::UnknownPod(pod_id.to_owned()));
    }
    let url = agent
        .pod_url(pod_id)
        .ok_or_else(|| CommandError::NoPort(pod_id.to_owned()))?;
    app.opener()
        .open_url(&url, None::<&str>)
        .map_err(|err| CommandError::Open {
            url,
            message: err.to_string(),
        })
}

/// Hides the dashboard window (Escape), as a popover goes away; the tray
/// brings it back.
#[tauri::command]
pub fn hide_window(window: tauri::Window) -> Result<(), CommandError> {
    crate::window::hide(&window).map_err(|err| CommandError::Window(err.to_string()))
}
