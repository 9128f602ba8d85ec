//! The tray icon and its menu. On Linux a click on the icon opens the menu,
//! so the menu is the first view: a line per pod, a check item that toggles
//! it (a submenu with its ports, each toggled alone, when it has several), a
//! submenu to open pods in the browser, then the dashboard, pin, start at
//! login, pause/resume all, mute, quit. The menu is rebuilt in place on
//! every change (AppIndicator cannot swap a menu once set), and the icon
//! shows health at a glance. Each fixed item has a mnemonic (a letter that
//! chooses it in the open menu): Open in browser b, Open dashboard d, Pin
//! window p, Start at login s, Pause/Resume all u, Mute notifications m,
//! Quit q.

use k3s_local_agent::model::{PodView, Protocol, Snapshot, Way};
use k3s_local_agent::notices::Glance;
use k3s_local_agent::ops::autostart;
use k3s_local_agent::state::DesktopSettings;
use k3s_local_agent::Agent;
use tauri::image::Image;
use tauri::menu::{
    CheckMenuItem, IsMenuItem, Menu, MenuEvent, MenuItem, PredefinedMenuItem, Submenu,
};
use tauri::tray::{MouseButton, MouseButtonState, TrayIcon, TrayIconBuilder, TrayIconEvent};
use tauri::{AppHandle, Manager, Wry};

use crate::preferences::Preferences;
use crate::{commands, window};

const TRAY_ID: &str = "main";
const TOGGLE_PREFIX: &str = "pod:";
/// `port:<staging port>:<pod id>`: one port of a pod toggled alone.
const PORT_PREFIX: &str = "port:";
const OPEN_PREFIX: &str = "open:";
const DASHBOARD: &str = "dashboard";
const PIN: &str = "pin";
const PAUSE_ALL: &str = "pause-all";
const RESUME_ALL: &str = "resume-all";
const MUTE: &str = "mute";
const AUTOSTART: &str = "autostart";
const QUIT: &str = "quit";

fn icon_for(glance: Glance) -> tauri::Result<Image<'static>> {
    let bytes: &'static [u8] = match glance {
        Glance::AllUp => include_bytes!("../../icons/tray-ok.png"),
        Glance::SomeFailing => include_bytes!("../../icons/tray-failing.png"),
        Glance::ControlPlaneUnreachable => include_bytes!("../../icons/tray-offline.png"),
        Glance::NoPods => include_bytes!("../../icons/tray-idle.png"),
    };
    Image::from_bytes(bytes)
}

/// The tray icon, its menu, and the desktop preferences it edits.
#[derive(Clone)]
pub struct Tray {
    icon: TrayIcon<Wry>,
    menu: Menu<Wry>,
    preferences: Preferences,
    /// What the menu shows now, as [`menu_key`] spells it: a change that
    /// does not touch the menu (a report, a mirror's phase) leaves an open
    /// menu alone rather than rebuilding it under the pointer.
    shown: std::sync::Arc<parking_lot::Mutex<Option<String>>>,
}

impl std::fmt::Debug for Tray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tray").finish_non_exhaustive()
    }
}

impl Tray {
    /// Puts the icon in the tray, showing `initial`'s health, with an empty
    /// menu that [`Tray::show`] fills. (The first image matters: some tray
    /// hosts keep the image an icon had when they embedded it.)
    pub fn install(
        app: &AppHandle,
        preferences: Preferences,
        initial: &Snapshot,
    ) -> tauri::Result<Self> {
        let menu = Menu::new(app)?;
        let icon = TrayIconBuilder::with_id(TRAY_ID)
            .icon(icon_for(Glance::of(initial))?)
            .tooltip("K3s Local Agent")
            .menu(&menu)
            // Where a platform delivers clicks (macOS, Windows), a left click
            // opens the dashboard and the menu stays on the right button.
            .show_menu_on_left_click(false)
            .on_menu_event(on_menu_event)
            .on_tray_icon_event(|tray, event| {
                // The positioner learns where the icon is from its events.
                tauri_plugin_positioner::on_tray_event(tray.app_handle(), &event);
                if let TrayIconEvent::Click {
                    button: MouseButton::Left,
                    button_state: MouseButtonState::Up,
                    ..
                } = event
                {
                    window::show(tray.app_handle());
                }
            })
            .build(app)?;
        let tray = Self {
            icon,
            menu,
            preferences,
            shown: Default::default(),
        };
        app.manage(tray.clone());
        Ok(tray)
    }

