//! Desktop notifications over D-Bus (notify-rust). A notice about one pod
//! carries a default action where the notification server supports actions:
//! clicking it shows the window at that pod. Without a notification daemon
//! the app says so once in the log and carries on.

use k3s_local_agent::notices::Notice;
use tauri::AppHandle;

const APP_NAME: &str = "K3s Local Agent";
/// The action a click on the notification's body invokes (the spec's name).
const DEFAULT_ACTION: &str = "default";

/// Sends notices; remembers whether the daemon was missing so it warns once.
#[derive(Debug)]
pub struct Notifier {
    app: AppHandle,
    warned_unavailable: bool,
    /// Whether the server takes actions (asked once, when first needed).
    server_has_actions: Option<bool>,
}

impl Notifier {
    pub fn new(app: AppHandle) -> Self {
        Self {
            app,
            warned_unavailable: false,
            server_has_actions: None,
        }
    }

    pub async fn send(&mut self, notice: Notice) {
        let summary = notice.summary.clone();
        let ask_actions = self.server_has_actions.is_none();
        let known_actions = self.server_has_actions.unwrap_or(false);
        let app = self.app.clone();
        let shown = tokio::task::spawn_blocking(move || {
            let has_actions = if ask_actions {
                server_has_actions()
            } else {
                known_actions
            };
            let mut notification = notify_rust::Notification::new();
            notification
                .appname(APP_NAME)
                .summary(&notice.summary)
                .body(&notice.body)
                .icon("network-transmit-receive");
            #[cfg(all(unix, not(target_os = "macos")))]
            notification.urgency(if notice.urgent {
                notify_rust::Urgency::Critical
            } else {
                notify_rust::Urgency::Normal
            });
            let clickable = notice.pod_id.clone().filter(|_| has_actions);
            if clickable.is_some() {
                notification.action(DEFAULT_ACTION, "Show");
            }
            let handle = notification.show()?;
            if let Some(pod_id) = clickable {
                // Waiting blocks until the notice is clicked or closed (the
                // server closes it when it expires): a thread of its own.
                std::thread::spawn(move || {
                    handle.wait_for_action(|action| {
                        if action == DEFAULT_ACTION {
                            crate::window::show_pod(&app, &pod_id);
                        }
                    });
                });
            }
            Ok::<bool, notify_rust::error::Error>(has_actions)
        })
        .await;
        match shown {
            Ok(Ok(has_actions)) => {
                tracing::debug!(%summary, "notification shown");
                self.server_has_actions = Some(has_actions);
                self.warned_unavailable = false;
            }
            Ok(Err(err)) if !self.warned_unavailable => {
                self.warned_unavailable = true;
                tracing::warn!(error = %err, "desktop notifications are unavailable (no notification daemon?); continuing without them");
            }
            Ok(Err(err)) => tracing::debug!(error = %err, %summary, "notification not shown"),
            Err(err) => tracing::warn!(error = %err, "notification task failed"),
        }
    }
}

/// Whether the notification server takes actions (a click on a notice).
#[cfg(all(unix, not(target_os = "macos")))]
fn server_has_actions() -> bool {
    notify_rust::get_capabilities().is_ok_and(|caps| caps.iter().any(|cap| cap == "actions"))
}

/// Elsewhere notify-rust has no actions to wait for.
#[cfg(not(all(unix, not(target_os = "macos"))))]
fn server_has_actions() -> bool {
    false
}
