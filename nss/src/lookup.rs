//! The safe core: which names this module answers, reading the user's names
//! file with the paranoid checks, and finding a name in it. No unsafe code and
//! no panics (no indexing, no unwrap); the FFI layer still runs it under
//! `catch_unwind`.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::net::Ipv4Addr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Every name this module answers ends with this (ASCII case-insensitive).
pub const SUFFIX: &str = "-staging.local";
/// A names file larger than this is ignored.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// The longest host name (without a trailing dot).
const MAX_NAME_BYTES: usize = 253;
/// The longest label of a host name.
const MAX_LABEL_BYTES: usize = 63;

/// The answer for one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub address: Ipv4Addr,
    /// The first usable name of the matching line, without a trailing dot.
    pub canonical: String,
    /// The other usable names of that line.
    pub aliases: Vec<String>,
}

/// The names file of the user with real uid `uid`.
pub fn names_file_path(uid: u32) -> PathBuf {
    PathBuf::from(format!("/run/user/{uid}/k3s-local-agent/names"))
}

/// `name` without one trailing dot, if it is a valid host name ending in
/// [`SUFFIX`] with something before the suffix.
fn our_name(name: &[u8]) -> Option<&[u8]> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return None;
    }
    let valid_labels = name.split(|&b| b == b'.').all(|label| {
        !label.is_empty()
            && label.len() <= MAX_LABEL_BYTES
            && label
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'-')
    });
    let suffix = SUFFIX.as_bytes();
    let prefix_len = name.len().checked_sub(suffix.len())?;
    let (prefix, tail) = name.split_at_checked(prefix_len)?;
    (valid_labels && !prefix.is_empty() && tail.eq_ignore_ascii_case(suffix)).then_some(name)
}

/// Whether this module answers `name` at all (every other name is "not
/// found" without reading anything).
pub fn is_our_name(name: &[u8]) -> bool {
    our_name(name).is_some()
}

/// Finds `name` in the text of a names file: the first line naming it wins.
pub fn find(text: &[u8], name: &[u8]) -> Option<Answer> {
    let wanted = our_name(name)?;
    text.split(|&b| b == b'\n').find_map(|line| {
        let line = line.split(|&b| b == b'#').next().unwrap_or_default();
        let mut fields = line
            .split(|&b| b == b' ' || b == b'\t' || b == b'\r')
            .filter(|field| !field.is_empty());
        let address: Ipv4Addr = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
        // Only valid names of ours are ever handed to the caller.
        let mut names = fields
            .filter_map(our_name)
            .filter_map(|n| std::str::from_utf8(n).ok());
        let canonical = names.next()?;
        let aliases: Vec<&str> = names.collect();
        let matches = std::iter::once(canonical)
            .chain(aliases.iter().copied())
            .any(|n| n.as_bytes().eq_ignore_ascii_case(wanted));
        matches.then(|| Answer {
            address,
            canonical: canonical.to_owned(),
            aliases: aliases.into_iter().map(str::to_owned).collect(),
        })
    })
}

/// The contents of the names file at `path`, if it is safe to trust: opened
/// without following a symlink and without blocking on a FIFO, and the open
/// descriptor (`fstat`) is a regular file owned by `uid`, not writable by
/// group or others, and at most [`MAX_FILE_BYTES`]. `None` otherwise.
pub fn read_names_file(path: &Path, uid: u32) -> Option<Vec<u8>> {
    // std adds O_CLOEXEC itself; it is repeated here so the flags are all in
    // one place.
    let file: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    let trusted = meta.file_type().is_file()
        && meta.uid() == uid
        && meta.mode() & 0o022 == 0
        && meta.len() <= MAX_FILE_BYTES;
    if !trusted {
        return None;
    }
    // The file may grow after the fstat: never read more than the limit.
    let mut text = Vec::new();
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut text).ok()?;
    (text.len() as u64 <= MAX_FILE_BYTES).then_some(text)
}

/// Looks `name` up in the names file at `path` on behalf of `uid`.
pub fn lookup_in(path: &Path, uid: u32, name: &[u8]) -> Option<Answer> {
    if !is_our_name(name) {
        return None;
    }
    find(&read_names_file(path, uid)?, name)
}

