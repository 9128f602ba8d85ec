//! Which addresses the helper binds: TCP on IPv4 pod addresses of the
//! calling user's own loopback block, never another user's, never the
//! system's own loopback addresses, never anything else.
//!
//! The per-user layout: root's config file names a range (127.128.0.0/9
//! unless it says otherwise) that is carved into one block per uid (a /24,
//! 254 pod addresses, unless it says otherwise), uid `first_uid` (0) taking
//! the first. With the defaults uids 0 to 32767 have a block, which covers
//! root and every account Debian's `adduser` makes on a machine with fewer
//! than 31,000 users; a uid past the range has none (the helper refuses it
//! every address, the agent gives its pods no address of their own, the
//! NSS module answers it nothing) until root sets `first_uid` (directory
//! uids such as 1286000000 from SSSD) or a wider `block`. The agent, the
//! helper and the NSS module read the same file, so they always agree on
//! whose block an address is in: the helper binds only inside the caller's
//! block (the caller's real uid, which a file-capability binary cannot be
//! lied to about), the agent allocates only there, and the module answers
//! a user only with addresses there.
//!
//! 127.0.0.0/23 is refused whatever the config says: 127.0.0.1 is what every
//! program means by "this machine", 127.0.0.53 and 127.0.0.54 are
//! systemd-resolved's DNS stubs, and Debian gives the host name 127.0.1.1.
//! A low port there (53, 25, 631...) is a system service that other users
//! and programs trust; a helper any local user can run must not let them
//! take one over while its owner restarts.

use std::fmt;
use std::fs;
use std::io::{self, Read as _};
use std::net::Ipv4Addr;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;

/// The config file, owned by root and writable by root alone.
pub const CONFIG_PATH: &str = "/etc/k3s-local-agent/bind-helper.conf";
/// A config file larger than this is not one we wrote.
const MAX_CONFIG: u64 = 4096;

/// A block of loopback addresses, like `127.77.0.0/16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    base: Ipv4Addr,
    prefix: u8,
}

/// Why a block setting was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("{0:?} is not an address block like 127.77.0.0/16")]
    Syntax(String),
    #[error("prefix /{0} is out of range: use /9 to /30")]
    Prefix(u8),
    #[error("{0} has address bits set past its prefix; did you mean {1}?")]
    HostBits(String, Block),
    #[error("{0} is outside 127.0.0.0/8: pod addresses must be loopback")]
    NotLoopback(Block),
    #[error("{0} overlaps 127.0.0.0/23, the system's own loopback addresses")]
    System(Block),
}

/// Why an address is not bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0} is every address: only pod addresses in {1} are served")]
    Unspecified(Ipv4Addr, Block),
    #[error("{0} is not a loopback address: only pod addresses in {1} are served")]
    NotLoopback(Ipv4Addr, Block),
    #[error("{0} is one of the system's own loopback addresses (127.0.0.0/23): only pod addresses in {1} are served")]
    System(Ipv4Addr, Block),
    #[error("{0} is outside the pod block {1}")]
    Outside(Ipv4Addr, Block),
    #[error("{0} is in another user's address block: uid {uid} may bind only in {1}", uid = .2)]
    NotYours(Ipv4Addr, Block, u32),
    #[error("uid {0} has no address block: {1}")]
    NoBlock(u32, NoBlock),
    #[error("{0} is the first or last address of {1}, never a pod's")]
    Edge(Ipv4Addr, Block),
}

/// Why the config file was refused; the helper then binds nothing.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path} {why}; refusing it")]
    Unsafe { path: PathBuf, why: &'static str },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} line {line}: {why}")]
    Syntax {
        path: PathBuf,
        line: usize,
        why: String,
    },
    #[error("{path} line {line}: {source}")]
    Block {
        path: PathBuf,
        line: usize,
        source: BlockError,
    },
    #[error("{path}: {source}")]
    Layout { path: PathBuf, source: LayoutError },
}

