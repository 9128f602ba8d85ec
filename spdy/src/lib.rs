//! SPDY/3 frames as Kubernetes port-forwards carry them: their bytes on
//! the wire, and the header blocks' zlib compression (one compression
//! context per direction for the connection's life, primed with the
//! spec's dictionary, each block ending in a sync flush).
//!
//! Only what a port-forward uses is understood; a frame of any other type
//! is read past whole and ignored, as the protocol asks.
//!
//! What a peer may make the decoder hold is bounded ([`Limits`]): a
//! control frame's length is checked before it is buffered, a header block
//! is inflated no further than a port-forward's headers need, and a data
//! frame too long to buffer is passed over as its bytes arrive and named
//! ([`Frame::DataTooLong`]) so the stream can be reset.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The header dictionary of the SPDY/3 specification (section 2.6.10.1).
const DICTIONARY: &[u8] = include_bytes!("dictionary.bin");

const VERSION: u16 = 3;
const CONTROL_BIT: u8 = 0x80;
/// The longest frame payload the 24-bit length field can carry.
pub const MAX_PAYLOAD: usize = (1 << 24) - 1;
/// A control frame's fixed 8-byte header, and a data frame's.
const HEADER_LEN: usize = 8;

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const SETTINGS: u16 = 4;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const WINDOW_UPDATE: u16 = 9;

/// FIN: the sender sends nothing more on this stream.
pub const FLAG_FIN: u8 = 0x01;

/// RST_STREAM status: the stream was refused.
pub const REFUSED_STREAM: u32 = 3;
/// RST_STREAM status: the stream is no longer needed.
pub const CANCEL: u32 = 5;
/// RST_STREAM status: a frame was longer than the receiver takes.
pub const FRAME_TOO_LARGE: u32 = 11;

/// Why bytes are not a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("SPDY version {0} (only 3 is spoken)")]
    Version(u16),
    #[error("a {kind} frame of {length} bytes is too short")]
    Short { kind: &'static str, length: usize },
    #[error("a header block does not compress: {0}")]
    Compress(#[from] flate2::CompressError),
    #[error("a header block does not decompress: {0}")]
    Decompress(#[from] flate2::DecompressError),
    #[error("the header blocks' zlib stream ended")]
    StreamEnded,
    #[error("a header block is malformed: {0}")]
    HeaderBlock(&'static str),
    #[error("a frame of {0} bytes is longer than SPDY's 16 MiB")]
    TooLong(usize),
    #[error("a control frame (type {kind}) of {length} bytes is longer than the {limit} taken")]
    ControlTooLong {
        kind: u16,
        length: usize,
        limit: usize,
    },
    #[error("a header block inflates past the {limit} bytes taken")]
    HeaderBlockTooLong { limit: usize },
    #[error("a header block of {count} pairs has more than the {limit} taken")]
    TooManyHeaders { count: u32, limit: usize },
}

/// What a decoder takes from its peer before it refuses. The defaults are
/// a port-forward's: its headers are three short pairs (`streamtype`,
/// `port`, `requestid`), a few dozen bytes, and a kubelet writes a pod's
/// bytes at most 32 KiB a frame (Go's `io.Copy` buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The longest control frame payload buffered; a longer one is an
    /// error before any of it is held. A port-forward's SYN_REPLY is tens
    /// of bytes compressed, RST_STREAM, PING and GOAWAY 4 to 8: 16 KiB is
    /// hundreds of times what is needed.
    pub control_payload: usize,
    /// The most bytes one header block may inflate to (zlib inflates up
    /// to ~1000 times, so 16 KiB compressed could be 16 MiB): 16 KiB,
    /// hundreds of times a port-forward's few headers.
    pub header_block: usize,
    /// The most name/value pairs one header block may hold: 64.
    pub header_pairs: usize,
    /// The longest data frame buffered and handed over: 1 MiB, 32 times
    /// what a kubelet writes at once. A longer one is passed over unheld.
    pub data_payload: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            control_payload: 16 * 1024,
            header_block: 16 * 1024,
            header_pairs: 64,
            data_payload: 1024 * 1024,
        }
    }
}

