//! This user's names file, `/run/user/<uid>/k3s-local-agent/names`, which the
//! package's NSS module (`libnss_k3slocal.so.2`, crate `nss-k3slocal`) reads
//! for this user's lookups only. One line per pod: `<address> <name>...`.
//!
//! The module trusts the file only when it is a regular file owned by the
//! user and writable by nobody else, so the agent keeps it that way: the
//! folder is made 0700 and must be ours and not a link, and the file is
//! replaced atomically with mode 0600.
//!
//! The module answers only while the agent holds an open-file-description
//! lock on `names.lock` beside it: taken once the file first says what this
//! run holds, let go after the file is removed, and dropped by the kernel
//! when the process dies however it dies, so a crashed agent's names stop
//! resolving at once. The file holds only the `.local` names (the module
//! answers nothing else; browsers resolve `.localhost` themselves) and never
//! grows past what the module reads ([`MAX_NSS_FILE_BYTES`]).

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{HostEntry, NamesError};
use parking_lot::Mutex;

use crate::state::fsio;

/// Where every user's runtime dir lives, as the NSS module looks for it.
pub(super) const RUN_USER: &str = "/run/user";
/// The agent's folder in the user's runtime dir.
pub const USER_DIR: &str = "k3s-local-agent";
/// The names file in that folder.
pub const USER_FILE: &str = "names";
/// The lock the agent holds while it runs, beside the names file.
pub const LOCK_FILE: &str = "names.lock";
/// The most the NSS module reads of the file (its `MAX_FILE_BYTES`): 10,000
/// pods with two names of the longest each fit.
pub const MAX_NSS_FILE_BYTES: usize = 6 * 1024 * 1024;

/// Why the lock that makes the NSS module answer is not held.
#[derive(Debug, thiserror::Error)]
enum LockError {
    #[error("cannot open {path}: {source}; names do not resolve")]
    Open { path: PathBuf, source: io::Error },
    #[error(
        "another agent of this user holds {path}: its names and this agent's share one file; \
         stop one of them"
    )]
    Held { path: PathBuf },
    #[error("cannot lock {path}: {source}; names do not resolve")]
    Lock {
        path: PathBuf,
        source: nix::errno::Errno,
    },
}

/// The names file of one user, in that user's runtime dir.
#[derive(Debug, Clone)]
pub struct UserNamesFile {
    dir: PathBuf,
    path: PathBuf,
    uid: u32,
    /// The lock file, held open (and locked) while names are published.
    lock: Arc<Mutex<Option<fs::File>>>,
    /// What the last write could not do (names left out, no lock), for health.
    problem: Arc<Mutex<Option<String>>>,
}

impl UserNamesFile {
    /// The file in `runtime_dir` (`/run/user/<uid>`), to be owned by `uid`.
    pub fn in_runtime_dir(runtime_dir: &Path, uid: u32) -> Self {
        let dir = runtime_dir.join(USER_DIR);
        let path = dir.join(USER_FILE);
        Self {
            dir,
            path,
            uid,
            lock: Arc::default(),
            problem: Arc::default(),
        }
    }

