//! `k3s-local-agent-bind`: the one binary of the agent with a capability
//! (`cap_net_bind_service=+ep`). It binds TCP ports on pod loopback
//! addresses for the agent and passes the listening sockets back over its
//! standard input, a Unix socket; see the library's `protocol` and `policy`.
//!
//! Being privileged and runnable by any local user, it binds only inside
//! the caller's own address block (one per uid, see `policy`), so no user
//! can take a port on another user's pod address; and it does as little as
//! it can: no arguments, no environment (beyond what libc does itself in
//! secure-execution mode), no file but its root-owned config, no socket but
//! the ones it is asked for and hands over at once.

use std::io::{self, Read as _, Write as _};
use std::net::SocketAddrV4;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd};
use std::path::Path;
use std::process::ExitCode;

use k3s_local_agent_bind::policy::{self, ConfigError, Layout};
use k3s_local_agent_bind::protocol::{self, BadRequest, Reply, Request, MAX_LINE};
use nix::sys::socket::{
    bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockProtocol,
    SockType, SockaddrIn,
};
use nix::sys::stat::{fstat, SFlag};

/// Pending connections per listener, as the agent's own listeners have.
const LISTEN_BACKLOG: i32 = 1024;

const USAGE: &str = "k3s-local-agent-bind: takes no arguments; the K3s Local Agent starts it with a Unix socket as standard input and asks it for listening sockets there";

fn main() -> ExitCode {
    // The default panic hook reads RUST_BACKTRACE; this one reads nothing.
    std::panic::set_hook(Box::new(|_| {
        let _ = writeln!(io::stderr(), "k3s-local-agent-bind: internal error");
    }));
    if std::env::args_os().len() > 1 {
        let _ = writeln!(io::stderr(), "{USAGE}");
        return ExitCode::from(2);
    }
    let stdin = io::stdin();
    let socket = stdin.as_fd();
    let is_socket = fstat(socket)
        .is_ok_and(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFSOCK);
    if !is_socket {
        let _ = writeln!(io::stderr(), "{USAGE}");
        return ExitCode::from(2);
    }
    let policy = policy::load_config(Path::new(policy::CONFIG_PATH));
    if let Err(err) = &policy {
        // Said on every request too, where the agent sees it.
        let _ = writeln!(io::stderr(), "k3s-local-agent-bind: bad config: {err}");
    }
    match serve(socket, &policy) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let _ = writeln!(io::stderr(), "k3s-local-agent-bind: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Answers requests read from `socket` until end of file. A line longer
/// than [`MAX_LINE`] is answered once, at its end, and skipped.
fn serve(socket: BorrowedFd<'_>, policy: &Result<Layout, ConfigError>) -> io::Result<()> {
    let mut input = io::stdin().lock();
    let mut line = Vec::with_capacity(MAX_LINE + 1);
    let mut too_long = false;
    let mut chunk = [0u8; 512];
    loop {
        let read = match input.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(read) => read,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        for &byte in &chunk[..read] {
            if byte != b'\n' {
                if line.len() == MAX_LINE {
                    too_long = true;
                    line.clear();
                }
                if !too_long {
                    line.push(byte);
                }
                continue;
            }
            let answer = if too_long {
                Answer::Refused(BadRequest::TooLong.to_string())
            } else {
                answer(&line, policy)
            };
            line.clear();
            too_long = false;
            match answer {
                Answer::Listener(fd) => {
                    protocol::send_reply(socket, &Reply::Ok, Some(fd.as_fd()))?;
                    // Ours closes here: the agent's copy is the only one.
                    drop(fd);
                }
                Answer::Refused(why) => protocol::send_reply(socket, &Reply::Refused(why), None)?,
                Answer::Os(errno, message) => {
                    protocol::send_reply(socket, &Reply::Os { errno, message }, None)?;
                }
            }
        }
    }
}

enum Answer {
    Listener(OwnedFd),
    Refused(String),
    Os(i32, String),
}

fn answer(line: &[u8], policy: &Result<Layout, ConfigError>) -> Answer {
    let addr = match protocol::parse_request(line) {
        Ok(Request::Tcp(addr)) => addr,
        Err(bad) => return Answer::Refused(bad.to_string()),
    };
    let layout = match policy {
        Ok(layout) => layout,
        Err(err) => return Answer::Refused(format!("bad config: {err}")),
    };
    // The real uid: who ran us. The capability raises no uid, and a
    // file-capability binary cannot be handed another real uid, so this is
    // the caller, whose block alone is served.
    let caller = nix::unistd::getuid().as_raw();
    if let Err(refusal) = layout.check(caller, *addr.ip()) {
        return Answer::Refused(refusal.to_string());
    }
    match bind_listener(addr) {
        Ok(fd) => Answer::Listener(fd),
        Err(errno) => Answer::Os(
            errno as i32,
            format!("cannot bind {addr}: {}", errno.desc()),
        ),
    }
}

/// A listening socket set up as the agent's own listeners are (its
/// `listen::bind_listener`): address reuse so a toggle can re-listen despite
/// connections in TIME_WAIT, `TCP_NODELAY` inherited by every accepted
/// connection, non-blocking (a flag of the open file, so it travels with
/// the descriptor), and a backlog of 1024. Never `SO_REUSEPORT`: a port
/// someone listens on stays theirs.
fn bind_listener(addr: SocketAddrV4) -> nix::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        SockProtocol::Tcp,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::TcpNoDelay, &true)?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(addr))?;
    listen(&fd, Backlog::new(LISTEN_BACKLOG)?)?;
    Ok(fd)
}
