//! The Linux fast path for bulk transfers: bytes move socket → pipe → socket
//! with splice(2), kernel to kernel, never copied through user space. The
//! forwarder hands a connection over once it carries bulk data, so idle and
//! chatty connections never cost a pipe; a socket splice refuses falls back to
//! the portable copy.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use nix::unistd::pipe2;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes asked of one splice call (and the pipe's size, when the kernel allows).
const CHUNK: usize = 256 * 1024;

/// What one direction ended with.
#[derive(Debug)]
pub enum Spliced {
    /// The source closed; everything was moved.
    Done,
    /// The kernel will not splice these sockets: move the rest another way.
    Unsupported,
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

fn new_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (read_end, write_end) = pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    // A bigger pipe means fewer round trips; the default (64 KiB) is fine too,
    // so a refusal (the per-user pipe budget) is not an error.
    let size = i32::try_from(CHUNK).unwrap_or(i32::MAX);
    let _ = fcntl(&write_end, FcntlArg::F_SETPIPE_SZ(size));
    Ok((read_end, write_end))
}

/// Moves bytes from `from` to `to` until `from` reaches end of stream (the
/// caller tells `to`'s peer). Each chunk is drained from the pipe before the next is
/// read, so a splice that would block always means the socket, not the pipe.
pub async fn pump(from: &TcpStream, to: &TcpStream, counter: &AtomicU64) -> io::Result<Spliced> {
    let mut pipe: Option<(OwnedFd, OwnedFd)> = None;
    let mut spliced_any = false;
    loop {
        from.readable().await?;
        let (read_end, write_end) = match &pipe {
            Some(pipe) => pipe,
            None => pipe.insert(new_pipe()?),
        };
        let moved = from.try_io(Interest::READABLE, || {
            splice(from.as_fd(), None, write_end, None, CHUNK, flags()).map_err(io::Error::from)
        });
        let moved = match moved {
            Ok(0) => break,
            Ok(moved) => moved,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
            Err(err) if unsupported(&err) && !spliced_any => return Ok(Spliced::Unsupported),
            Err(err) => return Err(err),
        };
        let mut left = moved;
        while left > 0 {
            to.writable().await?;
            let written = to.try_io(Interest::WRITABLE, || {
                splice(read_end, None, to.as_fd(), None, left, flags()).map_err(io::Error::from)
            });
            match written {
                Ok(written) => left -= written,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Err(err) => return Err(err),
            }
        }
        counter.fetch_add(moved as u64, Ordering::Relaxed);
        spliced_any = true;
    }
    Ok(Spliced::Done)
}

/// EINVAL / ENOSYS: this pair of descriptors cannot be spliced.
fn unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(code) if code == nix::errno::Errno::EINVAL as i32 || code == nix::errno::Errno::ENOSYS as i32
    )
}
