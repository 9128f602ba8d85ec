//! Names: where `<name>-staging.local` and `<name>-staging.localhost` are
//! written so that the system's resolver finds each pod's address, and the
//! choice of where. Three places, best first:
//!
//! - `user_file`: this user's names file under `/run/user/<uid>/`, which the
//!   package's NSS module (`k3slocal` in `/etc/nsswitch.conf`) answers from,
//!   for this user only: system-wide names with no root at run time;
//! - `hosts`: a marked block of `/etc/hosts`, when it is writable (root, or a
//!   development run without the package);
//! - `hosts` again, in a private file in the state dir, which only the
//!   agent's own views read (the `.localhost` names still work in browsers).
//!
//! `nsswitch` reads (and, for the installer, edits) the `hosts:` line;
//! `assign` decides which pod answers to which name.
//!
//! May use: `state` (crash-safe file writes) and `model`. Must never touch:
//! the store, the tunnels, the cluster, the HTTP API.

mod assign;
mod hosts;
pub mod nsswitch;
mod user_file;

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

pub use assign::{assign, long_name, short_name, Assigned, Claimant};
pub use hosts::{count_blocks, parse_block, render, HostsFile, BLOCK_BEGIN, BLOCK_END};
pub use user_file::{render_user_file, UserNamesFile, USER_DIR, USER_FILE};

use crate::model::{NamesHealth, NamesMode};

/// Why the names could not be written.
#[derive(Debug, thiserror::Error)]
pub enum NamesError {
    #[error("cannot read hosts file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("hosts file {path} is not UTF-8 text; refusing to rewrite it")]
    NotText { path: PathBuf },
    #[error("cannot write hosts file {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("refusing to use {path}: {why}")]
    Unsafe { path: PathBuf, why: String },
    #[error("refusing to use {path}: {why}")]
    NotOurs {
        path: PathBuf,
        #[source]
        why: crate::state::fsio::NotOurs,
    },
}

/// One line of names: an address and the names that resolve to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEntry {
    pub ip: IpAddr,
    pub names: Vec<String>,
}

/// The files the choice depends on; the real ones unless a test says otherwise.
#[derive(Debug, Clone)]
pub struct SystemFiles {
    /// The system hosts file (`/etc/hosts`).
    pub hosts: PathBuf,
    /// The name service switch (`/etc/nsswitch.conf`).
    pub nsswitch: PathBuf,
    /// Where each user's runtime dir lives (`/run/user`), as the NSS module sees it.
    pub run_user: PathBuf,
}

impl Default for SystemFiles {
    fn default() -> Self {
        Self {
            hosts: PathBuf::from("/etc/hosts"),
            nsswitch: PathBuf::from("/etc/nsswitch.conf"),
            run_user: PathBuf::from(user_file::RUN_USER),
        }
    }
}

#[derive(Debug, Clone)]
enum Target {
    Hosts(HostsFile),
    User(UserNamesFile),
    /// `--names off`: nothing is written anywhere.
    Off,
}

/// Where this agent writes its names, and why there.
#[derive(Debug, Clone)]
pub struct Names {
    target: Target,
    health: NamesHealth,
}

impl Names {
    /// `explicit` (`--hosts-file`) when given; else the NSS module's file when
    /// the module is on the `hosts:` line and this user has a runtime dir;
    /// else `/etc/hosts` when we may write it; else `<state_dir>/hosts`.
    pub fn choose(explicit: Option<PathBuf>, state_dir: &Path) -> Self {
        Self::choose_among(explicit, &SystemFiles::default(), state_dir, current_uid())
    }

    /// No names at all (`--names off`): nothing is written, and every
    /// address shown is `localhost:<range port>`.
    pub fn off() -> Self {
        Self {
            health: NamesHealth {
                hosts_file: String::new(),
                system_wide: false,
                mode: NamesMode::Off,
                why: "names are off (--names off): no name is written anywhere".to_owned(),
                warning: None,
            },
            target: Target::Off,
        }
    }