/// One frame, with what a port-forward needs of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream: u32,
        flags: u8,
        headers: Vec<(String, String)>,
    },
    SynReply {
        stream: u32,
        flags: u8,
        headers: Vec<(String, String)>,
    },
    RstStream {
        stream: u32,
        status: u32,
    },
    Data {
        stream: u32,
        flags: u8,
        data: Bytes,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good: u32,
        status: u32,
    },
    /// A data frame longer than the decoder's [`Limits::data_payload`]:
    /// its bytes are passed over as they arrive, never held. What follows
    /// is the reader's call (a port-forward resets the stream).
    DataTooLong {
        stream: u32,
        length: usize,
    },
    /// SETTINGS, HEADERS, WINDOW_UPDATE or a type this does not know: read
    /// and passed over (port-forward servers send no flow control).
    Ignored,
}

/// Writes frames: the compression context for the header blocks we send.
pub struct Encoder {
    deflate: Compress,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").finish_non_exhaustive()
    }
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Encoder {
    pub fn new() -> Self {
        let mut deflate = Compress::new(Compression::default(), true);
        // The dictionary is a fixed, valid one: setting it cannot fail on a
        // fresh stream.
        let _ = deflate.set_dictionary(DICTIONARY);
        Self { deflate }
    }

    /// Appends `frame`'s bytes to `out`. Data longer than [`MAX_PAYLOAD`]
    /// is refused: it is the caller's to split.
    pub fn encode(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), FrameError> {
        match frame {
            Frame::Data { data, .. } if data.len() > MAX_PAYLOAD => {
                return Err(FrameError::TooLong(data.len()))
            }
            Frame::Data {
                stream,
                flags,
                data,
            } => {
                out.reserve(HEADER_LEN + data.len());
                out.put_u32(stream & 0x7fff_ffff);
                put_flags_and_length(out, *flags, data.len());
                out.put_slice(data);
            }
            Frame::SynStream {
                stream,
                flags,
                headers,
            } => {
                let block = self.header_block(headers)?;
                fits(10 + block.len())?;
                control_header(out, SYN_STREAM, *flags, 10 + block.len());
                out.put_u32(stream & 0x7fff_ffff);
                out.put_u32(0); // associated-to stream: none
                out.put_u8(0); // priority 0 (highest), 5 unused bits
                out.put_u8(0); // credential slot
                out.put_slice(&block);
            }
            Frame::SynReply {
                stream,
                flags,
                headers,
            } => {
                let block = self.header_block(headers)?;
                fits(4 + block.len())?;
                control_header(out, SYN_REPLY, *flags, 4 + block.len());
                out.put_u32(stream & 0x7fff_ffff);
                out.put_slice(&block);
            }
            Frame::RstStream { stream, status } => {
                control_header(out, RST_STREAM, 0, 8);
                out.put_u32(stream & 0x7fff_ffff);
                out.put_u32(*status);
            }
            Frame::Ping { id } => {
                control_header(out, PING, 0, 4);
                out.put_u32(*id);
            }
            Frame::GoAway { last_good, status } => {
                control_header(out, GOAWAY, 0, 8);
                out.put_u32(last_good & 0x7fff_ffff);
                out.put_u32(*status);
            }
            // Nothing that was read whole: there is nothing to write.
            Frame::DataTooLong { .. } | Frame::Ignored => {}
        }
        Ok(())
    }

    /// A SYN_REPLY whose header block is `plain` as given, piece by piece:
    /// however long, well formed or not, compressed on this direction's
    /// context. What a broken or hostile server sends; it lets a test make
    /// a block that inflates far past its own size without holding it.
    pub fn encode_raw_reply<'a>(
        &mut self,
        stream: u32,
        plain: impl IntoIterator<Item = &'a [u8]>,
        out: &mut BytesMut,
    ) -> Result<(), FrameError> {
        let block = self.compress(plain)?;
        fits(4 + block.len())?;
        control_header(out, SYN_REPLY, 0, 4 + block.len());
        out.put_u32(stream & 0x7fff_ffff);
        out.put_slice(&block);
        Ok(())
    }

    /// A header block: the pair count, each name and value with its 32-bit
    /// length, compressed on this direction's context and sync-flushed.
    fn header_block(&mut self, headers: &[(String, String)]) -> Result<Vec<u8>, FrameError> {
        let mut plain = BytesMut::new();
        plain.put_u32(len_u32(headers.len()));
        for (name, value) in headers {
            plain.put_u32(len_u32(name.len()));
            plain.put_slice(name.to_ascii_lowercase().as_bytes());
            plain.put_u32(len_u32(value.len()));
            plain.put_slice(value.as_bytes());
        }
        self.compress([&plain[..]])
    }

    /// `pieces` compressed on this direction's context, then sync-flushed
    /// so the block ends on a byte the peer can inflate up to.
    fn compress<'a>(
        &mut self,
        pieces: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Vec<u8>, FrameError> {
        let mut compressed = Vec::with_capacity(128);
        for piece in pieces {
            self.deflate_into(piece, FlushCompress::None, &mut compressed)?;
        }
        self.deflate_into(&[], FlushCompress::Sync, &mut compressed)?;
        Ok(compressed)
    }

    fn deflate_into(
        &mut self,
        mut input: &[u8],
        flush: FlushCompress,
        compressed: &mut Vec<u8>,
    ) -> Result<(), FrameError> {
        loop {
            let before_in = self.deflate.total_in();
            compressed.reserve(64);
            self.deflate.compress_vec(input, compressed, flush)?;
            let used = usize::try_from(self.deflate.total_in() - before_in).unwrap_or(input.len());
            input = &input[used..];
            // Done when all input is in and the output fitted in the room
            // left (a full buffer may mean more is waiting).
            if input.is_empty() && compressed.len() < compressed.capacity() {
                return Ok(());
            }
        }
    }
}

