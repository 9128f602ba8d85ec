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
