//! Properties of the decoder: whatever bytes a peer sends, in whatever
//! pieces they arrive, decoding returns frames or an error and never
//! panics; and every frame the encoder writes, on one connection's shared
//! compression contexts, decodes to itself.

use bytes::{Bytes, BytesMut};
use k3s_local_agent_spdy::{Decoder, Encoder, Frame, FrameError, Limits};
use proptest::collection::vec;
use proptest::prelude::*;

/// Feeds `bytes` to `decoder` in pieces cut at `cuts`, taking every whole
/// frame as it can; returns the frames, and the error that ended it if one did.
fn decode_in_pieces(
    decoder: &mut Decoder,
    bytes: &[u8],
    cuts: &[usize],
) -> (Vec<Frame>, Option<FrameError>) {
    let mut points: Vec<usize> = cuts.iter().map(|cut| cut % (bytes.len() + 1)).collect();
    points.push(bytes.len());
    points.sort_unstable();
    let mut buffer = BytesMut::new();
    let mut frames = Vec::new();
    let mut from = 0;
    for to in points {
        buffer.extend_from_slice(&bytes[from..to]);
        from = to;
        loop {
            match decoder.decode(&mut buffer) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(err) => return (frames, Some(err)),
            }
        }
    }
    (frames, None)
}

/// Header names as the wire carries them (lowercase), values of any text.
fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
    vec(("[a-z][a-z0-9-]{0,15}", any::<String>()), 0..8)
}

/// A stream id: 31 bits on the wire.
fn stream() -> impl Strategy<Value = u32> {
    0..=0x7fff_ffff_u32
}

/// Any frame the encoder writes and the decoder returns as it was.
fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (stream(), any::<u8>(), headers()).prop_map(|(stream, flags, headers)| {
            Frame::SynStream {
                stream,
                flags,
                headers,
            }
        }),
        (stream(), any::<u8>(), headers()).prop_map(|(stream, flags, headers)| {
            Frame::SynReply {
                stream,
                flags,
                headers,
            }
        }),
        (stream(), any::<u32>()).prop_map(|(stream, status)| Frame::RstStream { stream, status }),
        (stream(), any::<u8>(), vec(any::<u8>(), 0..4096)).prop_map(|(stream, flags, data)| {
            Frame::Data {
                stream,
                flags,
                data: Bytes::from(data),
            }
        }),
        any::<u32>().prop_map(|id| Frame::Ping { id }),
        (stream(), any::<u32>())
            .prop_map(|(last_good, status)| Frame::GoAway { last_good, status }),
    ]
}

/// Small limits, so random lengths often cross them.
fn limits() -> impl Strategy<Value = Limits> {
    (0..64_usize, 0..64_usize, 0..4_usize, 0..64_usize).prop_map(
        |(control_payload, header_block, header_pairs, data_payload)| Limits {
            control_payload,
            header_block,
            header_pairs,
            data_payload,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in vec(any::<u8>(), 0..2048),
        cuts in vec(any::<usize>(), 0..8),
    ) {
        decode_in_pieces(&mut Decoder::new(), &bytes, &cuts);
    }

    #[test]
    fn arbitrary_bytes_never_panic_under_small_limits(
        bytes in vec(any::<u8>(), 0..2048),
        cuts in vec(any::<usize>(), 0..8),
        limits in limits(),
    ) {
        decode_in_pieces(&mut Decoder::with_limits(limits), &bytes, &cuts);
    }

    /// Real frames with bytes changed: valid headers over broken bodies and
    /// header blocks (zlib streams cut or corrupted) reach deeper code than
    /// random bytes do.
    #[test]
    fn frames_with_changed_bytes_never_panic(
        frames in vec(frame(), 1..6),
        changes in vec((any::<usize>(), any::<u8>()), 1..8),
        cuts in vec(any::<usize>(), 0..8),
    ) {
        let mut encoder = Encoder::new();
        let mut wire = BytesMut::new();
        for frame in &frames {
            encoder.encode(frame, &mut wire).expect("encode");
        }
        let len = wire.len();
        for (at, byte) in changes {
            wire[at % len] ^= byte;
        }
        decode_in_pieces(&mut Decoder::new(), &wire, &cuts);
    }

    /// Frames written one after another on one encoder (so each header
    /// block builds on the ones before it) come out of one decoder the same,
    /// in order, however the bytes are cut.
    #[test]
    fn encoded_frames_decode_to_themselves(
        frames in vec(frame(), 0..12),
        cuts in vec(any::<usize>(), 0..16),
    ) {
        let mut encoder = Encoder::new();
        let mut wire = BytesMut::new();
        for frame in &frames {
            encoder.encode(frame, &mut wire).expect("encode");
        }
        let (decoded, error) = decode_in_pieces(&mut Decoder::new(), &wire, &cuts);
        prop_assert!(error.is_none(), "{error:?}");
        prop_assert_eq!(decoded, frames);
    }
}