/// Why the per-user layout was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("user_prefix /{user} must lie between the block's /{block} and /30")]
    UserPrefix { user: u8, block: u8 },
}

/// Why a uid has no block of its own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the per-user range {range} holds uids {first} to {last} (one /{prefix} each); set \
     `first_uid` or a wider `block` in /etc/k3s-local-agent/bind-helper.conf"
)]
pub struct NoBlock {
    range: Block,
    prefix: u8,
    first: u32,
    last: u64,
}

/// The per-user layout: a range carved into one block per uid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    range: Block,
    user_prefix: u8,
    first_uid: u32,
}

impl Layout {
    /// 127.128.0.0/9 in /24s from uid 0: uids 0 to 32767, 254 pod addresses each.
    pub const DEFAULT: Layout = Layout {
        range: Block {
            base: Ipv4Addr::new(127, 128, 0, 0),
            prefix: 9,
        },
        user_prefix: 24,
        first_uid: 0,
    };

    /// A layout of `range` in blocks of `/user_prefix`, uid `first_uid` first.
    pub fn new(range: Block, user_prefix: u8, first_uid: u32) -> Result<Self, LayoutError> {
        if !(range.prefix..=30).contains(&user_prefix) {
            return Err(LayoutError::UserPrefix {
                user: user_prefix,
                block: range.prefix,
            });
        }
        Ok(Self {
            range,
            user_prefix,
            first_uid,
        })
    }

    /// The whole range the users' blocks are carved from.
    pub fn range(&self) -> Block {
        self.range
    }

    /// How many uids have a block.
    fn capacity(&self) -> u64 {
        1u64 << (self.user_prefix - self.range.prefix)
    }

    /// The block of `uid`, or why it has none.
    pub fn user_block(&self, uid: u32) -> Result<Block, NoBlock> {
        let no_block = || NoBlock {
            range: self.range,
            prefix: self.user_prefix,
            first: self.first_uid,
            last: u64::from(self.first_uid) + self.capacity() - 1,
        };
        let index = uid.checked_sub(self.first_uid).ok_or_else(no_block)?;
        if u64::from(index) >= self.capacity() {
            return Err(no_block());
        }
        let size = 1u32 << (32 - u32::from(self.user_prefix));
        Ok(Block {
            base: Ipv4Addr::from(self.range.first() + index * size),
            prefix: self.user_prefix,
        })
    }

    /// Whether the helper may bind `ip` for `uid`: a pod address of that
    /// user's own block, and nobody else's.
    pub fn check(&self, uid: u32, ip: Ipv4Addr) -> Result<(), Refusal> {
        let block = self
            .user_block(uid)
            .map_err(|why| Refusal::NoBlock(uid, why))?;
        match block.check(ip) {
            Err(Refusal::Outside(..)) if self.range.contains(ip) => {
                Err(Refusal::NotYours(ip, block, uid))
            }
            other => other,
        }
    }
}

impl Default for Layout {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} in /{} blocks from uid {}",
            self.range, self.user_prefix, self.first_uid
        )
    }
}

/// 127.0.0.0/23: localhost, resolver stubs, Debian's host name.
const SYSTEM: Block = Block {
    base: Ipv4Addr::new(127, 0, 0, 0),
    prefix: 23,
};

