//! The safe core: which names this module answers, reading the user's names
//! file with the paranoid checks, and finding a name in it. No unsafe code and
//! no panics (no indexing, no unwrap); the FFI layer still runs it under
//! `catch_unwind`.
//!
//! A user is answered only while that user's agent runs (it holds an
//! open-file-description lock on `names.lock` beside the names file, which
//! the kernel drops when the agent exits, however it exits: a crash or
//! `kill -9` stops resolution at once), only with addresses in that user's
//! own block of the per-user layout (the same root-owned file the bind
//! helper reads), and never inside nscd, whose cache is shared by every
//! user while this module's answers are each user's own.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::net::Ipv4Addr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use k3s_local_agent_bind::policy::{self, Block};

/// Every name this module answers ends with this (ASCII case-insensitive).
pub const SUFFIX: &str = "-staging.local";
/// A names file larger than this is ignored. 10,000 pods (the agent's
/// default cap) with a short and a long name each, both of the longest
/// (253 bytes, behind a 15-byte address), take 5.4 MB; 6 MiB holds them and
/// keeps what one lookup reads bounded. The agent checks its file against
/// the same figure (`MAX_NSS_FILE_BYTES` in its `names::user_file`).
pub const MAX_FILE_BYTES: u64 = 6 * 1024 * 1024;
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

/// The agent's folder of the user with real uid `uid`.
pub fn agent_dir(uid: u32) -> PathBuf {
    PathBuf::from(format!("/run/user/{uid}/k3s-local-agent"))
}

/// The names file of the user with real uid `uid`.
pub fn names_file_path(uid: u32) -> PathBuf {
    agent_dir(uid).join("names")
}

/// The lock the user's running agent holds, beside the names file.
pub fn lock_file_path(uid: u32) -> PathBuf {
    agent_dir(uid).join("names.lock")
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
    find_where(text, name, |_| true)
}

/// [`find`] over the lines whose address is `allowed`.
pub fn find_where(text: &[u8], name: &[u8], allowed: impl Fn(Ipv4Addr) -> bool) -> Option<Answer> {
    let wanted = our_name(name)?;
    text.split(|&b| b == b'\n').find_map(|line| {
        let line = line.split(|&b| b == b'#').next().unwrap_or_default();
        let mut fields = line
            .split(|&b| b == b' ' || b == b'\t' || b == b'\r')
            .filter(|field| !field.is_empty());
        let address: Ipv4Addr = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
        if !allowed(address) {
            return None;
        }
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
    let file = open_trusted(path, uid)?;
    if file.metadata().ok()?.len() > MAX_FILE_BYTES {
        return None;
    }
    // The file may grow after the fstat: never read more than the limit.
    let mut text = Vec::new();
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut text).ok()?;
    (text.len() as u64 <= MAX_FILE_BYTES).then_some(text)
}

/// Opens `path` as [`read_names_file`] does and checks the same of it: a
/// regular file of `uid`'s, writable by nobody else.
fn open_trusted(path: &Path, uid: u32) -> Option<File> {
    // std adds O_CLOEXEC itself; it is repeated here so the flags are all in
    // one place.
    let file: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    (meta.file_type().is_file() && meta.uid() == uid && meta.mode() & 0o022 == 0).then_some(file)
}

/// Whether the agent of `uid` runs: its lock file at `path` (trusted as the
/// names file is) carries a lock. `F_OFD_GETLK` only asks, so a lookup never
/// holds the lock and never makes a starting agent wait.
pub fn agent_is_running(path: &Path, uid: u32) -> bool {
    use nix::fcntl::{fcntl, FcntlArg};
    let Some(file) = open_trusted(path, uid) else {
        return false;
    };
    let mut probe = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        // Must be 0 for open-file-description locks.
        l_pid: 0,
    };
    fcntl(&file, FcntlArg::F_OFD_GETLK(&mut probe)).is_ok()
        && probe.l_type != libc::F_UNLCK as libc::c_short
}

