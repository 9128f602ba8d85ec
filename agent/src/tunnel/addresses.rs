//! Loopback addresses for pods: each pod gets one of its own from a block,
//! so its names can point at it and the pod's own port (80 for most) can
//! listen there, many pods on the same port. On Linux the whole of 127/8 is
//! local with no setup; elsewhere each address needs an alias on the
//! loopback interface.
//!
//! The block is this user's own (one per uid, carved from the range root
//! sets in `/etc/k3s-local-agent/bind-helper.conf`, 127.128.0.0/9 in /24s
//! by default; see the bind helper's `policy`): the helper binds only there
//! for this user and the NSS module answers this user only with addresses
//! there, so no two users' agents ever hand out the same address, and no
//! user can be given another's.
//!
//! Like the port allocator it holds no state: which addresses are in use is
//! the store's. A pod keeps its remembered address; a new pod starts from a
//! hash of its id, so it tends to get the same address even on a new machine.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

/// A block of loopback addresses, `a.b.c.d/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressBlock {
    base: Ipv4Addr,
    prefix: u8,
}

/// Why a pod has no address of its own: the block has none left.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[error("every address in {block} is taken")]
pub struct BlockFull {
    /// The block, as `127.77.0.0/16`.
    pub block: String,
}

/// Why a block setting was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressBlockError {
    #[error("{0:?} is not an address block like 127.77.0.0/16")]
    Syntax(String),
    #[error("{0} is outside 127.0.0.0/8: pod addresses must be loopback")]
    NotLoopback(String),
    #[error("prefix /{0} leaves no room: use /8 to /30")]
    Prefix(u8),
}

/// Why this user has no address block of their own (their pods then get
/// no address of their own: names point at the range port).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoUserBlock {
    #[error("{0}")]
    Config(String),
    #[error("uid {0} has no address block: {1}")]
    Uid(u32, k3s_local_agent_bind::policy::NoBlock),
}

impl AddressBlock {
    /// The block of user `uid` under the per-user layout root configured
    /// (the same file the bind helper and the NSS module read).
    pub fn of_user(uid: u32) -> Result<Self, NoUserBlock> {
        use k3s_local_agent_bind::policy;
        let layout = policy::load_config(std::path::Path::new(policy::CONFIG_PATH))
            .map_err(|err| NoUserBlock::Config(err.to_string()))?;
        let block = layout
            .user_block(uid)
            .map_err(|why| NoUserBlock::Uid(uid, why))?;
        Ok(Self {
            base: block.base(),
            prefix: block.prefix(),
        })
    }

    /// The block of the user running this process.
    pub fn of_this_user() -> Result<Self, NoUserBlock> {
        Self::of_user(nix::unistd::getuid().as_raw())
    }

    /// Whether every address of `self` lies in `other`.
    pub fn within(&self, other: &AddressBlock) -> bool {
        self.prefix >= other.prefix && other.contains_any(self.base)
    }

    /// Whether `ip` lies in the block, its edges included.
    fn contains_any(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - u32::from(self.prefix));
        u32::from(ip) & mask == u32::from(self.base)
    }

    fn host_count(&self) -> u32 {
        // The first (network) and last (broadcast-like) are left out, as
        // people expect of a block.
        (1u32 << (32 - u32::from(self.prefix))) - 2
    }

    fn host(&self, index: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + 1 + index)
    }

    /// Whether `ip` is one of the block's pod addresses.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let offset = u32::from(ip).wrapping_sub(u32::from(self.base));
        (1..=self.host_count()).contains(&offset)
    }

    /// An address for `pod_id`: its `remembered` one when still in the block
    /// and free, else the first free one from a hash of the id. `None` when
    /// every address is taken.
    pub fn allocate(
        &self,
        pod_id: &str,
        remembered: Option<Ipv4Addr>,
        taken: &HashSet<Ipv4Addr>,
    ) -> Option<Ipv4Addr> {
        if let Some(ip) = remembered.filter(|ip| self.contains(*ip) && !taken.contains(ip)) {
            return Some(ip);
        }
        let count = self.host_count();
        let start = crate::model::fnv1a_32(pod_id.as_bytes()) % count;
        (0..count)
            .map(|step| self.host((start + step) % count))
            .find(|ip| !taken.contains(ip))
    }
}

