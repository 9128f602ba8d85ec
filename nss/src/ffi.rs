//! The glibc NSS entry points (`_nss_k3slocal_gethostbyname{,2,3,4}_r`): turn
//! C arguments into a call to the safe core and lay its answer out in the
//! caller's buffer. The only module allowed unsafe code.
//!
//! Buffer layout: a bump allocator over `buffer[..buflen]` hands out each
//! piece at its own alignment (pointer arrays at pointer alignment, the
//! address at 4, strings at 1), pieces in that order so padding is at most
//! one pointer's worth at the start. Nothing is written until every piece
//! fits, so a too-small buffer leaves it untouched and returns
//! `ERANGE`/`NETDB_INTERNAL`/`TRYAGAIN` (glibc retries with a bigger one).

#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, CStr};
use std::mem::{align_of, size_of};
use std::ptr;

use libc::{hostent, size_t, AF_INET, ENOENT, ERANGE};

use crate::lookup::{self, Answer};

/// `enum nss_status`, an `int`-sized C enum.
type NssStatus = c_int;
const NSS_STATUS_TRYAGAIN: NssStatus = -2;
const NSS_STATUS_UNAVAIL: NssStatus = -1;
const NSS_STATUS_NOTFOUND: NssStatus = 0;
const NSS_STATUS_SUCCESS: NssStatus = 1;

/// `h_errno` values from `<netdb.h>`.
const NETDB_INTERNAL: c_int = -1;
const HOST_NOT_FOUND: c_int = 1;
const NO_RECOVERY: c_int = 3;

/// glibc's `struct gaih_addrtuple` (`<nss.h>`), one address of a
/// `gethostbyname4_r` answer.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug)]
pub struct gaih_addrtuple {
    pub next: *mut gaih_addrtuple,
    pub name: *mut c_char,
    pub family: c_int,
    pub addr: [u32; 4],
    pub scopeid: u32,
}

/// What went wrong, as NSS reports it.
enum Failure {
    NotFound,
    TooSmall,
    Internal,
}

/// Sets `*errnop` and `*h_errnop` for `failure`; returns its status.
///
/// # Safety
/// `errnop` and `h_errnop` are each null or valid for a write.
unsafe fn fail(failure: Failure, errnop: *mut c_int, h_errnop: *mut c_int) -> NssStatus {
    let (errno, h_errno, status) = match failure {
        Failure::NotFound => (ENOENT, HOST_NOT_FOUND, NSS_STATUS_NOTFOUND),
        Failure::TooSmall => (ERANGE, NETDB_INTERNAL, NSS_STATUS_TRYAGAIN),
        Failure::Internal => (ENOENT, NO_RECOVERY, NSS_STATUS_UNAVAIL),
    };
    if !errnop.is_null() {
        // SAFETY: non-null, and the caller guarantees it is valid for a write.
        unsafe { *errnop = errno };
    }
    if !h_errnop.is_null() {
        // SAFETY: as above.
        unsafe { *h_errnop = h_errno };
    }
    status
}

/// Runs the safe core for the C string `name` on behalf of the real uid.
///
/// # Safety
/// `name` is null or a NUL-terminated string valid for reads.
unsafe fn resolve(name: *const c_char) -> Result<Answer, Failure> {
    if name.is_null() {
        return Err(Failure::NotFound);
    }
    // SAFETY: non-null, and glibc passes a NUL-terminated string that lives
    // for the whole call.
    let name = unsafe { CStr::from_ptr(name) }.to_bytes();
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    // The core is panic-free by construction; this is a second fence so a
    // panic can never unwind into C.
    match std::panic::catch_unwind(|| lookup::lookup(uid, name)) {
        Ok(Some(answer)) => Ok(answer),
        Ok(None) => Err(Failure::NotFound),
        Err(_) => Err(Failure::Internal),
    }
}

/// A bump allocator over the caller's buffer.
struct Arena {
    next: *mut u8,
    left: usize,
}

