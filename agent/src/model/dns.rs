//! The DNS-1123 label, the one rule behind every name the agent writes to a
//! hosts file or applies to a cluster: pod names, namespaces, port names, the
//! names it makes from them, and (with a wider alphabet) label values.

/// The longest DNS label (RFC 1123), and so the longest namespace, Pod
/// name or label value Kubernetes takes.
pub const MAX_LABEL_LEN: usize = 63;

/// Whether `text` is a DNS-1123 label: 1 to 63 lowercase letters, digits and
/// '-', starting and ending with a letter or digit. A caller with a tighter
/// limit (pod names, port names) checks its length first, so that its error
/// can say which limit and why.
pub fn is_dns_label(text: &str) -> bool {
    label_shaped(text, |b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'
    })
}

/// Whether `text` is a Kubernetes label value that is not empty: a DNS
/// label's shape over a wider alphabet, letters of either case, digits, '-',
/// '_' and '.'.
pub fn is_label_value(text: &str) -> bool {
    label_shaped(text, |b| {
        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
    })
}

/// The shape both share: 1 to 63 bytes of `allowed`, a letter or digit at
/// each end (so never a '-' there, which resolvers and Kubernetes refuse).
fn label_shaped(text: &str, allowed: impl Fn(u8) -> bool) -> bool {
    let bytes = text.as_bytes();
    let alnum_ends = bytes
        .first()
        .zip(bytes.last())
        .is_some_and(|(first, last)| first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric());
    alnum_ends && bytes.len() <= MAX_LABEL_LEN && bytes.iter().all(|&b| allowed(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels_are_lowercase_with_alphanumeric_ends() {
        for good in ["a", "0", "my-app", "a--b", &"a".repeat(63)] {
            assert!(is_dns_label(good), "{good:?} refused");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "My-App",
            "my.app",
            "my_app",
            "my app",
            "a\n",
            "é",
            &"a".repeat(64),
        ] {
            assert!(!is_dns_label(bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn label_values_also_take_capitals_underscores_and_dots() {
        for good in ["staging-agent-box-1", "Box_1.local", &"A".repeat(63)] {
            assert!(is_label_value(good), "{good:?} refused");
        }
        for bad in ["", "a:b", "_a", "a.", "a b", &"a".repeat(64)] {
            assert!(!is_label_value(bad), "{bad:?} accepted");
        }
    }
}