/// Reads frames: the compression context for the header blocks we receive,
/// what the peer may make it hold, and what is left to pass over of a data
/// frame too long to hold.
pub struct Decoder {
    inflate: Decompress,
    limits: Limits,
    skip: usize,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder").finish_non_exhaustive()
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A decoder with a port-forward's [`Limits`].
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    pub fn with_limits(limits: Limits) -> Self {
        Self {
            inflate: Decompress::new(true),
            limits,
            skip: 0,
        }
    }

    /// Takes one whole frame off the front of `buffer`, or `None` when it
    /// holds only part of one (read more and call again). The buffer is
    /// never asked to hold more than one frame within the [`Limits`].
    pub fn decode(&mut self, buffer: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        self.pass_over(buffer);
        if self.skip > 0 || buffer.len() < HEADER_LEN {
            return Ok(None);
        }
        let length =
            usize::from(buffer[5]) << 16 | usize::from(buffer[6]) << 8 | usize::from(buffer[7]);
        let is_control = buffer[0] & CONTROL_BIT != 0;
        if is_control && length > self.limits.control_payload {
            return Err(FrameError::ControlTooLong {
                kind: u16::from(buffer[2]) << 8 | u16::from(buffer[3]),
                length,
                limit: self.limits.control_payload,
            });
        }
        if !is_control && length > self.limits.data_payload {
            let stream = buffer.get_u32() & 0x7fff_ffff;
            buffer.advance(HEADER_LEN - 4);
            self.skip = length;
            self.pass_over(buffer);
            return Ok(Some(Frame::DataTooLong { stream, length }));
        }
        if buffer.len() < HEADER_LEN + length {
            buffer.reserve(HEADER_LEN + length - buffer.len());
            return Ok(None);
        }
        let mut header = buffer.split_to(HEADER_LEN);
        let payload = buffer.split_to(length).freeze();
        let flags = header[4];
        if header[0] & CONTROL_BIT == 0 {
            let stream = header.get_u32() & 0x7fff_ffff;
            return Ok(Some(Frame::Data {
                stream,
                flags,
                data: payload,
            }));
        }
        let version = header.get_u16() & 0x7fff;
        if version != VERSION {
            return Err(FrameError::Version(version));
        }
        let kind = header.get_u16();
        self.control(kind, flags, payload).map(Some)
    }