impl Block {
    fn mask(prefix: u8) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(prefix))
            .unwrap_or_default()
    }

    fn first(self) -> u32 {
        u32::from(self.base)
    }

    fn last(self) -> u32 {
        self.first() | !Self::mask(self.prefix)
    }

    fn overlaps(self, other: Block) -> bool {
        self.first() <= other.last() && other.first() <= self.last()
    }

    /// Parses `a.b.c.d/len`: a block inside 127.0.0.0/8, clear of
    /// 127.0.0.0/23, with room for at least two pod addresses.
    pub fn parse(text: &str) -> Result<Block, BlockError> {
        let syntax = || BlockError::Syntax(text.to_owned());
        let (base, prefix) = text.split_once('/').ok_or_else(syntax)?;
        let base: Ipv4Addr = base.parse().map_err(|_| syntax())?;
        if prefix.is_empty() || prefix.len() > 2 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(syntax());
        }
        let prefix: u8 = prefix.parse().map_err(|_| syntax())?;
        if !(9..=30).contains(&prefix) {
            return Err(BlockError::Prefix(prefix));
        }
        let network = Ipv4Addr::from(u32::from(base) & Self::mask(prefix));
        let block = Block {
            base: network,
            prefix,
        };
        if network != base {
            return Err(BlockError::HostBits(text.to_owned(), block));
        }
        if base.octets()[0] != 127 {
            return Err(BlockError::NotLoopback(block));
        }
        if block.overlaps(SYSTEM) {
            return Err(BlockError::System(block));
        }
        Ok(block)
    }

    /// The block's network address.
    pub fn base(self) -> Ipv4Addr {
        self.base
    }

    /// The block's prefix length.
    pub fn prefix(self) -> u8 {
        self.prefix
    }

    /// Whether `ip` lies in the block (its edges included).
    pub fn contains(self, ip: Ipv4Addr) -> bool {
        (self.first()..=self.last()).contains(&u32::from(ip))
    }

    /// Whether the helper may bind `ip`: one of this block's pod addresses
    /// (its first and last are left out, as the agent leaves them out).
    pub fn check(self, ip: Ipv4Addr) -> Result<(), Refusal> {
        let n = u32::from(ip);
        if ip.is_unspecified() {
            Err(Refusal::Unspecified(ip, self))
        } else if !ip.is_loopback() {
            Err(Refusal::NotLoopback(ip, self))
        } else if (SYSTEM.first()..=SYSTEM.last()).contains(&n) {
            Err(Refusal::System(ip, self))
        } else if !(self.first()..=self.last()).contains(&n) {
            Err(Refusal::Outside(ip, self))
        } else if n == self.first() || n == self.last() {
            Err(Refusal::Edge(ip, self))
        } else {
            Ok(())
        }
    }
}

impl fmt::Display for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

/// Parses the config file's text: blank lines, `#` comments, and at most
/// one each of `block = a.b.c.d/len` (the range every user's block is
/// carved from), `user_prefix = N` (each user's block, /24 by default) and
/// `first_uid = N`. Anything else is an error rather than ignored, so a
/// typo cannot silently leave the default in force.
pub fn parse_config(path: &Path, text: &str) -> Result<Layout, ConfigError> {
    let mut block = None;
    let mut user_prefix = None;
    let mut first_uid = None;
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let syntax = |why: String| ConfigError::Syntax {
            path: path.to_owned(),
            line: line_no,
            why,
        };
        let Some((key, value)) = line.split_once('=') else {
            return Err(syntax(format!(
                "expected `block = 127.NN.0.0/9`, `user_prefix = 24` or `first_uid = 0`, got \
                 {line:?}"
            )));
        };
        let (key, value) = (key.trim(), value.trim());
        let twice = || syntax(format!("{key} is set twice"));
        let number = |max: u32| {
            value
                .parse::<u32>()
                .ok()
                .filter(|n| *n <= max && value.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| syntax(format!("{key} must be a number up to {max}, got {value:?}")))
        };
        match key {
            "block" if block.is_some() => return Err(twice()),
            "block" => {
                block = Some(Block::parse(value).map_err(|source| ConfigError::Block {
                    path: path.to_owned(),
                    line: line_no,
                    source,
                })?);
            }
            "user_prefix" if user_prefix.is_some() => return Err(twice()),
            "user_prefix" => user_prefix = Some(number(30)? as u8),
            "first_uid" if first_uid.is_some() => return Err(twice()),
            "first_uid" => first_uid = Some(number(u32::MAX)?),
            _ => return Err(syntax(format!("unknown setting {key:?}"))),
        }
    }
    let default = Layout::DEFAULT;
    Layout::new(
        block.unwrap_or(default.range),
        user_prefix.unwrap_or(default.user_prefix),
        first_uid.unwrap_or(default.first_uid),
    )
    .map_err(|source| ConfigError::Layout {
        path: path.to_owned(),
        source,
    })
}

