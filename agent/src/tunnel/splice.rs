//! The Linux fast path for bulk transfers: bytes move socket → pipe → socket
//! with splice(2), kernel to kernel, never copied through user space. The
//! forwarder hands a connection over once it carries bulk data, so idle and
//! chatty connections never cost a pipe; a socket splice refuses falls back to
//! the portable copy. Pipes are pooled: a transfer holds one only while a
//! chunk is in flight, so a few large pipes serve many connections.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use nix::unistd::pipe2;
use parking_lot::{Mutex, MutexGuard};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes asked of one splice call, and the size of a large pipe: in one
/// interleaved series one stream moved 8 % more through 512 KiB pipes than
/// through 256 KiB ones (and no more through 1 MiB), in the next the two
/// were even; see BENCHMARKS.md.
const CHUNK: usize = 512 * 1024;

/// Large pipes alive at most. The kernel charges pipe buffers to the user
/// (`fs.pipe-user-pages-soft`, 64 MiB by default) and, past that budget,
/// gives every new pipe of that user two pages; 32 × 512 KiB is a quarter
/// of it. Pipes beyond keep the kernel's default size (64 KiB).
const MAX_LARGE_PIPES: usize = 32;

/// Empty pipes kept for the next transfer (two descriptors each).
const MAX_IDLE_PIPES: usize = 8;

/// Pipes for bulk transfers, shared by every forwarding thread.
#[derive(Debug, Default)]
pub struct PipePool {
    idle: Mutex<Vec<Pipe>>,
    large: AtomicUsize,
}

#[derive(Debug)]
struct Pipe {
    read_end: OwnedFd,
    write_end: OwnedFd,
    large: bool,
}

impl PipePool {
    fn lock(&self) -> MutexGuard<'_, Vec<Pipe>> {
        self.idle.lock()
    }

    /// An empty pipe, from the pool or new, lent until the lease is dropped.
    fn lease(&self) -> io::Result<Lease<'_>> {
        let pooled = self.lock().pop();
        let pipe = match pooled {
            Some(pipe) => pipe,
            None => self.new_pipe()?,
        };
        Ok(Lease {
            pool: self,
            pipe: Some(pipe),
            empty: Cell::new(true),
        })
    }

    fn new_pipe(&self) -> io::Result<Pipe> {
        let (read_end, write_end) = pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        // A large pipe means fewer round trips; the default size works too,
        // so a refusal (the per-user budget) is not an error.
        let size = i32::try_from(CHUNK).unwrap_or(i32::MAX);
        let large = self.large.fetch_add(1, Ordering::Relaxed) < MAX_LARGE_PIPES
            && fcntl(&write_end, FcntlArg::F_SETPIPE_SZ(size)).is_ok();
        if !large {
            self.large.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(Pipe {
            read_end,
            write_end,
            large,
        })
    }

    /// Empty pipes waiting in the pool.
    pub fn idle(&self) -> usize {
        self.lock().len()
    }
}

/// A pipe lent to one transfer. Back to the pool when it is dropped empty;
/// closed when it may still hold bytes (an error, or the transfer dropped
/// mid-chunk) or the pool is full.
struct Lease<'a> {
    pool: &'a PipePool,
    pipe: Option<Pipe>,
    empty: Cell<bool>,
}

impl Lease<'_> {
    fn pipe(&self) -> io::Result<&Pipe> {
        self.pipe
            .as_ref()
            .ok_or_else(|| io::Error::other("pipe lease already returned"))
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let Some(pipe) = self.pipe.take() else {
            return;
        };
        if self.empty.get() {
            let mut idle = self.pool.lock();
            if idle.len() < MAX_IDLE_PIPES {
                idle.push(pipe);
                return;
            }
        }
        if pipe.large {
            self.pool.large.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

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

/// Moves bytes from `from` to `to` until `from` reaches end of stream (the
/// caller tells `to`'s peer). Each chunk is drained from the pipe before the
/// next is read, so a splice that would block always means the socket, not
/// the pipe, and the pipe goes back to `pipes` between chunks.
pub async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    counter: &AtomicU64,
    pipes: &PipePool,
) -> io::Result<Spliced> {
    let mut spliced_any = false;
    loop {
        from.readable().await?;
        let lease = pipes.lease()?;
        let pipe = lease.pipe()?;
        let moved = from.try_io(Interest::READABLE, || {
            splice(from.as_fd(), None, &pipe.write_end, None, CHUNK, flags())
                .map_err(io::Error::from)
        });
        let moved = match moved {
            Ok(0) => break,
            Ok(moved) => moved,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
            Err(err) if unsupported(&err) && !spliced_any => return Ok(Spliced::Unsupported),
            Err(err) => return Err(err),
        };
        lease.empty.set(false);
        let mut left = moved;
        while left > 0 {
            to.writable().await?;
            let written = to.try_io(Interest::WRITABLE, || {
                splice(&pipe.read_end, None, to.as_fd(), None, left, flags())
                    .map_err(io::Error::from)
            });
            match written {
                Ok(written) => left -= written,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Err(err) => return Err(err),
            }
        }
        lease.empty.set(true);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn leases(pool: &PipePool, count: usize) -> Vec<Lease<'_>> {
        (0..count).map(|_| pool.lease().expect("a pipe")).collect()
    }

    #[test]
    fn an_empty_pipe_goes_back_to_the_pool_and_one_that_may_hold_bytes_is_closed() {
        let pool = PipePool::default();
        drop(pool.lease().expect("a pipe"));
        assert_eq!(pool.idle(), 1, "an empty pipe is kept");

        let lease = pool.lease().expect("the kept pipe");
        assert_eq!(pool.idle(), 0, "the kept pipe is lent again");
        lease.empty.set(false);
        drop(lease);
        assert_eq!(pool.idle(), 0, "a pipe that may hold bytes is closed");
    }

    #[test]
    fn the_pool_keeps_a_few_pipes_and_few_large_ones() {
        let pool = PipePool::default();
        let many = leases(&pool, MAX_LARGE_PIPES + 8);
        let large = many
            .iter()
            .filter(|lease| lease.pipe().is_ok_and(|pipe| pipe.large))
            .count();
        assert!(large <= MAX_LARGE_PIPES, "{large} large pipes");
        assert_eq!(pool.large.load(Ordering::Relaxed), large);

        drop(many);
        assert_eq!(
            pool.idle(),
            MAX_IDLE_PIPES,
            "only a few empty pipes are kept"
        );
        let kept_large = pool.lock().iter().filter(|pipe| pipe.large).count();
        assert_eq!(
            pool.large.load(Ordering::Relaxed),
            kept_large,
            "closed pipes are no longer counted against the budget"
        );
    }
}
