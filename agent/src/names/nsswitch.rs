//! `/etc/nsswitch.conf`: putting our `k3slocal` NSS module on the `hosts:`
//! line and taking it off again. Only that line (or a marked line of our own)
//! ever changes, every other byte is kept, removal after adding gives back the
//! original byte for byte, and every write is an atomic replace.
//!
//! The file is bytes, not text: glibc reads it byte by byte in whatever
//! encoding its author used (a Latin-1 comment is common on older systems),
//! and we must never refuse, or mangle, a file that glibc reads fine. Every
//! offset below is a byte offset and every comparison a byte comparison.
//!
//! The file is read as glibc 2.33+ reads it (`nss/nss_database.c`,
//! `nss/nss_action_parse.c`, checked against glibc 2.36 in a private mount
//! namespace):
//! - leading white space is skipped; the database name is case-sensitive
//!   (`HOSTS:` is not `hosts:`) and ends at white space or `:`; any run of
//!   white space and colons follows it, so `hosts files dns` counts too;
//! - white space is C `isspace`, so the `\r` of a CRLF file is just a blank;
//! - the *last* `hosts` line wins;
//! - a service is a name, then optionally `[STATUS=action ...]`; a `[` where
//!   a name should start ends the list;
//! - glibc does NOT strip `#` comments on a service line: `hosts: dns # files`
//!   really consults `files`. We still treat a word starting with `#` as the
//!   start of a comment (that is what its author meant, and what the manual
//!   says), so a `k3slocal` written in a comment neither counts as present
//!   nor is ever removed;
//! - a last line without a newline is ignored by glibc (`getline` sets EOF
//!   and the loop stops before parsing it). We edit such a line like any
//!   other, since that is what its author meant; see [`last_line_ignored`].

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use crate::state::fsio;

/// Our NSS module's name (`libnss_k3slocal.so.2`).
pub const MODULE: &str = "k3slocal";
/// The file edited, relative to the root handed to [`install`] and [`remove`].
pub const CONF: &str = "etc/nsswitch.conf";
/// Comment line above the `hosts:` line we add to a file that had none.
pub const ADDED_MARKER: &str =
    "# k3s-local-agent: added the next line (this file had no hosts: line); removed on uninstall";
/// Comment line above the `hosts:` line of a file we created.
pub const CREATED_MARKER: &str =
    "# k3s-local-agent: created this file for the next line; removed on uninstall";
/// The `hosts:` line we add: glibc's default for a missing line (`files
/// dns`) with our module after `files`, so lookups behave as before for
/// every other name.
pub const ADDED_HOSTS_LINE: &str = "hosts: files k3slocal dns";

/// Symbolic links followed before giving up (a loop, or a silly chain).
const MAX_LINKS: usize = 8;

/// What [`install`] or [`remove`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The file was rewritten (or created, or deleted).
    Changed,
    /// The file already was as asked; nothing was written.
    AlreadySo,
}