/// Looks `name` up for the user with real uid `uid`, in that user's own file.
pub fn lookup(uid: u32, name: &[u8]) -> Option<Answer> {
    if !is_our_name(name) {
        return None;
    }
    lookup_in(&names_file_path(uid), uid, name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    const TEXT: &[u8] = b"# written by k3s-local-agent\n\
        \n\
        127.77.0.9 web-staging.local web-staging-staging-staging.local\n\
        127.77.0.10\tapi-staging.local # trailing comment\r\n\
        999.1.1.1 broken-staging.local\n\
        127.77.0.11\n\
        127.77.0.12 google.com\n\
        127.77.0.13 db-staging.local google.com DB2-Staging.Local.\n\
        127.77.0.14 web-staging.local\n";

    fn me() -> u32 {
        std::fs::metadata("/proc/self")
            .map(|m| m.uid())
            .unwrap_or(0)
    }

    fn addr(answer: Option<Answer>) -> Option<Ipv4Addr> {
        answer.map(|a| a.address)
    }

    #[test]
    fn only_names_ending_in_the_suffix_are_ours() {
        for name in [
            "web-staging.local",
            "WEB-STAGING.LOCAL",
            "web-staging.local.",
            "a.b-staging.local",
            "x-y-staging.local",
        ] {
            assert!(is_our_name(name.as_bytes()), "{name}");
        }
        for name in [
            "",
            ".",
            "-staging.local",
            "staging.local",
            "web-staging.localhost",
            "web-staging.local..",
            "web.staging.local",
            "localhost",
            "unrelated.example",
            "we b-staging.local",
            "web_x-staging.local",
            "a..b-staging.local",
            "wéb-staging.local",
        ] {
            assert!(!is_our_name(name.as_bytes()), "{name:?}");
        }
        let long_label = format!("{}-staging.local", "a".repeat(64));
        assert!(!is_our_name(long_label.as_bytes()));
        let long_name = format!("{}{}-staging.local", "a.".repeat(120), "b".repeat(10));
        assert!(long_name.len() > MAX_NAME_BYTES);
        assert!(!is_our_name(long_name.as_bytes()));
    }

    #[test]
    fn finds_names_case_insensitively_first_line_wins() {
        let web = find(TEXT, b"web-staging.local");
        assert_eq!(
            web,
            Some(Answer {
                address: Ipv4Addr::new(127, 77, 0, 9),
                canonical: "web-staging.local".into(),
                aliases: vec!["web-staging-staging-staging.local".into()],
            })
        );
        assert_eq!(find(TEXT, b"Web-Staging.Local."), web);
        let alias = find(TEXT, b"web-staging-staging-staging.local");
        assert_eq!(alias.map(|a| a.canonical), Some("web-staging.local".into()));
        assert_eq!(
            addr(find(TEXT, b"api-staging.local")),
            Some(Ipv4Addr::new(127, 77, 0, 10))
        );
    }

    #[test]
    fn skips_malformed_lines_and_foreign_names() {
        assert_eq!(find(TEXT, b"broken-staging.local"), None);
        assert_eq!(find(TEXT, b"google.com"), None);
        let db = find(TEXT, b"db2-staging.local");
        assert_eq!(
            db,
            Some(Answer {
                address: Ipv4Addr::new(127, 77, 0, 13),
                canonical: "db-staging.local".into(),
                aliases: vec!["DB2-Staging.Local".into()],
            })
        );
        assert_eq!(find(TEXT, b"missing-staging.local"), None);
        assert_eq!(find(b"", b"web-staging.local"), None);
        assert_eq!(find(b"\xff\xfe 127.0.0.1", b"web-staging.local"), None);
        assert_eq!(
            addr(find(
                b"\xff\n127.1.2.3 \xff web-staging.local",
                b"web-staging.local"
            )),
            Some(Ipv4Addr::new(127, 1, 2, 3))
        );
        // Not an IPv4 address in std's strict syntax.
        for line in [
            "::1 a-staging.local",
            "127.1 a-staging.local",
            "0127.0.0.1 a-staging.local",
        ] {
            assert_eq!(find(line.as_bytes(), b"a-staging.local"), None, "{line}");
        }
    }

    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Self {
            let path = std::env::temp_dir()
                .join(format!("nss-k3slocal-test-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).expect("create test dir");
            Self(path)
        }

        fn file(&self, name: &str, text: &[u8], mode: u32) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, text).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
            path
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn reads_a_file_owned_by_the_user() {
        let dir = Dir::new("owned");
        let path = dir.file("names", TEXT, 0o600);
        assert_eq!(
            addr(lookup_in(&path, me(), b"web-staging.local")),
            Some(Ipv4Addr::new(127, 77, 0, 9))
        );
        let readable = dir.file("readable", TEXT, 0o644);
        assert!(read_names_file(&readable, me()).is_some());
        // Foreign names are refused before the file is read.
        assert_eq!(lookup_in(&path, me(), b"google.com"), None);
    }

    #[test]
    fn refuses_files_it_cannot_trust() {
        let dir = Dir::new("untrusted");
        let good = dir.file("names", TEXT, 0o600);
        assert!(
            read_names_file(&good, me().wrapping_add(1)).is_none(),
            "other owner"
        );
        let group_writable = dir.file("gw", TEXT, 0o620);
        assert!(read_names_file(&group_writable, me()).is_none());
        let other_writable = dir.file("ow", TEXT, 0o602);
        assert!(read_names_file(&other_writable, me()).is_none());
        let link = dir.0.join("link");
        symlink(&good, &link).expect("symlink");
        assert!(read_names_file(&link, me()).is_none(), "symlink");
        assert!(read_names_file(&dir.0, me()).is_none(), "directory");
        assert!(read_names_file(&dir.0.join("missing"), me()).is_none());
        let big = dir.file("big", b"", 0o600);
        let file = OpenOptions::new().write(true).open(&big).expect("open");
        file.set_len(MAX_FILE_BYTES + 1).expect("grow");
        assert!(read_names_file(&big, me()).is_none(), "too big");
        file.set_len(MAX_FILE_BYTES).expect("shrink");
        assert!(read_names_file(&big, me()).is_some(), "exactly the limit");
        let fifo = dir.0.join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            // O_NONBLOCK: opening a FIFO without a writer does not hang.
            assert!(read_names_file(&fifo, me()).is_none(), "fifo");
        }
    }

    #[test]
    fn the_path_is_per_user() {
        assert_eq!(
            names_file_path(1000),
            PathBuf::from("/run/user/1000/k3s-local-agent/names")
        );
        assert_eq!(lookup(me(), b"unrelated.example"), None);
    }
}