    /// Drops what has arrived of a data frame too long to hold.
    fn pass_over(&mut self, buffer: &mut BytesMut) {
        let n = self.skip.min(buffer.len());
        buffer.advance(n);
        self.skip -= n;
    }

    fn control(&mut self, kind: u16, flags: u8, mut payload: Bytes) -> Result<Frame, FrameError> {
        let need = |kind: &'static str, length: usize, payload: &Bytes| {
            if payload.len() < length {
                Err(FrameError::Short {
                    kind,
                    length: payload.len(),
                })
            } else {
                Ok(())
            }
        };
        Ok(match kind {
            SYN_STREAM => {
                need("SYN_STREAM", 10, &payload)?;
                let stream = payload.get_u32() & 0x7fff_ffff;
                payload.advance(6); // associated-to, priority, slot
                Frame::SynStream {
                    stream,
                    flags,
                    headers: self.header_block(&payload)?,
                }
            }
            SYN_REPLY => {
                need("SYN_REPLY", 4, &payload)?;
                let stream = payload.get_u32() & 0x7fff_ffff;
                Frame::SynReply {
                    stream,
                    flags,
                    headers: self.header_block(&payload)?,
                }
            }
            RST_STREAM => {
                need("RST_STREAM", 8, &payload)?;
                Frame::RstStream {
                    stream: payload.get_u32() & 0x7fff_ffff,
                    status: payload.get_u32(),
                }
            }
            PING => {
                need("PING", 4, &payload)?;
                Frame::Ping {
                    id: payload.get_u32(),
                }
            }
            GOAWAY => {
                need("GOAWAY", 8, &payload)?;
                Frame::GoAway {
                    last_good: payload.get_u32() & 0x7fff_ffff,
                    status: payload.get_u32(),
                }
            }
            HEADERS => {
                // The block must still go through the shared context, or
                // every later block would not decompress.
                need("HEADERS", 4, &payload)?;
                payload.advance(4);
                self.header_block(&payload)?;
                Frame::Ignored
            }
            SETTINGS | WINDOW_UPDATE => Frame::Ignored,
            _ => Frame::Ignored,
        })
    }

    /// Inflates one block on the shared context, never past
    /// [`Limits::header_block`] (the output is given one byte of room more
    /// than the limit, to tell a block at it from one over it).
    fn header_block(&mut self, compressed: &[u8]) -> Result<Vec<(String, String)>, FrameError> {
        let limit = self.limits.header_block;
        let over = FrameError::HeaderBlockTooLong { limit };
        let mut plain = Vec::with_capacity((compressed.len() * 4 + 64).min(limit + 1));
        let mut input = compressed;
        loop {
            if plain.len() > limit {
                return Err(over);
            }
            let before_in = self.inflate.total_in();
            if plain.len() == plain.capacity() {
                plain.reserve_exact((limit + 1 - plain.len()).min(4096));
            }
            let outcome = self
                .inflate
                .decompress_vec(input, &mut plain, FlushDecompress::Sync);
            let used = usize::try_from(self.inflate.total_in() - before_in).unwrap_or(input.len());
            input = &input[used..];
            match outcome {
                Ok(Status::Ok | Status::BufError) => {}
                Ok(Status::StreamEnd) => return Err(FrameError::StreamEnded),
                Err(err) if err.needs_dictionary().is_some() => {
                    self.inflate.set_dictionary(DICTIONARY)?;
                }
                Err(err) => return Err(err.into()),
            }
            if plain.len() > limit {
                return Err(over);
            }
            if input.is_empty() && plain.len() < plain.capacity() {
                break;
            }
        }
        parse_pairs(&plain, self.limits.header_pairs)
    }
}