/// The layout in force: from the config file at `path` if there is one, the
/// default if neither it nor its directory exists. The directory and file
/// must be root's and writable by root alone (else any user who could
/// write them could widen what the helper binds), and the file a regular
/// file, not a link.
pub fn load_config(path: &Path) -> Result<Layout, ConfigError> {
    let unsafe_config = |path: &Path, why| ConfigError::Unsafe {
        path: path.to_owned(),
        why,
    };
    let read_error = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        match fs::symlink_metadata(dir) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Layout::DEFAULT),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: dir.to_owned(),
                    source,
                })
            }
            Ok(meta) if !meta.is_dir() => {
                return Err(unsafe_config(dir, "is not a directory"));
            }
            Ok(meta) => trusted(dir, &meta)?,
        }
    }
    // No following links, and no blocking on a FIFO planted there.
    let opened = fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).bits())
        .open(path);
    let file = match opened {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Layout::DEFAULT),
        Err(err) if err.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32) => {
            return Err(unsafe_config(path, "is a symbolic link"));
        }
        Err(source) => return Err(read_error(source)),
    };
    let meta = file.metadata().map_err(read_error)?;
    if !meta.is_file() {
        return Err(unsafe_config(path, "is not a regular file"));
    }
    trusted(path, &meta)?;
    if meta.len() > MAX_CONFIG {
        return Err(unsafe_config(path, "is larger than 4 KiB"));
    }
    let mut text = String::new();
    file.take(MAX_CONFIG + 1)
        .read_to_string(&mut text)
        .map_err(read_error)?;
    parse_config(path, &text)
}