impl fmt::Display for AddressBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl FromStr for AddressBlock {
    type Err = AddressBlockError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let syntax = || AddressBlockError::Syntax(text.to_owned());
        let (ip, prefix) = text.trim().split_once('/').ok_or_else(syntax)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| syntax())?;
        let prefix: u8 = prefix.parse().map_err(|_| syntax())?;
        if !(8..=30).contains(&prefix) {
            return Err(AddressBlockError::Prefix(prefix));
        }
        if ip.octets()[0] != 127 {
            return Err(AddressBlockError::NotLoopback(text.to_owned()));
        }
        let mask = u32::MAX << (32 - u32::from(prefix));
        Ok(Self {
            base: Ipv4Addr::from(u32::from(ip) & mask),
            prefix,
        })
    }
}

/// Why a pod's own port cannot listen on its address, with the one command
/// that would let it (shared by the tunnel's status and `doctor`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CannotListen {
    #[error(
        "cannot listen on {addr}: ports below {unprivileged_start} need privileges; to allow it \
         run `sudo setcap cap_net_bind_service=+ep {binary}` (or `sudo sysctl -w \
         net.ipv4.ip_unprivileged_port_start={port}`) and restart; until then use the range port"
    )]
    NeedsPrivilege {
        addr: SocketAddr,
        port: u16,
        unprivileged_start: u16,
        binary: String,
    },
    #[error(
        "cannot listen on {addr}: the address is not on the loopback interface; add it with \
         `sudo ifconfig lo0 alias {ip} up` (macOS) and restart"
    )]
    NotOnLoopback { addr: SocketAddr, ip: IpAddr },
    #[error("cannot listen on {addr}: another process holds it; use the range port")]
    Taken { addr: SocketAddr },
    #[error("cannot listen on {addr}: {message}")]
    Other { addr: SocketAddr, message: String },
}

impl CannotListen {
    /// What a failed bind of `addr` means for the user.
    pub fn new(addr: SocketAddr, err: &std::io::Error) -> Self {
        match err.kind() {
            std::io::ErrorKind::PermissionDenied => Self::NeedsPrivilege {
                addr,
                port: addr.port(),
                unprivileged_start: unprivileged_port_start().unwrap_or(1024),
                binary: std::env::current_exe()
                    .map(|path| path.display().to_string())
                    .unwrap_or_else(|_| "k3s-local-agent".to_owned()),
            },
            std::io::ErrorKind::AddrNotAvailable => Self::NotOnLoopback {
                addr,
                ip: addr.ip(),
            },
            std::io::ErrorKind::AddrInUse => Self::Taken { addr },
            _ => Self::Other {
                addr,
                message: err.to_string(),
            },
        }
    }
}

impl CannotListen {
    /// The same reason, when the bind helper at `helper` tried: the
    /// capability belongs on the helper, not on the agent.
    pub fn via_helper(self, helper: &std::path::Path) -> Self {
        match self {
            Self::NeedsPrivilege {
                addr,
                port,
                unprivileged_start,
                ..
            } => Self::NeedsPrivilege {
                addr,
                port,
                unprivileged_start,
                binary: helper.display().to_string(),
            },
            other => other,
        }
    }
}

