//! One SPDY session to a pod's port-forward (`portforward.k8s.io`, what
//! `kubectl port-forward` speaks) and the connections it carries. Each
//! connection is a pair of streams named by one request id: an error
//! stream (we send nothing on it; the kubelet writes why forwarding
//! failed) and a data stream (the port's bytes; our end of it is closed
//! with a FIN when the client has finished sending, as kubectl does).
//! Opening one is two frames on a session already up, sent without
//! waiting for replies; a reset ends its one connection, and only the
//! session's own end cuts them all.
//!
//! Two tasks drive a session: one writes frames (a connection's opening
//! always before its data, openings in the order of their ids, as SPDY
//! requires; a ping every [`PING_EVERY`] while it carries connections),
//! one reads them and hands each to its connection. A session whose pings
//! or writes go unanswered, or whose server does not acknowledge a new
//! connection within [`REPLY_TIMEOUT`], is ended or retired: a laptop that
//! slept or changed networks gets a fresh session, not a hang.
//!
//! Kubelets honour no SPDY flow control, so a connection whose client
//! stops reading holds up the session's reading once its own queue
//! ([`INCOMING_BYTES`], a few MiB) is full, as in kubectl. Such a session
//! is retired at once, so new connections go to another; and if the
//! connection is still not read after [`STALL`] while others share the
//! session, it alone is reset so the others carry on.
//!
//! A broken or hostile API server cannot make a session hold much: frames
//! are decoded within the port-forward limits of `k3s_local_agent_spdy`
//! (a data frame over 1 MiB resets its connection, an oversized or
//! over-inflating header block ends the session), a connection's error
//! text is kept to [`MAX_ERROR_TEXT`], the frames waiting to be written
//! to [`CONTROL_FRAMES`], the server's pings are answered only while
//! [`MAX_PENDING_ECHOES`] wait to go out, and a server that opens a
//! stream (which no port-forward server does) ends the session.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use k3s_local_agent_spdy::{
    Decoder, Encoder, Frame, CANCEL, FLAG_FIN, FRAME_TOO_LARGE, REFUSED_STREAM,
};
use parking_lot::{Mutex, MutexGuard};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, PollSender};
use tracing::Instrument as _;

use super::websocket::closed_for_writing;

/// The largest data frame sent: what a tunnel hands over at once.
const MAX_FRAME: usize = 64 * 1024;
/// Data frames queued for the socket before writers wait.
const OUTGOING_FRAMES: usize = 64;
/// Frames queued for one connection before the session stops reading
/// (kubelets send up to 32 KiB a frame: 4 MiB), however small they are.
const INCOMING_FRAMES: usize = 128;
/// Bytes queued for one connection before the session stops reading: 128
/// of a kubelet's 32 KiB frames. What one connection can hold is this,
/// the frame its reader is taking from (at most the decoder's 1 MiB data
/// limit), and the session's one frame being decoded (as large again).
const INCOMING_BYTES: usize = 4 * 1024 * 1024;
/// How much of a kubelet's words on the error stream is kept. They are one
/// line ("error forwarding port 80 to pod …: connection refused", a few
/// hundred bytes at most); past this the connection ends with what came.
const MAX_ERROR_TEXT: usize = 4 * 1024;
/// Openings, resets and pings waiting to be written. A session's 32
/// connections need three each at most (two openings, one reset) and a
/// ping: 97. A full queue means the server stopped reading, and the
/// session takes no more connections.
const CONTROL_FRAMES: usize = 256;
/// The server's pings echoed but not yet written past which more are not
/// answered: a server waits for its echo before the next ping (Go's
/// spdystream does), so more pending means a flood or a server that does
/// not read what it asked for.
const MAX_PENDING_ECHOES: usize = 4;
/// Bytes gathered into one socket write when frames queue up.
const WRITE_BATCH: usize = 256 * 1024;
/// A session that carried no connection for this long is closed.
pub const IDLE: Duration = Duration::from_secs(30);
/// How often a session carrying connections pings its server; two
/// periods without an answer end it.
pub const PING_EVERY: Duration = Duration::from_secs(10);
/// How long the server may take to acknowledge a new connection.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one unread connection may hold up the others on its session.
pub const STALL: Duration = Duration::from_secs(10);
/// How long one write to the server may take before the session is
/// taken for dead.
const WRITE_STALL: Duration = Duration::from_secs(30);
/// The highest stream id SPDY allows; a session that reaches it takes no
/// more connections.
const LAST_STREAM_ID: u32 = 0x7fff_ffff;

/// What the reading task hands a connection.
#[derive(Debug)]
enum Event {
    /// The server acknowledged the data stream.
    Replied,
    Data(Bytes),
    DataEnd,
    ErrorText(Bytes),
    ErrorEnd,
    Reset(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Data,
    Error,
}

impl Event {
    /// The bytes it holds, as counted against its connection's queue.
    fn queued_bytes(&self) -> usize {
        match self {
            Event::Data(bytes) | Event::ErrorText(bytes) => bytes.len(),
            _ => 0,
        }
    }
}

/// Where one stream's frames go: its connection's queue.
#[derive(Debug, Clone)]
struct Route {
    role: Role,
    events: mpsc::Sender<Event>,
    /// The bytes its queue may still take (a permit a byte): taken when a
    /// frame is queued, given back when the connection takes it.
    budget: Arc<Semaphore>,
    /// The connection's two stream ids (error, data).
    pair: (u32, u32),
    /// Why the session cut the connection (not read, a frame too long).
    cut: Arc<OnceLock<String>>,
}

/// The session's streams, and what it takes to open more: one lock, so
/// ids go out in order and an idle session is never closed under a
/// connection being opened.
#[derive(Debug)]
struct Streams {
    routes: HashMap<u32, Route>,
    next_stream: u32,
    next_request: u64,
    connections: usize,
    /// When a connection was last opened or ended.
    last_used: Instant,
    /// The id of our next ping (odd: the client's), and when the one
    /// awaiting its answer went out.
    next_ping: u32,
    ping_sent: Option<Instant>,
    /// The reading task waits for a connection's client to read: the
    /// server's answers to pings wait unread too.
    reader_waiting: bool,
    /// No connection may be opened any more (idle, gone away, ids used up,
    /// unresponsive, or a connection failed in a way that suggests the pod
    /// changed). The session ends once its last connection has.
    retired: bool,
}

#[derive(Debug)]
struct Shared {
    streams: Mutex<Streams>,
    /// Openings, resets and pings: written before data.
    control: mpsc::Sender<Frame>,
    /// Echoes of the server's pings queued on `control`, not yet written.
    pending_echoes: AtomicUsize,
    data: mpsc::Sender<Frame>,
    /// Cancelled when the session ends, by either task.
    closed: CancellationToken,
}

impl Shared {
    fn streams(&self) -> MutexGuard<'_, Streams> {
        self.streams.lock()
    }