    pub fn notifications_muted(&self) -> bool {
        self.preferences.get().notifications_muted
    }

    /// Rebuilds the menu for `snapshot` and sets the icon and tooltip.
    pub fn show(&self, app: &AppHandle, snapshot: &Snapshot) -> tauri::Result<()> {
        let glance = Glance::of(snapshot);
        // Set on every change, not only when the glance changes: a tray host
        // that embeds the icon late shows the last image it was given.
        self.icon.set_icon(Some(icon_for(glance)?))?;
        let preferences = self.preferences.get();
        self.icon.set_tooltip(Some(glance.describe(snapshot)))?;
        let key = menu_key(snapshot, &preferences);
        if self.shown().as_ref() == Some(&key) {
            return Ok(());
        }

        let mut items: Vec<Box<dyn IsMenuItem<Wry>>> = Vec::new();
        if snapshot.pods.is_empty() {
            items.push(Box::new(MenuItem::with_id(
                app,
                "empty",
                "No staging pods yet",
                false,
                None::<&str>,
            )?));
        }
        let open = Submenu::with_id(
            app,
            "open-menu",
            "Open in &browser",
            !snapshot.pods.is_empty(),
        )?;
        for view in &snapshot.pods {
            let tunnel = &view.tunnel;
            items.push(pod_item(app, view)?);
            open.append(&MenuItem::with_id(
                app,
                format!("{OPEN_PREFIX}{}", view.pod.id),
                format!(
                    "{}  ({})",
                    literal(&view.pod.name),
                    literal(&tunnel.localhost_name)
                ),
                tunnel.local_port.is_some() && tunnel.forwarding,
                None::<&str>,
            )?)?;
        }
        items.push(Box::new(PredefinedMenuItem::separator(app)?));
        items.push(Box::new(open));
        items.push(Box::new(MenuItem::with_id(
            app,
            DASHBOARD,
            "Open &dashboard",
            true,
            None::<&str>,
        )?));
        items.push(Box::new(CheckMenuItem::with_id(
            app,
            PIN,
            "&Pin window",
            true,
            preferences.pinned,
            None::<&str>,
        )?));
        items.push(Box::new(CheckMenuItem::with_id(
            app,
            AUTOSTART,
            "&Start at login",
            autostart::autostart_dir().is_some(),
            autostart::autostart_dir().is_some_and(|dir| autostart::is_enabled(&dir)),
            None::<&str>,
        )?));
        let any_forwarding = snapshot.pods.iter().any(|v| v.tunnel.forwarding);
        let (pause_id, pause_text) = if any_forwarding || snapshot.pods.is_empty() {
            (PAUSE_ALL, "Pa&use all")
        } else {
            (RESUME_ALL, "Res&ume all")
        };
        items.push(Box::new(MenuItem::with_id(
            app,
            pause_id,
            pause_text,
            !snapshot.pods.is_empty(),
            None::<&str>,
        )?));
        items.push(Box::new(CheckMenuItem::with_id(
            app,
            MUTE,
            "&Mute notifications",
            true,
            preferences.notifications_muted,
            None::<&str>,
        )?));
        items.push(Box::new(PredefinedMenuItem::separator(app)?));
        items.push(Box::new(MenuItem::with_id(
            app,
            QUIT,
            "&Quit",
            true,
            None::<&str>,
        )?));

        // Forgotten until the menu is whole: a failed build is tried again.
        *self.shown() = None;
        while self.menu.remove_at(0)?.is_some() {}
        for item in &items {
            self.menu.append(item.as_ref())?;
        }
        *self.shown() = Some(key);
        Ok(())
    }

