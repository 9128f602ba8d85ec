//! The agent's side: starting the helper on one end of a socket pair,
//! asking it for listening sockets, and taking them back as
//! `std::net::TcpListener`s set up as the agent's own (address reuse,
//! `TCP_NODELAY`, non-blocking, backlog 1024).

use std::io::{self, Write as _};
use std::net::{SocketAddr, SocketAddrV4, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::socket::{getsockopt, socketpair, sockopt, AddressFamily, SockFlag, SockType};

use crate::protocol::{read_reply, Reply, Request};

/// How long one reply may take: a bind is instant, so a helper this slow is
/// stuck, and the agent must not hang on it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the helper did not hand over a listening socket.
#[derive(Debug, thiserror::Error)]
pub enum BindHelperError {
    #[error("cannot start the bind helper {helper}: {source}")]
    Spawn { helper: PathBuf, source: io::Error },
    #[error("bind helper {helper} refused {addr}: {reason}")]
    Refused {
        helper: PathBuf,
        addr: SocketAddrV4,
        reason: String,
    },
    #[error("bind helper {helper} could not bind {addr}: {source}")]
    Bind {
        helper: PathBuf,
        addr: SocketAddrV4,
        /// The helper's errno: `AddrInUse` when another process has the port.
        source: io::Error,
    },
    #[error("talking to bind helper {helper} about {addr} failed: {source}{}", exited_note(.status))]
    Io {
        helper: PathBuf,
        addr: SocketAddrV4,
        source: io::Error,
        /// How the helper ended, when it had.
        status: Option<ExitStatus>,
    },
    #[error("bind helper {helper} answered {reply:?} for {addr}, which is not the protocol")]
    Protocol {
        helper: PathBuf,
        addr: SocketAddrV4,
        reply: String,
    },
    #[error("bind helper {helper} sent a socket for {addr} that is not one: {why}")]
    NotAListener {
        helper: PathBuf,
        addr: SocketAddrV4,
        why: String,
    },
    #[error("bind helper {helper} ended with {status}")]
    Exit { helper: PathBuf, status: ExitStatus },
}

fn exited_note(status: &Option<ExitStatus>) -> String {
    status.map_or_else(String::new, |s| format!(" (the helper ended with {s})"))
}

impl BindHelperError {
    /// The helper's errno for a failed bind, so the agent can tell a port
    /// in use (`io::ErrorKind::AddrInUse`) from the rest.
    pub fn bind_error(&self) -> Option<&io::Error> {
        match self {
            BindHelperError::Bind { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// One running helper, kept for many requests (the agent may bind many pods
/// at start). Dropping it ends the helper; [`BindHelper::finish`] also says
/// how it ended.
#[derive(Debug)]
pub struct BindHelper {
    helper: PathBuf,
    child: Child,
    socket: Option<UnixStream>,
}

impl BindHelper {
    /// Starts the helper at `helper` with one end of a fresh Unix socket
    /// pair as its standard input, and nothing else: no arguments, an empty
    /// environment, standard output discarded, standard error inherited for
    /// its diagnostics.
    pub fn spawn(helper: &Path) -> Result<Self, BindHelperError> {
        let spawn_error = |source| BindHelperError::Spawn {
            helper: helper.to_owned(),
            source,
        };
        // Close-on-exec for both ends here; the child's end is dup'ed onto
        // its descriptor 0, which clears the flag there only.
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|errno| spawn_error(errno.into()))?;
        let socket = UnixStream::from(ours);
        socket
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .and_then(|()| socket.set_write_timeout(Some(REPLY_TIMEOUT)))
            .map_err(spawn_error)?;
        // The `Command` (holding our copy of the child's end) is dropped
        // right after spawning, so the helper's exit is seen as end of file.
        let child = Command::new(helper)
            .env_clear()
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(spawn_error)?;
        Ok(Self {
            helper: helper.to_owned(),
            child,
            socket: Some(socket),
        })
    }

    /// Asks for a TCP listening socket on `addr`.
    pub fn bind(&mut self, addr: SocketAddrV4) -> Result<TcpListener, BindHelperError> {
        let (line, mut fds) = self.exchange(addr)?;
        let reply = Reply::parse(&line).ok_or_else(|| BindHelperError::Protocol {
            helper: self.helper.clone(),
            addr,
            reply: String::from_utf8_lossy(&line).into_owned(),
        })?;
        let protocol_error = || BindHelperError::Protocol {
            helper: self.helper.clone(),
            addr,
            reply: String::from_utf8_lossy(&line).into_owned(),
        };
        match reply {
            Reply::Ok if fds.len() == 1 => match fds.pop() {
                Some(fd) => self.listener(addr, fd),
                None => Err(protocol_error()),
            },
            // Extra or missing descriptors: the ones received close here.
            Reply::Ok => Err(protocol_error()),
            _ if !fds.is_empty() => Err(protocol_error()),
            Reply::Refused(reason) => Err(BindHelperError::Refused {
                helper: self.helper.clone(),
                addr,
                reason,
            }),
            // The errno says it all; the helper's text is for people
            // reading the protocol.
            Reply::Os { errno, .. } => Err(BindHelperError::Bind {
                helper: self.helper.clone(),
                addr,
                source: io::Error::from_raw_os_error(errno),
            }),
        }
    }

    /// Ends the helper: closes its input, waits for it, and fails unless it
    /// exited cleanly.
    pub fn finish(mut self) -> Result<(), BindHelperError> {
        self.socket = None;
        let status = self.child.wait().map_err(|source| BindHelperError::Spawn {
            helper: self.helper.clone(),
            source,
        })?;
        if status.success() {
            Ok(())
        } else {
            Err(BindHelperError::Exit {
                helper: self.helper.clone(),
                status,
            })
        }
    }

    /// Sends the request for `addr` and reads the reply.
    fn exchange(&mut self, addr: SocketAddrV4) -> Result<(Vec<u8>, Vec<OwnedFd>), BindHelperError> {
        let result = match &self.socket {
            Some(socket) => {
                // `&UnixStream` writes: no mutable borrow of `self` needed.
                let mut writer = socket;
                writer
                    .write_all(Request::Tcp(addr).encode().as_bytes())
                    .and_then(|()| read_reply(socket))
            }
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the helper was finished",
            )),
        };
        result.map_err(|source| {
            // Dead helper: say how it died (it may have refused to start).
            let status = self.child.try_wait().ok().flatten();
            BindHelperError::Io {
                helper: self.helper.clone(),
                addr,
                source,
                status,
            }
        })
    }

    /// Checks that `fd` is what was asked for: a listening TCP socket on
    /// `addr` (the kernel's word, not the helper's).
    fn listener(&self, addr: SocketAddrV4, fd: OwnedFd) -> Result<TcpListener, BindHelperError> {
        let not_one = |why: String| BindHelperError::NotAListener {
            helper: self.helper.clone(),
            addr,
            why,
        };
        match getsockopt(&fd, sockopt::AcceptConn) {
            Ok(true) => {}
            Ok(false) => return Err(not_one("it is not listening".to_owned())),
            Err(errno) => return Err(not_one(format!("it has no listening state ({errno})"))),
        }
        let listener = TcpListener::from(fd);
        match listener.local_addr() {
            Ok(SocketAddr::V4(local)) if local == addr => Ok(listener),
            Ok(local) => Err(not_one(format!("it is bound to {local}"))),
            Err(err) => Err(not_one(format!("it has no address ({err})"))),
        }
    }
}

impl Drop for BindHelper {
    fn drop(&mut self) {
        if self.socket.take().is_none() {
            // Finished: already waited for.
            return;
        }
        // End of file ends an idle helper at once; one that is stuck is
        // killed rather than waited for, so dropping never hangs.
        for _ in 0..20 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One listening socket from a helper started for it alone: spawns the
/// helper at `helper`, asks for `addr`, and waits for the helper to exit.
pub fn bind_via_helper(helper: &Path, addr: SocketAddrV4) -> Result<TcpListener, BindHelperError> {
    let mut running = BindHelper::spawn(helper)?;
    let listener = running.bind(addr)?;
    running.finish()?;
    Ok(listener)
}