impl Arena {
    /// # Safety
    /// `buffer` is null or valid for writes of `len` bytes, for as long as
    /// the pointers handed out are used.
    unsafe fn new(buffer: *mut c_char, len: size_t) -> Self {
        let left = if buffer.is_null() { 0 } else { len };
        Self {
            next: buffer.cast(),
            left,
        }
    }

    /// Reserves `size` bytes aligned to `align` (a power of two); writes
    /// nothing. `None` when they do not fit.
    fn take(&mut self, size: usize, align: usize) -> Option<*mut u8> {
        let pad = (self.next as usize).wrapping_neg() & (align - 1);
        let need = pad.checked_add(size)?;
        if need > self.left {
            return None;
        }
        // SAFETY: pad + size <= left, so both pointers stay inside (or one
        // past the end of) the buffer `new` was given.
        let start = unsafe { self.next.add(pad) };
        // SAFETY: as above.
        self.next = unsafe { start.add(size) };
        self.left -= need;
        Some(start)
    }

    /// Reserves an array of `count` values of `T`.
    fn array<T>(&mut self, count: usize) -> Option<*mut T> {
        let size = size_of::<T>().checked_mul(count)?;
        Some(self.take(size, align_of::<T>())?.cast())
    }
}

/// Where a string will be copied: its destination and its bytes.
struct StrSlot<'a> {
    dest: *mut c_char,
    text: &'a str,
}

impl<'a> StrSlot<'a> {
    fn reserve(arena: &mut Arena, text: &'a str) -> Option<Self> {
        let dest = arena.array::<c_char>(text.len().checked_add(1)?)?;
        Some(Self { dest, text })
    }

    /// Copies the string and its NUL; returns the C string.
    ///
    /// # Safety
    /// `dest` came from an [`Arena`] whose buffer is still valid.
    unsafe fn write(&self) -> *mut c_char {
        // SAFETY: `dest` has room for len + 1 bytes (reserved above) and
        // cannot overlap `text`, which Rust owns.
        unsafe {
            ptr::copy_nonoverlapping(self.text.as_ptr(), self.dest.cast::<u8>(), self.text.len());
            *self.dest.add(self.text.len()) = 0;
        }
        self.dest
    }
}

/// Lays `answer` out in the buffer and fills `result`.
///
/// # Safety
/// `result` is valid for a write; `buffer` is null or valid for writes of
/// `buflen` bytes.
unsafe fn fill_hostent(
    answer: &Answer,
    result: *mut hostent,
    buffer: *mut c_char,
    buflen: size_t,
) -> Option<()> {
    // SAFETY: forwarded from this function's contract.
    let mut arena = unsafe { Arena::new(buffer, buflen) };
    // Pointer arrays first (pointer alignment), then the address, then the
    // strings (byte alignment): padding only before the first piece.
    let addr_list = arena.array::<*mut c_char>(2)?;
    let alias_list = arena.array::<*mut c_char>(answer.aliases.len().checked_add(1)?)?;
    // An `in_addr`'s worth, at its alignment (4).
    let addr = arena.take(4, align_of::<u32>())?.cast::<[u8; 4]>();
    let canonical = StrSlot::reserve(&mut arena, &answer.canonical)?;
    let aliases = answer
        .aliases
        .iter()
        .map(|alias| StrSlot::reserve(&mut arena, alias))
        .collect::<Option<Vec<_>>>()?;
    // Everything fits: now write.
    // SAFETY: every pointer below was reserved in the caller's buffer at the
    // alignment of its type with room for what is written, the pieces do not
    // overlap, and `result` is valid for a write by this function's contract.
    unsafe {
        addr.write(answer.address.octets());
        addr_list.write(addr.cast());
        addr_list.add(1).write(ptr::null_mut());
        for (i, alias) in aliases.iter().enumerate() {
            alias_list.add(i).write(alias.write());
        }
        alias_list.add(aliases.len()).write(ptr::null_mut());
        result.write(hostent {
            h_name: canonical.write(),
            h_aliases: alias_list,
            h_addrtype: AF_INET,
            h_length: 4,
            h_addr_list: addr_list,
        });
    }
    Some(())
}