    fn shown(&self) -> parking_lot::MutexGuard<'_, Option<String>> {
        self.shown.lock()
    }

    /// Rebuilds the menu on the next show, changed or not: a toggle the
    /// agent refused left its check mark flipped by the menu itself.
    fn forget_shown(&self) {
        *self.shown() = None;
    }

    /// Flips one preference (mute, pin) and shows it in the menu at once.
    fn toggle(&self, app: &AppHandle, what: &str, flag: fn(&mut DesktopSettings) -> &mut bool) {
        let settings = self.preferences.update(|settings| {
            let value = flag(settings);
            *value = !*value;
        });
        let mut settings = settings;
        tracing::info!(
            preference = what,
            on = *flag(&mut settings),
            "preference toggled"
        );
        let snapshot = app.state::<Agent>().snapshot();
        if let Err(err) = self.show(app, &snapshot) {
            tracing::warn!(error = %err, "cannot update the tray menu");
        }
    }
}

/// Everything the menu shows, in one string: equal keys, equal menus.
fn menu_key(snapshot: &Snapshot, preferences: &DesktopSettings) -> String {
    use std::fmt::Write;
    let mut key = format!(
        "{}|{}|{:?}|",
        preferences.pinned,
        preferences.notifications_muted,
        autostart::autostart_dir().map(|dir| autostart::is_enabled(&dir))
    );
    for view in &snapshot.pods {
        let tunnel = &view.tunnel;
        let _ = write!(
            key,
            "{}/{}/{}/{:?}/{:?}/{}/{:?};",
            view.pod.id,
            view.pod.name,
            tunnel.localhost_name,
            tunnel.local_port,
            tunnel.error.as_deref().map(shorten),
            tunnel.forwarding,
            tunnel.status,
        );
        let _ = write!(key, "{:?};", tunnel.way);
        for port in &tunnel.ports {
            let _ = write!(
                key,
                "{}/{:?}/{:?}/{}/{:?}/{:?},",
                port.staging_port,
                port.name,
                port.local_port,
                port.forwarding,
                port.protocol,
                port.error.as_deref().map(shorten),
            );
        }
    }
    key
}

/// A pod's line: a check item toggling it; with several ports, a submenu
/// with the whole pod's toggle and one per port.
fn pod_item(app: &AppHandle, view: &PodView) -> tauri::Result<Box<dyn IsMenuItem<Wry>>> {
    let tunnel = &view.tunnel;
    let range_port =
        |port: Option<u16>| port.map_or_else(|| "no port".to_owned(), |p| format!(":{p}"));
    let mut label = format!(
        "{}  →  {}",
        literal(&view.pod.name),
        range_port(tunnel.local_port)
    );
    // The way in use, when it is not the plain one.
    if tunnel.way != Way::Direct {
        label.push_str(&format!("  ({})", tunnel.way.describe()));
    }
    let toggle_id = format!("{TOGGLE_PREFIX}{}", view.pod.id);
    if tunnel.ports.len() <= 1 {
        if let Some(error) = &tunnel.error {
            label.push_str(&format!("  ({})", literal(&shorten(error))));
        }
        return Ok(Box::new(CheckMenuItem::with_id(
            app,
            toggle_id,
            label,
            true,
            tunnel.forwarding,
            None::<&str>,
        )?));
    }
    let more = tunnel.ports.len() - 1;
    label.push_str(&format!(
        "  +{more} port{}",
        if more == 1 { "" } else { "s" }
    ));
    let submenu = Submenu::with_id(app, format!("ports:{}", view.pod.id), label, true)?;
    submenu.append(&CheckMenuItem::with_id(
        app,
        toggle_id,
        "All ports",
        true,
        tunnel.ports.iter().any(|port| port.forwarding),
        None::<&str>,
    )?)?;
    submenu.append(&PredefinedMenuItem::separator(app)?)?;
    for port in &tunnel.ports {
        let label = literal(&port.label());
        if port.protocol != Protocol::Tcp {
            submenu.append(&MenuItem::with_id(
                app,
                format!("untunnelled:{}:{}", port.staging_port, view.pod.id),
                format!("{label}  (not forwarded)"),
                false,
                None::<&str>,
            )?)?;
            continue;
        }
        let mut text = format!("{label}  →  {}", range_port(port.local_port));
        if let Some(error) = &port.error {
            text.push_str(&format!("  ({})", literal(&shorten(error))));
        }
        submenu.append(&CheckMenuItem::with_id(
            app,
            format!("{PORT_PREFIX}{}:{}", port.staging_port, view.pod.id),
            text,
            true,
            port.forwarding,
            None::<&str>,
        )?)?;
    }
    Ok(Box::new(submenu))
}

