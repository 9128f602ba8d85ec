//! A private desktop for the tray app's tests: an Xvfb display, a D-Bus
//! session bus, a notification daemon (dunst), a `dbus-monitor` recording
//! every Notify call, and a tray host (trayer) at the top-left corner. Built
//! from Debian's packages; a missing one fails the test and names it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::wait_until;

/// Size of the virtual screen.
pub const SCREEN: &str = "1280x800x24";
/// Where the tray host puts the (only) icon: the middle of its first slot.
pub const TRAY_ICON_AT: (u32, u32) = (16, 16);

/// What each program comes from, for the failure message.
const TOOLS: [(&str, &str); 7] = [
    ("Xvfb", "xvfb"),
    ("dbus-daemon", "dbus"),
    ("dbus-monitor", "dbus"),
    ("dunst", "dunst"),
    ("trayer", "trayer"),
    ("xdotool", "xdotool"),
    ("import", "imagemagick"),
];

/// The app binary: `K3S_LOCAL_AGENT_TRAY_BIN`, else beside the agent binary.
pub fn tray_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("K3S_LOCAL_AGENT_TRAY_BIN") {
        return PathBuf::from(path);
    }
    let agent = crate::agent_binary();
    let binary = agent.with_file_name("k3s-local-agent-tray");
    assert!(
        binary.exists(),
        "{} is missing: build it with `cargo build -p k3s-local-agent-tray` (the test script does)",
        binary.display()
    );
    binary
}

/// One notification as the daemon received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenNotification {
    pub app: String,
    pub summary: String,
    pub body: String,
}

/// A running private desktop; everything in it stops on drop.
#[derive(Debug)]
pub struct Desktop {
    pub dir: tempfile::TempDir,
    display: String,
    bus: String,
    children: Vec<Child>,
    monitor_lines: Arc<Mutex<Vec<String>>>,
}

fn free_display(from: u32) -> Result<u32> {
    (from..from + 30)
        .find(|&n| display_is_free(n))
        .with_context(|| format!("no free X display number in {from}-{}", from + 29))
}

/// Whether display `n` can be used: no live server holds its lock. A lock
/// and socket left by a server that died without cleaning up (killed, or a
/// crashed test) are removed here, or every such run would use a number up
/// for good, and a stale socket would pass for a server that is ready.
fn display_is_free(n: u32) -> bool {
    let lock = PathBuf::from(format!("/tmp/.X{n}-lock"));
    let socket = PathBuf::from(format!("/tmp/.X11-unix/X{n}"));
    let holder = std::fs::read_to_string(&lock)
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok());
    if holder.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists()) {
        return false;
    }
    let _ = std::fs::remove_file(&lock);
    let _ = std::fs::remove_file(&socket);
    !lock.exists() && !socket.exists()
}

