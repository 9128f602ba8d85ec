//! The commands besides `status`: `run` the agent, `pods`, `push`,
//! `forward`, `target`, `doctor`, `system-setup` and `token`, each what it
//! does and what it prints.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use k3s_local_agent::config::{Config, RunOverrides};
use k3s_local_agent::model::{StagingVia, TunnelTarget};
use k3s_local_agent::ops::{doctor as checks, system_setup};
use k3s_local_agent::state::Identity;
use k3s_local_agent::Agent;

use super::table::Table;
use super::tunnels::{describe_tunnel, tunnel_rows, COLUMNS};
use crate::{ClientArgs, SetupAction};

/// Hard limit on a clean shutdown after Ctrl-C / SIGTERM.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(5);

pub async fn run(overrides: RunOverrides) -> Result<()> {
    let config = Config::resolve(&overrides)?;
    let with_demo = config.demo;
    let (agent, demo_pods) = k3s_local_agent::launch(config, with_demo).await?;
    if with_demo {
        println!(
            "DEMO MODE: {} demo pods, served through tunnels:",
            demo_pods.len()
        );
        let mut table = Table::new(&COLUMNS);
        for view in agent.pods() {
            for row in tunnel_rows(&view.tunnel) {
                table.row(row);
            }
        }
        for line in table.lines() {
            println!("  {line}");
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

/// Every pod with its tunnels: the pod's id, then its tunnel rows, one
/// table so every pod's columns line up.
pub async fn pods(args: ClientArgs) -> Result<()> {
    let list = super::client(&args)?.pods().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if list.pods.is_empty() {
        println!("no pods: push some with `k3s-local-agent push FILE`, or run with --demo");
        return Ok(());
    }
    let mut aligns = vec![super::table::Align::Left];
    aligns.extend(COLUMNS);
    let mut table = Table::new(&aligns);
    for view in &list.pods {
        for (index, row) in tunnel_rows(&view.tunnel).into_iter().enumerate() {
            let id = if index == 0 {
                view.pod.id.clone()
            } else {
                String::new()
            };
            table.row(std::iter::once(id).chain(row));
        }
    }
    for line in table.lines() {
        println!("{line}");
    }
    Ok(())
}

pub async fn push(file: PathBuf, args: ClientArgs) -> Result<()> {
    let text = if file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        text
    } else {
        std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?
    };
    let mut request: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", file.display()))?;
    let client = super::client(&args)?;
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

pub async fn forward(
    pod_id: &str,
    enabled: bool,
    port: Option<u16>,
    args: ClientArgs,
) -> Result<()> {
    let tunnel = super::client(&args)?
        .set_forwarding(pod_id, enabled, port)
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&tunnel)?);
    } else {
        println!("{}", describe_tunnel(&tunnel));
    }
    Ok(())
}

pub async fn target(
    pod_id: &str,
    target: TunnelTarget,
    via: Option<StagingVia>,
    args: ClientArgs,
) -> Result<()> {
    let tunnel = super::client(&args)?
        .set_target(pod_id, target, via)
        .await?;
    println!("{}", describe_tunnel(&tunnel));
    Ok(())
}

/// Runs `doctor`'s checks on the agent `agent_url` names (`--agent-url`,
/// `K3S_LOCAL_AGENT_URL`), else the one the settings describe; fails when
/// any check does.
pub async fn doctor(settings: &RunOverrides, agent_url: Option<&str>, json: bool) -> Result<()> {
    let config = Config::resolve(settings)?;
    let url = checks::agent_url(agent_url, &config);
    let found = checks::run(&config, &url).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&found)?);
    } else {
        // Fixed widths, not a sized table: scripts and people read the
        // check names at the same place whatever failed.
        for check in &found {
            let mark = if check.ok { "ok" } else { "FAIL" };
            println!("{:<12} {mark:<4}  {}", check.name, check.detail);
        }
    }
    if found.iter().any(|c| !c.ok) {
        bail!("something above needs fixing");
    }
    Ok(())
}

pub fn system_setup(action: SetupAction, root: &Path) -> Result<()> {
    let steps = match action {
        SetupAction::Install => system_setup::install(root)?,
        SetupAction::Remove => system_setup::remove(root)?,
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

pub fn token(state_dir: Option<PathBuf>) -> Result<()> {
    let dir = state_dir
        .or_else(super::default_state_dir)
        .context("no data directory; pass --state-dir")?;
    println!("{}", Identity::read_token(&dir)?);
    Ok(())
}
