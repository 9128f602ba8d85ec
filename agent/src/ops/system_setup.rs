//! `k3s-local-agent system-setup install|remove [--root DIR]`: the system
//! changes the package makes, in one place its maintainer scripts call (and
//! the tests run on temporary roots). Install puts the `k3slocal` NSS module
//! on the `hosts:` line of `/etc/nsswitch.conf` and gives the low-port bind
//! helper `cap_net_bind_service`; remove takes the word off again, byte for
//! byte (the capability goes with the helper's file). Both are idempotent.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::names::nsswitch;

/// Where the package installs the bind helper, relative to the root.
pub const BIND_HELPER: &str = "usr/libexec/k3s-local-agent/k3s-local-agent-bind";
/// The one capability the helper gets.
pub const BIND_CAPABILITY: &str = "cap_net_bind_service=+ep";

/// Why a system change could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SystemSetupError {
    #[error(transparent)]
    Nsswitch(#[from] nsswitch::SetupError),
    #[error(
        "cannot give {path} its capability: {why} (is libcap2-bin installed, and does the \
         file system keep extended attributes?)"
    )]
    Capability { path: PathBuf, why: String },
}

/// What one step did, for the maintainer script's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub what: String,
    pub changed: bool,
}

/// Makes the system changes under `root` (`/` for the real system).
pub fn install(root: &Path) -> Result<Vec<Step>, SystemSetupError> {
    let outcome = nsswitch::install(root)?;
    let mut steps = vec![Step {
        what: format!(
            "{}: {} on the hosts line",
            root.join(nsswitch::CONF).display(),
            nsswitch::MODULE
        ),
        changed: outcome == nsswitch::Outcome::Changed,
    }];
    let helper = root.join(BIND_HELPER);
    if helper.exists() {
        let output = Command::new("setcap")
            .args([BIND_CAPABILITY])
            .arg(&helper)
            .output()
            .map_err(|err| SystemSetupError::Capability {
                path: helper.clone(),
                why: format!("cannot run setcap: {err}"),
            })?;
        if !output.status.success() {
            return Err(SystemSetupError::Capability {
                path: helper,
                why: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        steps.push(Step {
            what: format!("{}: {BIND_CAPABILITY}", helper.display()),
            changed: true,
        });
    }
    Ok(steps)
}

/// Takes the system changes under `root` away again.
pub fn remove(root: &Path) -> Result<Vec<Step>, SystemSetupError> {
    let outcome = nsswitch::remove(root)?;
    Ok(vec![Step {
        what: format!(
            "{}: {} off the hosts line",
            root.join(nsswitch::CONF).display(),
            nsswitch::MODULE
        ),
        changed: outcome == nsswitch::Outcome::Changed,
    }])
}