/// Why the file could not be edited.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{path} does not exist or is not a directory; is the root right?")]
    NoEtc { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is a chain of more than {MAX_LINKS} symbolic links; refusing to follow it")]
    TooManyLinks { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// The file with our module on the effective `hosts:` line. `text` is the
/// file's bytes, `None` when there is no file; the result always is a file.
/// Adding to a file that has the module already returns it unchanged.
pub fn with_module<T: AsRef<[u8]> + ?Sized>(text: Option<&T>) -> Vec<u8> {
    let Some(text) = text.map(AsRef::as_ref) else {
        return format!("{CREATED_MARKER}\n{ADDED_HOSTS_LINE}\n").into_bytes();
    };
    let lines = lines(text);
    let Some((line, hosts)) = effective_hosts(text, &lines) else {
        // No hosts line: add ours, marked, where the settings begin.
        let at = block_position(text, &lines);
        let eol: &[u8] = if lines
            .first()
            .is_some_and(|l| l.content(text).ends_with(b"\r"))
        {
            b"\r\n"
        } else {
            b"\n"
        };
        let mut out = Vec::with_capacity(text.len() + 160);
        out.extend_from_slice(&text[..at]);
        out.extend_from_slice(ADDED_MARKER.as_bytes());
        out.extend_from_slice(eol);
        out.extend_from_slice(ADDED_HOSTS_LINE.as_bytes());
        out.extend_from_slice(eol);
        out.extend_from_slice(&text[at..]);
        return out;
    };
    let content = line.content(text);
    if hosts.services.iter().any(|s| is_module(content, *s)) {
        return text.to_owned();
    }
    // Right after `files` (and its action): names are looked up in the
    // hosts file first, as ever, then by us, before mDNS or DNS can answer
    // (or, with `[NOTFOUND=return]`, stop the lookup). Without `files`, first.
    let files = hosts
        .services
        .iter()
        .find(|s| &content[s.name()] == b"files");
    let at = match files {
        Some(files) => files.end,
        None => hosts.services.first().map_or(hosts.key_end, |s| s.start),
    };
    // Exactly one blank goes in with the word: before it when a blank or the
    // end follows, else after it. One blank, never two or none, is what
    // makes removal exact: taking the word and the blank on either side
    // then gives the same text whenever both sides are blanks.
    let bytes = content;
    let (at, inserted) = if at == bytes.len() || is_space(bytes[at]) {
        (at, format!(" {MODULE}"))
    } else if at > 0 && (matches!(bytes[at - 1], b':' | b']') || is_space(bytes[at - 1])) {
        // The word starts a token of its own here (after the key's colon,
        // a blank or a closed action), so its blank can follow it.
        (at, format!("{MODULE} "))
    } else {
        // `files` glued to an unclosed `[` (a line glibc refuses anyway):
        // no room after it for the word with one blank, so before it.
        (files.map_or(at, |f| f.start), format!("{MODULE} "))
    };
    let mut out = Vec::with_capacity(text.len() + inserted.len());
    out.extend_from_slice(&text[..line.start + at]);
    out.extend_from_slice(inserted.as_bytes());
    out.extend_from_slice(&text[line.start + at..]);
    out
}

/// The file without our module: our marked line taken away, and the module
/// taken off the effective `hosts:` line. `None` means no file: the file was
/// ours alone. After [`with_module`], gives back the original byte for byte.
/// A module placed by hand goes with its own `[...]` action (left behind,
/// the action would change the service before it) and one adjacent blank.
pub fn without_module<T: AsRef<[u8]> + ?Sized>(text: Option<&T>) -> Option<Vec<u8>> {
    let text = text?.as_ref();
    let (mut text, created) = without_block(text);
    if created && text.is_empty() {
        return None;
    }
    while let Some(next) = without_one_module(&text) {
        text = next;
    }
    Some(text)
}

/// Whether the effective `hosts:` line lists our module.
pub fn has_module<T: AsRef<[u8]> + ?Sized>(text: Option<&T>) -> bool {
    let Some(text) = text.map(AsRef::as_ref) else {
        return false;
    };
    let lines = lines(text);
    effective_hosts(text, &lines).is_some_and(|(line, hosts)| {
        let content = line.content(text);
        hosts.services.iter().any(|s| is_module(content, *s))
    })
}

/// Whether the file ends in a line without a newline that glibc 2.33+
/// therefore never reads (an edit there has no effect until a newline is
/// added). Worth a warning from a doctor; not ours to fix silently.
pub fn last_line_ignored<T: AsRef<[u8]> + ?Sized>(text: &T) -> bool {
    let text = text.as_ref();
    !text.is_empty() && !text.ends_with(b"\n")
}

/// Whether `<root>/etc/nsswitch.conf` (following symbolic links within
/// `root`) has our module on its effective `hosts:` line.
pub fn installed(root: &Path) -> Result<bool, SetupError> {
    let path = conf_path(root)?;
    Ok(read(&path)?.is_some_and(|file| has_module(Some(&file.bytes))))
}

/// Adds our module to `<root>/etc/nsswitch.conf` (following symbolic links
/// within `root`), creating the file if there is none.
pub fn install(root: &Path) -> Result<Outcome, SetupError> {
    let path = conf_path(root)?;
    let old = read(&path)?;
    let new = with_module(old.as_ref().map(|f| f.bytes.as_slice()));
    match &old {
        Some(old) if old.bytes == new => Ok(Outcome::AlreadySo),
        _ => {
            replace(&path, old.as_ref(), &new)?;
            Ok(Outcome::Changed)
        }
    }
}

/// Takes our module out of `<root>/etc/nsswitch.conf` (following symbolic
/// links within `root`), deleting the file if we had created it. A file
/// without our module is left exactly as it is, not even rewritten.
pub fn remove(root: &Path) -> Result<Outcome, SetupError> {
    let path = conf_path(root)?;
    let Some(old) = read(&path)? else {
        return Ok(Outcome::AlreadySo);
    };
    match without_module(Some(&old.bytes)) {
        Some(new) if new == old.bytes => Ok(Outcome::AlreadySo),
        Some(new) => {
            replace(&path, Some(&old), &new)?;
            Ok(Outcome::Changed)
        }
        None => {
            fs::remove_file(&path).map_err(|source| SetupError::Write {
                path: path.clone(),
                source,
            })?;
            sync_dir(&path);
            Ok(Outcome::Changed)
        }
    }
}

/// C `isspace` in the "C" locale, as glibc's parser uses it.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Whether `service` on the line `content` is our module.
fn is_module(content: &[u8], service: Service) -> bool {
    &content[service.name()] == MODULE.as_bytes()
}

/// One line of the file: `start..end` with its `\n`, `content_end` without.
#[derive(Debug, Clone, Copy)]
struct Line {
    start: usize,
    content_end: usize,
    end: usize,
}

impl Line {
    fn content(self, text: &[u8]) -> &[u8] {
        &text[self.start..self.content_end]
    }

    fn terminated(self) -> bool {
        self.end > self.content_end
    }
}

fn lines(text: &[u8]) -> Vec<Line> {
    let mut out = Vec::new();
    let mut start = 0;
    for piece in text.split_inclusive(|&b| b == b'\n') {
        let end = start + piece.len();
        let content_end = if piece.ends_with(b"\n") { end - 1 } else { end };
        out.push(Line {
            start,
            content_end,
            end,
        });
        start = end;
    }
    out
}

/// One service on a `hosts` line, as offsets into the line: its name at
/// `start`, and `end` past its `[...]` action if it has one.
#[derive(Debug, Clone, Copy)]
struct Service {
    start: usize,
    name_end: usize,
    end: usize,
}

impl Service {
    fn name(self) -> std::ops::Range<usize> {
        self.start..self.name_end
    }
}

/// A parsed `hosts` line: where the key and its colons end, and its services
/// (those before any comment).
#[derive(Debug)]
struct HostsLine {
    key_end: usize,
    services: Vec<Service>,
}

/// Parses `line` (without its `\n`) if glibc would take it as the `hosts`
/// database's line.
fn parse_hosts(b: &[u8]) -> Option<HostsLine> {
    let skip_space = |mut i: usize| {
        while i < b.len() && is_space(b[i]) {
            i += 1;
        }
        i
    };
    let name_start = skip_space(0);
    let mut i = name_start;
    while i < b.len() && !is_space(b[i]) && b[i] != b':' {
        i += 1;
    }
    if &b[name_start..i] != b"hosts" {
        return None;
    }
    // Insertion into an empty list goes after the colon, not after blanks
    // that may precede a comment.
    let mut key_end = i;
    while i < b.len() && (is_space(b[i]) || b[i] == b':') {
        if b[i] == b':' {
            key_end = i + 1;
        }
        i += 1;
    }
    let mut services = Vec::new();
    loop {
        i = skip_space(i);
        if i == b.len() || b[i] == b'#' || b[i] == b'[' {
            break;
        }
        let start = i;
        while i < b.len() && !is_space(b[i]) && b[i] != b'[' {
            i += 1;
        }
        let name_end = i;
        let mut end = i;
        let action = skip_space(i);
        let mut unclosed = false;
        if action < b.len() && b[action] == b'[' {
            // An unclosed `[` makes glibc refuse the line; we take the list
            // as ending there, so whatever we insert stays outside it.
            match b[action..].iter().position(|&c| c == b']') {
                Some(close) => {
                    end = action + close + 1;
                    i = end;
                }
                None => unclosed = true,
            }
        }
        services.push(Service {
            start,
            name_end,
            end,
        });
        if unclosed {
            break;
        }
    }
    Some(HostsLine { key_end, services })
}

/// The last `hosts` line: the one glibc uses.
fn effective_hosts(text: &[u8], lines: &[Line]) -> Option<(Line, HostsLine)> {
    lines
        .iter()
        .rev()
        .find_map(|&line| parse_hosts(line.content(text)).map(|hosts| (line, hosts)))
}

/// Where our marked line goes in a file without a `hosts` line: before the
/// first setting, after the comments that head the file. Never after an
/// unterminated last line (glibc would ignore ours, and a newline added
/// there could not be told apart on removal).
fn block_position(text: &[u8], lines: &[Line]) -> usize {
    lines
        .iter()
        .find(|line| {
            let content = line.content(text);
            let content = &content[content
                .iter()
                .position(|&b| !is_space(b))
                .unwrap_or(content.len())..];
            !line.terminated() || !(content.is_empty() || content.starts_with(b"#"))
        })
        .map_or(text.len(), |line| line.start)
}

/// `text` without our marked line(s): the marker and the `hosts` line under
/// it. Also tells whether the marker said we created the file.
fn without_block(text: &[u8]) -> (Vec<u8>, bool) {
    let lines = lines(text);
    let mut out = Vec::with_capacity(text.len());
    let mut created = false;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let mut content = line.content(text);
        while let Some(shorter) = content.strip_suffix(b"\r") {
            content = shorter;
        }
        let ours = content == ADDED_MARKER.as_bytes() || content == CREATED_MARKER.as_bytes();
        if ours {
            created |= content == CREATED_MARKER.as_bytes();
            i += 1;
            // Our line goes with its marker even if edited since: it was
            // never the user's.
            if lines
                .get(i)
                .is_some_and(|next| parse_hosts(next.content(text)).is_some())
            {
                i += 1;
            }
            continue;
        }
        out.extend_from_slice(&text[line.start..line.end]);
        i += 1;
    }
    (out, created)
}

/// `text` with one occurrence of our module taken off the effective `hosts`
/// line, or `None` when there is none.
fn without_one_module(text: &[u8]) -> Option<Vec<u8>> {
    let lines = lines(text);
    let (line, hosts) = effective_hosts(text, &lines)?;
    let b = line.content(text);
    let index = hosts.services.iter().position(|s| is_module(b, *s))?;
    let service = hosts.services[index];
    let cut = |from: usize, to: usize| {
        let mut out = Vec::with_capacity(text.len());
        out.extend_from_slice(&text[..line.start + from]);
        out.extend_from_slice(&text[line.start + to..]);
        out
    };
    // What `with_module` inserted: the word and a space before or after it.
    // The name alone is tried as well as the name with its action: a stray
    // `[`, where glibc ends the list, reads as our module's action once the
    // module stands before it.
    let space_at = |i: usize| b.get(i) == Some(&b' ');
    let before = service.start > 0 && space_at(service.start - 1);
    for end in [service.end, service.name_end] {
        let candidates = [
            before.then(|| cut(service.start - 1, end)),
            space_at(end).then(|| cut(service.start, end + 1)),
        ];
        for candidate in candidates.into_iter().flatten() {
            if with_module(Some(&candidate)) == text {
                return Some(candidate);
            }
        }
    }
    // Placed by hand: the word and one adjacent blank, the one between it
    // and the service before if there is one, so the list stays spaced as
    // it was around it.
    let blank = |i: usize| b[i] == b' ' || b[i] == b'\t';
    let (from, to) = if index > 0 && blank(service.start - 1) {
        (service.start - 1, service.end)
    } else if service.end < b.len() && blank(service.end) {
        (service.start, service.end + 1)
    } else if service.start > 0 && blank(service.start - 1) {
        (service.start - 1, service.end)
    } else {
        (service.start, service.end)
    };
    Some(cut(from, to))
}

/// The file as read, with what a replacement must keep of it.
#[derive(Debug)]
struct Existing {
    bytes: Vec<u8>,
    mode: u32,
    uid: u32,
    gid: u32,
}

/// `<root>/etc/nsswitch.conf`, or the file its symbolic links lead to,
/// resolved inside `root` (an absolute link target is taken as relative to
/// `root`, as it would be on that system). Replacing a link with a file
/// would cut off whatever manages the target (authselect on Fedora does so).
fn conf_path(root: &Path) -> Result<PathBuf, SetupError> {
    let etc = root.join("etc");
    if !etc.is_dir() {
        return Err(SetupError::NoEtc { path: etc });
    }
    let mut path = root.join(CONF);
    for _ in 0..MAX_LINKS {
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = fs::read_link(&path).map_err(|source| SetupError::Read {
                    path: path.clone(),
                    source,
                })?;
                path = match target.strip_prefix("/") {
                    Ok(inside) => root.join(inside),
                    Err(_) => path.parent().unwrap_or(root).join(target),
                };
            }
            _ => return Ok(path),
        }
    }
    Err(SetupError::TooManyLinks {
        path: root.join(CONF),
    })
}