/// The name/value pairs of a decompressed header block. A value holding
/// several values separated by NUL is kept whole.
fn parse_pairs(mut plain: &[u8], limit: usize) -> Result<Vec<(String, String)>, FrameError> {
    let take = |plain: &mut &[u8]| -> Result<String, FrameError> {
        if plain.len() < 4 {
            return Err(FrameError::HeaderBlock("a length is cut short"));
        }
        let length = plain.get_u32() as usize;
        if plain.len() < length {
            return Err(FrameError::HeaderBlock("a name or value is cut short"));
        }
        let text = String::from_utf8_lossy(&plain[..length]).into_owned();
        plain.advance(length);
        Ok(text)
    };
    if plain.len() < 4 {
        return Err(FrameError::HeaderBlock("no pair count"));
    }
    let count = plain.get_u32();
    if usize::try_from(count).map_or(true, |count| count > limit) {
        return Err(FrameError::TooManyHeaders { count, limit });
    }
    let mut pairs = Vec::new();
    for _ in 0..count {
        let name = take(&mut plain)?;
        let value = take(&mut plain)?;
        pairs.push((name, value));
    }
    Ok(pairs)
}

/// A payload of `length` bytes fits a frame's 24-bit length.
fn fits(length: usize) -> Result<(), FrameError> {
    if length > MAX_PAYLOAD {
        return Err(FrameError::TooLong(length));
    }
    Ok(())
}

fn control_header(out: &mut BytesMut, kind: u16, flags: u8, length: usize) {
    out.reserve(HEADER_LEN + length);
    out.put_u16(u16::from(CONTROL_BIT) << 8 | VERSION);
    out.put_u16(kind);
    put_flags_and_length(out, flags, length);
}

fn put_flags_and_length(out: &mut BytesMut, flags: u8, length: usize) {
    out.put_u32(u32::from(flags) << 24 | len_u32(length) & 0x00ff_ffff);
}

fn len_u32(length: usize) -> u32 {
    u32::try_from(length).unwrap_or(u32::MAX)
}