    /// Queues a reset or an echo. A full queue means the server stopped
    /// reading: the session takes no new connection, and its writes time
    /// out on their own.
    fn send_control(&self, frame: Frame) -> bool {
        let sent = self.control.try_send(frame).is_ok();
        if !sent {
            self.streams().retired = true;
        }
        sent
    }

    /// No new connection here; and if none is left, the session ends now.
    fn retire(&self) {
        let mut streams = self.streams();
        streams.retired = true;
        if streams.connections == 0 {
            self.closed.cancel();
        }
    }
}

/// Why a connection could not be opened on a session.
#[derive(Debug, thiserror::Error)]
#[error("the port-forward session takes no more connections")]
pub struct SessionRetired;

/// One upgraded connection to a pod's port-forward.
#[derive(Debug, Clone)]
pub struct Session {
    shared: Arc<Shared>,
}

impl Session {
    /// Runs SPDY on `socket` (a connection the API server upgraded).
    pub fn start<T>(socket: T) -> Self
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (reader, writer) = tokio::io::split(socket);
        let (control, control_queue) = mpsc::channel(CONTROL_FRAMES);
        let (data, data_queue) = mpsc::channel(OUTGOING_FRAMES);
        let shared = Arc::new(Shared {
            streams: Mutex::new(Streams {
                routes: HashMap::new(),
                // Streams a client opens have odd ids.
                next_stream: 1,
                next_request: 0,
                connections: 0,
                last_used: Instant::now(),
                next_ping: 1,
                ping_sent: None,
                reader_waiting: false,
                retired: false,
            }),
            control,
            pending_echoes: AtomicUsize::new(0),
            data,
            closed: CancellationToken::new(),
        });
        // Its tasks log within the span current here (the pod and the
        // session's number, when the sessions made it): a warning says
        // whose session it is about.
        let span = tracing::Span::current();
        tokio::spawn(
            write_frames(writer, control_queue, data_queue, shared.clone())
                .instrument(span.clone()),
        );
        tokio::spawn(read_frames(reader, shared.clone()).instrument(span));
        Self { shared }
    }

    /// Whether new connections may be opened here.
    pub fn is_usable(&self) -> bool {
        !self.shared.closed.is_cancelled() && !self.shared.streams().retired
    }

    /// How many connections the session carries now.
    pub fn connections(&self) -> usize {
        self.shared.streams().connections
    }

    /// A new connection to `port`: its two streams are announced at once,
    /// and its data may follow them without waiting for the replies.
    pub fn open(&self, port: u16) -> Result<PairStream, SessionRetired> {
        let (events, incoming) = mpsc::channel(INCOMING_FRAMES);
        let budget = Arc::new(Semaphore::new(INCOMING_BYTES));
        let cut = Arc::new(OnceLock::new());
        let mut streams = self.shared.streams();
        // Both openings must fit: half a connection is never announced.
        if streams.retired
            || self.shared.closed.is_cancelled()
            || self.shared.control.capacity() < 2
        {
            streams.retired = true;
            return Err(SessionRetired);
        }
        let error_id = streams.next_stream;
        let Some(data_id) = error_id.checked_add(2).filter(|id| *id <= LAST_STREAM_ID) else {
            streams.retired = true;
            return Err(SessionRetired);
        };
        streams.next_stream = data_id.saturating_add(2);
        let request = streams.next_request;
        streams.next_request += 1;
        let headers = |kind: &str| {
            vec![
                ("streamtype".to_owned(), kind.to_owned()),
                ("port".to_owned(), port.to_string()),
                ("requestid".to_owned(), request.to_string()),
            ]
        };
        // Nothing is sent on the error stream: it is opened finished.
        let opened = self
            .shared
            .control
            .try_send(Frame::SynStream {
                stream: error_id,
                flags: FLAG_FIN,
                headers: headers("error"),
            })
            .and_then(|()| {
                self.shared.control.try_send(Frame::SynStream {
                    stream: data_id,
                    flags: 0,
                    headers: headers("data"),
                })
            });
        if opened.is_err() {
            streams.retired = true;
            return Err(SessionRetired);
        }
        for (id, role) in [(error_id, Role::Error), (data_id, Role::Data)] {
            streams.routes.insert(
                id,
                Route {
                    role,
                    events: events.clone(),
                    budget: budget.clone(),
                    pair: (error_id, data_id),
                    cut: cut.clone(),
                },
            );
        }
        streams.connections += 1;
        streams.last_used = Instant::now();
        drop(streams);
        Ok(PairStream {
            shared: self.shared.clone(),
            data_id,
            error_id,
            incoming,
            budget,
            outgoing: PollSender::new(self.shared.data.clone()),
            cut,
            reply_deadline: Box::pin(tokio::time::sleep(REPLY_TIMEOUT)),
            replied: false,
            unread: Bytes::new(),
            error_text: Vec::new(),
            data_seen: false,
            data_ended: false,
            shut: false,
            failed: false,
        })
    }
}

