//! A private name service for tests that resolve through the real glibc
//! resolver: in a mount namespace of the test's own (`unshare --mount
//! --propagation private`), a `hosts: files k3slocal dns` nsswitch.conf and a
//! resolv.conf that fails at once are bound over /etc, a tmpfs over
//! /run/user, and the built NSS module is copied where `LD_LIBRARY_PATH`
//! finds it. The machine's own files are never touched.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The built NSS module: `K3S_LOCAL_AGENT_NSS`, else beside the tests' target dir.
pub fn nss_module() -> PathBuf {
    crate::built_artifact("K3S_LOCAL_AGENT_NSS", "libnss_k3slocal.so", "nss-k3slocal")
}

/// Runs `program` to its successful end.
pub fn run(program: &str, args: &[&str]) -> Result<()> {
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} {args:?} failed: {status}");
    }
    Ok(())
}

/// Sets `path`'s mode.
pub fn chmod(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// Sets the name service up in `dir` (which other users must be able to
/// enter: it is made 0755) and returns the folder holding the module, for
/// `LD_LIBRARY_PATH`. Call it only inside a private mount namespace.
pub fn private_name_service(dir: &Path) -> Result<PathBuf> {
    let lib = dir.join("lib");
    std::fs::create_dir(&lib)?;
    // Programs run as other users must reach the module.
    chmod(dir, 0o755)?;
    chmod(&lib, 0o755)?;
    std::fs::copy(nss_module(), lib.join("libnss_k3slocal.so.2")).context("copy the module")?;

    let real = std::fs::read_to_string("/etc/nsswitch.conf").unwrap_or_default();
    let mut nsswitch: String = real
        .lines()
        .filter(|line| !line.starts_with("hosts:"))
        .map(|line| format!("{line}\n"))
        .collect();
    nsswitch.push_str("hosts: files k3slocal dns\n");
    let nsswitch_path = dir.join("nsswitch.conf");
    std::fs::write(&nsswitch_path, nsswitch)?;
    // Hermetic DNS: nothing listens on 127.0.0.1:53, so the dns module fails
    // at once instead of leaving the machine.
    let resolv_path = dir.join("resolv.conf");
    std::fs::write(
        &resolv_path,
        "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
    )?;
    for (file, target) in [
        (&nsswitch_path, "/etc/nsswitch.conf"),
        (&resolv_path, "/etc/resolv.conf"),
    ] {
        run("mount", &["--bind", &file.display().to_string(), target])?;
    }
    run(
        "mount",
        &["-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run/user"],
    )?;
    // The per-user address layout is the default one, whatever this
    // machine's /etc/k3s-local-agent says.
    if Path::new("/etc/k3s-local-agent").exists() {
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                "mode=0755",
                "tmpfs",
                "/etc/k3s-local-agent",
            ],
        )?;
    }
    Ok(lib)
}

/// Runs the test `test_name` of this test binary again, alone, in a private
/// mount namespace of its own (private propagation: its mounts are invisible
/// outside it and vanish with it), with `inner_env` set so that the test
/// knows it is the inner run; fails unless that run passed its one test.
pub fn rerun_in_private_mount_namespace(inner_env: &str, test_name: &str) -> Result<()> {
    crate::require_mount_namespace();
    let output = Command::new("unshare")
        .args(["--mount", "--propagation", "private"])
        .arg(std::env::current_exe()?)
        .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
        .env(inner_env, "1")
        .env("K3S_LOCAL_AGENT_NSS", nss_module())
        .output()
        .context("re-run under unshare")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || !stdout.contains("1 passed") {
        bail!(
            "the inner run of {test_name} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}
