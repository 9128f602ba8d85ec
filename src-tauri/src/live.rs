//! Pushes every change of the agent to the desktop: a fresh snapshot to the
//! window (the `snapshot` event), the tray menu and icon, and notifications
//! for what changed, coalesced over two seconds. Driven by the agent's change channels, never a timer;
//! counter-only movements reach the window throttled and skip the rest.

use std::time::Duration;

use k3s_local_agent::notices;
use k3s_local_agent::Agent;
use tauri::{AppHandle, Emitter};
use tokio::time::Instant;

use crate::notify::Notifier;
use crate::tray::Tray;

/// The event the dashboard listens to.
pub const SNAPSHOT_EVENT: &str = "snapshot";
/// The most often the window gets fresh counters.
const TRAFFIC_THROTTLE: Duration = Duration::from_millis(500);

/// Starts the loop that follows the agent, and the signal handler.
pub fn spawn(app: AppHandle, agent: Agent, tray: Tray) {
    let signals_app = app.clone();
    let signals_agent = agent.clone();
    tauri::async_runtime::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: stopping");
        crate::commands::quit(signals_app, signals_agent);
    });
    tauri::async_runtime::spawn(follow(app, agent, tray));
}

async fn follow(app: AppHandle, agent: Agent, tray: Tray) {
    let mut revisions = agent.events().watch_revision();
    let mut traffic = agent.events().watch_traffic();
    let mut notifier = Notifier::new(app.clone());
    let mut coalescer = notices::Coalescer::default();
    loop {
        let snapshot = agent.snapshot();
        let _ = app.emit(SNAPSHOT_EVENT, &snapshot);
        let mut last_emit = Instant::now();
        if let Err(err) = tray.show(&app, &snapshot) {
            tracing::warn!(error = %err, "cannot update the tray");
        }
        if tray.notifications_muted() {
            // Muted: what changes now is never told, not even later.
            coalescer.absorb(snapshot);
        } else {
            let found = coalescer.observe(snapshot, std::time::Instant::now());
            announce(&tray, &mut notifier, found).await;
        }

        // Wait for the next real change; counter movements meanwhile only
        // refresh the window, at most every TRAFFIC_THROTTLE.
        loop {
            tokio::select! {
                _ = agent.stopped() => return,
                changed = revisions.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    revisions.mark_unchanged();
                    break;
                }
                // Changes held back to coalesce are due: tell what they added up to.
                _ = sleep_until_due(coalescer.due()) => {
                    let found = coalescer.flush(std::time::Instant::now());
                    announce(&tray, &mut notifier, found).await;
                }
                changed = traffic.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    tokio::time::sleep_until(last_emit + TRAFFIC_THROTTLE).await;
                    traffic.mark_unchanged();
                    last_emit = Instant::now();
                    let _ = app.emit(SNAPSHOT_EVENT, &agent.snapshot());
                }
            }
        }
    }
}

/// Shows `found`, unless the user muted notifications.
async fn announce(tray: &Tray, notifier: &mut Notifier, found: Vec<notices::Notice>) {
    if tray.notifications_muted() {
        return;
    }
    for notice in found {
        notifier.send(notice).await;
    }
}

/// Sleeps until `due`, or forever when nothing is held.
async fn sleep_until_due(due: Option<std::time::Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(Instant::from_std(due)).await,
        None => std::future::pending().await,
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