    /// [`Names::choose`] over `system`'s files, for the user `uid` (none
    /// where no NSS module can be: only glibc loads them).
    pub fn choose_among(
        explicit: Option<PathBuf>,
        system: &SystemFiles,
        state_dir: &Path,
        uid: Option<u32>,
    ) -> Self {
        if let Some(path) = explicit {
            let system_wide = path == system.hosts;
            let warning = (!system_wide).then(|| {
                format!(
                    "pod names are written to {}, not {}: the system resolver does not see them",
                    path.display(),
                    system.hosts.display()
                )
            });
            return Self::hosts(
                path,
                NamesMode::File,
                system_wide,
                "--hosts-file names it".to_owned(),
                warning,
            );
        }
        // Bytes, as glibc reads the file: a Latin-1 comment must not hide
        // the module.
        let listed = std::fs::read(&system.nsswitch)
            .ok()
            .is_some_and(|bytes| nsswitch::has_module(Some(&bytes)));
        let mut no_session = None;
        if let Some(uid) = uid.filter(|_| listed) {
            let runtime_dir = system.run_user.join(uid.to_string());
            if runtime_dir.is_dir() {
                let file = UserNamesFile::in_runtime_dir(&runtime_dir, uid);
                let why = format!(
                    "the {} NSS module is on the hosts line of {}, and it answers this user's \
                     names from {}",
                    nsswitch::MODULE,
                    system.nsswitch.display(),
                    file.path().display()
                );
                return Self {
                    health: NamesHealth {
                        hosts_file: file.path().display().to_string(),
                        system_wide: true,
                        mode: NamesMode::NssModule,
                        why,
                        warning: None,
                    },
                    target: Target::User(file),
                };
            }
            no_session = Some(format!(
                "the {} NSS module is installed, but {} does not exist (no login session for \
                 uid {uid}, so the module has nowhere to read this user's names from)",
                nsswitch::MODULE,
                runtime_dir.display()
            ));
        }
        if is_writable(&system.hosts) {
            let why = match &no_session {
                Some(reason) => format!("{reason}; {} is writable", system.hosts.display()),
                None => format!(
                    "{} is writable and the NSS module is not installed",
                    system.hosts.display()
                ),
            };
            let warning = no_session.clone();
            return Self::hosts(
                system.hosts.clone(),
                NamesMode::SystemHosts,
                true,
                why,
                warning,
            );
        }
        let fallback = state_dir.join("hosts");
        let why = match &no_session {
            Some(reason) => format!("{reason}; {} is not writable", system.hosts.display()),
            None => format!(
                "the NSS module is not installed and {} is not writable",
                system.hosts.display()
            ),
        };
        let warning = format!(
            "{why}, so pod names go to {}, which the system resolver does not read: \
             `.local` names work only where that file is used; `<name>-staging.localhost` \
             still works in browsers. Install the package (its NSS module gives every \
             user system-wide names without root), or run with write access to {}.",
            fallback.display(),
            system.hosts.display()
        );
        Self::hosts(fallback, NamesMode::PrivateFile, false, why, Some(warning))
    }

    fn hosts(
        path: PathBuf,
        mode: NamesMode,
        system_wide: bool,
        why: String,
        warning: Option<String>,
    ) -> Self {
        Self {
            health: NamesHealth {
                hosts_file: path.display().to_string(),
                system_wide,
                mode,
                why,
                warning,
            },
            target: Target::Hosts(HostsFile::at(path)),
        }
    }

    /// The file written (empty with names off).
    pub fn path(&self) -> &Path {
        match &self.target {
            Target::Hosts(hosts) => hosts.path(),
            Target::User(file) => file.path(),
            Target::Off => Path::new(""),
        }
    }

    /// Whether names are written at all.
    pub fn enabled(&self) -> bool {
        !matches!(self.target, Target::Off)
    }

    pub fn warning(&self) -> Option<&str> {
        self.health.warning.as_deref()
    }

    pub fn health(&self) -> NamesHealth {
        let mut health = self.health.clone();
        // What the last write of the NSS module's file could not do (names
        // left out past its size, no lock) is the warning that matters now.
        if let Target::User(file) = &self.target {
            if let Some(problem) = file.problem() {
                health.warning = Some(problem);
            }
        }
        health
    }

