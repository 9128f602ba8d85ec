//! Build script: gives the shared object the soname glibc's NSS loader asks
//! for (`libnss_<service>.so.2`), so the built `libnss_k3slocal.so` can be
//! installed as `libnss_k3slocal.so.2`.

fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libnss_k3slocal.so.2");
    println!("cargo:rerun-if-changed=build.rs");
}
