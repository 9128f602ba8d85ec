//! The one stable hash (FNV-1a) that pod addresses, shortened DNS labels and
//! mirror names derive from. std's hashers promise neither the same output on
//! every machine nor across releases; these must keep both, since a pod's
//! address and names would change under it on an upgrade otherwise.

/// 32-bit FNV-1a of `bytes`: pod addresses (`tunnel/addresses.rs`), the hash
/// in long DNS labels (`names/assign.rs`), the suffix of a shared mirror name
/// (`cluster/manifest.rs`).
pub fn fnv1a_32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193)
    })
}

/// 64-bit FNV-1a of `bytes`: the agent label when the id is not a label value
/// (`cluster/manifest.rs`).
pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published FNV test vectors, and one pod id's value as the releases
    /// before the hash moved here computed it: an address or a name derived
    /// from it must not change across an upgrade.
    #[test]
    fn the_hashes_keep_their_published_values() {
        assert_eq!(fnv1a_32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a_32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a_32(b"foobar"), 0xbf9c_f968);
        assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(fnv1a_32(b"web/staging-42"), PINNED_POD_ID_HASH);
    }

    /// `fnv1a_32("web/staging-42")`, computed by the inline copy that
    /// `tunnel/addresses.rs`, `names/assign.rs` and `cluster/manifest.rs` each
    /// held before.
    const PINNED_POD_ID_HASH: u32 = 0x7771_4464;
}