/// The lowest port an unprivileged process may bind (Linux's sysctl).
fn unprivileged_port_start() -> Option<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_failed_bind_says_why_and_what_to_run() {
        let addr: SocketAddr = "127.77.0.9:80".parse().expect("addr");
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let why = CannotListen::new(addr, &denied);
        let text = why.to_string();
        assert!(
            text.starts_with("cannot listen on 127.77.0.9:80: ports below"),
            "{text}"
        );
        assert!(text.contains("cap_net_bind_service"), "{text}");
        assert!(text.contains("ip_unprivileged_port_start=80"), "{text}");
        let json = serde_json::to_value(&why).expect("serializes");
        assert_eq!(json["kind"], "needs_privilege");
        assert_eq!(json["addr"], "127.77.0.9:80");

        let taken = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        assert_eq!(
            CannotListen::new(addr, &taken).to_string(),
            "cannot listen on 127.77.0.9:80: another process holds it; use the range port"
        );
        let missing = std::io::Error::from(std::io::ErrorKind::AddrNotAvailable);
        assert!(CannotListen::new(addr, &missing)
            .to_string()
            .contains("ifconfig lo0 alias 127.77.0.9 up"));
    }

    #[test]
    fn blocks_parse_and_refuse_what_is_not_loopback() {
        let block: AddressBlock = "127.77.0.0/16".parse().expect("block");
        assert_eq!(block.to_string(), "127.77.0.0/16");
        // Host bits are dropped.
        assert_eq!(
            "127.77.3.9/16".parse::<AddressBlock>().expect("block"),
            block
        );
        let own: AddressBlock = "127.77.4.0/24".parse().expect("block");
        assert!(own.within(&block));
        assert!(!block.within(&own));
        assert!(!own.within(&"127.78.0.0/16".parse().expect("block")));
        assert!(matches!(
            "10.0.0.0/16".parse::<AddressBlock>(),
            Err(AddressBlockError::NotLoopback(_))
        ));
        assert!(matches!(
            "127.0.0.0/31".parse::<AddressBlock>(),
            Err(AddressBlockError::Prefix(31))
        ));
        assert!(matches!(
            "127.77.0.0".parse::<AddressBlock>(),
            Err(AddressBlockError::Syntax(_))
        ));
        assert!(!block.contains(Ipv4Addr::new(127, 77, 0, 0)));
        assert!(block.contains(Ipv4Addr::new(127, 77, 0, 1)));
        assert!(!block.contains(Ipv4Addr::new(127, 77, 255, 255)));
        assert!(!block.contains(Ipv4Addr::new(127, 0, 0, 1)));
    }

    #[test]
    fn this_users_block_follows_the_layout() {
        // No config file on a test machine's /etc, or root's: the default
        // layout, one /24 per uid from 127.128.0.0.
        let block = AddressBlock::of_user(1000).expect("uid 1000 has a block");
        assert_eq!(block.to_string(), "127.131.232.0/24");
        let none = AddressBlock::of_user(40_000).expect_err("past the range");
        assert!(
            none.to_string().contains("uid 40000 has no address block"),
            "{none}"
        );
    }

    #[test]
    fn a_full_block_says_so() {
        let block: AddressBlock = "127.9.9.0/30".parse().expect("block");
        let mut taken = HashSet::new();
        for id in ["a", "b"] {
            let ip = block.allocate(id, None, &taken).expect("room");
            assert!(taken.insert(ip));
        }
        assert_eq!(block.allocate("c", None, &taken), None);
    }

    proptest! {
        /// Many pods never share an address, every address is in the block,
        /// and with their remembered addresses each pod gets its own back
        /// (the restart case), in any order.
        #[test]
        fn addresses_are_unique_stable_and_in_the_block(
            ids in prop::collection::btree_set("[a-z0-9-]{1,12}", 1..200),
            prefix in 20u8..=24,
        ) {
            let block: AddressBlock = format!("127.40.0.0/{prefix}").parse().expect("block");
            let mut taken = HashSet::new();
            let mut given = Vec::new();
            for id in &ids {
                let ip = block.allocate(id, None, &taken).expect("room");
                prop_assert!(block.contains(ip));
                prop_assert!(taken.insert(ip), "{ip} given twice");
                given.push((id.clone(), ip));
            }
            let mut again = HashSet::new();
            for (id, ip) in given.iter().rev() {
                let back = block.allocate(id, Some(*ip), &again).expect("room");
                prop_assert_eq!(back, *ip);
                again.insert(back);
            }
        }
    }
}