/// Whether this process is nscd: its hosts cache is shared by every user,
/// and this module's answers are each user's own, so it answers nscd
/// nothing (an answer for nscd's own uid would be served to everyone).
fn in_nscd() -> bool {
    std::fs::read("/proc/self/comm").is_ok_and(|comm| comm == b"nscd\n")
}

/// The address block of `uid` under the layout in root's config file;
/// `None` when the config is unsafe or the uid has no block (then nothing
/// is answered: fail closed).
fn users_block(uid: u32) -> Option<Block> {
    policy::load_config(Path::new(policy::CONFIG_PATH))
        .ok()?
        .user_block(uid)
        .ok()
}

/// Looks `name` up in the names file at `path` on behalf of `uid`, with no
/// other check: the file's own (see [`read_names_file`]).
pub fn lookup_in(path: &Path, uid: u32, name: &[u8]) -> Option<Answer> {
    if !is_our_name(name) {
        return None;
    }
    find(&read_names_file(path, uid)?, name)
}

/// Looks `name` up for `uid` in the agent folder `dir`: only while the
/// agent holds its lock there, and only an address in `block`.
pub fn lookup_in_dir(dir: &Path, uid: u32, name: &[u8], block: Block) -> Option<Answer> {
    if !is_our_name(name) || !agent_is_running(&dir.join("names.lock"), uid) {
        return None;
    }
    let text = read_names_file(&dir.join("names"), uid)?;
    find_where(&text, name, |address| block.check(address).is_ok())
}

/// Looks `name` up for the user with real uid `uid`, in that user's own
/// folder, while that user's agent runs, within that user's own block.
pub fn lookup(uid: u32, name: &[u8]) -> Option<Answer> {
    if !is_our_name(name) || in_nscd() {
        return None;
    }
    lookup_in_dir(&agent_dir(uid), uid, name, users_block(uid)?)
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

    /// Holds an open-file-description write lock on `path`, as the agent
    /// does, until dropped.
    fn hold_lock(path: &Path) -> File {
        use nix::fcntl::{fcntl, FcntlArg};
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .expect("open lock");
        let lock = libc::flock {
            l_type: libc::F_WRLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        fcntl(&file, FcntlArg::F_OFD_SETLK(&lock)).expect("lock");
        file
    }

    #[test]
    fn answers_only_while_the_agent_holds_its_lock_and_only_in_the_users_block() {
        let dir = Dir::new("locked");
        let block = Block::parse("127.77.0.0/24").expect("block");
        dir.file(
            "names",
            b"127.78.0.9 web-staging.local\n127.77.0.9 web-staging.local\n127.78.0.5 other-staging.local\n",
            0o600,
        );
        let lock = dir.file("names.lock", b"", 0o600);
        let web = || lookup_in_dir(&dir.0, me(), b"web-staging.local", block).map(|a| a.address);
        assert_eq!(
            web(),
            None,
            "no agent holds the lock: a crashed agent's names are dead"
        );
        let held = hold_lock(&lock);
        assert_eq!(
            web(),
            Some(Ipv4Addr::new(127, 77, 0, 9)),
            "the line outside the block is skipped"
        );
        assert_eq!(
            lookup_in_dir(&dir.0, me(), b"other-staging.local", block),
            None,
            "another user's block is never answered"
        );
        assert_eq!(
            lookup_in_dir(&dir.0, me().wrapping_add(1), b"web-staging.local", block),
            None,
            "files of another owner"
        );
        drop(held);
        assert_eq!(web(), None, "the lock went with its holder");
        // A lock file of another owner, or a link, proves nothing.
        std::fs::remove_file(&lock).expect("rm");
        symlink(dir.0.join("names"), &lock).expect("symlink");
        assert!(!agent_is_running(&lock, me()));
    }

    #[test]
    fn the_path_is_per_user() {
        assert_eq!(
            names_file_path(1000),
            PathBuf::from("/run/user/1000/k3s-local-agent/names")
        );
        assert_eq!(
            lock_file_path(1000),
            PathBuf::from("/run/user/1000/k3s-local-agent/names.lock")
        );
        assert_eq!(lookup(me(), b"unrelated.example"), None);
    }
}
