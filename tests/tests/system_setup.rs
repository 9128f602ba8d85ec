//! `k3s-local-agent system-setup install|remove --root DIR`, the package's
//! maintainer-script logic, run by the built binary on temporary roots with
//! the odd but valid `nsswitch.conf` files real machines have: install twice
//! is the same as once, and remove gives back the original byte for byte.

use std::path::Path;

use k3s_local_agent_e2e::cli;

/// Files as real machines have them (and no file at all: `None`).
const CASES: [(&str, Option<&str>); 7] = [
    (
        "debian desktop",
        Some(
            "# /etc/nsswitch.conf\n#\n# Example configuration of GNU Name Service Switch functionality.\n\n\
             passwd:         files systemd\ngroup:          files systemd\n\
             hosts:          files mdns4_minimal [NOTFOUND=return] dns myhostname\n\
             networks:       files\n",
        ),
    ),
    ("bare", Some("hosts: files dns\n")),
    (
        "comments and a commented-out hosts line",
        Some("# hosts: dns files\npasswd: files\nhosts:\tfiles\tdns # the usual\n"),
    ),
    (
        "systemd-resolved",
        Some("hosts: files resolve [!UNAVAIL=return] dns myhostname\n"),
    ),
    (
        "no hosts line",
        Some("passwd: files\ngroup: files\n"),
    ),
    ("no final newline", Some("passwd: files\nhosts: files dns")),
    ("no file at all", None),
];

fn root_with(nsswitch: Option<&str>) -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(root.path().join("etc")).expect("etc");
    if let Some(text) = nsswitch {
        std::fs::write(root.path().join("etc/nsswitch.conf"), text).expect("write");
    }
    root
}

fn setup(action: &str, root: &Path) -> String {
    let root = root.display().to_string();
    let (ok, stdout, stderr) =
        cli(&["system-setup", action, "--root", &root]).expect("the CLI runs");
    assert!(ok, "system-setup {action} failed: {stdout}{stderr}");
    stdout
}

fn read(root: &Path) -> Option<String> {
    std::fs::read_to_string(root.join("etc/nsswitch.conf")).ok()
}

#[test]
fn install_is_idempotent_and_remove_restores_every_file_byte_for_byte() {
    for (case, original) in CASES {
        let root = root_with(original);
        let said = setup("install", root.path());
        assert!(said.contains("changed"), "{case}: {said}");
        let once = read(root.path()).expect("a file after install");
        let hosts = once
            .lines()
            .rfind(|line| line.trim_start().starts_with("hosts"))
            .unwrap_or_else(|| panic!("{case}: no hosts line:\n{once}"));
        assert!(
            hosts.contains("k3slocal"),
            "{case}: the module is on the hosts line: {hosts}"
        );
        if let Some(files_at) = hosts.find("files") {
            let module_at = hosts.find("k3slocal").unwrap_or_default();
            assert!(module_at > files_at, "{case}: after files: {hosts}");
            for later in ["mdns4_minimal", "resolve", "dns"] {
                if let Some(at) = hosts.find(later) {
                    assert!(module_at < at, "{case}: before {later}: {hosts}");
                }
            }
        }

        let again = setup("install", root.path());
        assert!(again.contains("already so"), "{case}: {again}");
        assert_eq!(read(root.path()).as_deref(), Some(once.as_str()), "{case}");

        setup("remove", root.path());
        assert_eq!(read(root.path()).as_deref(), original, "{case}");
        let again = setup("remove", root.path());
        assert!(again.contains("already so"), "{case}: {again}");
        assert_eq!(read(root.path()).as_deref(), original, "{case}");
    }
}