/// `gethostbyname3_r`: one address family, with TTL and canonical name.
///
/// # Safety
/// glibc's contract: `name` a C string; `result` valid for a write; `buffer`
/// valid for `buflen` bytes; `errnop`, `h_errnop` valid; `ttlp`, `canonp`
/// null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn _nss_k3slocal_gethostbyname3_r(
    name: *const c_char,
    af: c_int,
    result: *mut hostent,
    buffer: *mut c_char,
    buflen: size_t,
    errnop: *mut c_int,
    h_errnop: *mut c_int,
    ttlp: *mut i32,
    canonp: *mut *mut c_char,
) -> NssStatus {
    // Addresses are IPv4 only: an AF_INET6 query is "not found" at once.
    if af != AF_INET {
        // SAFETY: errnop and h_errnop come from glibc, valid or null.
        return unsafe { fail(Failure::NotFound, errnop, h_errnop) };
    }
    if result.is_null() {
        // SAFETY: as above.
        return unsafe { fail(Failure::Internal, errnop, h_errnop) };
    }
    // SAFETY: `name` is glibc's NUL-terminated query.
    let answer = match unsafe { resolve(name) } {
        Ok(answer) => answer,
        // SAFETY: errnop and h_errnop come from glibc, valid or null.
        Err(failure) => return unsafe { fail(failure, errnop, h_errnop) },
    };
    // SAFETY: `result` is non-null and glibc's; `buffer`/`buflen` describe
    // the caller's scratch buffer.
    if unsafe { fill_hostent(&answer, result, buffer, buflen) }.is_none() {
        // SAFETY: errnop and h_errnop come from glibc, valid or null.
        return unsafe { fail(Failure::TooSmall, errnop, h_errnop) };
    }
    if !ttlp.is_null() {
        // SAFETY: non-null, and glibc passes it valid for a write. 0: the
        // names change with the pods, so no cache (nscd) should keep them.
        unsafe { *ttlp = 0 };
    }
    if !canonp.is_null() {
        // SAFETY: non-null and valid for a write; `result` was just filled.
        unsafe { *canonp = (*result).h_name };
    }
    NSS_STATUS_SUCCESS
}

/// `gethostbyname2_r`: one address family.
///
/// # Safety
/// As [`_nss_k3slocal_gethostbyname3_r`].
#[no_mangle]
pub unsafe extern "C" fn _nss_k3slocal_gethostbyname2_r(
    name: *const c_char,
    af: c_int,
    result: *mut hostent,
    buffer: *mut c_char,
    buflen: size_t,
    errnop: *mut c_int,
    h_errnop: *mut c_int,
) -> NssStatus {
    // SAFETY: same contract; null TTL and canonical-name pointers are allowed.
    unsafe {
        _nss_k3slocal_gethostbyname3_r(
            name,
            af,
            result,
            buffer,
            buflen,
            errnop,
            h_errnop,
            ptr::null_mut(),
            ptr::null_mut(),
        )
    }
}

/// `gethostbyname_r`: IPv4.
///
/// # Safety
/// As [`_nss_k3slocal_gethostbyname3_r`].
#[no_mangle]
pub unsafe extern "C" fn _nss_k3slocal_gethostbyname_r(
    name: *const c_char,
    result: *mut hostent,
    buffer: *mut c_char,
    buflen: size_t,
    errnop: *mut c_int,
    h_errnop: *mut c_int,
) -> NssStatus {
    // SAFETY: same contract.
    unsafe {
        _nss_k3slocal_gethostbyname2_r(name, AF_INET, result, buffer, buflen, errnop, h_errnop)
    }
}

