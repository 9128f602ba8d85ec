//! A private desktop for the tray app's tests: an Xvfb display, a D-Bus
//! session bus, a notification daemon (dunst), a `dbus-monitor` recording
//! every Notify call, and a tray host (trayer) at the top-left corner. Built
//! from Debian's packages; a missing one fails the test and names it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{wait_until, wait_until_within};

/// Size of the virtual screen.
pub const SCREEN: &str = "1280x800x24";
/// Its width in pixels.
pub const SCREEN_WIDTH: i64 = 1280;
/// How long a menu choice may take to show its effect before the choice
/// is made again (a key or click that came while the menu was not yet
/// taking input is lost, more often on a loaded machine).
const MENU_CHOICE_TIMEOUT: Duration = Duration::from_secs(8);
/// How many times a menu choice is made before the test fails.
const MENU_CHOICE_ATTEMPTS: u32 = 3;

/// The file whose lock is a desktop's turn: one desktop at a time on this
/// machine (a tray app, a webview and a WebDriver each are heavy on two
/// cores, and three desktops at once made menus too slow to take clicks and
/// keys). The kernel holds the lock, and gives it back when its holder ends,
/// a failed test included.
fn desktop_turn() -> Result<std::fs::File> {
    let path = std::env::temp_dir().join("k3s-local-agent-test-desktop.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.lock()
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(file)
}

/// What each program comes from, for the failure message.
const TOOLS: [(&str, &str); 8] = [
    ("Xvfb", "xvfb"),
    ("dbus-daemon", "dbus"),
    ("dbus-monitor", "dbus"),
    ("dunst", "dunst"),
    ("trayer", "trayer"),
    ("xdotool", "xdotool"),
    ("import", "imagemagick"),
    ("identify", "imagemagick"),
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
    /// Held while this desktop runs (dropped after its programs stop).
    _turn: std::fs::File,
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
        let turn = desktop_turn()?;
        let dir = tempfile::tempdir()?;
        let number = free_display(first_display)?;
        let display = format!(":{number}");
        let mut desktop = Self {
            bus: format!("unix:path={}", dir.path().join("bus").display()),
            dir,
            display,
            children: Vec::new(),
            monitor_lines: Arc::new(Mutex::new(Vec::new())),
            _turn: turn,
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

        // dunst gives up when the display is not yet taking clients (a
        // loaded machine): start it again until it holds its bus name.
        let start_dunst = || {
            desktop
                .command("dunst")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting dunst")
        };
        let mut dunst = start_dunst()?;
        let mut restart_failed = None;
        let ready = wait_until("the notification daemon", || {
            if desktop.name_has_owner("org.freedesktop.Notifications") {
                return true;
            }
            if matches!(dunst.try_wait(), Ok(Some(_))) {
                match start_dunst() {
                    Ok(again) => dunst = again,
                    Err(error) => restart_failed = Some(error),
                }
            }
            restart_failed.is_some()
        });
        desktop.children.push(dunst);
        if let Some(error) = restart_failed {
            return Err(error);
        }
        ready?;

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
        self.window_titled(title).is_some()
    }

    /// Chooses an item of the tray icon's menu: opens the menu, presses
    /// `keys` in it (Down, Up, Return) and waits until `done` holds. A key
    /// or click lost while the menu was not yet taking input leaves `done`
    /// false: the menu is closed, `done` looked at once more (a slow effect
    /// is not a lost one), and the choice made again, a few times at most.
    pub fn choose_in_tray_menu(
        &self,
        keys: &[&str],
        what: &str,
        mut done: impl FnMut() -> bool,
    ) -> Result<()> {
        let mut last_error = None;
        for _ in 0..MENU_CHOICE_ATTEMPTS {
            let outcome = self
                .open_tray_menu()
                .and_then(|_menu| self.press(keys))
                .and_then(|()| wait_until_within(MENU_CHOICE_TIMEOUT, what, &mut done));
            match outcome {
                Ok(()) => return Ok(()),
                Err(error) => last_error = Some(error),
            }
            self.close_menus()?;
            if done() {
                return Ok(());
            }
        }
        let error = last_error.context("no attempt made")?;
        Err(error.context(format!(
            "{what}: the menu choice had no effect after {MENU_CHOICE_ATTEMPTS} tries"
        )))
    }

    /// The app's windows on screen now (its menus among them).
    fn app_windows(&self) -> std::collections::BTreeSet<String> {
        self.xdotool(&["search", "--onlyvisible", "--class", "k3s-local-agent-tray"])
            .map(|out| out.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// Presses Escape until no menu of the app is open (the main window,
    /// when shown, is not a menu and stays).
    pub fn close_menus(&self) -> Result<()> {
        let main_window = self.window_titled("K3s Local Agent");
        let menus_open = || {
            self.app_windows()
                .iter()
                .any(|id| Some(id) != main_window.as_ref())
        };
        wait_until("the tray menu to close", || {
            if !menus_open() {
                return true;
            }
            let _ = self.press(&["Escape"]);
            !menus_open()
        })
    }

    /// Waits until the app's icon is in the tray host: the tray host embeds
    /// it once the app has set up.
    pub fn wait_for_tray_icon(&self) -> Result<()> {
        wait_until("the tray icon", || self.tray_icon().is_some())
    }

    /// The middle of the app's icon in the tray host, if it is there.
    fn tray_icon(&self) -> Option<(i64, i64)> {
        let found = self
            .xdotool(&["search", "--onlyvisible", "--class", "tray-icon tray app"])
            .ok()?;
        let window = found.lines().next()?.trim().to_owned();
        let (x, y, width, height) = self.window_geometry(&window).ok()?;
        (width > 0 && height > 0).then_some((x + width / 2, y + height / 2))
    }

    /// Clicks the tray icon and waits until its menu is on screen and
    /// drawn; returns the menu's window id.
    pub fn open_tray_menu(&self) -> Result<String> {
        self.wait_for_tray_icon()?;
        // A menu is a window that was not there before the click (the one
        // just closed may still be on its way out, so counting would lie).
        let before = self.app_windows();
        let click = || -> Result<()> {
            let (x, y) = self.tray_icon().context("the tray icon went away")?;
            self.xdotool(&["mousemove", &x.to_string(), &y.to_string(), "click", "1"])?;
            Ok(())
        };
        click()?;
        let mut menu = None;
        wait_until_within(MENU_CHOICE_TIMEOUT, "the tray menu to open", || {
            menu = self.app_windows().difference(&before).next().cloned();
            menu.is_some()
        })?;
        let menu = menu.context("the menu went away")?;
        // Mapped is not yet drawn, nor yet taking keys: wait for its items.
        self.wait_painted(&menu, "the tray menu")?;
        Ok(menu)
    }

    /// Opens the tray menu, presses `keys` that open one of its submenus
    /// (Down, Right) and waits until that submenu is on screen and drawn;
    /// returns its window id. The menus stay open (for a screenshot). Keys
    /// lost before the menu took them are pressed again, as in
    /// [`Desktop::choose_in_tray_menu`].
    pub fn open_tray_submenu(&self, keys: &[&str]) -> Result<String> {
        let mut last_error = None;
        for _ in 0..MENU_CHOICE_ATTEMPTS {
            match self.try_open_tray_submenu(keys) {
                Ok(submenu) => return Ok(submenu),
                Err(error) => last_error = Some(error),
            }
            self.close_menus()?;
        }
        Err(last_error.context("no attempt made")?)
    }

    fn try_open_tray_submenu(&self, keys: &[&str]) -> Result<String> {
        let menu = self.open_tray_menu()?;
        let before = self.app_windows();
        self.press(keys)?;
        let mut submenu = None;
        wait_until_within(MENU_CHOICE_TIMEOUT, "the submenu to open", || {
            submenu = self
                .app_windows()
                .difference(&before)
                .find(|id| **id != menu)
                .cloned();
            submenu.is_some()
        })?;
        let submenu = submenu.context("the submenu went away")?;
        self.wait_painted(&submenu, "the submenu")?;
        Ok(submenu)
    }

    /// Waits until window `id` shows something: a window not yet drawn is
    /// one flat colour.
    pub fn wait_painted(&self, id: &str, what: &str) -> Result<()> {
        wait_until(&format!("{what} to be drawn"), || {
            self.pixel_spread(id).is_ok_and(|spread| spread > 0.0)
        })
    }

    /// How much the pixels of window `id` vary: the standard deviation of
    /// its grey levels, 0 (one colour) to 1.
    fn pixel_spread(&self, id: &str) -> Result<f64> {
        let picture = self.dir.path().join("window.png");
        let captured = self
            .command("import")
            .args(["-window", id])
            .arg(&picture)
            .stderr(Stdio::null())
            .status()?;
        if !captured.success() {
            bail!("capturing window {id} failed");
        }
        let output = Command::new("identify")
            .args(["-colorspace", "gray", "-format", "%[fx:standard_deviation]"])
            .arg(&picture)
            .output()?;
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .context("identify's answer")
    }

    /// Where window `id` is and how big: x, y, width, height.
    pub fn window_geometry(&self, id: &str) -> Result<(i64, i64, i64, i64)> {
        let geometry = self.xdotool(&["getwindowgeometry", "--shell", id])?;
        let field = |name: &str| -> Result<i64> {
            geometry
                .lines()
                .find_map(|line| line.strip_prefix(&format!("{name}=")))
                .and_then(|value| value.trim().parse().ok())
                .with_context(|| format!("no {name} in {geometry:?}"))
        };
        Ok((field("X")?, field("Y")?, field("WIDTH")?, field("HEIGHT")?))
    }

    /// Gives window `id` the keyboard focus, as a click into it would, and
    /// waits until it has held it for a moment (a popover takes only a
    /// settled focus for the user's: see the app's `window` module).
    pub fn focus_window(&self, id: &str) -> Result<()> {
        const SETTLED: Duration = Duration::from_millis(400);
        let mut held_since: Option<std::time::Instant> = None;
        wait_until("the window to hold the focus", || {
            let focused = self
                .xdotool(&["getwindowfocus"])
                .is_ok_and(|out| out.trim() == id);
            if !focused {
                held_since = None;
                let _ = self.xdotool(&["windowfocus", id]);
                return false;
            }
            held_since
                .get_or_insert_with(std::time::Instant::now)
                .elapsed()
                >= SETTLED
        })
    }

    /// Gives the keyboard focus to the tray host's window, as a click on
    /// another application would.
    pub fn focus_elsewhere(&self) -> Result<()> {
        let host = self.xdotool(&["search", "--onlyvisible", "--class", "trayer"])?;
        let host = host.lines().next().context("no tray host window")?;
        self.xdotool(&["windowfocus", host])?;
        Ok(())
    }

    /// Runs dunstctl against this desktop's notification daemon.
    pub fn dunstctl(&self, args: &[&str]) -> Result<()> {
        let status = self.command("dunstctl").args(args).status()?;
        if !status.success() {
            bail!("dunstctl {args:?} failed: {status}");
        }
        Ok(())
    }

    /// Waits until a window titled exactly `title` is on screen and drawn
    /// (hidden since start or not, it must paint); returns its id.
    pub fn wait_for_drawn_window(&self, title: &str) -> Result<String> {
        let mut id = None;
        wait_until(&format!("the window {title:?}"), || {
            id = self.window_titled(title);
            id.is_some()
        })?;
        let id = id.context("the window went away")?;
        self.wait_painted(&id, title)?;
        Ok(id)
    }

    /// The id of the visible window titled exactly `title`.
    pub fn window_titled(&self, title: &str) -> Option<String> {
        self.xdotool(&["search", "--onlyvisible", "--name", &format!("^{title}$")])
            .ok()?
            .lines()
            .next()
            .map(str::to_owned)
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
