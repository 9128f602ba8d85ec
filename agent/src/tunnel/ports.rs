//! Choosing local ports for tunnels: the range, the ports never handed out (the
//! agent's own, the control plane's), a pod's remembered port first, and
//! moving on past ports that another process holds.
//!
//! The allocator holds no state of its own: which ports our pods use is the
//! store's, and whether a port is free is asked of the kernel by binding it
//! (no check-then-bind race).

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::str::FromStr;

use serde::Deserialize;

/// An inclusive range of local ports, written `A-B`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    /// How many ports the range holds.
    pub fn len(&self) -> usize {
        usize::from(self.end - self.start) + 1
    }

    /// Always false: a range holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (start, end) = text
            .split_once('-')
            .ok_or_else(|| format!("port range {text:?} is not of the form A-B"))?;
        let parse = |part: &str| {
            part.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("port {part:?} in range {text:?} is not in 1-65535"))
        };
        let (start, end) = (parse(start)?, parse(end)?);
        if start > end {
            return Err(format!("port range {text:?} starts after it ends"));
        }
        Ok(Self { start, end })
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Why no port could be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error("no available ports in range {range}")]
    Exhausted {
        range: PortRange,
        /// Ports that another process held, so the user can see why.
        held_elsewhere: Vec<u16>,
    },
    #[error("cannot listen on port {port}: {message}")]
    Bind { port: u16, message: String },
}

/// The result of a successful allocation.
#[derive(Debug)]
pub struct Allocation<L> {
    pub port: u16,
    pub listener: L,
    /// Ports tried before it that another process held.
    pub held_elsewhere: Vec<u16>,
}

impl<L> Allocation<L> {
    /// A note for the user when the pod did not get its first choice.
    pub fn note(&self) -> Option<String> {
        match self.held_elsewhere.as_slice() {
            [] => None,
            [one] => Some(format!(
                "port {one} is held by another process; using {}",
                self.port
            )),
            many => Some(format!(
                "ports {} are held by other processes; using {}",
                many.iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                self.port
            )),
        }
    }
}

/// The tunnel port policy.
#[derive(Debug, Clone)]
pub struct PortPlan {
    range: PortRange,
    reserved: BTreeSet<u16>,
}

impl PortPlan {
    /// A plan over `range` that never hands out any of `reserved`.
    pub fn new(range: PortRange, reserved: impl IntoIterator<Item = u16>) -> Self {
        Self {
            range,
            reserved: reserved.into_iter().collect(),
        }
    }

    pub fn range(&self) -> PortRange {
        self.range
    }

    /// Whether the plan may ever hand out `port`.
    pub fn allows(&self, port: u16) -> bool {
        self.range.contains(port) && !self.reserved.contains(&port)
    }