/// Root's, and writable by root alone.
fn trusted(path: &Path, meta: &fs::Metadata) -> Result<(), ConfigError> {
    let why = if meta.uid() != 0 {
        "is not owned by root"
    } else if meta.mode() & 0o022 != 0 {
        "is writable by group or others"
    } else {
        return Ok(());
    };
    Err(ConfigError::Unsafe {
        path: path.to_owned(),
        why,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn ip(text: &str) -> Ipv4Addr {
        text.parse().unwrap()
    }

    #[test]
    fn the_default_block_serves_pod_addresses_only() {
        let block = Block::parse("127.77.0.0/16").unwrap();
        for ok in ["127.77.0.9", "127.77.0.1", "127.77.255.254"] {
            assert_eq!(block.check(ip(ok)), Ok(()), "{ok}");
        }
        let refused = [
            ("0.0.0.0", "every address"),
            ("10.1.2.3", "not a loopback"),
            ("192.168.1.1", "not a loopback"),
            ("127.0.0.1", "system's own"),
            ("127.0.0.53", "system's own"),
            ("127.0.1.1", "system's own"),
            ("127.78.0.1", "outside the pod block 127.77.0.0/16"),
            ("127.77.0.0", "first or last"),
            ("127.77.255.255", "first or last"),
            ("255.255.255.255", "not a loopback"),
        ];
        for (addr, why) in refused {
            let err = block.check(ip(addr)).unwrap_err().to_string();
            assert!(err.contains(addr) && err.contains(why), "{addr}: {err}");
        }
    }

    #[test]
    fn blocks_must_be_loopback_and_clear_of_the_system_addresses() {
        assert_eq!(
            Block::parse("127.88.0.0/16").unwrap().to_string(),
            "127.88.0.0/16"
        );
        assert_eq!(
            Block::parse("127.128.0.0/9").unwrap().to_string(),
            "127.128.0.0/9"
        );
        assert_eq!(
            Block::parse("127.0.2.0/24").unwrap().to_string(),
            "127.0.2.0/24"
        );
        let refused = [
            ("127.0.0.0/8", BlockError::Prefix(8)),
            (
                "127.0.0.0/16",
                BlockError::System(Block::parse_unchecked("127.0.0.0", 16)),
            ),
            (
                "127.0.0.0/9",
                BlockError::System(Block::parse_unchecked("127.0.0.0", 9)),
            ),
            (
                "127.0.1.0/24",
                BlockError::System(Block::parse_unchecked("127.0.1.0", 24)),
            ),
            (
                "127.0.0.128/25",
                BlockError::System(Block::parse_unchecked("127.0.0.128", 25)),
            ),
            (
                "10.77.0.0/16",
                BlockError::NotLoopback(Block::parse_unchecked("10.77.0.0", 16)),
            ),
            (
                "127.77.0.1/16",
                BlockError::HostBits(
                    "127.77.0.1/16".into(),
                    Block::parse_unchecked("127.77.0.0", 16),
                ),
            ),
            ("127.77.0.0/31", BlockError::Prefix(31)),
            ("127.77.0.0", BlockError::Syntax("127.77.0.0".into())),
            (
                "127.77.0.0/+16",
                BlockError::Syntax("127.77.0.0/+16".into()),
            ),
            ("::1/128", BlockError::Syntax("::1/128".into())),
        ];
        for (text, expected) in refused {
            assert_eq!(Block::parse(text), Err(expected), "{text}");
        }
    }

    impl Block {
        fn parse_unchecked(base: &str, prefix: u8) -> Block {
            Block {
                base: ip(base),
                prefix,
            }
        }
    }

    #[test]
    fn each_uid_has_a_block_of_its_own_and_none_of_anothers() {
        let layout = Layout::DEFAULT;
        assert_eq!(layout.user_block(0).unwrap().to_string(), "127.128.0.0/24");
        assert_eq!(
            layout.user_block(1000).unwrap().to_string(),
            "127.131.232.0/24"
        );
        assert_eq!(
            layout.user_block(32767).unwrap().to_string(),
            "127.255.255.0/24"
        );
        let past = layout.user_block(32768).unwrap_err().to_string();
        assert!(past.contains("holds uids 0 to 32767"), "{past}");
        assert!(past.contains("first_uid"), "{past}");

        assert_eq!(layout.check(1000, ip("127.131.232.9")), Ok(()));
        let theirs = layout
            .check(1001, ip("127.131.232.9"))
            .unwrap_err()
            .to_string();
        assert!(
            theirs.contains("another user's address block")
                && theirs.contains("uid 1001 may bind only in 127.131.233.0/24"),
            "{theirs}"
        );
        let outside = layout.check(1000, ip("127.77.0.9")).unwrap_err();
        assert!(matches!(outside, Refusal::Outside(..)), "{outside}");
        let system = layout.check(1000, ip("127.0.0.1")).unwrap_err();
        assert!(matches!(system, Refusal::System(..)), "{system}");
        let none = layout
            .check(40000, ip("127.131.232.9"))
            .unwrap_err()
            .to_string();
        assert!(none.starts_with("uid 40000 has no address block"), "{none}");

        // Directory uids: root moves the first block to them.
        let sssd = Layout::new(Block::parse("127.128.0.0/9").unwrap(), 24, 1_286_000_000).unwrap();
        assert_eq!(
            sssd.user_block(1_286_000_001).unwrap().to_string(),
            "127.128.1.0/24"
        );
        assert!(sssd.user_block(1000).is_err());
        assert!(sssd.user_block(u32::MAX).is_err());
    }

    proptest::proptest! {
        /// Two uids never share an address.
        #[test]
        fn no_address_is_in_two_users_blocks(a in 0u32..40000, b in 0u32..40000, host in 0u32..256) {
            let layout = Layout::DEFAULT;
            if let (Ok(block_a), Ok(block_b)) = (layout.user_block(a), layout.user_block(b)) {
                let ip = Ipv4Addr::from(u32::from(block_a.base()) + host);
                if a != b {
                    proptest::prop_assert!(!block_b.contains(ip));
                    proptest::prop_assert!(layout.check(b, ip).is_err());
                }
            }
        }
    }

    #[test]
    fn config_text() {
        let path = Path::new("/x.conf");
        let layout = parse_config(path, "# pods\n\n  block = 127.88.0.0/16  \n").unwrap();
        assert_eq!(layout.to_string(), "127.88.0.0/16 in /24 blocks from uid 0");
        assert_eq!(parse_config(path, "# nothing\n").unwrap(), Layout::DEFAULT);
        assert_eq!(
            parse_config(
                path,
                "block=127.88.0.0/16\nuser_prefix = 20\nfirst_uid=1000"
            )
            .unwrap()
            .to_string(),
            "127.88.0.0/16 in /20 blocks from uid 1000"
        );
        for (text, why) in [
            ("blok = 127.88.0.0/16\n", "line 1: unknown setting \"blok\""),
            ("block 127.88.0.0/16\n", "line 1: expected"),
            (
                "block = 127.88.0.0/16\nblock = 127.89.0.0/16\n",
                "line 2: block is set twice",
            ),
            (
                "\nblock = 127.0.0.0/16\n",
                "line 2: 127.0.0.0/16 overlaps 127.0.0.0/23",
            ),
            (
                "user_prefix = 31\n",
                "line 1: user_prefix must be a number up to 30",
            ),
            ("first_uid = -1\n", "line 1: first_uid must be a number"),
            (
                "first_uid = 1\nfirst_uid = 2\n",
                "line 2: first_uid is set twice",
            ),
            (
                "block = 127.88.0.0/16\nuser_prefix = 12\n",
                "user_prefix /12 must lie between the block's /16 and /30",
            ),
        ] {
            let err = parse_config(path, text).unwrap_err().to_string();
            assert!(
                err.starts_with("/x.conf") && err.contains(why),
                "{text:?}: {err}"
            );
        }
    }

    /// A config dir and file in a temporary dir, root's and 0755/0644 when
    /// the tests run as root (the usual case here).
    fn config_dir(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("bind-helper.conf");
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        (dir, path)
    }

    /// Files we create are root's only when we are root.
    fn as_root() -> bool {
        let probe = tempfile::tempfile().unwrap();
        probe.metadata().unwrap().uid() == 0
    }

    #[test]
    fn config_file_is_read_when_root_owns_it() {
        let (dir, path) = config_dir("block = 127.88.0.0/16\n");
        if as_root() {
            assert_eq!(
                load_config(&path).unwrap().range().to_string(),
                "127.88.0.0/16"
            );
        }
        // Missing file, missing directory: the default.
        assert_eq!(
            load_config(&dir.path().join("none.conf")).unwrap(),
            Layout::DEFAULT
        );
        assert_eq!(
            load_config(&dir.path().join("none/bind-helper.conf")).unwrap(),
            Layout::DEFAULT
        );
    }

    #[test]
    fn config_file_writable_by_others_is_refused() {
        if !as_root() {
            return;
        }
        let (_dir, path) = config_dir("block = 127.88.0.0/16\n");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o664)).unwrap();
        let err = load_config(&path).unwrap_err().to_string();
        assert!(err.contains("writable by group or others"), "{err}");

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        let err = load_config(&path).unwrap_err().to_string();
        assert!(err.contains("not owned by root"), "{err}");
    }

    #[test]
    fn config_dir_writable_by_others_is_refused() {
        if !as_root() {
            return;
        }
        let (dir, path) = config_dir("block = 127.88.0.0/16\n");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let err = load_config(&path).unwrap_err().to_string();
        assert!(err.contains("writable by group or others"), "{err}");
    }

    #[test]
    fn config_links_and_fifos_are_refused() {
        if !as_root() {
            return;
        }
        let (dir, path) = config_dir("block = 127.88.0.0/16\n");
        let link = dir.path().join("link.conf");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let err = load_config(&link).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");

        let fifo = dir.path().join("fifo.conf");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let err = load_config(&fifo).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }
}
