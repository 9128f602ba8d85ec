//! The desktop app's preferences (mute, pin, the window's size): one copy,
//! shared by the tray menu and the window, saved to `desktop.json` in the
//! state dir whenever it changes.

use std::path::PathBuf;
use std::sync::Arc;

use k3s_local_agent::state::DesktopSettings;
use parking_lot::{Mutex, MutexGuard};

/// The preferences and where they are kept; cheap to clone.
#[derive(Debug, Clone)]
pub struct Preferences {
    settings: Arc<Mutex<DesktopSettings>>,
    state_dir: PathBuf,
}

impl Preferences {
    /// The saved preferences (defaults when none were saved).
    pub fn load(state_dir: PathBuf) -> Self {
        Self {
            settings: Arc::new(Mutex::new(DesktopSettings::load(&state_dir))),
            state_dir,
        }
    }

    fn lock(&self) -> MutexGuard<'_, DesktopSettings> {
        self.settings.lock()
    }

    pub fn get(&self) -> DesktopSettings {
        self.lock().clone()
    }

    /// Changes the preferences and saves them when they changed. A file
    /// that cannot be written costs only the memory of the change: it is
    /// logged, and the app goes on with the new value.
    pub fn update(&self, change: impl FnOnce(&mut DesktopSettings)) -> DesktopSettings {
        let (changed, now) = {
            let mut settings = self.lock();
            let before = settings.clone();
            change(&mut settings);
            (*settings != before, settings.clone())
        };
        if changed {
            if let Err(err) = now.save(&self.state_dir) {
                tracing::warn!(error = %err, "cannot save the desktop preferences");
            }
        }
        now
    }
}
