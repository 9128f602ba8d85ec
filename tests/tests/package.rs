//! The desktop package, as a person installing it gets it: `scripts/package
//! --debug` builds the `.deb` with Tauri's bundler; `dpkg-deb` shows its
//! files, modes and `Depends`; `desktop-file-validate` passes on its entry;
//! and the package is installed for real with `dpkg -i` into an overlay of
//! `/` in a private mount namespace (the machine itself is never touched).
//! There, as a normal unprivileged user (uid 1000), the packaged agent serves a pod
//! whose port is 80, and `curl http://web-staging.local/` reaches it through
//! the package's NSS module and bind helper, while `/etc/hosts` stays as it
//! was. Upgrading keeps the user's state; purging gives `/etc/nsswitch.conf`
//! back byte for byte. Needs root, as CI has.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use k3s_local_agent_e2e::{http_pod, wait_until, AgentProcess};
use serde_json::{json, Value};

/// A desktop machine's hosts line: mDNS would swallow every `.local` name
/// that reaches it, so the module must come before it.
const DESKTOP_NSSWITCH: &str = "# /etc/nsswitch.conf as a desktop install has it\n\
passwd:         files\n\
group:          files\n\
hosts:          files mdns4_minimal [NOTFOUND=return] dns myhostname\n\
networks:       files\n";
/// Where the staging pod listens: its own port 80, on an address of its own.
const POD_ADDR: &str = "127.66.0.1:80";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// Builds the package as README says (debug profile, for speed).
fn build_package() -> PathBuf {
    let output = Command::new(workspace().join("scripts/package"))
        .arg("--debug")
        .current_dir(workspace())
        .stdin(Stdio::null())
        .output()
        .expect("scripts/package runs");
    assert!(
        output.status.success(),
        "scripts/package failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let deb = stdout.lines().last().expect("the package's path").trim();
    workspace().join(deb)
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("{program} runs: {err}"))
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A private mount namespace whose root is an overlay of `/`: writes land in
/// a tmpfs and vanish with it. Held open by a sleeping process; every
/// command runs inside it (and chrooted to the overlay) through `nsenter`.
struct Overlay {
    holder: Child,
    /// The overlay's mount point, inside the namespace.
    root: String,
}

impl Overlay {
    fn new(deb: &Path) -> Self {
        let script = format!(
            r#"set -eu
t=$(mktemp -d)
mount -t tmpfs overlay-layers "$t"
mkdir "$t/upper" "$t/work" "$t/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$t/upper,workdir=$t/work" "$t/root"
for d in proc dev sys; do mount --rbind "/$d" "$t/root/$d"; done
mount -t tmpfs tmp "$t/root/tmp"
mount -t tmpfs run "$t/root/run"
cp '{deb}' "$t/root/tmp/k3s-local-agent.deb"
echo "root=$t/root"
exec sleep 3600"#,
            deb = deb.display()
        );
        let mut holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("unshare runs (needs root, as CI has)");
        let mut stdout = holder.stdout.take().expect("stdout");
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while stdout.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        let line = String::from_utf8_lossy(&line).into_owned();
        let root = line
            .strip_prefix("root=")
            .unwrap_or_else(|| panic!("the overlay did not come up: {line:?}"))
            .to_owned();
        Self { holder, root }
    }

    /// The command line that runs `program` as root inside the overlay.
    fn command(&self, program: &[&str]) -> Command {
        let mut command = Command::new("nsenter");
        command
            .args([
                "--target",
                &self.holder.id().to_string(),
                "--mount",
                "chroot",
            ])
            .arg(&self.root)
            .args(program)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::null());
        command
    }

    fn run(&self, program: &[&str]) -> Output {
        self.command(program).output().expect("nsenter runs")
    }

    /// Runs `program` and insists it succeeds; its stdout.
    fn ok(&self, program: &[&str]) -> String {
        let output = self.run(program);
        assert!(
            output.status.success(),
            "{program:?} failed:\n{}\n{}",
            text(&output),
            String::from_utf8_lossy(&output.stderr)
        );
        text(&output)
    }

    /// Runs `program` as the normal user (uid 1000, the first account
    /// Debian makes; it needs no entry in the overlay's passwd for
    /// `setpriv`) inside the overlay.
    fn as_user(&self, program: &[&str]) -> Output {
        let mut args = vec![
            "setpriv",
            "--reuid=1000",
            "--regid=1000",
            "--clear-groups",
            "--reset-env",
        ];
        args.extend_from_slice(program);
        self.run(&args)
    }

    fn read(&self, path: &str) -> String {
        self.ok(&["cat", path])
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

#[test]
fn the_package_installs_names_pods_for_a_normal_user_and_purges_cleanly() {
    let deb = build_package();
    let deb_str = deb.display().to_string();
    assert!(
        deb.file_name().and_then(|name| name.to_str()).is_some_and(
            |name| name.starts_with(&format!("k3s-local-agent_{}_", env!("CARGO_PKG_VERSION")))
        ),
        "the package is named k3s-local-agent_<workspace version>_<arch>.deb: {deb_str}"
    );

    // What is in it, and with which modes.
    let fields = text(&run("dpkg-deb", &["--field", &deb_str]));
    assert!(fields.contains("Package: k3s-local-agent\n"), "{fields}");
    assert!(
        fields.contains(&format!("Version: {}\n", env!("CARGO_PKG_VERSION"))),
        "{fields}"
    );
    let depends = fields
        .lines()
        .find_map(|line| line.strip_prefix("Depends: "))
        .unwrap_or_default();
    for needed in [
        "libcap2-bin",
        "libwebkit2gtk-4.1-0",
        "libgtk-3-0",
        "libayatana-appindicator3-1",
    ] {
        assert!(
            depends.contains(needed),
            "Depends lacks {needed}: {depends}"
        );
    }
    let listing = text(&run("dpkg-deb", &["--contents", &deb_str]));
    let mode_of = |path: &str| {
        listing
            .lines()
            .find(|line| {
                line.ends_with(&format!(" ./{path}")) || line.ends_with(&format!(" {path}"))
            })
            .and_then(|line| line.split_whitespace().next())
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("{path} is not in the package:\n{listing}"))
    };
    for (path, mode) in [
        ("usr/bin/k3s-local-agent-tray", "-rwxr-xr-x"),
        ("usr/bin/k3s-local-agent", "-rwxr-xr-x"),
        (
            "usr/libexec/k3s-local-agent/k3s-local-agent-bind",
            "-rwxr-xr-x",
        ),
        (
            "usr/lib/x86_64-linux-gnu/libnss_k3slocal.so.2",
            "-rwxr-xr-x",
        ),
        ("usr/lib/systemd/user/k3s-local-agent.service", "-rw-r--r--"),
        (
            "usr/share/applications/k3s-local-agent.desktop",
            "-rw-r--r--",
        ),
    ] {
        assert_eq!(mode_of(path), mode, "mode of {path}");
    }
    let unpacked = tempfile::tempdir().expect("tempdir");
    let unpack = run(
        "dpkg-deb",
        &["-x", &deb_str, &unpacked.path().display().to_string()],
    );
    assert!(unpack.status.success(), "dpkg-deb -x failed");
    let entry = unpacked
        .path()
        .join("usr/share/applications/k3s-local-agent.desktop");
    let validate = run("desktop-file-validate", &[&entry.display().to_string()]);
    assert!(
        validate.status.success() && validate.stdout.is_empty(),
        "desktop-file-validate: {}{}",
        text(&validate),
        String::from_utf8_lossy(&validate.stderr)
    );
    let entry_text = std::fs::read_to_string(&entry).expect("read the entry");
    assert!(
        entry_text.contains("\nExec=k3s-local-agent-tray\n"),
        "{entry_text}"
    );
    let unit = std::fs::read_to_string(
        unpacked
            .path()
            .join("usr/lib/systemd/user/k3s-local-agent.service"),
    )
    .expect("read the unit");
    assert!(
        unit.contains("ExecStart=/usr/bin/k3s-local-agent run"),
        "{unit}"
    );

    // Installed for real, in an overlay of this machine.
    let real_hosts = std::fs::read_to_string("/etc/hosts").expect("read /etc/hosts");
    let overlay = Overlay::new(&deb);
    overlay.ok(&[
        "sh",
        "-c",
        &format!("printf '%s' '{DESKTOP_NSSWITCH}' > /etc/nsswitch.conf"),
    ]);
    let install = overlay.ok(&["dpkg", "-i", "/tmp/k3s-local-agent.deb"]);
    let nsswitch = overlay.read("/etc/nsswitch.conf");
    assert!(
        nsswitch.contains(
            "hosts:          files k3slocal mdns4_minimal [NOTFOUND=return] dns myhostname\n"
        ),
        "k3slocal comes right after files:\n{nsswitch}\n(dpkg said: {install})"
    );
    let caps = overlay.ok(&[
        "getcap",
        "/usr/libexec/k3s-local-agent/k3s-local-agent-bind",
    ]);
    assert!(caps.contains("cap_net_bind_service=ep"), "{caps}");
    let tray_caps = overlay.ok(&["getcap", "/usr/bin/k3s-local-agent-tray"]);
    assert!(
        tray_caps.trim().is_empty(),
        "the GUI binary carries no capability: {tray_caps}"
    );

    // A fresh, unprivileged user with a login session starts the packaged agent.
    overlay.ok(&[
        "sh",
        "-c",
        "install -d -m 700 -o 1000 -g 1000 /run/user/1000 /tmp/user",
    ]);
    let pod_addr: SocketAddr = POD_ADDR.parse().expect("address");
    http_pod(pod_addr, "hello from the staging pod");
    let agent = AgentProcess::run_command(
        overlay
            .command(&[
                "setpriv",
                "--reuid=1000",
                "--regid=1000",
                "--clear-groups",
                "--reset-env",
                "/usr/bin/k3s-local-agent",
                "run",
                "--agent-port",
                "0",
                "--port-range",
                "18800-18840",
                "--no-cluster",
                "--state-dir",
                "/tmp/user/state",
            ])
            .env("RUST_LOG", "info"),
    )
    .expect("the packaged agent starts as the normal user");
    let health = agent.get_json("/health").expect("health");
    assert_eq!(health["names"]["mode"], "nss-module", "{health}");
    let agent_id = agent.agent_id().expect("agent id");
    let (code, answer) = agent
        .push(&json!({
            "agent_id": agent_id,
            "action": "create",
            "pods": [{"id": "web-1", "name": "web", "namespace": "staging",
                      "image": "nginx", "status": "running", "ip": "127.66.0.1", "port": 80}],
        }))
        .expect("push");
    assert_eq!(code, 200, "{answer}");
    let mut redirection = Value::Null;
    wait_until("the pod's own port to listen on its address", || {
        redirection = agent
            .get_json("/api/v1/pods/status")
            .map(|status| status["redirections"]["web-1"].clone())
            .unwrap_or_default();
        redirection["name_url"].is_string()
    })
    .unwrap_or_else(|err| panic!("{err}: {redirection}\n{}", agent.log_lines().join("\n")));
    assert_eq!(redirection["name_port_error"], Value::Null, "{redirection}");

    // The headline: no port, no root, no /etc/hosts.
    let curl = overlay.as_user(&[
        "curl",
        "-s",
        "--max-time",
        "10",
        "http://web-staging.local/",
    ]);
    assert_eq!(
        text(&curl),
        "hello from the staging pod",
        "curl as the normal user: {}",
        String::from_utf8_lossy(&curl.stderr)
    );
    let resolved = overlay.as_user(&["getent", "hosts", "web-staging.local"]);
    let address = redirection["address"].as_str().expect("the pod's address");
    assert!(text(&resolved).starts_with(address), "{}", text(&resolved));
    // Another user (root here) has no such pod: the name is the user's alone.
    let for_root = overlay.run(&["getent", "hosts", "web-staging.local"]);
    assert!(
        !for_root.status.success(),
        "root resolved the user's pod: {}",
        text(&for_root)
    );
    assert_eq!(
        overlay.read("/etc/hosts"),
        real_hosts,
        "/etc/hosts is untouched"
    );

    // Upgrade (the same package again): the system change stays single,
    // the user's state stays.
    overlay.ok(&["dpkg", "-i", "/tmp/k3s-local-agent.deb"]);
    let nsswitch = overlay.read("/etc/nsswitch.conf");
    assert_eq!(nsswitch.matches("k3slocal").count(), 1, "{nsswitch}");
    agent.terminate().expect("stop the agent");
    overlay.ok(&["test", "-f", "/tmp/user/state/state.db"]);

    // Remove keeps user data; purge undoes every system change.
    overlay.ok(&["dpkg", "--remove", "k3s-local-agent"]);
    overlay.ok(&["test", "-f", "/tmp/user/state/state.db"]);
    overlay.ok(&["dpkg", "--purge", "k3s-local-agent"]);
    assert_eq!(
        overlay.read("/etc/nsswitch.conf"),
        DESKTOP_NSSWITCH,
        "purge gives nsswitch.conf back byte for byte"
    );
    let gone = overlay.run(&[
        "test",
        "-e",
        "/usr/libexec/k3s-local-agent/k3s-local-agent-bind",
    ]);
    assert!(
        !gone.status.success(),
        "the helper (and its capability) is gone"
    );
    assert_eq!(
        std::fs::read_to_string("/etc/hosts").expect("read /etc/hosts"),
        real_hosts,
        "the machine's own /etc/hosts is untouched"
    );
}