/// What the writing task does next.
enum Next {
    /// Write a frame: from the data queue, or an opening, reset or ping.
    Frame {
        frame: Frame,
        is_data: bool,
    },
    Stop,
    Nothing,
}

/// Writes the session's frames: openings, resets and pings before data,
/// gathered into large writes when they queue up. Pings while connections
/// are carried; ends the session when they go unanswered, when a write
/// stalls, or when it has carried nothing for [`IDLE`].
async fn write_frames<W: AsyncWrite + Unpin>(
    mut socket: W,
    mut control: mpsc::Receiver<Frame>,
    mut data: mpsc::Receiver<Frame>,
    shared: Arc<Shared>,
) {
    let mut encoder = Encoder::new();
    let mut out = BytesMut::with_capacity(MAX_FRAME + 1024);
    let mut tick = tokio::time::interval(PING_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'session: loop {
        let next = tokio::select! {
            biased;
            _ = shared.closed.cancelled() => Next::Stop,
            Some(frame) = control.recv() => Next::Frame { frame, is_data: false },
            Some(frame) = data.recv() => Next::Frame { frame, is_data: true },
            _ = tick.tick() => keep_alive(&shared),
        };
        let frames: Vec<Frame> = match next {
            Next::Stop => break,
            Next::Nothing => continue,
            Next::Frame {
                frame,
                is_data: false,
            } => std::iter::once(frame)
                .chain(std::iter::from_fn(|| control.try_recv().ok()))
                .collect(),
            // A data frame's opening was queued before it: the openings
            // queued by the time it was taken go first.
            Next::Frame {
                frame,
                is_data: true,
            } => std::iter::from_fn(|| control.try_recv().ok())
                .chain(std::iter::once(frame))
                .collect(),
        };
        let mut batch = frames.into_iter();
        loop {
            for frame in batch.by_ref() {
                if matches!(frame, Frame::Ping { id } if id % 2 == 0) {
                    shared.pending_echoes.fetch_sub(1, Ordering::Relaxed);
                }
                if encoder.encode(&frame, &mut out).is_err() {
                    // Only a header block can fail to compress, and then
                    // the shared compression context is lost.
                    break 'session;
                }
            }
            if out.len() >= WRITE_BATCH {
                break;
            }
            let Ok(frame) = data.try_recv() else { break };
            let mut more: Vec<Frame> = std::iter::from_fn(|| control.try_recv().ok()).collect();
            more.push(frame);
            batch = more.into_iter();
        }
        let write = async {
            socket.write_all(&out).await?;
            socket.flush().await
        };
        let wrote = tokio::select! {
            _ = shared.closed.cancelled() => false,
            result = tokio::time::timeout(WRITE_STALL, write) => matches!(result, Ok(Ok(()))),
        };
        if !wrote {
            break;
        }
        out.clear();
    }
    shared.streams().retired = true;
    shared.closed.cancel();
    let _ = socket.shutdown().await;
}

/// The writing task's tick: a ping while connections are carried (or the
/// end, when the last went unanswered), the end when idle.
fn keep_alive(shared: &Shared) -> Next {
    let mut streams = shared.streams();
    if streams.connections == 0 {
        return if streams.retired || streams.last_used.elapsed() >= IDLE {
            Next::Stop
        } else {
            Next::Nothing
        };
    }
    if streams.reader_waiting {
        // An answer may be waiting behind an unread connection's frames.
        streams.ping_sent = None;
        return Next::Nothing;
    }
    match streams.ping_sent {
        Some(sent) if sent.elapsed() >= PING_EVERY * 2 => {
            tracing::warn!("a staging port-forward session stopped answering; its connections end");
            Next::Stop
        }
        Some(_) => Next::Nothing,
        None => {
            let id = streams.next_ping;
            streams.next_ping = streams.next_ping.wrapping_add(2) | 1;
            streams.ping_sent = Some(Instant::now());
            Next::Frame {
                frame: Frame::Ping { id },
                is_data: false,
            }
        }
    }
}

/// A port-forward server opened a stream: it is not speaking the protocol,
/// and the session ends.
#[derive(Debug, thiserror::Error)]
#[error(
    "the port-forward session broke: the API server opened stream {stream}, which a \
     port-forward server never does"
)]
struct ServerOpenedStream {
    stream: u32,
}

/// Reads the session's frames and hands each to its connection, until the
/// session ends; then every connection still on it is cut.
async fn read_frames<R: AsyncRead + Unpin>(mut socket: R, shared: Arc<Shared>) {
    let mut decoder = Decoder::new();
    let mut buffer = BytesMut::with_capacity(128 * 1024);
    let why = 'session: loop {
        loop {
            match decoder.decode(&mut buffer) {
                Ok(Some(frame)) => {
                    if let Err(why) = deliver(frame, &shared).await {
                        break 'session why.to_string();
                    }
                }
                Ok(None) => break,
                Err(err) => break 'session format!("the port-forward session broke: {err}"),
            }
        }
        if buffer.capacity() - buffer.len() < 16 * 1024 {
            buffer.reserve(MAX_FRAME);
        }
        tokio::select! {
            _ = shared.closed.cancelled() => break "the port-forward session ended".to_owned(),
            read = socket.read_buf(&mut buffer) => match read {
                Ok(0) => break "the API server ended the port-forward session".to_owned(),
                Ok(_) => {}
                Err(err) => break format!("the port-forward session broke: {err}"),
            },
        }
    };
    shared.closed.cancel();
    let routes: Vec<Route> = {
        let mut streams = shared.streams();
        streams.retired = true;
        streams.routes.drain().map(|(_, route)| route).collect()
    };
    for route in routes.into_iter().filter(|route| route.role == Role::Data) {
        let _ = route.events.try_send(Event::Reset(why.clone()));
    }
}