/// `gethostbyname4_r`, used by `getaddrinfo`: a list of addresses of any
/// family. As glibc's own modules do, an existing `*pat` tuple is filled in
/// place; otherwise one is placed in the buffer.
///
/// # Safety
/// glibc's contract: `name` a C string; `pat` valid, `*pat` null or a
/// writable tuple; `buffer` valid for `buflen` bytes; `errnop`, `h_errnop`
/// valid; `ttlp` null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn _nss_k3slocal_gethostbyname4_r(
    name: *const c_char,
    pat: *mut *mut gaih_addrtuple,
    buffer: *mut c_char,
    buflen: size_t,
    errnop: *mut c_int,
    h_errnop: *mut c_int,
    ttlp: *mut i32,
) -> NssStatus {
    if pat.is_null() {
        // SAFETY: errnop and h_errnop come from glibc, valid or null.
        return unsafe { fail(Failure::Internal, errnop, h_errnop) };
    }
    // SAFETY: `name` is glibc's NUL-terminated query.
    let answer = match unsafe { resolve(name) } {
        Ok(answer) => answer,
        // SAFETY: errnop and h_errnop come from glibc, valid or null.
        Err(failure) => return unsafe { fail(failure, errnop, h_errnop) },
    };
    // SAFETY: `buffer`/`buflen` describe the caller's scratch buffer.
    let mut arena = unsafe { Arena::new(buffer, buflen) };
    // SAFETY: `pat` is non-null and valid for reads.
    let given = unsafe { *pat };
    let tuple = if given.is_null() {
        arena.array::<gaih_addrtuple>(1)
    } else {
        Some(given)
    };
    let slots = tuple.zip(StrSlot::reserve(&mut arena, &answer.canonical));
    let Some((tuple, canonical)) = slots else {
        // SAFETY: errnop and h_errnop come from glibc, valid or null.
        return unsafe { fail(Failure::TooSmall, errnop, h_errnop) };
    };
    // SAFETY: `tuple` is either glibc's writable tuple or was reserved in the
    // buffer at its alignment; the name was reserved in the buffer apart from
    // it; `pat` is valid for a write.
    unsafe {
        tuple.write(gaih_addrtuple {
            next: ptr::null_mut(),
            name: canonical.write(),
            family: AF_INET,
            addr: [u32::from_ne_bytes(answer.address.octets()), 0, 0, 0],
            scopeid: 0,
        });
        *pat = tuple;
    }
    if !ttlp.is_null() {
        // SAFETY: non-null, and glibc passes it valid for a write.
        unsafe { *ttlp = 0 };
    }
    NSS_STATUS_SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer() -> Answer {
        Answer {
            address: std::net::Ipv4Addr::new(127, 77, 0, 9),
            canonical: "web-staging.local".into(),
            aliases: vec!["a-staging.local".into(), "b-staging.local".into()],
        }
    }

    /// The exact size the layout needs from an aligned start.
    fn needed(a: &Answer) -> usize {
        let ptr = size_of::<*mut c_char>();
        let strings: usize = std::iter::once(&a.canonical)
            .chain(&a.aliases)
            .map(|s| s.len() + 1)
            .sum();
        ptr * 2 + ptr * (a.aliases.len() + 1) + 4 + strings
    }

    #[test]
    fn lays_a_hostent_out_in_the_buffer_at_any_offset() {
        let a = answer();
        for offset in 0..8 {
            let mut storage = vec![0u64; 64];
            let base: *mut c_char = storage.as_mut_ptr().cast();
            // SAFETY: offset < 8 stays inside the 512-byte storage.
            let buffer = unsafe { base.add(offset) };
            let mut result = hostent {
                h_name: ptr::null_mut(),
                h_aliases: ptr::null_mut(),
                h_addrtype: 0,
                h_length: 0,
                h_addr_list: ptr::null_mut(),
            };
            let room = 512 - offset;
            // SAFETY: `buffer` is valid for `room` bytes; `result` is local.
            let filled = unsafe { fill_hostent(&a, &mut result, buffer, room) };
            assert!(filled.is_some());
            assert_eq!(result.h_addr_list as usize % align_of::<*mut c_char>(), 0);
            assert_eq!(result.h_aliases as usize % align_of::<*mut c_char>(), 0);
            // SAFETY: the pointers were just laid out inside `storage`.
            unsafe {
                assert_eq!(
                    CStr::from_ptr(result.h_name).to_bytes(),
                    b"web-staging.local"
                );
                let addr = *result.h_addr_list;
                assert_eq!(addr as usize % 4, 0, "in_addr alignment");
                assert_eq!(
                    std::slice::from_raw_parts(addr.cast::<u8>(), 4),
                    [127, 77, 0, 9]
                );
                assert!(result.h_addr_list.add(1).read().is_null());
                assert_eq!(
                    CStr::from_ptr(*result.h_aliases).to_bytes(),
                    b"a-staging.local"
                );
                assert_eq!(
                    CStr::from_ptr(*result.h_aliases.add(1)).to_bytes(),
                    b"b-staging.local"
                );
                assert!(result.h_aliases.add(2).read().is_null());
            }
        }
    }

    #[test]
    fn a_buffer_one_byte_short_is_too_small_and_untouched() {
        let a = answer();
        let need = needed(&a);
        let mut storage = vec![0xAAAA_AAAA_AAAA_AAAAu64; 64];
        let buffer: *mut c_char = storage.as_mut_ptr().cast();
        let mut result = hostent {
            h_name: ptr::null_mut(),
            h_aliases: ptr::null_mut(),
            h_addrtype: 0,
            h_length: 0,
            h_addr_list: ptr::null_mut(),
        };
        // SAFETY: `buffer` is aligned and valid for 512 >= need bytes.
        assert!(unsafe { fill_hostent(&a, &mut result, buffer, need - 1) }.is_none());
        assert!(storage.iter().all(|&w| w == 0xAAAA_AAAA_AAAA_AAAA));
        assert!(result.h_name.is_null());
        // SAFETY: as above.
        assert!(unsafe { fill_hostent(&a, &mut result, buffer, need) }.is_some());
        // SAFETY: a null buffer is allowed and means "no room".
        assert!(unsafe { fill_hostent(&a, &mut result, ptr::null_mut(), 4096) }.is_none());
    }

    #[test]
    fn foreign_names_are_not_found_without_touching_anything() {
        let mut errno = 0;
        let mut h_errno = 0;
        let mut pat: *mut gaih_addrtuple = ptr::null_mut();
        let mut buffer = [0u64; 16];
        // SAFETY: all pointers are to live locals of the right size.
        let status = unsafe {
            _nss_k3slocal_gethostbyname4_r(
                c"unrelated.example".as_ptr(),
                &mut pat,
                buffer.as_mut_ptr().cast(),
                128,
                &mut errno,
                &mut h_errno,
                ptr::null_mut(),
            )
        };
        assert_eq!(status, NSS_STATUS_NOTFOUND);
        assert_eq!((errno, h_errno), (ENOENT, HOST_NOT_FOUND));
        assert!(pat.is_null());
        let mut result = hostent {
            h_name: ptr::null_mut(),
            h_aliases: ptr::null_mut(),
            h_addrtype: 0,
            h_length: 0,
            h_addr_list: ptr::null_mut(),
        };
        errno = 0;
        // SAFETY: as above.
        let status = unsafe {
            _nss_k3slocal_gethostbyname2_r(
                c"web-staging.local".as_ptr(),
                libc::AF_INET6,
                &mut result,
                buffer.as_mut_ptr().cast(),
                128,
                &mut errno,
                &mut h_errno,
            )
        };
        assert_eq!(status, NSS_STATUS_NOTFOUND);
        assert_eq!(errno, ENOENT);
    }

    #[test]
    fn the_tuple_matches_glibc_layout() {
        // x86_64/aarch64 glibc: next 0, name 8, family 16, addr 20, scopeid 36.
        assert_eq!(
            std::mem::offset_of!(gaih_addrtuple, family),
            2 * size_of::<usize>()
        );
        assert_eq!(
            std::mem::offset_of!(gaih_addrtuple, addr),
            2 * size_of::<usize>() + 4
        );
        assert_eq!(
            std::mem::offset_of!(gaih_addrtuple, scopeid),
            2 * size_of::<usize>() + 20
        );
    }
}
