//! Pod names: `<name>-staging.local` and `<name>-staging.localhost` in one
//! marked block of a hosts file. Only our block ever changes; every other line
//! is kept byte for byte, and every write is an atomic replace.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{HostEntry, NamesError};
use crate::state::fsio;

/// First line of our block.
pub const BLOCK_BEGIN: &str =
    "# BEGIN k3s-local-agent: staging pod names, managed by the agent; edits are lost";
/// Last line of our block.
pub const BLOCK_END: &str = "# END k3s-local-agent";

/// Returns `text` with every block of ours removed (a stale one from a crash
/// included), and the byte offset where the first one stood.
fn without_blocks(text: &str) -> (String, Option<usize>) {
    let mut kept = String::with_capacity(text.len());
    let mut first_block_at = None;
    let mut lines = text.split_inclusive('\n').peekable();
    while let Some(line) = lines.next() {
        if line.trim_end() != BLOCK_BEGIN {
            kept.push_str(line);
            continue;
        }
        // Only a block with an end marker is ours to drop; a lone begin
        // marker (hand-edited file) loses just that marker line.
        let rest: Vec<&str> = lines.clone().collect();
        match rest.iter().position(|l| l.trim_end() == BLOCK_END) {
            Some(end) => {
                first_block_at.get_or_insert(kept.len());
                for _ in 0..=end {
                    lines.next();
                }
            }
            None => {
                first_block_at.get_or_insert(kept.len());
            }
        }
    }
    (kept, first_block_at)
}

/// Renders the block for `entries`; empty when there are none.
fn render_block(entries: &[HostEntry]) -> String {
    if entries.is_empty() {
        return String::new();
    }
    let mut block = format!("{BLOCK_BEGIN}\n");
    for entry in entries {
        // Names reach here made of validated DNS labels; whatever else might
        // slip through (whitespace, '#', a newline: another line of the
        // system's hosts file) is left out rather than written.
        let names: Vec<&str> = entry
            .names
            .iter()
            .map(String::as_str)
            .filter(|name| is_host_name(name))
            .collect();
        if !names.is_empty() {
            let _ = writeln!(block, "{} {}", entry.ip, names.join(" "));
        }
    }
    block.push_str(BLOCK_END);
    block.push('\n');
    block
}

/// Whether `name` is a host name and nothing more: letters, digits, '-'
/// and '.', not starting with '-'.
fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// The whole new file: `existing` with our block replaced by one for `entries`.
pub fn render(existing: &str, entries: &[HostEntry]) -> String {
    let (mut kept, at) = without_blocks(existing);
    let block = render_block(entries);
    if block.is_empty() {
        return kept;
    }
    let at = at.unwrap_or(kept.len());
    let mut insertion = String::new();
    if at > 0 && !kept[..at].ends_with('\n') {
        insertion.push('\n');
    }
    insertion.push_str(&block);
    kept.insert_str(at, &insertion);
    kept
}

/// The entries in our block(s) of `text`, for checking what a file says.
pub fn parse_block(text: &str) -> Vec<HostEntry> {
    let mut entries = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        match line.trim_end() {
            BLOCK_BEGIN => inside = true,
            BLOCK_END => inside = false,
            body if inside => {
                let mut words = body.split_whitespace();
                if let Some(ip) = words.next().and_then(|w| w.parse().ok()) {
                    entries.push(HostEntry {
                        ip,
                        names: words.map(str::to_owned).collect(),
                    });
                }
            }
            _ => {}
        }
    }
    entries
}

/// How many blocks of ours `text` holds (a healthy file has 0 or 1).
pub fn count_blocks(text: &str) -> usize {
    text.lines().filter(|l| l.trim_end() == BLOCK_BEGIN).count()
}

/// A hosts file the agent writes its names to, in one marked block.
#[derive(Debug, Clone)]
pub struct HostsFile {
    path: PathBuf,
}