/// Hands one frame to the connection it belongs to; an error (why) when
/// the server broke the protocol so that the session must end.
async fn deliver(frame: Frame, shared: &Shared) -> Result<(), ServerOpenedStream> {
    let route = |stream: u32| shared.streams().routes.get(&stream).cloned();
    match frame {
        Frame::Data {
            stream,
            flags,
            data,
        } => {
            let Some(route) = route(stream) else {
                return Ok(());
            };
            if !data.is_empty() {
                let event = match route.role {
                    Role::Data => Event::Data(data),
                    Role::Error => Event::ErrorText(data),
                };
                hand_over(shared, &route, event).await;
            }
            if flags & FLAG_FIN != 0 {
                hand_over(shared, &route, end_of(route.role)).await;
            }
        }
        Frame::SynReply { stream, flags, .. } => {
            if let Some(route) = route(stream) {
                if route.role == Role::Data {
                    hand_over(shared, &route, Event::Replied).await;
                }
                if flags & FLAG_FIN != 0 {
                    hand_over(shared, &route, end_of(route.role)).await;
                }
            }
        }
        Frame::RstStream { stream, status } => {
            if let Some(route) = route(stream) {
                let why = format!("the API server reset the stream ({})", reset_reason(status));
                hand_over(shared, &route, Event::Reset(why)).await;
            }
        }
        // Held by nobody: the connection is reset, the session goes on.
        Frame::DataTooLong { stream, length } => {
            if let Some(route) = route(stream) {
                let why = format!(
                    "reset: the API server sent a frame of {length} bytes, more than a \
                     port-forward takes"
                );
                cut_connection(shared, &route, why, FRAME_TOO_LARGE);
            }
        }
        // Our pings have odd ids: one answered. The server's are echoed
        // while only a few echoes wait to be written.
        Frame::Ping { id } if id % 2 == 1 => shared.streams().ping_sent = None,
        Frame::Ping { id } => {
            // Counted before it is queued: the writer may take it at once.
            let pending = shared.pending_echoes.fetch_add(1, Ordering::Relaxed);
            if pending >= MAX_PENDING_ECHOES || !shared.send_control(Frame::Ping { id }) {
                shared.pending_echoes.fetch_sub(1, Ordering::Relaxed);
            }
        }
        Frame::GoAway { .. } => shared.retire(),
        // A port-forward server never opens a stream: one that does is not
        // speaking the protocol, and refusing each would queue without end.
        Frame::SynStream { stream, .. } => return Err(ServerOpenedStream { stream }),
        _ => {}
    }
    Ok(())
}

/// Ends one connection from the session's side: its streams get no more
/// frames, the server is told with a reset of `status`, and its reader
/// learns `why` once it has what was queued.
fn cut_connection(shared: &Shared, route: &Route, why: String, status: u32) {
    let (error_id, data_id) = route.pair;
    {
        let mut streams = shared.streams();
        streams.routes.remove(&error_id);
        streams.routes.remove(&data_id);
    }
    let _ = route.cut.set(why);
    shared.send_control(Frame::RstStream {
        stream: data_id,
        status,
    });
}

/// Puts `event` on a connection's queue. A full queue (its client stopped
/// reading: [`INCOMING_BYTES`] or [`INCOMING_FRAMES`] waiting) retires the
/// session, so no new connection joins the wait; if it is still full after
/// [`STALL`] while other connections share the session, that connection is
/// reset and the others carry on.
async fn hand_over(shared: &Shared, route: &Route, event: Event) {
    // A frame is at most the decoder's data limit, far below u32::MAX.
    let size = u32::try_from(event.queued_bytes()).unwrap_or(u32::MAX);
    let event = match route.budget.try_acquire_many(size) {
        Ok(bytes) => match route.events.try_send(event) {
            Ok(()) => {
                bytes.forget();
                return;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return,
            Err(mpsc::error::TrySendError::Full(event)) => event,
        },
        Err(tokio::sync::TryAcquireError::Closed) => return,
        Err(tokio::sync::TryAcquireError::NoPermits) => event,
    };
    {
        let mut streams = shared.streams();
        streams.retired = true;
        streams.reader_waiting = true;
    }
    waiting_for_reader(shared, route, event, size).await;
    shared.streams().reader_waiting = false;
}

/// The wait of [`hand_over`] on a full queue: for room for `size` bytes
/// and a place in it.
async fn waiting_for_reader(shared: &Shared, route: &Route, event: Event, size: u32) {
    let stall = tokio::time::sleep(STALL);
    tokio::pin!(stall);
    let room = async {
        let bytes = route.budget.acquire_many(size).await.ok()?;
        let place = route.events.reserve().await.ok()?;
        Some((bytes, place))
    };
    tokio::pin!(room);
    loop {
        tokio::select! {
            room = &mut room => {
                if let Some((bytes, place)) = room {
                    bytes.forget();
                    place.send(event);
                }
                return;
            }
            _ = shared.closed.cancelled() => return,
            _ = &mut stall => {
                if shared.streams().connections > 1 {
                    let why = format!(
                        "reset: its client read nothing for {} s while other connections to \
                         the pod waited",
                        STALL.as_secs()
                    );
                    cut_connection(shared, route, why, CANCEL);
                    return;
                }
                stall.as_mut().reset(Instant::now() + STALL);
            }
        }
    }
}

fn end_of(role: Role) -> Event {
    match role {
        Role::Data => Event::DataEnd,
        Role::Error => Event::ErrorEnd,
    }
}

fn reset_reason(status: u32) -> &'static str {
    match status {
        1 => "protocol error",
        2 => "invalid stream",
        REFUSED_STREAM => "refused",
        4 => "unsupported version",
        CANCEL => "cancelled",
        6 => "internal error",
        7 => "flow control error",
        FRAME_TOO_LARGE => "frame too large",
        _ => "unknown status",
    }
}

