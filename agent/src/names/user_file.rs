//! This user's names file, `/run/user/<uid>/k3s-local-agent/names`, which the
//! package's NSS module (`libnss_k3slocal.so.2`, crate `nss-k3slocal`) reads
//! for this user's lookups only. One line per pod: `<address> <name>...`.
//!
//! The module trusts the file only when it is a regular file owned by the
//! user and writable by nobody else, so the agent keeps it that way: the
//! folder is made 0700 and must be ours and not a link, and the file is
//! replaced atomically with mode 0600.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{HostEntry, NamesError};
use crate::state::fsio;

/// Where every user's runtime dir lives, as the NSS module looks for it.
pub(super) const RUN_USER: &str = "/run/user";
/// The agent's folder in the user's runtime dir.
pub const USER_DIR: &str = "k3s-local-agent";
/// The names file in that folder.
pub const USER_FILE: &str = "names";

/// The names file of one user, in that user's runtime dir.
#[derive(Debug, Clone)]
pub struct UserNamesFile {
    dir: PathBuf,
    path: PathBuf,
    uid: u32,
}

impl UserNamesFile {
    /// The file in `runtime_dir` (`/run/user/<uid>`), to be owned by `uid`.
    pub fn in_runtime_dir(runtime_dir: &Path, uid: u32) -> Self {
        let dir = runtime_dir.join(USER_DIR);
        let path = dir.join(USER_FILE);
        Self { dir, path, uid }
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
            Ok(Err(why)) => Err(NamesError::Unsafe {
                path: self.path.clone(),
                why: why.to_string(),
            }),
            Err(source) => Err(NamesError::Read {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Makes the file list exactly `entries`.
    pub fn write(&self, entries: &[HostEntry]) -> Result<(), NamesError> {
        self.own_folder()?;
        let text = render_user_file(entries);
        if fs::read(&self.path).is_ok_and(|existing| existing == text.as_bytes()) {
            return Ok(());
        }
        fsio::atomic_replace(&self.path, text.as_bytes(), 0o600).map_err(|source| {
            NamesError::Write {
                path: self.path.clone(),
                source,
            }
        })
    }

    /// Removes the file: no pod of this user's resolves any more.
    pub fn clear(&self) -> Result<(), NamesError> {
        match fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(NamesError::Write {
                path: self.path.clone(),
                source,
            }),
        }
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

/// The file's text: a comment saying whose it is, then one line per entry.
pub fn render_user_file(entries: &[HostEntry]) -> String {
    let mut text = String::from(
        "# k3s-local-agent: this user's staging pod names, read by the k3slocal NSS module; \
         rewritten by the agent\n",
    );
    for entry in entries {
        // Writing to a String cannot fail.
        let _ = writeln!(text, "{} {}", entry.ip, entry.names.join(" "));
    }
    text
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
        assert!(text.ends_with("\n127.77.0.9 web-staging.local web-staging.localhost\n"));
        let meta = fs::metadata(file.path()).expect("meta");
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(meta.uid(), uid());
        let dir = fs::metadata(runtime.path().join(USER_DIR)).expect("dir");
        assert_eq!(dir.mode() & 0o777, 0o700);
        file.clear().expect("clear");
        assert!(!file.path().exists());
        file.clear().expect("clearing twice is fine");
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
