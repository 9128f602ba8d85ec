//! Crash-safe file replacement, shared by the hosts file and the state dir:
//! a reader sees the old file or the new one, never an empty or torn one.
//! And the rule for the agent's own files: a folder or file it adopts must
//! be the running user's and not a link, checked on the open descriptor
//! (`O_NOFOLLOW`, `fstat`), never on the path, so a file planted by someone
//! else (a link to a victim, a token of an attacker's) is refused by name.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

/// Replaces `path` with `contents` atomically: a temp file in the same folder,
/// written, fsynced, given `mode` (Unix permission bits), renamed over the
/// target, and the folder fsynced so the rename itself survives a crash.
///
/// When the target is a mount point (a container's bind-mounted `/etc/hosts`)
/// a rename over it fails with `EBUSY`; then, and only then, the file is
/// rewritten in place, which is the best such a target allows.
pub fn atomic_replace(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    atomic_replace_owned(path, contents, mode, None)
}

/// Who a replaced file belongs to: a system file edited as root (the
/// nsswitch.conf of `system-setup`) keeps the owner it had, not root's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// [`atomic_replace`], the new file given `owner` as well when there is one.
/// The temp file's name is unpredictable (`O_EXCL`, random suffix), so a
/// name planted beforehand in a shared folder cannot be written through.
pub fn atomic_replace_owned(
    path: &Path,
    contents: &[u8],
    mode: u32,
    owner: Option<Owner>,
) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut temp = tempfile::Builder::new()
        .prefix(".k3s-local-agent-")
        .tempfile_in(dir)?;
    set_owner(temp.as_file(), owner)?;
    // After the chown, which clears set-id bits: exactly `mode` is kept.
    set_mode(temp.as_file(), mode)?;
    temp.write_all(contents)?;
    temp.as_file().sync_all()?;
    // On any error below the temp file is removed when `temp` (or the
    // persist error holding it) drops.
    match temp.persist(path) {
        Ok(_) => {
            sync_dir(dir);
            Ok(())
        }
        Err(err) if is_busy(&err.error) => {
            tracing::debug!(path = %path.display(), "target is a mount point; rewriting in place");
            rewrite_in_place(path, contents)
        }
        Err(err) => Err(err.error),
    }
}

#[cfg(unix)]
fn set_owner(file: &fs::File, owner: Option<Owner>) -> io::Result<()> {
    match owner {
        Some(Owner { uid, gid }) => std::os::unix::fs::fchown(file, Some(uid), Some(gid)),
        None => Ok(()),
    }
}

#[cfg(not(unix))]
fn set_owner(_file: &fs::File, _owner: Option<Owner>) -> io::Result<()> {
    Ok(())
}

/// Writes the whole new content from offset 0 before cutting the tail, so the
/// file is never empty at any moment.
fn rewrite_in_place(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file = fs::OpenOptions::new().write(true).open(path)?;
    file.write_all(contents)?;
    file.set_len(contents.len() as u64)?;
    file.sync_all()
}

fn is_busy(err: &io::Error) -> bool {
    // EBUSY is 16 on Linux; ResourceBusy is the stable kind for it.
    err.kind() == io::ErrorKind::ResourceBusy
}

#[cfg(unix)]
fn set_mode(file: &fs::File, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_file: &fs::File, _mode: u32) -> io::Result<()> {
    Ok(())
}

/// Flushes `dir`, so a rename or removal in it lasts; best effort.
#[cfg(unix)]
pub fn sync_dir(dir: &Path) {
    // Best effort: some filesystems refuse fsync on a directory.
    if let Ok(handle) = fs::File::open(dir) {
        let _ = handle.sync_all();
    }
}

#[cfg(not(unix))]
pub fn sync_dir(_dir: &Path) {}

/// Creates `dir` (and missing parents) readable by its owner only; an
/// existing directory is left as it is (it may be one the user shares).
#[cfg(unix)]
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)
}

/// Makes an existing file of ours readable and writable by its owner only,
/// through a descriptor opened without following links (a `chmod` of the
/// path would change whatever a planted link points at).
pub fn make_private(path: &Path) -> io::Result<()> {
    match open_own(path)? {
        Some(Ok(file)) => set_mode(&file, 0o600),
        Some(Err(why)) => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("refusing {}: {why}", path.display()),
        )),
        None => Err(io::Error::from(io::ErrorKind::NotFound)),
    }
}

/// The permission bits of an existing file, for keeping them on replace.
#[cfg(unix)]
pub fn mode_of(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o7777)
}

#[cfg(not(unix))]
pub fn mode_of(_path: &Path) -> Option<u32> {
    None
}

/// Why a folder or file of the agent's own cannot be used as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotOurs {
    #[error("it is a symbolic link; remove it (and let the agent make a real one)")]
    Link,
    #[error("it is not a regular file; remove it")]
    NotAFile,
    #[error("it is not a directory")]
    NotADir,
    #[error(
        "it belongs to uid {owner}, not to this user (uid {us}); remove it, or run as its owner"
    )]
    Owner { owner: u32, us: u32 },
    #[error("every user may write to it (mode {mode:o}); `chmod o-w` it")]
    OpenToAll { mode: u32 },
}