/// One connection on a session, as a byte stream.
#[derive(Debug)]
pub struct PairStream {
    shared: Arc<Shared>,
    data_id: u32,
    error_id: u32,
    incoming: mpsc::Receiver<Event>,
    /// The queue's room in bytes, given back as frames are taken.
    budget: Arc<Semaphore>,
    outgoing: PollSender<Frame>,
    /// Why the session cut this connection, when it did.
    cut: Arc<OnceLock<String>>,
    /// Until the server acknowledges the data stream: when to give up.
    reply_deadline: Pin<Box<Sleep>>,
    replied: bool,
    /// What is left of the last data frame.
    unread: Bytes,
    /// What the kubelet wrote on the error stream so far (at most
    /// [`MAX_ERROR_TEXT`]).
    error_text: Vec<u8>,
    /// Whether the pod sent any data: an error before it is a refusal.
    data_seen: bool,
    /// The pod's side is done.
    data_ended: bool,
    /// Our sending side is done.
    shut: bool,
    /// The connection broke; nothing more goes either way.
    failed: bool,
}

fn session_ended() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        "the port-forward session ended",
    )
}

impl PairStream {
    /// The kubelet's words on the error stream, as the read's error: a
    /// refusal before any data (and then the session is not reused: the
    /// pod may have been replaced under it), a broken connection after.
    fn fail_with_error_text(&mut self) -> io::Error {
        self.failed = true;
        let kind = if self.data_seen {
            io::ErrorKind::ConnectionReset
        } else {
            self.shared.streams().retired = true;
            io::ErrorKind::ConnectionRefused
        };
        io::Error::new(kind, String::from_utf8_lossy(&self.error_text).into_owned())
    }

    /// Why the queue ended with no word: the session cut this connection
    /// (not read, a frame too long), or the whole session ended.
    fn cut(&mut self) -> io::Error {
        self.failed = true;
        match self.cut.get() {
            Some(why) => io::Error::new(io::ErrorKind::ConnectionReset, why.clone()),
            None => session_ended(),
        }
    }

    /// Keeps the kubelet's words up to [`MAX_ERROR_TEXT`]; past it, the
    /// connection ends with what came (`Some`, the read's error).
    fn keep_error_text(&mut self, text: &[u8]) -> Option<io::Error> {
        let room = MAX_ERROR_TEXT - self.error_text.len();
        if text.len() <= room {
            self.error_text.extend_from_slice(text);
            return None;
        }
        self.error_text.extend_from_slice(&text[..room]);
        self.error_text.extend_from_slice("…".as_bytes());
        Some(self.fail_with_error_text())
    }
}

impl AsyncRead for PairStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.unread.is_empty() {
                let n = self.unread.len().min(buf.remaining());
                buf.put_slice(&self.unread.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if self.data_ended || self.failed {
                return Poll::Ready(Ok(()));
            }
            let Poll::Ready(event) = self.incoming.poll_recv(cx) else {
                // A server that does not acknowledge a new connection in
                // time: this session is not to be trusted with more.
                if !self.replied && self.reply_deadline.as_mut().poll(cx).is_ready() {
                    self.failed = true;
                    self.shared.retire();
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "the API server did not answer the port-forward within {} s",
                            REPLY_TIMEOUT.as_secs()
                        ),
                    )));
                }
                return Poll::Pending;
            };
            if let Some(event) = &event {
                self.budget.add_permits(event.queued_bytes());
            }
            match event {
                Some(Event::Replied) => self.replied = true,
                Some(Event::Data(data)) => {
                    self.replied = true;
                    self.data_seen = true;
                    self.unread = data;
                }
                Some(Event::DataEnd) => {
                    self.data_ended = true;
                    if !self.error_text.is_empty() {
                        return Poll::Ready(Err(self.fail_with_error_text()));
                    }
                }
                Some(Event::ErrorText(text)) => {
                    if let Some(err) = self.keep_error_text(&text) {
                        return Poll::Ready(Err(err));
                    }
                }
                Some(Event::ErrorEnd) => {
                    if !self.error_text.is_empty() {
                        return Poll::Ready(Err(self.fail_with_error_text()));
                    }
                }
                Some(Event::Reset(why)) => {
                    self.failed = true;
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, why)));
                }
                None => return Poll::Ready(Err(self.cut())),
            }
        }
    }
}

impl AsyncWrite for PairStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.shut || self.failed {
            return Poll::Ready(Err(closed_for_writing()));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(self.outgoing.poll_reserve(cx)).map_err(|_| session_ended())?;
        let n = data.len().min(MAX_FRAME);
        let frame = Frame::Data {
            stream: self.data_id,
            flags: 0,
            data: Bytes::copy_from_slice(&data[..n]),
        };
        self.outgoing
            .send_item(frame)
            .map_err(|_| session_ended())?;
        Poll::Ready(Ok(n))
    }

    /// The writing task sends what it is handed at once.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// FIN on the data stream, as kubectl sends when its client is done
    /// sending. Whether the pod's answer still comes is the kubelet's
    /// runtime's choice: some end both ways soon after.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut && !self.failed {
            ready!(self.outgoing.poll_reserve(cx)).map_err(|_| session_ended())?;
            let fin = Frame::Data {
                stream: self.data_id,
                flags: FLAG_FIN,
                data: Bytes::new(),
            };
            self.outgoing.send_item(fin).map_err(|_| session_ended())?;
        }
        self.shut = true;
        Poll::Ready(Ok(()))
    }
}

