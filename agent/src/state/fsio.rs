//! Crash-safe file replacement, shared by the hosts file and the state dir:
//! a reader sees the old file or the new one, never an empty or torn one.

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
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut temp = tempfile::Builder::new()
        .prefix(".k3s-local-agent-")
        .tempfile_in(dir)?;
    temp.write_all(contents)?;
    set_mode(temp.as_file(), mode)?;
    temp.as_file().sync_all()?;
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

#[cfg(unix)]
fn sync_dir(dir: &Path) {
    // Best effort: some filesystems refuse fsync on a directory.
    if let Ok(handle) = fs::File::open(dir) {
        let _ = handle.sync_all();
    }
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) {}

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

/// Makes an existing file readable and writable by its owner only.
pub fn make_private(path: &Path) -> io::Result<()> {
    set_mode(&fs::File::open(path)?, 0o600)
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

#[cfg(test)]
mod tests {
    use super::*;

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
