//! `libnss_k3slocal.so.2`: a glibc NSS hosts module that resolves the k3s
//! local agent's pod names (`<name>-staging.local`) for the user who runs the
//! agent, without the agent ever writing `/etc/hosts`.
//!
//! # Where the names come from
//!
//! Only from the calling user's own file
//! `/run/user/<getuid()>/k3s-local-agent/names`, and only for names ending in
//! `-staging.local` (ASCII case-insensitive, one trailing dot allowed). Any
//! other name is answered "not found" at once, without touching the disk. The
//! module reads no environment variable, does no network I/O and keeps no
//! state between calls.
//!
//! The module is loaded into root and setuid programs too, so the file is
//! opened `O_RDONLY|O_NOFOLLOW|O_CLOEXEC|O_NONBLOCK` and used only if the open
//! descriptor is a regular file owned by the real uid, writable by nobody
//! else, and at most 1 MiB. Anything else counts as "no names".
//!
//! # File format (written by the agent)
//!
//! UTF-8 text, one entry per line:
//!
//! ```text
//! # comment
//! <IPv4 address> <name> [<name>...]
//! 127.77.0.9 web-staging.local web-staging-staging-staging.local
//! ```
//!
//! - `#` starts a comment that runs to the end of the line; blank lines are
//!   ignored; fields are separated by spaces or tabs; `\r\n` line ends work.
//! - The address is dotted-quad IPv4 (`std::net::Ipv4Addr` syntax). A line
//!   whose address does not parse is skipped.
//! - A name is used only if it is a valid host name (letters, digits, `-`,
//!   dots between non-empty labels of at most 63 bytes, 253 bytes in all)
//!   ending in `-staging.local`; other names on a line are ignored, and a line
//!   left with no usable name is skipped.
//! - The first line naming the queried name wins. Its first usable name is the
//!   canonical name; its other usable names are the aliases.
//!
//! IPv6 (`AF_INET6`) queries are answered "not found": `getaddrinfo` with
//! `AF_UNSPEC` still gets the IPv4 address.
//!
//! # Layout
//!
//! [`lookup`] is the safe core (name filter, file checks, parsing); `ffi`
//! holds the `_nss_k3slocal_*` entry points, the only unsafe code.

pub mod lookup;

mod ffi;