fn read(path: &Path) -> Result<Option<Existing>, SetupError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SetupError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    let meta = fs::metadata(path).map_err(|source| SetupError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok(Some(Existing {
        bytes,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
    }))
}

/// Atomic replace ([`fsio::atomic_replace_owned`]) keeping the old file's
/// mode and owner: the file is a system's, edited as root.
fn replace(path: &Path, old: Option<&Existing>, bytes: &[u8]) -> Result<(), SetupError> {
    let mode = old.map_or(0o644, |old| old.mode);
    let owner = old.map(|old| fsio::Owner {
        uid: old.uid,
        gid: old.gid,
    });
    fsio::atomic_replace_owned(path, bytes, mode, owner).map_err(|source| SetupError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Flushes the directory holding `path`, so a removal in it lasts.
fn sync_dir(path: &Path) {
    fsio::sync_dir(path.parent().unwrap_or(Path::new(".")));
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::fs::PermissionsExt as _;

    /// [`with_module`] on text, as text (the cases below are all UTF-8;
    /// other encodings have tests of their own).
    fn add(text: Option<&str>) -> String {
        String::from_utf8(with_module(text)).unwrap()
    }

    /// [`without_module`] on text, as text.
    fn take(text: Option<&str>) -> Option<String> {
        without_module(text).map(|bytes| String::from_utf8(bytes).unwrap())
    }

    /// Adds, checks the exact result and idempotence, removes, checks the
    /// original comes back.
    fn round_trip(original: Option<&str>, expected: &str) {
        let added = add(original);
        assert_eq!(added, expected, "add to {original:?}");
        assert_eq!(add(Some(&added)), added, "add twice {original:?}");
        assert!(has_module(Some(&added)), "{added:?}");
        assert_eq!(
            take(Some(&added)).as_deref(),
            original,
            "remove from {added:?}"
        );
        assert!(!has_module(take(Some(&added)).as_deref()));
    }

    const DEBIAN: &str = "# /etc/nsswitch.conf\n#\n# Example configuration of GNU Name Service Switch functionality.\n\npasswd:         files systemd\ngroup:          files systemd\nshadow:         files systemd\ngshadow:        files systemd\n\nhosts:          files mdns4_minimal [NOTFOUND=return] dns myhostname\nnetworks:       files\n\nprotocols:      db files\nnetgroup:       nis\n";

    #[test]
    fn debian_file_gets_the_module_after_files() {
        let expected = DEBIAN.replace(
            "hosts:          files mdns4",
            "hosts:          files k3slocal mdns4",
        );
        round_trip(Some(DEBIAN), &expected);
    }

    #[test]
    fn ubuntu_resolve_line() {
        round_trip(
            Some("hosts: files mdns4_minimal [NOTFOUND=return] resolve [!UNAVAIL=return] dns\n"),
            "hosts: files k3slocal mdns4_minimal [NOTFOUND=return] resolve [!UNAVAIL=return] dns\n",
        );
    }

    #[test]
    fn bare_lines() {
        round_trip(Some("hosts: files dns\n"), "hosts: files k3slocal dns\n");
        round_trip(Some("hosts: files\n"), "hosts: files k3slocal\n");
        round_trip(Some("hosts: files"), "hosts: files k3slocal");
        round_trip(Some("hosts:\n"), "hosts: k3slocal\n");
        round_trip(Some("hosts\n"), "hosts k3slocal\n");
        round_trip(Some("hosts:dns\n"), "hosts:k3slocal dns\n");
        round_trip(Some("hosts files dns\n"), "hosts files k3slocal dns\n");
    }

    #[test]
    fn action_right_after_files_stays_with_files() {
        round_trip(
            Some("hosts: files [NOTFOUND=return] dns\n"),
            "hosts: files [NOTFOUND=return] k3slocal dns\n",
        );
        round_trip(
            Some("hosts: files[ NOTFOUND = return ]dns\n"),
            "hosts: files[ NOTFOUND = return ]k3slocal dns\n",
        );
    }

    #[test]
    fn without_files_the_module_goes_first() {
        round_trip(
            Some("hosts: mdns4_minimal [NOTFOUND=return] dns\n"),
            "hosts: k3slocal mdns4_minimal [NOTFOUND=return] dns\n",
        );
        round_trip(
            Some("hosts:\tresolve\tdns\n"),
            "hosts:\tk3slocal resolve\tdns\n",
        );
    }

    #[test]
    fn tabs_and_spaces_are_kept() {
        round_trip(
            Some("hosts:\t\tfiles\tdns\t\n"),
            "hosts:\t\tfiles k3slocal\tdns\t\n",
        );
        round_trip(
            Some("  \thosts :  files   dns\n"),
            "  \thosts :  files k3slocal   dns\n",
        );
    }

    #[test]
    fn comments_are_kept_and_ignored() {
        let original =
            "# hosts: files dns\n#hosts: dns\nhosts: files dns # files k3slocal here\n# end\n";
        round_trip(
            Some(original),
            "# hosts: files dns\n#hosts: dns\nhosts: files k3slocal dns # files k3slocal here\n# end\n",
        );
        round_trip(Some("hosts: dns # c\n"), "hosts: k3slocal dns # c\n");
        round_trip(Some("hosts:# c\n"), "hosts:k3slocal # c\n");
        round_trip(Some("hosts: files# c\n"), "hosts: k3slocal files# c\n");
        round_trip(Some("hosts: # c\n"), "hosts: k3slocal # c\n");
        // A stray `[` ends glibc's list; the module goes before it.
        round_trip(Some("hosts:[x\n"), "hosts:k3slocal [x\n");
    }

    #[test]
    fn the_last_hosts_line_is_the_one_edited() {
        round_trip(
            Some("hosts: files dns\nHOSTS: files\nhosts: files mdns\n"),
            "hosts: files dns\nHOSTS: files\nhosts: files k3slocal mdns\n",
        );
    }

    #[test]
    fn crlf_files_are_kept_crlf() {
        round_trip(
            Some("# c\r\nhosts: files dns\r\n"),
            "# c\r\nhosts: files k3slocal dns\r\n",
        );
        round_trip(Some("hosts: files\r\n"), "hosts: files k3slocal\r\n");
        round_trip(Some("hosts:\r\n"), "hosts: k3slocal\r\n");
        round_trip(
            Some("# c\r\npasswd: files\r\n"),
            &format!("# c\r\n{ADDED_MARKER}\r\n{ADDED_HOSTS_LINE}\r\npasswd: files\r\n"),
        );
    }

    #[test]
    fn no_hosts_line_gets_our_marked_line_before_the_settings() {
        round_trip(
            Some("# header\n\npasswd: files\n"),
            &format!("# header\n\n{ADDED_MARKER}\n{ADDED_HOSTS_LINE}\npasswd: files\n"),
        );
        round_trip(
            Some("# only comments\n"),
            &format!("# only comments\n{ADDED_MARKER}\n{ADDED_HOSTS_LINE}\n"),
        );
        round_trip(
            Some("# no newline"),
            &format!("{ADDED_MARKER}\n{ADDED_HOSTS_LINE}\n# no newline"),
        );
        round_trip(
            Some("passwd: files"),
            &format!("{ADDED_MARKER}\n{ADDED_HOSTS_LINE}\npasswd: files"),
        );
        round_trip(Some(""), &format!("{ADDED_MARKER}\n{ADDED_HOSTS_LINE}\n"));
    }

    #[test]
    fn no_file_gets_one_and_loses_it() {
        round_trip(None, &format!("{CREATED_MARKER}\n{ADDED_HOSTS_LINE}\n"));
        // Lines the user added since are kept; only ours go.
        let grown = format!("{CREATED_MARKER}\n{ADDED_HOSTS_LINE}\npasswd: files\n");
        assert_eq!(take(Some(&grown)).as_deref(), Some("passwd: files\n"));
    }

    #[test]
    fn present_already_changes_nothing() {
        for text in [
            "hosts: k3slocal\n",
            "hosts: dns k3slocal files\n",
            "hosts: files k3slocal [NOTFOUND=return] dns\n",
        ] {
            assert_eq!(add(Some(text)), text);
        }
    }

    #[test]
    fn a_module_placed_by_hand_goes_with_one_blank_and_its_action() {
        let cases = [
            ("hosts: dns k3slocal\n", "hosts: dns\n"),
            ("hosts: dns\tk3slocal\tfiles\n", "hosts: dns\tfiles\n"),
            ("hosts:\tk3slocal\tdns\n", "hosts:\tdns\n"),
            ("hosts: k3slocal  dns\n", "hosts:  dns\n"),
            ("hosts:k3slocal\n", "hosts:\n"),
            (
                "hosts: mdns k3slocal [NOTFOUND=return] dns\n",
                "hosts: mdns dns\n",
            ),
            (
                "hosts: files dns k3slocal # mine\n",
                "hosts: files dns # mine\n",
            ),
            ("hosts: k3slocal files k3slocal dns\n", "hosts: files dns\n"),
        ];
        for (text, expected) in cases {
            assert_eq!(take(Some(text)).as_deref(), Some(expected), "{text:?}");
        }
    }

    #[test]
    fn removal_leaves_other_lines_alone() {
        let text = "passwd: files k3slocal\nhosts: files dns # k3slocal\n";
        assert_eq!(take(Some(text)).as_deref(), Some(text));
        // Only the effective line is ours to edit.
        let text = "hosts: k3slocal\nhosts: files k3slocal dns\n";
        assert_eq!(
            take(Some(text)).as_deref(),
            Some("hosts: k3slocal\nhosts: files dns\n")
        );
    }

    #[test]
    fn non_ascii_text_is_kept() {
        round_trip(
            Some("# réglages — été\nhosts: files dns # données\n"),
            "# réglages — été\nhosts: files k3slocal dns # données\n",
        );
    }

    #[test]
    fn unterminated_last_line_is_reported() {
        assert!(last_line_ignored("hosts: files dns"));
        assert!(!last_line_ignored("hosts: files dns\n"));
        assert!(!last_line_ignored(""));
    }

    fn root_with(text: Option<&str>) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join("etc")).unwrap();
        if let Some(text) = text {
            fs::write(root.path().join(CONF), text).unwrap();
        }
        root
    }

    #[test]
    fn install_and_remove_round_trip_on_disk_keeping_mode_and_owner() {
        let root = root_with(Some(DEBIAN));
        let conf = root.path().join(CONF);
        fs::set_permissions(&conf, fs::Permissions::from_mode(0o640)).unwrap();
        // Another owner than ours when we can (tests usually run as root).
        let chowned = std::os::unix::fs::chown(&conf, Some(65534), Some(65534)).is_ok();
        let before = fs::metadata(&conf).unwrap();

        assert_eq!(install(root.path()).unwrap(), Outcome::Changed);
        let installed = fs::read_to_string(&conf).unwrap();
        assert!(has_module(Some(&installed)));
        let after = fs::metadata(&conf).unwrap();
        assert_ne!(
            after.ino(),
            before.ino(),
            "replaced, not rewritten in place"
        );
        assert_eq!(after.mode() & 0o7777, 0o640);
        if chowned {
            assert_eq!((after.uid(), after.gid()), (65534, 65534));
        }
        assert_eq!(install(root.path()).unwrap(), Outcome::AlreadySo);
        assert_eq!(fs::read_to_string(&conf).unwrap(), installed);

        assert_eq!(remove(root.path()).unwrap(), Outcome::Changed);
        assert_eq!(fs::read_to_string(&conf).unwrap(), DEBIAN);
        assert_eq!(fs::metadata(&conf).unwrap().mode() & 0o7777, 0o640);
        assert_eq!(remove(root.path()).unwrap(), Outcome::AlreadySo);
        // No temporary file left behind.
        assert_eq!(fs::read_dir(root.path().join("etc")).unwrap().count(), 1);
    }

    #[test]
    fn install_creates_and_remove_deletes_a_missing_file() {
        let root = root_with(None);
        let conf = root.path().join(CONF);
        assert_eq!(remove(root.path()).unwrap(), Outcome::AlreadySo);
        assert_eq!(install(root.path()).unwrap(), Outcome::Changed);
        assert_eq!(
            fs::read_to_string(&conf).unwrap(),
            format!("{CREATED_MARKER}\n{ADDED_HOSTS_LINE}\n")
        );
        assert_eq!(fs::metadata(&conf).unwrap().mode() & 0o777, 0o644);
        assert_eq!(remove(root.path()).unwrap(), Outcome::Changed);
        assert!(!conf.exists());
    }

    #[test]
    fn a_missing_etc_is_an_error_naming_it() {
        let root = tempfile::tempdir().unwrap();
        let err = install(root.path()).unwrap_err();
        assert!(matches!(err, SetupError::NoEtc { .. }), "{err}");
        assert!(err
            .to_string()
            .contains(&root.path().join("etc").display().to_string()));
        assert!(matches!(remove(root.path()), Err(SetupError::NoEtc { .. })));
    }

    #[test]
    fn a_symlinked_file_is_edited_at_its_target_inside_the_root() {
        let root = root_with(None);
        fs::create_dir(root.path().join("etc/authselect")).unwrap();
        let target = root.path().join("etc/authselect/nsswitch.conf");
        fs::write(&target, "hosts: files dns\n").unwrap();
        // Absolute, as authselect makes it: resolved inside the root.
        std::os::unix::fs::symlink("/etc/authselect/nsswitch.conf", root.path().join(CONF))
            .unwrap();
        assert_eq!(install(root.path()).unwrap(), Outcome::Changed);
        assert!(fs::symlink_metadata(root.path().join(CONF))
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(
            fs::read_to_string(&target).unwrap(),
            "hosts: files k3slocal dns\n"
        );
        assert_eq!(remove(root.path()).unwrap(), Outcome::Changed);
        assert_eq!(fs::read_to_string(&target).unwrap(), "hosts: files dns\n");
    }

    /// A Debian file whose comments an older system wrote in Latin-1
    /// (`é` as the single byte 0xe9), and a stray 0xff on the hosts line
    /// after a comment sign: glibc reads it fine, so must we.
    const LATIN1: &[u8] = b"# /etc/nsswitch.conf\n# r\xe9glages de l'\xe9t\xe9\n\npasswd: files\n\
        hosts:          files mdns4_minimal [NOTFOUND=return] dns # \xff k3slocal\n\
        networks:       files\n";

    #[test]
    fn files_that_are_not_utf8_are_edited_byte_for_byte() {
        let added = with_module(Some(LATIN1));
        let expected: &[u8] =
            b"# /etc/nsswitch.conf\n# r\xe9glages de l'\xe9t\xe9\n\npasswd: files\n\
            hosts:          files k3slocal mdns4_minimal [NOTFOUND=return] dns # \xff k3slocal\n\
            networks:       files\n";
        assert_eq!(added, expected);
        assert!(has_module(Some(&added)));
        assert!(!has_module(Some(LATIN1)), "a word in a comment is not ours");
        assert_eq!(without_module(Some(&added)).as_deref(), Some(LATIN1));
        // The word in the comment is never ours to take.
        assert_eq!(without_module(Some(LATIN1)).as_deref(), Some(LATIN1));
    }

    #[test]
    fn install_and_remove_keep_every_other_byte_of_a_latin1_file() {
        let root = root_with(None);
        let conf = root.path().join(CONF);
        fs::write(&conf, LATIN1).unwrap();
        assert_eq!(install(root.path()).unwrap(), Outcome::Changed);
        assert_eq!(fs::read(&conf).unwrap(), with_module(Some(LATIN1)));
        assert_eq!(remove(root.path()).unwrap(), Outcome::Changed);
        assert_eq!(fs::read(&conf).unwrap(), LATIN1);
    }

    #[test]
    fn a_file_without_our_word_is_not_touched_whatever_its_encoding() {
        let root = root_with(None);
        let conf = root.path().join(CONF);
        // Latin-1, and bytes that are no text at all in any encoding.
        for bytes in [LATIN1, b"\xff\xfe h\x00o\x00s\x00t\x00s\x00\n\x80"] {
            fs::write(&conf, bytes).unwrap();
            let before = fs::metadata(&conf).unwrap();
            assert_eq!(remove(root.path()).unwrap(), Outcome::AlreadySo);
            let after = fs::metadata(&conf).unwrap();
            assert_eq!(fs::read(&conf).unwrap(), bytes);
            assert_eq!(after.ino(), before.ino(), "not replaced");
            assert_eq!(
                (after.mtime(), after.mtime_nsec()),
                (before.mtime(), before.mtime_nsec()),
                "not rewritten"
            );
        }
    }

    /// A random line of a plausible nsswitch.conf.
    fn any_line() -> impl Strategy<Value = String> {
        let blank = prop::sample::select(vec![" ", " ", "\t", "  ", " \t", "\t\t", ""]);
        let service = prop::sample::select(vec![
            "files",
            "dns",
            "mdns4_minimal",
            "resolve",
            "myhostname",
            "mymachines",
            "wins",
            "k3slocal",
            "filesx",
            "#",
            "# c",
        ]);
        let action = prop::sample::select(vec![
            "",
            " [NOTFOUND=return]",
            "[!UNAVAIL=return]",
            " [ SUCCESS = continue ]",
        ]);
        let services = prop::collection::vec((blank.clone(), service, action), 0..6);
        let key = prop::sample::select(vec![
            "hosts:", "hosts :", "hosts", "hosts::", "HOSTS:", "#hosts:", "# hosts:", "passwd:",
            "hostsx:",
        ]);
        let indent = prop::sample::select(vec!["", " ", "\t"]);
        let tail = prop::sample::select(vec!["", " ", "\t", " # note", "#x", "\r", " [", "["]);
        let setting = (indent, key, services, tail).prop_map(|(indent, key, services, tail)| {
            let mut line = format!("{indent}{key}");
            for (blank, service, action) in services {
                line.push_str(blank);
                line.push_str(service);
                line.push_str(action);
            }
            line.push_str(tail);
            line
        });
        prop_oneof![
            3 => setting,
            1 => prop::sample::select(vec!["", "# comment", "#", "  ", "\r", "netgroup: nis"])
                .prop_map(str::to_owned),
        ]
    }

    fn any_file() -> impl Strategy<Value = Option<String>> {
        let eol = prop::sample::select(vec!["\n", "\r\n"]);
        let file = (
            prop::collection::vec((any_line(), eol), 0..8),
            any::<bool>(),
        )
            .prop_map(|(lines, terminated)| {
                let mut text: String = lines.iter().map(|(l, e)| format!("{l}{e}")).collect();
                if !terminated && text.ends_with('\n') {
                    text.pop();
                }
                text
            });
        prop_oneof![1 => Just(None), 12 => file.prop_map(Some)]
    }

    /// 4096 by default; more with `NSSWITCH_PROPTEST_CASES` for a long run.
    fn cases() -> u32 {
        std::env::var("NSSWITCH_PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(4096)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases()))]

        #[test]
        fn adding_is_idempotent_and_removing_restores(text in any_file()) {
            let added = with_module(text.as_deref());
            prop_assert_eq!(&with_module(Some(&added)), &added);
            prop_assert!(has_module(Some(&added)));
            let removed = without_module(Some(&added));
            prop_assert!(!has_module(removed.as_deref()));
            if !has_module(text.as_deref()) {
                prop_assert_eq!(removed.as_deref(), text.as_deref().map(str::as_bytes));
            }
            // Removing twice is removing once.
            prop_assert_eq!(without_module(removed.as_deref()), removed.clone());
        }
    }
}