#[test]
fn install_gives_the_bind_helper_its_one_capability() {
    let root = root_with(Some("hosts: files dns\n"));
    let helper = root
        .path()
        .join("usr/libexec/k3s-local-agent/k3s-local-agent-bind");
    std::fs::create_dir_all(helper.parent().expect("parent")).expect("mkdir");
    std::fs::copy("/bin/true", &helper).expect("a stand-in helper");
    let said = setup("install", root.path());
    assert!(said.contains("cap_net_bind_service"), "{said}");
    let output = std::process::Command::new("getcap")
        .arg(&helper)
        .output()
        .expect("getcap (libcap2-bin) runs");
    let caps = String::from_utf8_lossy(&output.stdout);
    assert!(caps.contains("cap_net_bind_service=ep"), "{caps}");
}

#[test]
fn a_root_without_etc_is_refused_by_name() {
    let root = tempfile::tempdir().expect("tempdir");
    let missing = root.path().join("nowhere");
    let (ok, stdout, stderr) = cli(&[
        "system-setup",
        "install",
        "--root",
        &missing.display().to_string(),
    ])
    .expect("the CLI runs");
    assert!(!ok, "{stdout}");
    assert!(
        stderr.contains(&missing.join("etc").display().to_string()),
        "the error names the missing folder: {stderr}"
    );
}

/// A Debian file an older system wrote in Latin-1 (`é` as the byte 0xe9),
/// with k3slocal in a comment that is not ours.
const LATIN1: &[u8] =
    b"# /etc/nsswitch.conf\n# r\xe9glages de l'\xe9t\xe9 (k3slocal ici)\n\npasswd: files\n\
hosts:          files mdns4_minimal [NOTFOUND=return] dns # k3slocal \xff\n\
networks:       files\n";
/// [`LATIN1`] with our word on its hosts line.
const LATIN1_INSTALLED: &[u8] =
    b"# /etc/nsswitch.conf\n# r\xe9glages de l'\xe9t\xe9 (k3slocal ici)\n\npasswd: files\n\
hosts:          files k3slocal mdns4_minimal [NOTFOUND=return] dns # k3slocal \xff\n\
networks:       files\n";

#[test]
fn a_file_that_is_not_utf8_is_edited_byte_for_byte() {
    let root = root_with(None);
    let conf = root.path().join("etc/nsswitch.conf");
    std::fs::write(&conf, LATIN1).expect("write");
    setup("install", root.path());
    assert_eq!(std::fs::read(&conf).expect("read"), LATIN1_INSTALLED);
    setup("remove", root.path());
    assert_eq!(std::fs::read(&conf).expect("read"), LATIN1);
}

#[test]
fn remove_leaves_a_file_without_our_word_untouched_whatever_its_encoding() {
    use std::os::unix::fs::MetadataExt as _;
    let root = root_with(None);
    let conf = root.path().join("etc/nsswitch.conf");
    for bytes in [LATIN1, b"\xff\xfeh\x00o\x00s\x00t\x00s\x00:\x00\n\x00\x80"] {
        std::fs::write(&conf, bytes).expect("write");
        let before = std::fs::metadata(&conf).expect("stat");
        let said = setup("remove", root.path());
        assert!(said.contains("already so"), "{said}");
        let after = std::fs::metadata(&conf).expect("stat");
        assert_eq!(std::fs::read(&conf).expect("read"), bytes);
        assert_eq!(after.ino(), before.ino(), "not replaced");
        assert_eq!(
            (after.mtime(), after.mtime_nsec()),
            (before.mtime(), before.mtime_nsec()),
            "not rewritten"
        );
    }
}

/// A maintainer script of the package, run as dpkg runs it with
/// `--force-script-chrootless`: every path under `DPKG_ROOT`.
fn script(name: &str, args: &[&str], root: &Path) -> std::process::Output {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging")
        .join(name);
    std::process::Command::new("sh")
        .arg(&path)
        .args(args)
        .env("DPKG_ROOT", root)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("sh {} runs: {err}", path.display()))
}