impl HostsFile {
    pub fn at(path: PathBuf) -> Self {
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes our block say exactly `entries` (none: no block at all).
    /// Skips the write when the file already says it.
    pub fn write(&self, entries: &[HostEntry]) -> Result<(), NamesError> {
        let existing = match fs::read(&self.path) {
            Ok(bytes) => String::from_utf8(bytes).map_err(|_| NamesError::NotText {
                path: self.path.clone(),
            })?,
            Err(err) if err.kind() == io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(NamesError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let updated = render(&existing, entries);
        if updated == existing && self.path.exists() {
            return Ok(());
        }
        let mode = fsio::mode_of(&self.path).unwrap_or(0o644);
        fsio::atomic_replace(&self.path, updated.as_bytes(), mode).map_err(|source| {
            NamesError::Write {
                path: self.path.clone(),
                source,
            }
        })
    }

    /// Removes our block, leaving every other line as it was.
    pub fn clear(&self) -> Result<(), NamesError> {
        if !self.path.exists() {
            return Ok(());
        }
        self.write(&[])
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_name_that_is_not_a_host_name_is_never_written() {
        let entries = [HostEntry {
            ip: "127.77.0.1".parse().expect("ip"),
            names: vec![
                "web-staging.local".to_owned(),
                "x\n10.6.6.6 bank.example".to_owned(),
                "a b".to_owned(),
                "#c".to_owned(),
            ],
        }];
        let text = render("", &entries);
        assert!(text.contains("127.77.0.1 web-staging.local\n"), "{text}");
        assert!(
            !text.contains("bank.example") && !text.contains("#c"),
            "{text}"
        );
    }

    use super::*;
    use crate::model::{is_dns_label, validate_pod_name};
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn entry(name: &str) -> HostEntry {
        HostEntry {
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            names: vec![
                format!("{name}-staging.local"),
                format!("{name}-staging.localhost"),
            ],
        }
    }

    const FOREIGN: &str = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n# a comment\n";

    #[test]
    fn block_is_appended_replaced_and_removed() {
        let one = render(FOREIGN, &[entry("a")]);
        assert!(one.starts_with(FOREIGN));
        assert_eq!(count_blocks(&one), 1);
        let two = render(&one, &[entry("a"), entry("b")]);
        assert_eq!(count_blocks(&two), 1);
        assert_eq!(parse_block(&two), vec![entry("a"), entry("b")]);
        assert_eq!(render(&two, &[]), FOREIGN);
    }

    #[test]
    fn block_stays_where_it_was_and_stale_blocks_merge() {
        let with_block = format!(
            "first\n{BLOCK_BEGIN}\n127.0.0.1 old-staging.local\n{BLOCK_END}\nlast\n\
             {BLOCK_BEGIN}\n127.0.0.1 older-staging.local\n{BLOCK_END}\n"
        );
        let updated = render(&with_block, &[entry("a")]);
        assert_eq!(count_blocks(&updated), 1);
        assert!(updated.starts_with(&format!("first\n{BLOCK_BEGIN}\n")));
        assert!(updated.ends_with(&format!("{BLOCK_END}\nlast\n")));
        assert!(!updated.contains("old"));
    }

    #[test]
    fn file_without_final_newline_keeps_its_last_line() {
        let updated = render("10.0.0.1 db", &[entry("a")]);
        assert!(updated.starts_with("10.0.0.1 db\n"));
        assert_eq!(render(&updated, &[]), "10.0.0.1 db\n");
    }

    #[test]
    fn write_and_clear_a_real_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hosts");
        fs::write(&path, FOREIGN).expect("write");
        let hosts = HostsFile::at(path.clone());
        hosts.write(&[entry("my-app")]).expect("write names");
        let text = fs::read_to_string(&path).expect("read");
        assert!(text.contains("127.0.0.1 my-app-staging.local my-app-staging.localhost\n"));
        hosts.clear().expect("clear");
        assert_eq!(fs::read_to_string(&path).expect("read"), FOREIGN);
    }

    fn foreign_line() -> impl Strategy<Value = String> {
        // Anything a hosts file may hold on a line, our markers aside.
        "[ -~\t]{0,40}".prop_filter("not a marker", |l| {
            l.trim_end() != BLOCK_BEGIN && l.trim_end() != BLOCK_END
        })
    }

    fn valid_name() -> impl Strategy<Value = String> {
        "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?"
    }

    proptest! {
        /// Any foreign content survives any sequence of writes byte for
        /// byte, there is never more than one block, and the block says
        /// exactly the entries last written.
        #[test]
        fn foreign_lines_survive_and_block_round_trips(
            foreign in proptest::collection::vec(foreign_line(), 0..12),
            writes in proptest::collection::vec(
                proptest::collection::vec(valid_name(), 0..6), 1..5),
        ) {
            let original = foreign.iter().map(|l| format!("{l}\n")).collect::<String>();
            let mut text = original.clone();
            for names in &writes {
                let entries: Vec<HostEntry> = names.iter().map(|n| entry(n)).collect();
                text = render(&text, &entries);
                prop_assert!(count_blocks(&text) <= 1);
                prop_assert_eq!(parse_block(&text), entries);
            }
            prop_assert_eq!(render(&text, &[]), original);
        }

        /// A name that passes validation yields exactly its own two names on
        /// exactly one line: it can never inject another line.
        #[test]
        fn valid_names_yield_exactly_their_own_line(name in "[a-z0-9# .\n\tA-Z-]{1,20}") {
            if validate_pod_name(&name).is_ok() {
                let text = render("", &[entry(&name)]);
                prop_assert_eq!(text.lines().count(), 3);
                prop_assert_eq!(parse_block(&text), vec![entry(&name)]);
            } else {
                prop_assert!(!is_dns_label(&name));
            }
        }
    }
}
