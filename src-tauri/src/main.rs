//! The desktop app: hosts the agent in-process and shows it as a tray icon,
//! a dashboard window and notifications. Business logic lives in the agent
//! crate; this crate only wires it to the desktop.

#![cfg_attr(not(debug_assertions), windows_subsystem = "windows")]

mod commands;
mod live;
mod notify;
mod preferences;
mod tray;
mod window;

use std::process::ExitCode;

use clap::Parser;
use k3s_local_agent::config::{Config, RunOverrides};
use k3s_local_agent::Agent;
use tauri::{Manager, RunEvent};

use crate::preferences::Preferences;

/// The same allocator as the headless agent, for the same reason: glibc's
/// malloc could spend tens of milliseconds building one status report.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The same settings as `k3s-local-agent run`; with no control plane
/// configured, the app runs the built-in demo so a first run shows tunnels.
#[derive(Debug, Parser)]
#[command(
    name = "k3s-local-agent-tray",
    version,
    about = "K3s Local Agent in your system tray."
)]
struct Cli {
    #[command(flatten)]
    run: RunOverrides,
}

/// Starts the agent, with the demo when no control plane is configured.
async fn start_agent(config: Config) -> anyhow::Result<Agent> {
    let with_demo = config.demo || !config.control_plane_configured;
    let (agent, _demo_pods) = k3s_local_agent::launch(config, with_demo).await?;
    Ok(agent)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    k3s_local_agent::init_logging();
    let config = match Config::resolve(&cli.run) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    let preferences = Preferences::load(config.state_dir.clone());

    let app = tauri::Builder::default()
        // First, so that a second launch hands over to the running app (its
        // window shows) and exits 0 before it starts an agent of its own.
        .plugin(tauri_plugin_single_instance::init(|app, _argv, _cwd| {
            tracing::info!("launched again: showing the running app's window");
            window::show(app);
        }))
        .plugin(tauri_plugin_opener::init())
        .plugin(tauri_plugin_positioner::init())
        .invoke_handler(tauri::generate_handler![
            commands::snapshot,
            commands::set_forwarding,
            commands::set_target,
            commands::stop_tunnel,
            commands::open_pod,
            commands::hide_window,
        ])
        .setup(move |app| {
            let agent = tauri::async_runtime::block_on(start_agent(config))?;
            app.manage(agent.clone());
            app.manage(preferences.clone());
            app.manage(window::Popover::default());
            window::restore_size(app.handle());
            let tray = tray::Tray::install(app.handle(), preferences.clone(), &agent.snapshot())?;
            live::spawn(app.handle().clone(), agent.clone(), tray);
            Ok(())
        })
        .on_window_event(window::on_event)
        .build(tauri::generate_context!("../tauri.conf.json"));
    let app = match app {
        Ok(app) => app,
        Err(err) => {
            eprintln!("error: cannot start the desktop app: {err}");
            return ExitCode::FAILURE;
        }
    };
    app.run(|_handle, event| {
        if let RunEvent::ExitRequested { api, code, .. } = event {
            // No window left is not a reason to quit: the tray stays. An
            // explicit exit (Quit) carries a code and goes through.
            if code.is_none() {
                api.prevent_exit();
            }
        }
    });
    ExitCode::SUCCESS
}