/// The value of header `name` (names are lowercase on the wire).
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    #[test]
    fn the_dictionary_is_the_specs() {
        // SPDY/3's dictionary is 1423 bytes, from "options" to "enq=0.".
        assert_eq!(DICTIONARY.len(), 1423);
        assert!(DICTIONARY.starts_with(b"\0\0\0\x07options"));
        assert!(DICTIONARY.ends_with(b"enq=0."));
    }

    #[test]
    fn a_data_frame_is_its_stream_flags_length_and_bytes() {
        let mut out = BytesMut::new();
        let frame = Frame::Data {
            stream: 3,
            flags: FLAG_FIN,
            data: Bytes::from_static(b"hi"),
        };
        Encoder::new().encode(&frame, &mut out).expect("encode");
        assert_eq!(&out[..], b"\0\0\0\x03\x01\0\0\x02hi");
        assert_eq!(
            Decoder::new().decode(&mut out).expect("decode"),
            Some(frame)
        );
        assert!(out.is_empty());
    }

    #[test]
    fn control_frames_have_the_version_type_and_length_up_front() {
        let mut out = BytesMut::new();
        let frame = Frame::RstStream {
            stream: 5,
            status: CANCEL,
        };
        Encoder::new().encode(&frame, &mut out).expect("encode");
        assert_eq!(&out[..], b"\x80\x03\0\x03\0\0\0\x08\0\0\0\x05\0\0\0\x05");
        assert_eq!(
            Decoder::new().decode(&mut out).expect("decode"),
            Some(frame)
        );
    }

    #[test]
    fn header_blocks_share_one_context_per_direction() {
        let (mut encoder, mut decoder) = (Encoder::new(), Decoder::new());
        let mut wire = BytesMut::new();
        for stream in [1u32, 3, 5] {
            let frame = Frame::SynStream {
                stream,
                flags: 0,
                headers: pairs(&[("streamtype", "data"), ("port", "8080"), ("requestid", "0")]),
            };
            encoder.encode(&frame, &mut wire).expect("encode");
        }
        // Frames arrive in pieces: nothing is taken until one is whole.
        let mut buffer = BytesMut::new();
        let mut seen = Vec::new();
        for byte in wire {
            buffer.put_u8(byte);
            if let Some(frame) = decoder.decode(&mut buffer).expect("decode") {
                seen.push(frame);
            }
        }
        assert_eq!(seen.len(), 3);
        assert_eq!(
            seen[2],
            Frame::SynStream {
                stream: 5,
                flags: 0,
                headers: pairs(&[("streamtype", "data"), ("port", "8080"), ("requestid", "0")]),
            }
        );
    }

    #[test]
    fn a_header_block_compressed_by_zlib_itself_is_read() {
        // A SYN_REPLY for stream 1 whose block ("streamtype: error") was
        // compressed by the reference zlib with the SPDY/3 dictionary and
        // a sync flush, as Go's and C's SPDY stacks do.
        let block: &[u8] = &[
            0x78, 0xbb, 0xe3, 0xc6, 0xa7, 0xc2, 0x02, 0xa6, 0x23, 0x46, 0x70, 0x3a, 0x2b, 0x29,
            0x4a, 0x4d, 0xcc, 0x85, 0x16, 0x25, 0xac, 0xa9, 0xa0, 0x80, 0x06, 0x00, 0x00, 0x00,
            0xff, 0xff,
        ];
        let mut wire = BytesMut::new();
        control_header(&mut wire, SYN_REPLY, 0, 4 + block.len());
        wire.put_u32(1);
        wire.put_slice(block);
        let frame = Decoder::new().decode(&mut wire).expect("decode");
        assert_eq!(
            frame,
            Some(Frame::SynReply {
                stream: 1,
                flags: 0,
                headers: pairs(&[("streamtype", "error")]),
            })
        );
    }

    #[test]
    fn data_too_long_for_one_frame_is_refused_not_cut() {
        let frame = Frame::Data {
            stream: 1,
            flags: 0,
            data: Bytes::from(vec![0u8; MAX_PAYLOAD + 1]),
        };
        let mut out = BytesMut::new();
        let err = Encoder::new()
            .encode(&frame, &mut out)
            .expect_err("too long");
        assert!(matches!(err, FrameError::TooLong(_)), "{err}");
        assert!(out.is_empty());
    }

    #[test]
    fn frames_of_other_types_are_passed_over_whole() {
        let mut wire = BytesMut::new();
        control_header(&mut wire, WINDOW_UPDATE, 0, 8);
        wire.put_u64(0x0000_0001_0001_0000);
        Encoder::new()
            .encode(&Frame::Ping { id: 2 }, &mut wire)
            .expect("encode");
        let mut decoder = Decoder::new();
        assert_eq!(
            decoder.decode(&mut wire).expect("decode"),
            Some(Frame::Ignored)
        );
        assert_eq!(
            decoder.decode(&mut wire).expect("decode"),
            Some(Frame::Ping { id: 2 })
        );
    }

    /// A SYN_REPLY for stream 1 whose block says one pair, named `bomb`,
    /// of `value_len` zero bytes: a few KiB on the wire per MiB inflated.
    fn bomb(encoder: &mut Encoder, value_len: usize) -> BytesMut {
        let mut head = BytesMut::new();
        head.put_u32(1);
        head.put_u32(4);
        head.put_slice(b"bomb");
        head.put_u32(len_u32(value_len));
        let zeros = vec![0u8; 64 * 1024];
        let pieces = std::iter::once(&head[..]).chain(
            std::iter::repeat_n(&zeros[..], value_len / zeros.len())
                .chain(std::iter::once(&zeros[..value_len % zeros.len()])),
        );
        let mut wire = BytesMut::new();
        encoder
            .encode_raw_reply(1, pieces, &mut wire)
            .expect("encode");
        wire
    }

    #[test]
    fn a_header_block_that_inflates_past_the_limit_is_a_typed_error() {
        // 8 MiB in about 8 KiB: a frame short enough to be taken whole.
        let mut wire = bomb(&mut Encoder::new(), 8 * 1024 * 1024);
        assert!(
            wire.len() < Limits::default().control_payload,
            "the bomb is small on the wire: {} bytes",
            wire.len()
        );
        let err = Decoder::new().decode(&mut wire).expect_err("refused");
        assert!(
            matches!(err, FrameError::HeaderBlockTooLong { limit } if limit == 16 * 1024),
            "{err}"
        );
    }

    #[test]
    fn a_header_block_too_long_on_the_wire_is_refused_before_inflating() {
        // 64 MiB in about 64 KiB: longer than any port-forward frame.
        let mut wire = bomb(&mut Encoder::new(), 64 * 1024 * 1024);
        let err = Decoder::new().decode(&mut wire).expect_err("refused");
        assert!(
            matches!(
                err,
                FrameError::ControlTooLong {
                    kind: SYN_REPLY,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_header_block_just_within_the_limit_is_read() {
        let limit = Limits::default().header_block;
        // 4 (count) + 4 + 4 ("bomb") + 4 (value length) before the value.
        let mut wire = bomb(&mut Encoder::new(), limit - 16);
        let Some(Frame::SynReply { headers, .. }) = Decoder::new().decode(&mut wire).expect("read")
        else {
            panic!("a SYN_REPLY");
        };
        assert_eq!(headers[0].1.len(), limit - 16);
    }

    #[test]
    fn a_header_block_of_too_many_pairs_is_a_typed_error() {
        let many: Vec<(String, String)> =
            (0..65).map(|n| (format!("h{n}"), String::new())).collect();
        let mut wire = BytesMut::new();
        Encoder::new()
            .encode(
                &Frame::SynReply {
                    stream: 1,
                    flags: 0,
                    headers: many,
                },
                &mut wire,
            )
            .expect("encode");
        let err = Decoder::new().decode(&mut wire).expect_err("refused");
        assert!(
            matches!(
                err,
                FrameError::TooManyHeaders {
                    count: 65,
                    limit: 64
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_control_frame_too_long_is_refused_from_its_header_alone() {
        // Only the 8-byte header has come: the refusal needs no more, so
        // none of the 16 MiB it announces is ever waited for or held.
        let mut header = BytesMut::new();
        control_header(&mut header, SYN_REPLY, 0, MAX_PAYLOAD);
        let mut wire = BytesMut::from(&header[..HEADER_LEN]);
        let err = Decoder::new().decode(&mut wire).expect_err("refused");
        assert!(
            matches!(
                err,
                FrameError::ControlTooLong {
                    kind: SYN_REPLY,
                    length: MAX_PAYLOAD,
                    ..
                }
            ),
            "{err}"
        );
        assert!(wire.capacity() < 1024, "nothing reserved for it");
    }

    #[test]
    fn a_data_frame_too_long_is_named_and_passed_over_as_it_arrives() {
        let mut decoder = Decoder::with_limits(Limits {
            data_payload: 16,
            ..Limits::default()
        });
        let mut encoder = Encoder::new();
        let mut wire = BytesMut::new();
        let long = Frame::Data {
            stream: 3,
            flags: 0,
            data: Bytes::from(vec![7u8; 100]),
        };
        encoder.encode(&long, &mut wire).expect("encode");
        encoder
            .encode(&Frame::Ping { id: 2 }, &mut wire)
            .expect("encode");
        // In pieces of 10 bytes: the buffer never holds more than what
        // came since the last call.
        let mut buffer = BytesMut::new();
        let mut seen = Vec::new();
        for piece in wire.chunks(10) {
            buffer.put_slice(piece);
            while let Some(frame) = decoder.decode(&mut buffer).expect("decode") {
                seen.push(frame);
            }
            assert!(buffer.len() <= 20, "{} bytes held", buffer.len());
        }
        assert_eq!(
            seen,
            vec![
                Frame::DataTooLong {
                    stream: 3,
                    length: 100
                },
                Frame::Ping { id: 2 }
            ]
        );
    }
}