/// Turns start at login on or off (the autostart entry is the setting),
/// then shows the new state in the menu.
fn toggle_autostart(app: &AppHandle) {
    let Some(dir) = autostart::autostart_dir() else {
        return;
    };
    let result = if autostart::is_enabled(&dir) {
        autostart::disable(&dir)
    } else {
        std::env::current_exe().and_then(|exe| autostart::enable(&dir, &exe))
    };
    match result {
        Ok(()) => tracing::info!(
            enabled = autostart::is_enabled(&dir),
            "start at login toggled"
        ),
        Err(err) => tracing::warn!(error = %err, "cannot change start at login"),
    }
    let snapshot = app.state::<Agent>().snapshot();
    if let Err(err) = app.state::<Tray>().show(app, &snapshot) {
        tracing::warn!(error = %err, "cannot update the tray menu");
    }
}

/// Text shown as it is in a menu label: '&' marks a mnemonic there (each
/// fixed item has one: d for the dashboard, u for pause/resume, q to quit).
fn literal(text: &str) -> String {
    text.replace('&', "&&")
}

/// Keeps menu labels short: the dashboard has the full reason.
fn shorten(text: &str) -> String {
    const MAX: usize = 48;
    if text.chars().count() <= MAX {
        text.to_owned()
    } else {
        format!("{}…", text.chars().take(MAX).collect::<String>())
    }
}

/// Turns a pod (or one port of it) on or off, off the menu's thread; a
/// refusal puts the menu back as the agent has it.
fn toggle_from_tray(
    app: &AppHandle,
    agent: Agent,
    pod_id: String,
    enabled: bool,
    port: Option<u16>,
) {
    let app = app.clone();
    tauri::async_runtime::spawn(async move {
        if let Err(err) = agent.set_forwarding(&pod_id, enabled, port).await {
            tracing::warn!(%pod_id, ?port, error = %err, "cannot toggle from the tray");
            let tray = app.state::<Tray>();
            tray.forget_shown();
            if let Err(err) = tray.show(&app, &agent.snapshot()) {
                tracing::warn!(error = %err, "cannot update the tray menu");
            }
        }
    });
}

fn on_menu_event(app: &AppHandle, event: MenuEvent) {
    let id = event.id().as_ref().to_owned();
    let agent = app.state::<Agent>().inner().clone();
    if let Some(pod_id) = id.strip_prefix(TOGGLE_PREFIX) {
        let pod_id = pod_id.to_owned();
        // Any port on: the pod's toggle turns them all off.
        let enabled = !agent
            .pod(&pod_id)
            .is_some_and(|view| view.tunnel.ports.iter().any(|port| port.forwarding));
        toggle_from_tray(app, agent, pod_id, enabled, None);
    } else if let Some((port, pod_id)) = id
        .strip_prefix(PORT_PREFIX)
        .and_then(|rest| rest.split_once(':'))
    {
        let Ok(port) = port.parse::<u16>() else {
            return;
        };
        let pod_id = pod_id.to_owned();
        let enabled = !agent.pod(&pod_id).is_some_and(|view| {
            view.tunnel
                .ports
                .iter()
                .any(|p| p.staging_port == port && p.forwarding)
        });
        toggle_from_tray(app, agent, pod_id, enabled, Some(port));
    } else if let Some(pod_id) = id.strip_prefix(OPEN_PREFIX) {
        if let Err(err) = commands::open_in_browser(app, &agent, pod_id) {
            tracing::warn!(%pod_id, error = %err, "cannot open the pod");
        }
    } else {
        match id.as_str() {
            DASHBOARD => window::show(app),
            PIN => app
                .state::<Tray>()
                .toggle(app, "pin window", |s| &mut s.pinned),
            PAUSE_ALL | RESUME_ALL => {
                let enabled = id == RESUME_ALL;
                tauri::async_runtime::spawn(async move {
                    if let Err(err) = agent.set_forwarding_all(enabled).await {
                        tracing::warn!(error = %err, "cannot pause or resume all");
                    }
                });
            }
            MUTE => app
                .state::<Tray>()
                .toggle(app, "mute notifications", |s| &mut s.notifications_muted),
            AUTOSTART => toggle_autostart(app),
            QUIT => commands::quit(app.clone(), agent),
            _ => {}
        }
    }
}