impl Drop for PairStream {
    /// Leaves the session; a connection that did not finish both ways is
    /// reset, so the kubelet lets go of the pod's side at once. The last
    /// connection of a retired session ends it.
    fn drop(&mut self) {
        // A frame waiting for room in the queue waits no more.
        self.budget.close();
        let mut streams = self.shared.streams();
        streams.routes.remove(&self.data_id);
        streams.routes.remove(&self.error_id);
        streams.connections = streams.connections.saturating_sub(1);
        streams.last_used = Instant::now();
        let last_of_retired = streams.retired && streams.connections == 0;
        drop(streams);
        if !(self.shut && self.data_ended) {
            self.shared.send_control(Frame::RstStream {
                stream: self.data_id,
                status: CANCEL,
            });
        }
        if last_of_retired {
            self.shared.closed.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k3s_local_agent_spdy::header;
    use tokio::io::DuplexStream;

    /// The API server's end of a session: frames in, frames out.
    struct Server {
        socket: DuplexStream,
        encoder: Encoder,
        decoder: Decoder,
        buffer: BytesMut,
    }

    impl Server {
        async fn next(&mut self) -> Frame {
            loop {
                if let Some(frame) = self.decoder.decode(&mut self.buffer).expect("a frame") {
                    return frame;
                }
                let read = self.socket.read_buf(&mut self.buffer).await.expect("read");
                assert!(read > 0, "the session ended");
            }
        }

        async fn send(&mut self, frame: Frame) {
            let mut out = BytesMut::new();
            self.encoder.encode(&frame, &mut out).expect("encode");
            self.socket.write_all(&out).await.expect("write");
        }
    }

    fn pair() -> (Session, Server) {
        pair_of(1 << 20)
    }

    /// A session whose socket holds at most `capacity` bytes in flight.
    fn pair_of(capacity: usize) -> (Session, Server) {
        let (ours, theirs) = tokio::io::duplex(capacity);
        let server = Server {
            socket: theirs,
            encoder: Encoder::new(),
            decoder: Decoder::new(),
            buffer: BytesMut::new(),
        };
        (Session::start(ours), server)
    }

    fn data(stream: u32, bytes: &'static [u8], flags: u8) -> Frame {
        Frame::Data {
            stream,
            flags,
            data: Bytes::from_static(bytes),
        }
    }

    #[tokio::test]
    async fn a_connection_is_two_streams_named_by_one_request_and_its_data_follows_at_once() {
        let (session, mut server) = pair();
        let mut first = session.open(8080).expect("open");
        first.write_all(b"ping").await.expect("write");
        let Frame::SynStream {
            stream: 1,
            flags: FLAG_FIN,
            headers,
        } = server.next().await
        else {
            panic!("the error stream first, opened finished");
        };
        assert_eq!(header(&headers, "streamtype"), Some("error"));
        assert_eq!(header(&headers, "port"), Some("8080"));
        assert_eq!(header(&headers, "requestid"), Some("0"));
        let Frame::SynStream {
            stream: 3, headers, ..
        } = server.next().await
        else {
            panic!("then the data stream");
        };
        assert_eq!(header(&headers, "streamtype"), Some("data"));
        assert_eq!(header(&headers, "requestid"), Some("0"));
        assert_eq!(server.next().await, data(3, b"ping", 0), "no reply awaited");

        // A second connection: the next ids and request, same session.
        let _second = session.open(9090).expect("open");
        let Frame::SynStream {
            stream: 5, headers, ..
        } = server.next().await
        else {
            panic!("the second connection's error stream");
        };
        assert_eq!(header(&headers, "requestid"), Some("1"));
        assert_eq!(session.connections(), 2);

        server.send(data(3, b"pong", 0)).await;
        server.send(data(3, b"", FLAG_FIN)).await;
        first.shutdown().await.expect("half-close");
        let mut answer = String::new();
        first.read_to_string(&mut answer).await.expect("read");
        assert_eq!(answer, "pong");
        drop(first);
        assert_eq!(session.connections(), 1);
    }

    #[tokio::test]
    async fn a_reset_breaks_its_connection_and_the_other_carries_on() {
        let (session, mut server) = pair();
        let mut cut = session.open(80).expect("open");
        let mut other = session.open(80).expect("open");
        server
            .send(Frame::RstStream {
                stream: 3,
                status: CANCEL,
            })
            .await;
        let err = cut.read(&mut [0u8; 8]).await.expect_err("reset");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        server.send(data(7, b"still here", 0)).await;
        let mut buffer = [0u8; 10];
        other
            .read_exact(&mut buffer)
            .await
            .expect("the other reads");
        assert_eq!(&buffer, b"still here");
        assert!(session.is_usable());
    }

    #[tokio::test]
    async fn the_kubelets_words_before_data_are_a_refusal_and_the_session_is_not_reused() {
        let (session, mut server) = pair();
        let mut stream = session.open(80).expect("open");
        let message: &'static [u8] = b"error forwarding port 80 to pod web: connection refused";
        server.send(data(1, message, 0)).await;
        server.send(data(1, b"", FLAG_FIN)).await;
        let err = stream.read(&mut [0u8; 8]).await.expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        assert!(err.to_string().contains("connection refused"), "{err}");
        assert!(!session.is_usable(), "the next connection upgrades anew");
    }

    #[tokio::test]
    async fn the_end_of_the_session_cuts_every_connection() {
        let (session, server) = pair();
        let mut stream = session.open(80).expect("open");
        drop(server);
        let err = stream.read(&mut [0u8; 8]).await.expect_err("cut");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert!(!session.is_usable());
        assert!(session.open(80).is_err());
    }

    #[tokio::test]
    async fn a_dropped_connection_is_reset_and_pings_are_answered() {
        let (session, mut server) = pair();
        let stream = session.open(80).expect("open");
        let _ = server.next().await;
        let _ = server.next().await;
        drop(stream);
        assert_eq!(
            server.next().await,
            Frame::RstStream {
                stream: 3,
                status: CANCEL
            }
        );
        server.send(Frame::Ping { id: 2 }).await;
        assert_eq!(server.next().await, Frame::Ping { id: 2 });
    }

    /// Two connections on one session: the first's client reads nothing
    /// while the server sends it one frame more than its queue holds, then
    /// "other" to the second.
    async fn one_unread_beside_another() -> (Session, Server, PairStream, PairStream) {
        let (session, mut server) = pair();
        let stalled = session.open(80).expect("open");
        let other = session.open(80).expect("open");
        for _ in 0..=INCOMING_FRAMES {
            server.send(data(3, b"unread", 0)).await;
        }
        server.send(data(7, b"other", 0)).await;
        (session, server, stalled, other)
    }

    #[tokio::test]
    async fn a_connection_that_is_not_read_keeps_new_ones_off_its_session() {
        let (session, _server, mut stalled, mut other) = one_unread_beside_another().await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while session.is_usable() {
            assert!(std::time::Instant::now() < deadline, "never retired");
            tokio::task::yield_now().await;
        }
        assert!(session.open(80).is_err(), "new connections go elsewhere");
        // Once it reads, the session moves on and the other gets its bytes.
        let mut drained = vec![0u8; 6 * (INCOMING_FRAMES + 1)];
        stalled.read_exact(&mut drained).await.expect("read");
        let mut buffer = [0u8; 5];
        other
            .read_exact(&mut buffer)
            .await
            .expect("the other reads");
        assert_eq!(&buffer, b"other");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_left_unread_is_reset_so_the_others_carry_on() {
        let (_session, mut server, mut stalled, mut other) = one_unread_beside_another().await;
        // Nobody reads the first for longer than STALL: the other gets its
        // bytes, and the server is told to let go of the first.
        tokio::time::sleep(STALL + Duration::from_secs(1)).await;
        let mut buffer = [0u8; 5];
        other
            .read_exact(&mut buffer)
            .await
            .expect("the other reads");
        assert_eq!(&buffer, b"other");
        let reset = Frame::RstStream {
            stream: 3,
            status: CANCEL,
        };
        let mut seen = Vec::new();
        while !seen.contains(&reset) {
            assert!(seen.len() < 10, "no reset for the unread one: {seen:?}");
            seen.push(server.next().await);
        }
        // What was queued is still read, then the reason.
        let mut queued = Vec::new();
        let err = stalled.read_to_end(&mut queued).await.expect_err("reset");
        assert_eq!(queued.len(), 6 * INCOMING_FRAMES);
        assert!(err.to_string().contains("read nothing"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_never_acknowledges_a_connection_times_it_out() {
        let (session, _server) = pair();
        let mut stream = session.open(80).expect("open");
        let err = stream.read(&mut [0u8; 8]).await.expect_err("timed out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(!session.is_usable(), "no new connection trusts it");
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_whose_pings_go_unanswered_ends() {
        let (session, mut server) = pair();
        let mut stream = session.open(80).expect("open");
        server
            .send(Frame::SynReply {
                stream: 3,
                flags: 0,
                headers: Vec::new(),
            })
            .await;
        let err = stream.read(&mut [0u8; 8]).await.expect_err("ended");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert!(!session.is_usable());
        let mut pinged = false;
        let mut rest = Vec::new();
        server
            .socket
            .read_to_end(&mut rest)
            .await
            .expect("to the end");
        server.buffer.extend_from_slice(&rest);
        while let Ok(Some(frame)) = server.decoder.decode(&mut server.buffer) {
            pinged |= matches!(frame, Frame::Ping { id } if id % 2 == 1);
        }
        assert!(pinged, "it asked before giving up");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_session_closes_and_takes_no_more_connections() {
        let (session, mut server) = pair();
        drop(session.open(80).expect("open"));
        tokio::time::sleep(IDLE * 2).await;
        assert!(!session.is_usable());
        // The server sees the openings, the reset, then the end.
        let mut rest = Vec::new();
        server.socket.read_to_end(&mut rest).await.expect("read");
        assert!(session.open(80).is_err());
    }

    /// Every frame the server can read now, as many as come before a
    /// moment with nothing more (the test's clock is paused: a timeout
    /// fires only when no task can go on).
    async fn frames_waiting(server: &mut Server) -> Vec<Frame> {
        let mut seen = Vec::new();
        loop {
            while let Some(frame) = server.decoder.decode(&mut server.buffer).expect("a frame") {
                seen.push(frame);
            }
            let read = tokio::time::timeout(
                Duration::from_millis(100),
                server.socket.read_buf(&mut server.buffer),
            )
            .await;
            match read {
                Ok(Ok(n)) if n > 0 => {}
                _ => return seen,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_not_read_holds_a_few_mib_however_large_its_frames() {
        let (_session, mut server) = pair();
        let _stalled = session_open(&_session);
        // Frames of 1 MiB (the most a frame may be): the server writes
        // until the session stops reading. Before a byte bound, 128 such
        // frames were queued for the one connection.
        let frame = Frame::Data {
            stream: 3,
            flags: 0,
            data: Bytes::from(vec![0u8; 1024 * 1024]),
        };
        let mut sent = 0usize;
        while tokio::time::timeout(Duration::from_secs(1), server.send(frame.clone()))
            .await
            .is_ok()
        {
            sent += 1;
            assert!(sent < 64, "the session kept reading: {sent} MiB taken");
        }
        // The queue's 4 MiB, the frame being handed over, the decoder's
        // read buffer and the socket's 1 MiB in flight.
        assert!(sent <= 4 + 3, "{sent} MiB taken");
    }

    fn session_open(session: &Session) -> PairStream {
        session.open(80).expect("open")
    }

    #[tokio::test]
    async fn a_data_frame_over_the_limit_resets_its_connection_and_the_other_carries_on() {
        let (session, mut server) = pair();
        let mut flooded = session.open(80).expect("open");
        let mut other = session.open(80).expect("open");
        let huge = Frame::Data {
            stream: 3,
            flags: 0,
            data: Bytes::from(vec![0u8; 2 * 1024 * 1024]),
        };
        server.send(huge).await;
        server.send(data(7, b"still here", 0)).await;
        let err = flooded.read(&mut [0u8; 8]).await.expect_err("reset");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert!(err.to_string().contains("2097152 bytes"), "{err}");
        let mut buffer = [0u8; 10];
        other
            .read_exact(&mut buffer)
            .await
            .expect("the other reads");
        assert_eq!(&buffer, b"still here");
        let reset = Frame::RstStream {
            stream: 3,
            status: FRAME_TOO_LARGE,
        };
        let mut seen = Vec::new();
        while !seen.contains(&reset) {
            assert!(seen.len() < 10, "no reset for the flooded one: {seen:?}");
            seen.push(server.next().await);
        }
        assert!(session.is_usable(), "the session goes on");
    }

    #[tokio::test]
    async fn endless_error_text_ends_the_connection_after_a_few_kib() {
        let (session, mut server) = pair();
        let mut stream = session.open(80).expect("open");
        // Another connection keeps the session (retired by the refusal) up
        // until the reset is written.
        let _other = session.open(80).expect("open");
        let line: &'static [u8] = &[b'x'; 1024];
        // No FIN: the text would go on; the connection ends at the cap.
        for _ in 0..64 {
            server.send(data(1, line, 0)).await;
        }
        let err = stream.read(&mut [0u8; 8]).await.expect_err("ended");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        let words = err.to_string();
        assert!(
            words.len() <= MAX_ERROR_TEXT + 4,
            "{} bytes kept",
            words.len()
        );
        assert!(words.ends_with('…'), "cut short, and said so");
        drop(stream);
        let reset = Frame::RstStream {
            stream: 3,
            status: CANCEL,
        };
        let mut seen = Vec::new();
        while !seen.contains(&reset) {
            assert!(seen.len() < 10, "no reset: {seen:?}");
            seen.push(server.next().await);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_ping_flood_from_a_server_that_does_not_read_gets_only_a_few_echoes() {
        // The socket holds 4 KiB in flight: the echoes the session writes
        // stop there while the server pings on and reads nothing.
        let (session, mut server) = pair_of(4096);
        let mut stream = session.open(80).expect("open");
        let mut pings = BytesMut::new();
        for id in 0..20_000u32 {
            server
                .encoder
                .encode(&Frame::Ping { id: id * 2 + 2 }, &mut pings)
                .expect("encode");
        }
        server.send(data(3, b"after", 0)).await;
        let (wrote, read) = tokio::join!(server.socket.write_all(&pings), async {
            let mut buffer = [0u8; 5];
            stream.read_exact(&mut buffer).await.map(|_| buffer)
        });
        wrote.expect("the session read every ping");
        assert_eq!(&read.expect("then the data"), b"after");
        assert!(
            session.is_usable(),
            "the few echoes left the control queue room for openings and resets"
        );
        let echoes = frames_waiting(&mut server)
            .await
            .into_iter()
            .filter(|frame| matches!(frame, Frame::Ping { id } if id % 2 == 0))
            .count();
        // What the socket held, plus the few pending: not one per ping.
        assert!(
            echoes < 4096 / 12 + 2 * MAX_PENDING_ECHOES,
            "{echoes} echoes"
        );
    }

    #[tokio::test]
    async fn a_server_that_opens_a_stream_ends_the_session_and_is_not_answered() {
        let (session, mut server) = pair();
        let mut stream = session.open(80).expect("open");
        server
            .send(Frame::SynStream {
                stream: 2,
                flags: 0,
                headers: Vec::new(),
            })
            .await;
        let err = stream.read(&mut [0u8; 8]).await.expect_err("ended");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert!(err.to_string().contains("opened stream 2"), "{err}");
        assert!(!session.is_usable());
        let mut rest = Vec::new();
        server
            .socket
            .read_to_end(&mut rest)
            .await
            .expect("to the end");
        server.buffer.extend_from_slice(&rest);
        while let Ok(Some(frame)) = server.decoder.decode(&mut server.buffer) {
            assert!(
                !matches!(frame, Frame::RstStream { stream: 2, .. }),
                "no reset is queued for it"
            );
        }
    }

    #[tokio::test]
    async fn a_server_that_reads_nothing_fills_the_control_queue_and_the_session_retires() {
        // Nothing is written while this task runs on: each connection
        // opened and dropped queues three frames (two openings, a reset),
        // and the queue stops at its bound rather than growing.
        let (session, _server) = pair_of(64);
        let mut opened = 0;
        while let Ok(stream) = session.open(80) {
            drop(stream);
            opened += 1;
            assert!(opened <= CONTROL_FRAMES, "{opened} connections queued");
        }
        assert!(!session.is_usable(), "new connections go elsewhere");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_dropped_while_its_full_queue_holds_the_session_frees_it_at_once() {
        let (session, mut server) = pair();
        let full = session.open(80).expect("open");
        let mut other = session.open(80).expect("open");
        // One frame of 1 MiB more than the unread queue's 4 MiB holds: the
        // session waits for room, then its client goes away.
        let mib = Bytes::from(vec![0u8; 1024 * 1024]);
        for _ in 0..5 {
            server
                .send(Frame::Data {
                    stream: 3,
                    flags: 0,
                    data: mib.clone(),
                })
                .await;
        }
        server.send(data(7, b"other", 0)).await;
        tokio::task::yield_now().await;
        drop(full);
        let mut buffer = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(1), other.read_exact(&mut buffer))
            .await
            .expect("no wait for STALL")
            .expect("the other reads");
        assert_eq!(&buffer, b"other");
    }
}