    /// Ports to try, in order: the preferred one (when allowed), then the
    /// range from its start, skipping reserved ports and those `in_use` by
    /// our own pods.
    pub fn candidates<'a>(
        &'a self,
        preferred: Option<u16>,
        in_use: &'a dyn Fn(u16) -> bool,
    ) -> impl Iterator<Item = u16> + 'a {
        let preferred = preferred.filter(|p| self.allows(*p) && !in_use(*p));
        preferred.into_iter().chain(
            (self.range.start..=self.range.end)
                .filter(move |p| Some(*p) != preferred && self.allows(*p) && !in_use(*p)),
        )
    }

    /// Binds the first candidate port that the kernel grants. A port another
    /// process holds (`AddrInUse`) is skipped and remembered; any other bind
    /// error stops the search, since the next port would fail the same way.
    pub fn allocate<L>(
        &self,
        preferred: Option<u16>,
        in_use: &dyn Fn(u16) -> bool,
        mut bind: impl FnMut(u16) -> io::Result<L>,
    ) -> Result<Allocation<L>, PortError> {
        let mut held_elsewhere = Vec::new();
        for port in self.candidates(preferred, in_use) {
            match bind(port) {
                Ok(listener) => {
                    return Ok(Allocation {
                        port,
                        listener,
                        held_elsewhere,
                    })
                }
                Err(err) if err.kind() == io::ErrorKind::AddrInUse => held_elsewhere.push(port),
                Err(err) => {
                    return Err(PortError::Bind {
                        port,
                        message: err.to_string(),
                    })
                }
            }
        }
        Err(PortError::Exhausted {
            range: self.range,
            held_elsewhere,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn range(start: u16, end: u16) -> PortRange {
        PortRange { start, end }
    }

    #[test]
    fn preferred_port_comes_first_and_reserved_never() {
        let plan = PortPlan::new(range(8080, 8090), [8080, 8082]);
        let none = |_p: u16| false;
        let order: Vec<u16> = plan.candidates(Some(8085), &none).take(3).collect();
        assert_eq!(order, vec![8085, 8081, 8083]);
        let reserved_preferred: Vec<u16> = plan.candidates(Some(8082), &none).take(1).collect();
        assert_eq!(reserved_preferred, vec![8081]);
    }

    #[test]
    fn held_ports_are_skipped_and_named() {
        let plan = PortPlan::new(range(100, 105), []);
        let none = |_p: u16| false;
        let alloc = plan
            .allocate(Some(101), &none, |p| {
                if p == 101 || p == 100 {
                    Err(io::Error::from(io::ErrorKind::AddrInUse))
                } else {
                    Ok(p)
                }
            })
            .expect("a port");
        assert_eq!(alloc.port, 102);
        assert_eq!(alloc.held_elsewhere, vec![101, 100]);
        assert_eq!(
            alloc.note().as_deref(),
            Some("ports 101, 100 are held by other processes; using 102")
        );
    }

    #[test]
    fn exhaustion_names_the_range() {
        let plan = PortPlan::new(range(100, 101), []);
        let all = |_p: u16| true;
        let err = plan.allocate(None, &all, Ok).expect_err("exhausted");
        assert_eq!(err.to_string(), "no available ports in range 100-101");
    }

    proptest! {
        /// Allocating for many pods never yields a duplicate, a reserved
        /// port, a port outside the range or one held by another process,
        /// and re-allocating with the remembered ports gives each pod its
        /// own port back (the restart case).
        #[test]
        fn allocation_is_unique_and_stable(
            start in 1000u16..1100,
            len in 1u16..40,
            reserved in proptest::collection::hash_set(1000u16..1140, 0..10),
            foreign in proptest::collection::hash_set(1000u16..1140, 0..10),
            pods in 1usize..60,
        ) {
            let plan = PortPlan::new(range(start, start + len - 1), reserved.iter().copied());
            let bind = |p: u16| if foreign.contains(&p) {
                Err(io::Error::from(io::ErrorKind::AddrInUse))
            } else {
                Ok(p)
            };
            let mut used: HashSet<u16> = HashSet::new();
            let mut assigned = Vec::new();
            for _ in 0..pods {
                let snapshot = used.clone();
                let in_use = move |p: u16| snapshot.contains(&p);
                match plan.allocate(None, &in_use, bind) {
                    Ok(a) => {
                        prop_assert!(plan.allows(a.port));
                        prop_assert!(!foreign.contains(&a.port));
                        prop_assert!(used.insert(a.port), "duplicate {}", a.port);
                        assigned.push(a.port);
                    }
                    Err(PortError::Exhausted { .. }) => {}
                    Err(other) => prop_assert!(false, "unexpected {other}"),
                }
            }
            // Restart: each pod asks for its remembered port in turn.
            let mut again: HashSet<u16> = HashSet::new();
            for port in &assigned {
                let snapshot = again.clone();
                let in_use = move |p: u16| snapshot.contains(&p);
                let a = plan.allocate(Some(*port), &in_use, bind).expect("room for every pod");
                prop_assert_eq!(a.port, *port);
                again.insert(a.port);
            }
        }
    }
}