/// Stops `child` with SIGTERM, so a server removes its lock and socket,
/// and kills it if it has not gone within the suite's deadline.
fn stop(child: &mut Child) {
    let asked = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .is_ok_and(|status| status.success());
    let gone = asked
        && wait_until("a desktop program to stop", || {
            matches!(child.try_wait(), Ok(Some(_)))
        })
        .is_ok();
    if !gone {
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Desktop {
    /// Starts a desktop on the first free display number from `first_display`
    /// (tests that run at once give different ones).
    pub fn start(first_display: u32) -> Result<Self> {
        for (program, package) in TOOLS {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {program}")])
                .output()
                .is_ok_and(|o| o.status.success());
            if !found {
                bail!("{program} is missing: install Debian's {package} (scripts/test does)");
            }
        }
        let dir = tempfile::tempdir()?;
        let number = free_display(first_display)?;
        let display = format!(":{number}");
        let mut desktop = Self {
            bus: format!("unix:path={}", dir.path().join("bus").display()),
            dir,
            display,
            children: Vec::new(),
            monitor_lines: Arc::new(Mutex::new(Vec::new())),
        };
        let xvfb = Command::new("Xvfb")
            .args([&desktop.display, "-screen", "0", SCREEN, "-nolisten", "tcp"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting Xvfb")?;
        desktop.children.push(xvfb);
        let socket = PathBuf::from(format!("/tmp/.X11-unix/X{number}"));
        wait_until("the X display", || socket.exists())?;

        let bus_socket = desktop.dir.path().join("bus");
        let dbus = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--nopidfile"])
            .arg(format!("--address={}", desktop.bus))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting dbus-daemon")?;
        desktop.children.push(dbus);
        wait_until("the session bus", || bus_socket.exists())?;

        let mut monitor = desktop
            .command("dbus-monitor")
            .arg("interface='org.freedesktop.Notifications',member='Notify'")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting dbus-monitor")?;
        let stdout = monitor.stdout.take().context("monitor stdout")?;
        let lines = Arc::clone(&desktop.monitor_lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut lines) = lines.lock() {
                    lines.push(line);
                }
            }
        });
        desktop.children.push(monitor);

        let dunst = desktop
            .command("dunst")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting dunst")?;
        desktop.children.push(dunst);
        wait_until("the notification daemon", || {
            desktop.name_has_owner("org.freedesktop.Notifications")
        })?;

        let trayer = desktop
            .command("trayer")
            .args([
                "--edge",
                "top",
                "--align",
                "left",
                "--widthtype",
                "request",
                "--height",
                "32",
            ])
            .args([
                "--SetDockType",
                "true",
                "--transparent",
                "false",
                "--tint",
                "0xdddddd",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting trayer")?;
        desktop.children.push(trayer);
        wait_until("the tray host", || {
            desktop
                .xdotool(&["search", "--class", "trayer"])
                .is_ok_and(|out| !out.trim().is_empty())
        })?;
        Ok(desktop)
    }

    /// A command that runs inside this desktop (display and session bus).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        command
            .env("DISPLAY", &self.display)
            .env("DBUS_SESSION_BUS_ADDRESS", &self.bus)
            .env_remove("WAYLAND_DISPLAY")
            .env("NO_AT_BRIDGE", "1");
        command
    }

    fn name_has_owner(&self, name: &str) -> bool {
        self.command("dbus-send")
            .args([
                "--session",
                "--print-reply",
                "--dest=org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus.NameHasOwner",
                &format!("string:{name}"),
            ])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("boolean true"))
    }

    /// Runs xdotool in this desktop; returns its output.
    pub fn xdotool(&self, args: &[&str]) -> Result<String> {
        let output = self.command("xdotool").args(args).output()?;
        if !output.status.success() {
            bail!(
                "xdotool {args:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Saves a screenshot of the whole screen.
    pub fn screenshot(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let status = self
            .command("import")
            .args(["-window", "root"])
            .arg(path)
            .status()?;
        if !status.success() {
            bail!("screenshot to {} failed", path.display());
        }
        Ok(())
    }

    /// Every notification seen so far, in order.
    pub fn notifications(&self) -> Vec<SeenNotification> {
        let lines = self
            .monitor_lines
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default();
        let mut seen = Vec::new();
        let mut strings: Option<Vec<String>> = None;
        for line in lines {
            if line.contains("member=Notify") {
                strings = Some(Vec::new());
                continue;
            }
            let Some(current) = strings.as_mut() else {
                continue;
            };
            let trimmed = line.trim();
            if let Some(text) = trimmed
                .strip_prefix("string \"")
                .and_then(|t| t.strip_suffix('"'))
            {
                current.push(text.to_owned());
                // app_name, app_icon, summary, body
                if current.len() == 4 {
                    seen.push(SeenNotification {
                        app: current[0].clone(),
                        summary: current[2].clone(),
                        body: current[3].clone(),
                    });
                    strings = None;
                }
            }
        }
        seen
    }

    /// Whether a visible window has exactly this title.
    pub fn window_visible(&self, title: &str) -> bool {
        self.xdotool(&["search", "--onlyvisible", "--name", &format!("^{title}$")])
            .is_ok_and(|out| !out.trim().is_empty())
    }

    /// Opens the tray icon's menu and presses `keys` in it (Down, Up, Return).
    pub fn tray_menu_keys(&self, keys: &[&str]) -> Result<()> {
        self.open_tray_menu()?;
        self.press(keys)
    }

    /// Waits until the app's icon is in the tray host: the tray host embeds
    /// it once the app has set up.
    pub fn wait_for_tray_icon(&self) -> Result<()> {
        wait_until("the tray icon", || {
            self.xdotool(&["search", "--onlyvisible", "--class", "tray-icon tray app"])
                .is_ok_and(|out| !out.trim().is_empty())
        })
    }

    /// Clicks the tray icon and waits until its menu is on screen.
    pub fn open_tray_menu(&self) -> Result<()> {
        let app_windows = || -> std::collections::BTreeSet<String> {
            self.xdotool(&["search", "--onlyvisible", "--class", "k3s-local-agent-tray"])
                .map(|out| out.lines().map(str::to_owned).collect())
                .unwrap_or_default()
        };
        self.wait_for_tray_icon()?;
        // A menu is a window that was not there before the click (the one
        // just closed may still be on its way out, so counting would lie).
        let before = app_windows();
        let (x, y) = TRAY_ICON_AT;
        let click = || self.xdotool(&["mousemove", &x.to_string(), &y.to_string(), "click", "1"]);
        click()?;
        let mut clicked_at = Instant::now();
        wait_until("the tray menu to open", || {
            if app_windows().difference(&before).next().is_some() {
                return true;
            }
            // A click that came while the tray host was busy is lost: click
            // again, now and then (never while a menu is open).
            if clicked_at.elapsed() > Duration::from_secs(4) {
                let _ = click();
                clicked_at = Instant::now();
            }
            false
        })
    }

    /// Presses keys in whatever has the keyboard (an open menu).
    pub fn press(&self, keys: &[&str]) -> Result<()> {
        let mut args = vec!["key", "--delay", "120"];
        args.extend_from_slice(keys);
        self.xdotool(&args)?;
        Ok(())
    }
}

impl Drop for Desktop {
    fn drop(&mut self) {
        for child in self.children.iter_mut().rev() {
            stop(child);
        }
    }
}
