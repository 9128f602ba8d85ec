//! Desktop notifications over D-Bus (notify-rust). Without a notification
//! daemon the app says so once in the log and carries on.

use k3s_local_agent::notices::Notice;

const APP_NAME: &str = "K3s Local Agent";

/// Sends notices; remembers whether the daemon was missing so it warns once.
#[derive(Debug, Default)]
pub struct Notifier {
    warned_unavailable: bool,
}

impl Notifier {
    pub async fn send(&mut self, notice: Notice) {
        let summary = notice.summary.clone();
        let shown = tokio::task::spawn_blocking(move || {
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
            notification.show().map(|_| ())
        })
        .await;
        match shown {
            Ok(Ok(())) => {
                tracing::debug!(%summary, "notification shown");
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