/// Runs `script` and insists it exits 0; its stderr.
fn script_ok(name: &str, args: &[&str], root: &Path) -> String {
    let output = script(name, args, root);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "{name} {args:?} failed: {}{stderr}",
        String::from_utf8_lossy(&output.stdout)
    );
    stderr
}

/// A root with the package's agent in it (the built one, linked), or none.
fn package_root(nsswitch: Option<&str>, with_agent: bool) -> tempfile::TempDir {
    let root = root_with(nsswitch);
    if with_agent {
        let bin = root.path().join("usr/bin");
        std::fs::create_dir_all(&bin).expect("mkdir");
        std::os::unix::fs::symlink(
            k3s_local_agent_e2e::agent_binary(),
            bin.join("k3s-local-agent"),
        )
        .expect("link the agent");
    }
    root
}

#[test]
fn the_maintainer_scripts_warn_and_succeed_when_system_setup_fails() {
    // An agent that fails, and no agent at all.
    for failing in [Some("#!/bin/sh\necho 'no, not today' >&2\nexit 1\n"), None] {
        let root = package_root(Some("hosts: files dns\n"), false);
        if let Some(body) = failing {
            use std::os::unix::fs::PermissionsExt as _;
            let bin = root.path().join("usr/bin");
            std::fs::create_dir_all(&bin).expect("mkdir");
            let agent = bin.join("k3s-local-agent");
            std::fs::write(&agent, body).expect("write");
            std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        for (name, args) in [
            ("postinst", &["configure", ""][..]),
            ("postinst", &["configure", "0.1.0"][..]),
            ("prerm", &["remove"][..]),
        ] {
            let stderr = script_ok(name, args, root.path());
            assert!(stderr.contains("warning"), "{name} {args:?}: {stderr}");
        }
    }
}

#[test]
fn an_upgrade_leaves_the_word_off_once_the_administrator_took_it_off() {
    const ORIGINAL: &str = "# mine\nhosts: files dns\n";
    const INSTALLED: &str = "# mine\nhosts: files k3slocal dns\n";
    let root = package_root(Some(ORIGINAL), true);
    // A first install: no version configured before.
    script_ok("postinst", &["configure", ""], root.path());
    assert_eq!(read(root.path()).as_deref(), Some(INSTALLED));
    // An upgrade with the word in place keeps it, once.
    script_ok("postinst", &["configure", "0.1.0"], root.path());
    assert_eq!(read(root.path()).as_deref(), Some(INSTALLED));

    // The administrator takes it off; upgrades respect that.
    std::fs::write(root.path().join("etc/nsswitch.conf"), ORIGINAL).expect("write");
    for _ in 0..2 {
        script_ok("postinst", &["configure", "0.1.0"], root.path());
        assert_eq!(read(root.path()).as_deref(), Some(ORIGINAL));
    }

    // Removed and installed again (its old version still known to dpkg):
    // that is a fresh install, and the word comes back.
    script_ok("prerm", &["remove"], root.path());
    script_ok("postrm", &["remove"], root.path());
    assert_eq!(read(root.path()).as_deref(), Some(ORIGINAL));
    assert!(
        !root
            .path()
            .join("var/lib/k3s-local-agent/nsswitch-added")
            .exists(),
        "the record goes with the package"
    );
    script_ok("postinst", &["configure", "0.1.0"], root.path());
    assert_eq!(read(root.path()).as_deref(), Some(INSTALLED));
    // And an upgrade after that still respects the administrator.
    std::fs::write(root.path().join("etc/nsswitch.conf"), ORIGINAL).expect("write");
    script_ok("postinst", &["configure", "0.1.0"], root.path());
    assert_eq!(read(root.path()).as_deref(), Some(ORIGINAL));

    // Purged: nothing of ours is left, and a new install is a first one.
    script_ok("prerm", &["remove"], root.path());
    script_ok("postrm", &["remove"], root.path());
    script_ok("postrm", &["purge"], root.path());
    assert!(!root.path().join("var/lib/k3s-local-agent").exists());
    script_ok("postinst", &["configure", ""], root.path());
    assert_eq!(read(root.path()).as_deref(), Some(INSTALLED));
}

#[test]
fn the_first_upgrade_from_a_version_without_the_record_respects_the_administrator() {
    // The version before kept no record; the administrator took the word
    // off under it.
    let root = package_root(Some("hosts: files dns\n"), true);
    script_ok("postinst", &["configure", "0.1.0"], root.path());
    assert_eq!(read(root.path()).as_deref(), Some("hosts: files dns\n"));
    // With the word in place, the upgrade keeps it and records it.
    let root = package_root(Some("hosts: files k3slocal dns\n"), true);
    script_ok("postinst", &["configure", "0.1.0"], root.path());
    assert_eq!(
        read(root.path()).as_deref(),
        Some("hosts: files k3slocal dns\n")
    );
    assert!(root
        .path()
        .join("var/lib/k3s-local-agent/nsswitch-added")
        .exists());
}

#[test]
fn postrm_takes_only_our_word_off_a_symlinked_file_and_keeps_the_link() {
    // As authselect has it on Fedora (absolute, resolved inside the root),
    // and as an administrator may have it (relative).
    for link_target in ["/etc/authselect/nsswitch.conf", "authselect/nsswitch.conf"] {
        postrm_on_a_link(link_target);
    }
}

fn postrm_on_a_link(link_target: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    let root = package_root(None, false);
    let target = root.path().join("etc/authselect/nsswitch.conf");
    std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
    std::fs::write(&target, LATIN1_INSTALLED).expect("write");
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let link = root.path().join("etc/nsswitch.conf");
    std::os::unix::fs::symlink(link_target, &link).expect("link");

    // The agent is gone by now (prerm could not run it): the fallback's turn.
    script_ok("postrm", &["remove"], root.path());
    assert!(
        std::fs::symlink_metadata(&link)
            .expect("lstat")
            .file_type()
            .is_symlink(),
        "{link_target}: the link is still a link"
    );
    assert_eq!(
        std::fs::read_link(&link).expect("readlink"),
        Path::new(link_target)
    );
    assert_eq!(
        std::fs::read(&target).expect("read"),
        LATIN1,
        "{link_target}: only our word left; the comments naming k3slocal are as they were"
    );
    assert_eq!(
        std::fs::metadata(&target)
            .expect("stat")
            .permissions()
            .mode()
            & 0o7777,
        0o640
    );
    assert_eq!(
        std::fs::read_dir(target.parent().expect("parent"))
            .expect("ls")
            .count(),
        1,
        "no temporary file left"
    );
    // Again: nothing of ours left, nothing written.
    script_ok("postrm", &["purge"], root.path());
    assert_eq!(std::fs::read(&target).expect("read"), LATIN1);
}

#[test]
fn postrm_undoes_what_the_agent_did_byte_for_byte_on_every_file() {
    for (case, original) in CASES {
        let root = root_with(original);
        setup("install", root.path());
        // No agent in this root: postrm's own removal, not the agent's.
        script_ok("postrm", &["remove"], root.path());
        assert_eq!(read(root.path()).as_deref(), original, "{case}");
    }
    // A word in a comment is not ours: the file is left alone.
    let commented = "hosts: files dns # k3slocal was here\n";
    let root = root_with(Some(commented));
    script_ok("postrm", &["remove"], root.path());
    assert_eq!(read(root.path()).as_deref(), Some(commented));
    // A module placed by hand, with its action, goes with it.
    let root = root_with(Some(
        "hosts: mdns k3slocal [NOTFOUND=return] dns # k3slocal\n",
    ));
    script_ok("postrm", &["remove"], root.path());
    assert_eq!(
        read(root.path()).as_deref(),
        Some("hosts: mdns dns # k3slocal\n")
    );
}
