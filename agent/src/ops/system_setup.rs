//! `k3s-local-agent system-setup install|remove [--root DIR]`: the system
//! changes the package makes, in one place its maintainer scripts call (and
//! the tests run on temporary roots). Install puts the `k3slocal` NSS module
//! on the `hosts:` line of `/etc/nsswitch.conf` and gives the low-port bind
//! helper `cap_net_bind_service`; remove takes the word off again, byte for
//! byte (the capability goes with the helper's file). Both are idempotent.
//!
//! The word is the administrator's to take off, and Debian policy says a
//! local change survives an upgrade. So install leaves a record that it put
//! the word on (or found it there); an install that finds the record but not
//! the word knows the administrator removed it, and leaves the file alone.
//! Remove takes the record away with the word, so installing the package
//! again after a removal is a fresh install that puts the word back.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::names::nsswitch;

/// Where the package installs the bind helper, relative to the root.
pub const BIND_HELPER: &str = "usr/libexec/k3s-local-agent/k3s-local-agent-bind";
/// The one capability the helper gets.
pub const BIND_CAPABILITY: &str = "cap_net_bind_service=+ep";
/// The record that the package put (or found) the word on the hosts line,
/// relative to the root. Delete it to have the next install put the word
/// back after removing it by hand.
pub const NSSWITCH_RECORD: &str = "var/lib/k3s-local-agent/nsswitch-added";

/// Why a system change could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SystemSetupError {
    #[error(transparent)]
    Nsswitch(#[from] nsswitch::SetupError),
    #[error("cannot read or write the record {path}: {source}")]
    Record { path: PathBuf, source: io::Error },
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
    let conf = root.join(nsswitch::CONF);
    let record = root.join(NSSWITCH_RECORD);
    let mut steps = Vec::new();
    if !nsswitch::installed(root)? && exists(&record)? {
        steps.push(Step {
            what: format!(
                "{}: {} left off the hosts line, as the administrator took it off (delete {} \
                 and run this again to put it back)",
                conf.display(),
                nsswitch::MODULE,
                record.display()
            ),
            changed: false,
        });
    } else {
        let outcome = nsswitch::install(root)?;
        write_record(&record)?;
        steps.push(Step {
            what: format!("{}: {} on the hosts line", conf.display(), nsswitch::MODULE),
            changed: outcome == nsswitch::Outcome::Changed,
        });
    }
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
    let record = root.join(NSSWITCH_RECORD);
    match fs::remove_file(&record) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(SystemSetupError::Record {
                path: record,
                source,
            })
        }
    }
    // The record's folder is ours alone; gone once empty (best effort: an
    // administrator's file in it keeps it).
    if let Some(dir) = record.parent() {
        let _ = fs::remove_dir(dir);
    }
    Ok(vec![Step {
        what: format!(
            "{}: {} off the hosts line",
            root.join(nsswitch::CONF).display(),
            nsswitch::MODULE
        ),
        changed: outcome == nsswitch::Outcome::Changed,
    }])
}

fn exists(path: &Path) -> Result<bool, SystemSetupError> {
    path.try_exists()
        .map_err(|source| SystemSetupError::Record {
            path: path.to_owned(),
            source,
        })
}

fn write_record(path: &Path) -> Result<(), SystemSetupError> {
    let record_error = |source| SystemSetupError::Record {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(record_error)?;
    }
    fs::write(
        path,
        "k3s-local-agent put k3slocal on the hosts line of /etc/nsswitch.conf (or found it \
         there). If it is gone, an administrator took it off, and upgrades leave it off.\n",
    )
    .map_err(record_error)
}