/// The effective uid the agent's files must belong to (`None` where the
/// platform gives no owners to compare).
fn our_uid() -> Option<u32> {
    #[cfg(target_os = "linux")]
    {
        Some(nix::unistd::geteuid().as_raw())
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

#[cfg(unix)]
fn check_meta(meta: &fs::Metadata) -> Result<(), NotOurs> {
    use std::os::unix::fs::MetadataExt;
    if let Some(us) = our_uid() {
        if meta.uid() != us {
            return Err(NotOurs::Owner {
                owner: meta.uid(),
                us,
            });
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_meta(_meta: &fs::Metadata) -> Result<(), NotOurs> {
    Ok(())
}

/// Checks a folder the agent keeps its files in: a real directory (not a
/// link), ours, and not writable by every user (who could plant files).
pub fn check_own_dir(dir: &Path) -> Result<(), NotOurs> {
    let meta = fs::symlink_metadata(dir).map_err(|_| NotOurs::NotADir)?;
    if meta.file_type().is_symlink() {
        return Err(NotOurs::Link);
    }
    if !meta.is_dir() {
        return Err(NotOurs::NotADir);
    }
    check_meta(&meta)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o002 != 0 {
            return Err(NotOurs::OpenToAll { mode });
        }
    }
    Ok(())
}

/// Opens one of the agent's own files for reading without following a link,
/// and checks the open descriptor: a regular file of ours. `Ok(None)` when
/// there is no such file.
pub fn open_own(path: &Path) -> io::Result<Option<Result<fs::File, NotOurs>>> {
    let mut options = fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // O_NOFOLLOW: a link is refused by the kernel (ELOOP), not followed;
        // O_NONBLOCK: a planted FIFO cannot hang the open.
        options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    }
    let file = match options.open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) if is_link_refusal(&err) => return Ok(Some(Err(NotOurs::Link))),
        Err(err) => return Err(err),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(Some(Err(NotOurs::NotAFile)));
    }
    Ok(Some(check_meta(&meta).map(|()| file)))
}

/// Opens (making it, `mode`, when missing) one of the agent's own files
/// for reading and writing, without following a link, and checks the open
/// descriptor: a regular file of ours. For a file whose content does not
/// matter, only its descriptor (a lock file).
pub fn open_own_file(path: &Path, mode: u32) -> io::Result<fs::File> {
    let mut options = fs::OpenOptions::new();
    options.read(true).write(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let file = options.open(path).map_err(|err| {
        if is_link_refusal(&err) {
            io::Error::other(NotOurs::Link)
        } else {
            err
        }
    })?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other(NotOurs::NotAFile));
    }
    check_meta(&meta).map_err(io::Error::other)?;
    Ok(file)
}

/// Checks an existing file of the agent's without opening it through a
/// link: `Ok(())` also when it does not exist.
pub fn check_own_file(path: &Path) -> io::Result<Result<(), NotOurs>> {
    Ok(match open_own(path)? {
        None | Some(Ok(_)) => Ok(()),
        Some(Err(why)) => Err(why),
    })
}

/// `O_NOFOLLOW` refuses a link with `ELOOP` (Linux) or `EMLINK` (BSDs).
#[cfg(unix)]
fn is_link_refusal(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(code) if code == libc::ELOOP || code == libc::EMLINK)
}

#[cfg(not(unix))]
fn is_link_refusal(_err: &io::Error) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The owner given is the new file's, and the mode exactly the one asked
    /// (a chown clears set-id bits; they are put back after it). Another
    /// user's owner only where the test may give files away (as root).
    #[cfg(unix)]
    #[test]
    fn an_owned_replace_keeps_owner_and_mode() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nsswitch.conf");
        fs::write(&path, "old\n").expect("seed");
        let root = nix::unistd::geteuid().is_root();
        let owner = if root {
            Owner {
                uid: 65534,
                gid: 65534,
            }
        } else {
            Owner {
                uid: nix::unistd::geteuid().as_raw(),
                gid: nix::unistd::getegid().as_raw(),
            }
        };
        let mode = if root { 0o2644 } else { 0o640 };
        atomic_replace_owned(&path, b"new\n", mode, Some(owner)).expect("replace");
        let meta = fs::metadata(&path).expect("stat");
        assert_eq!((meta.uid(), meta.gid()), (owner.uid, owner.gid));
        assert_eq!(mode_of(&path), Some(mode));
        assert_eq!(fs::read_to_string(&path).expect("read"), "new\n");
        assert_eq!(fs::read_dir(dir.path()).expect("list").count(), 1);
    }

    #[test]
    fn replaces_content_and_keeps_no_temp_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hosts");
        fs::write(&path, "old\n").expect("seed");
        atomic_replace(&path, b"new\n", 0o644).expect("replace");
        assert_eq!(fs::read_to_string(&path).expect("read"), "new\n");
        assert_eq!(mode_of(&path), Some(0o644));
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 1, "temp file left behind: {names:?}");
    }
}