    /// Checks, before the agent starts, that the file its names go to was
    /// not planted: in the state dir or the runtime dir it must be ours and
    /// not a link (the system hosts file and `--hosts-file` are the user's
    /// own choice).
    pub fn check(&self) -> Result<(), NamesError> {
        let path = match (&self.target, self.health.mode) {
            (Target::User(file), _) => return file.check(),
            (Target::Hosts(hosts), NamesMode::PrivateFile) => hosts.path(),
            _ => return Ok(()),
        };
        match crate::state::fsio::check_own_file(path) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(NamesError::NotOurs {
                path: path.to_owned(),
                why,
            }),
            Err(source) => Err(NamesError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Makes the names say exactly `entries`.
    pub fn write(&self, entries: &[HostEntry]) -> Result<(), NamesError> {
        match &self.target {
            Target::Hosts(hosts) => hosts.write(entries),
            Target::User(file) => file.write(entries),
            Target::Off => Ok(()),
        }
    }

    /// Takes every name of ours away, leaving everything else as it was.
    pub fn clear(&self) -> Result<(), NamesError> {
        match &self.target {
            Target::Hosts(hosts) => hosts.clear(),
            Target::User(file) => file.clear(),
            Target::Off => Ok(()),
        }
    }
}

/// The real uid: whose runtime dir the NSS module reads for this process
/// (`None` off Linux, where no glibc NSS module runs).
fn current_uid() -> Option<u32> {
    #[cfg(target_os = "linux")]
    {
        Some(nix::unistd::getuid().as_raw())
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Whether we may replace `path`: the file opens for writing and its folder
/// takes a new file (the atomic replace needs both).
fn is_writable(path: &Path) -> bool {
    let file_ok = std::fs::OpenOptions::new().append(true).open(path).is_ok();
    let dir_ok = path
        .parent()
        .and_then(|dir| tempfile::tempfile_in(dir).ok())
        .is_some();
    file_ok && dir_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const FOREIGN: &str = "127.0.0.1 localhost\n";

    fn system(dir: &Path) -> SystemFiles {
        SystemFiles {
            hosts: dir.join("etc-hosts"),
            nsswitch: dir.join("nsswitch.conf"),
            run_user: dir.join("run-user"),
        }
    }

    #[test]
    fn fallback_warns_when_system_file_is_not_writable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut files = system(dir.path());
        files.hosts = dir.path().join("no-such-dir").join("hosts");
        let names = Names::choose_among(None, &files, dir.path(), Some(1000));
        assert_eq!(names.path(), dir.path().join("hosts"));
        assert_eq!(names.health().mode, NamesMode::PrivateFile);
        assert!(!names.health().system_wide);
        assert!(names.warning().expect("warning").contains("not writable"));
        let files = system(dir.path());
        fs::write(&files.hosts, FOREIGN).expect("write");
        let names = Names::choose_among(None, &files, dir.path(), Some(1000));
        assert_eq!(names.path(), files.hosts);
        assert_eq!(names.health().mode, NamesMode::SystemHosts);
        assert!(names.health().system_wide);
        assert!(names.warning().is_none());
    }

    #[test]
    fn the_module_on_the_hosts_line_and_a_runtime_dir_win() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = system(dir.path());
        fs::write(&files.hosts, FOREIGN).expect("write");
        fs::write(&files.nsswitch, "hosts: files k3slocal dns\n").expect("write");
        // No runtime dir: /etc/hosts, saying why the module is not used.
        let names = Names::choose_among(None, &files, dir.path(), Some(1000));
        assert_eq!(names.health().mode, NamesMode::SystemHosts);
        assert!(
            names
                .warning()
                .expect("warning")
                .contains("no login session"),
            "{:?}",
            names.warning()
        );
        fs::create_dir_all(files.run_user.join("1000")).expect("runtime dir");
        let names = Names::choose_among(None, &files, dir.path(), Some(1000));
        assert_eq!(names.health().mode, NamesMode::NssModule);
        assert_eq!(
            names.path(),
            files.run_user.join("1000").join(USER_DIR).join(USER_FILE)
        );
        assert!(names.health().system_wide);
        assert!(names.warning().is_none());
        // Another user's runtime dir is no use to this one.
        let names = Names::choose_among(None, &files, dir.path(), Some(1001));
        assert_eq!(names.health().mode, NamesMode::SystemHosts);
        // A Latin-1 comment does not hide the module.
        fs::write(
            &files.nsswitch,
            b"# r\xe9solution\nhosts: files k3slocal dns\n",
        )
        .expect("write");
        let names = Names::choose_among(None, &files, dir.path(), Some(1000));
        assert_eq!(names.health().mode, NamesMode::NssModule);
    }

    #[test]
    fn an_explicit_file_wins_over_everything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = system(dir.path());
        fs::write(&files.nsswitch, "hosts: files k3slocal dns\n").expect("write");
        fs::create_dir_all(files.run_user.join("1000")).expect("runtime dir");
        let explicit = dir.path().join("mine");
        let names = Names::choose_among(Some(explicit.clone()), &files, dir.path(), Some(1000));
        assert_eq!(names.path(), explicit);
        assert_eq!(names.health().mode, NamesMode::File);
    }
}
