//! Desktop notifications over D-Bus (notify-rust). A notice about one pod
//! carries a default action where the notification server supports actions:
//! clicking it shows the window at that pod. A server that reads the body as
//! markup gets it escaped (an error's `<a href>` is text, not a link). Without
//! a notification daemon the app says so once in the log and carries on.

use k3s_local_agent::notices::Notice;
use tauri::AppHandle;

const APP_NAME: &str = "K3s Local Agent";
/// The action a click on the notification's body invokes (the spec's name).
const DEFAULT_ACTION: &str = "default";

/// What the notification server does with a notice, as it says.
#[derive(Debug, Clone, Copy, Default)]
struct Capabilities {
    /// It takes actions (a click on a notice).
    actions: bool,
    /// It reads the body as markup.
    body_markup: bool,
}

/// Sends notices; remembers whether the daemon was missing so it warns once.
#[derive(Debug)]
pub struct Notifier {
    app: AppHandle,
    warned_unavailable: bool,
    /// What the server does (asked once, when first needed).
    server: Option<Capabilities>,
}

impl Notifier {
    pub fn new(app: AppHandle) -> Self {
        Self {
            app,
            warned_unavailable: false,
            server: None,
        }
    }

    pub async fn send(&mut self, notice: Notice) {
        let summary = notice.summary.clone();
        let known = self.server;
        let app = self.app.clone();
        let shown = tokio::task::spawn_blocking(move || {
            let server = known.unwrap_or_else(server_capabilities);
            // notify-rust hands the body over as is: escaped where the
            // server would read markup in it, as written where it would not.
            let body = if server.body_markup {
                notice.body_markup()
            } else {
                notice.body.clone()
            };
            let mut notification = notify_rust::Notification::new();
            notification
                .appname(APP_NAME)
                .summary(&notice.summary)
                .body(&body)
                .icon("network-transmit-receive");
            #[cfg(all(unix, not(target_os = "macos")))]
            notification.urgency(if notice.urgent {
                notify_rust::Urgency::Critical
            } else {
                notify_rust::Urgency::Normal
            });
            let clickable = notice.pod_id.clone().filter(|_| server.actions);
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
            Ok::<Capabilities, notify_rust::error::Error>(server)
        })
        .await;
        match shown {
            Ok(Ok(server)) => {
                tracing::debug!(%summary, "notification shown");
                self.server = Some(server);
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

/// What the notification server says it does. A server that cannot be
/// asked is taken to read markup: escaped text is the safe side.
#[cfg(all(unix, not(target_os = "macos")))]
fn server_capabilities() -> Capabilities {
    match notify_rust::get_capabilities() {
        Ok(caps) => Capabilities {
            actions: caps.iter().any(|cap| cap == "actions"),
            body_markup: caps.iter().any(|cap| cap == "body-markup"),
        },
        Err(_) => Capabilities {
            actions: false,
            body_markup: true,
        },
    }
}

/// Elsewhere notify-rust has no actions to wait for, and no markup.
#[cfg(not(all(unix, not(target_os = "macos"))))]
fn server_capabilities() -> Capabilities {
    Capabilities::default()
}