    /// What the last write could not do, if anything.
    pub fn problem(&self) -> Option<String> {
        self.problem.lock().clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks an existing folder and file: ours, and not links.
    pub fn check(&self) -> Result<(), NamesError> {
        if fs::symlink_metadata(&self.dir).is_err() {
            return Ok(());
        }
        self.own_folder()?;
        match crate::state::fsio::check_own_file(&self.path) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(NamesError::NotOurs {
                path: self.path.clone(),
                why,
            }),
            Err(source) => Err(NamesError::Read {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Makes the file list exactly `entries` (as many as the module reads),
    /// then holds the lock that makes the module answer.
    pub fn write(&self, entries: &[HostEntry]) -> Result<(), NamesError> {
        self.own_folder()?;
        let rendered = render_user_file(entries, MAX_NSS_FILE_BYTES);
        let mut problem = rendered.left_out.map(|left_out| {
            format!(
                "{left_out} pod names are left out of {}: the NSS module reads at most {} MiB \
                 of it (about 10,000 pods)",
                self.path.display(),
                MAX_NSS_FILE_BYTES / (1024 * 1024)
            )
        });
        let unchanged =
            fs::read(&self.path).is_ok_and(|existing| existing == rendered.text.as_bytes());
        if !unchanged {
            fsio::atomic_replace(&self.path, rendered.text.as_bytes(), 0o600).map_err(
                |source| NamesError::Write {
                    path: self.path.clone(),
                    source,
                },
            )?;
        }
        // Only now, with the file saying what this run holds (a crashed
        // run's file never resolves again), does the module answer.
        if let Err(why) = self.hold_lock() {
            problem = Some(why.to_string());
        }
        if let Some(problem) = &problem {
            tracing::warn!("{problem}");
        }
        *self.problem.lock() = problem;
        Ok(())
    }

    /// Takes the lock, once: an open-file-description write lock on
    /// [`LOCK_FILE`], ours and not a link.
    fn hold_lock(&self) -> Result<(), LockError> {
        use nix::fcntl::{fcntl, FcntlArg};
        let mut held = self.lock.lock();
        if held.is_some() {
            return Ok(());
        }
        let path = self.dir.join(LOCK_FILE);
        let file = fsio::open_own_file(&path, 0o600).map_err(|source| LockError::Open {
            path: path.clone(),
            source,
        })?;
        let lock = nix::libc::flock {
            l_type: nix::libc::F_WRLCK as nix::libc::c_short,
            l_whence: nix::libc::SEEK_SET as nix::libc::c_short,
            l_start: 0,
            l_len: 0,
            // Must be 0 for open-file-description locks.
            l_pid: 0,
        };
        fcntl(&file, FcntlArg::F_OFD_SETLK(&lock)).map_err(|errno| match errno {
            nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES => {
                LockError::Held { path: path.clone() }
            }
            source => LockError::Lock {
                path: path.clone(),
                source,
            },
        })?;
        *held = Some(file);
        Ok(())
    }

    /// Removes the file, then lets the lock go: no pod of this user's
    /// resolves any more.
    pub fn clear(&self) -> Result<(), NamesError> {
        let removed = match fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(NamesError::Write {
                path: self.path.clone(),
                source,
            }),
        };
        self.lock.lock().take();
        removed
    }

    /// Makes the folder (0700) if it is missing, and checks that it is a
    /// real folder of ours that nobody else can write: a link or another
    /// user's folder could point our writes somewhere else.
    fn own_folder(&self) -> Result<(), NamesError> {
        let unsafe_folder = |why: String| NamesError::Unsafe {
            path: self.dir.clone(),
            why,
        };
        let mut builder = fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        match builder.create(&self.dir) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(NamesError::Write {
                    path: self.dir.clone(),
                    source,
                })
            }
        }
        let meta = fs::symlink_metadata(&self.dir).map_err(|source| NamesError::Write {
            path: self.dir.clone(),
            source,
        })?;
        if meta.file_type().is_symlink() || !meta.is_dir() {
            return Err(unsafe_folder(
                "it is not a folder (a link?); remove it and restart the agent".to_owned(),
            ));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            if meta.uid() != self.uid {
                return Err(unsafe_folder(format!(
                    "it belongs to uid {}, not to this user (uid {}); remove it",
                    meta.uid(),
                    self.uid
                )));
            }
            if meta.mode() & 0o022 != 0 {
                return Err(unsafe_folder(format!(
                    "others may write to it (mode {:o}); `chmod 700` it",
                    meta.mode() & 0o7777
                )));
            }
        }
        Ok(())
    }
}

/// The file's text, and how many names did not fit.
#[derive(Debug)]
pub struct Rendered {
    pub text: String,
    pub left_out: Option<usize>,
}

/// The file's text: a comment saying whose it is, then one line per entry
/// with its `.local` names (the module answers no other), entries past
/// `max_bytes` left out and counted.
pub fn render_user_file(entries: &[HostEntry], max_bytes: usize) -> Rendered {
    let mut text = String::from(
        "# k3s-local-agent: this user's staging pod names, read by the k3slocal NSS module; \
         rewritten by the agent\n",
    );
    let mut left_out = 0;
    let mut line = String::new();
    for entry in entries {
        let names: Vec<&str> = entry
            .names
            .iter()
            .map(String::as_str)
            .filter(|name| name.ends_with(".local"))
            .collect();
        if names.is_empty() {
            continue;
        }
        line.clear();
        // Writing to a String cannot fail.
        let _ = writeln!(line, "{} {}", entry.ip, names.join(" "));
        if text.len() + line.len() > max_bytes {
            left_out += names.len();
            continue;
        }
        text.push_str(&line);
    }
    Rendered {
        text,
        left_out: (left_out > 0).then_some(left_out),
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn uid() -> u32 {
        nix::unistd::getuid().as_raw()
    }

    fn web() -> HostEntry {
        HostEntry {
            ip: IpAddr::V4(Ipv4Addr::new(127, 77, 0, 9)),
            names: vec![
                "web-staging.local".to_owned(),
                "web-staging.localhost".to_owned(),
            ],
        }
    }

    #[test]
    fn writes_a_private_file_in_a_private_folder_and_clears_it() {
        let runtime = tempfile::tempdir().expect("tempdir");
        let file = UserNamesFile::in_runtime_dir(runtime.path(), uid());
        file.write(&[web()]).expect("write");
        let text = fs::read_to_string(file.path()).expect("read");
        assert!(
            text.ends_with("\n127.77.0.9 web-staging.local\n"),
            "no .localhost twin: the module answers none: {text}"
        );
        let meta = fs::metadata(file.path()).expect("meta");
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(meta.uid(), uid());
        let dir = fs::metadata(runtime.path().join(USER_DIR)).expect("dir");
        assert_eq!(dir.mode() & 0o777, 0o700);
        assert!(
            nss_lock_is_held(&runtime.path().join(USER_DIR).join(LOCK_FILE)),
            "written: the module may answer"
        );
        assert_eq!(file.problem(), None);
        file.clear().expect("clear");
        assert!(!file.path().exists());
        assert!(
            !nss_lock_is_held(&runtime.path().join(USER_DIR).join(LOCK_FILE)),
            "cleared: the lock is gone"
        );
        file.clear().expect("clearing twice is fine");
    }

    /// What the NSS module asks: whether anyone holds a lock on `path`.
    fn nss_lock_is_held(path: &Path) -> bool {
        use nix::fcntl::{fcntl, FcntlArg};
        let file = fs::File::open(path).expect("open lock");
        let mut probe = nix::libc::flock {
            l_type: nix::libc::F_WRLCK as nix::libc::c_short,
            l_whence: nix::libc::SEEK_SET as nix::libc::c_short,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        fcntl(&file, FcntlArg::F_OFD_GETLK(&mut probe)).expect("getlk");
        probe.l_type != nix::libc::F_UNLCK as nix::libc::c_short
    }

    #[test]
    fn a_second_agent_of_the_user_is_told_who_holds_the_names() {
        let runtime = tempfile::tempdir().expect("tempdir");
        let first = UserNamesFile::in_runtime_dir(runtime.path(), uid());
        first.write(&[web()]).expect("write");
        let second = UserNamesFile::in_runtime_dir(runtime.path(), uid());
        second.write(&[web()]).expect("write");
        let problem = second.problem().expect("a problem");
        assert!(problem.contains("another agent of this user"), "{problem}");
    }

    #[test]
    fn names_past_what_the_module_reads_are_left_out_and_said() {
        let runtime = tempfile::tempdir().expect("tempdir");
        let file = UserNamesFile::in_runtime_dir(runtime.path(), uid());
        let ip = IpAddr::V4(Ipv4Addr::new(127, 128, 0, 9));
        let entries: Vec<HostEntry> = (0..30_000)
            .map(|i| HostEntry {
                ip,
                names: vec![format!("{}-{i:05}-staging.local", "y".repeat(230))],
            })
            .collect();
        file.write(&entries).expect("write");
        let written = fs::metadata(file.path()).expect("meta").len();
        assert!(written <= MAX_NSS_FILE_BYTES as u64, "{written}");
        let problem = file.problem().expect("said");
        assert!(problem.contains("pod names are left out"), "{problem}");
        file.write(&[web()]).expect("write");
        assert_eq!(file.problem(), None, "fits again: nothing to say");
    }

    #[test]
    fn ten_thousand_pods_fit_and_what_does_not_fit_is_counted() {
        let long = |i: usize| format!("{}-{i:05}-staging.local", "x".repeat(230));
        let entries: Vec<HostEntry> = (0..10_000)
            .flat_map(|i| {
                let ip = IpAddr::V4(Ipv4Addr::new(127, 255, 255, 254));
                [
                    HostEntry {
                        ip,
                        names: vec![long(i), format!("{}host", long(i))],
                    },
                    HostEntry {
                        ip,
                        names: vec![long(i + 10_000)],
                    },
                ]
            })
            .collect();
        let rendered = render_user_file(&entries, MAX_NSS_FILE_BYTES);
        assert_eq!(
            rendered.left_out, None,
            "10,000 pods of the longest names fit"
        );
        assert!(rendered.text.len() <= MAX_NSS_FILE_BYTES);
        let small = render_user_file(&entries, 64 * 1024);
        let kept = small.text.lines().count() - 1;
        assert_eq!(small.left_out, Some(20_000 - kept));
        assert!(small.text.len() <= 64 * 1024);
    }

    #[test]
    fn refuses_a_linked_or_open_folder() {
        let runtime = tempfile::tempdir().expect("tempdir");
        let elsewhere = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink(elsewhere.path(), runtime.path().join(USER_DIR))
            .expect("plant a link");
        let file = UserNamesFile::in_runtime_dir(runtime.path(), uid());
        let err = file.write(&[web()]).expect_err("a link is refused");
        assert!(err.to_string().contains("not a folder"), "{err}");
        assert_eq!(fs::read_dir(elsewhere.path()).expect("read").count(), 0);

        let runtime = tempfile::tempdir().expect("tempdir");
        let dir = runtime.path().join(USER_DIR);
        fs::create_dir(&dir).expect("dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).expect("chmod");
        let file = UserNamesFile::in_runtime_dir(runtime.path(), uid());
        let err = file.write(&[web()]).expect_err("an open folder is refused");
        assert!(err.to_string().contains("chmod 700"), "{err}");
    }
}
