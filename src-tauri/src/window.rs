//! The dashboard window as a tray popover: placed by the tray icon the first
//! time it shows (the screen's top-right corner where the platform does not
//! say where the icon is: Linux trays send no clicks), given the size the
//! user last left it at, and put away when it loses focus unless pinned.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k3s_local_agent::state::WindowSize;
use parking_lot::Mutex;
use tauri::{
    AppHandle, Emitter, LogicalSize, Manager, PhysicalPosition, Runtime, Window, WindowEvent,
};
use tauri_plugin_positioner::{Position, WindowExt};

use crate::preferences::Preferences;

/// The dashboard window's label in tauri.conf.json.
pub const MAIN_WINDOW: &str = "main";

/// The event that asks the page to show one pod (a notification's click).
pub const FOCUS_POD_EVENT: &str = "focus-pod";

/// How long the window must have held the focus before losing it puts it
/// away: a window being mapped can gain and lose the focus within a few
/// milliseconds (seen without a window manager), which is not the user
/// clicking elsewhere.
const SETTLED_FOCUS: Duration = Duration::from_millis(300);

/// What the popover remembers within a run: whether it was placed (after
/// the first time it stays where the user puts it), and since when it has
/// had the focus.
#[derive(Debug, Default)]
pub struct Popover {
    placed: AtomicBool,
    focused_since: Mutex<Option<Instant>>,
}

impl Popover {
    /// Notes a focus change; says whether a loss ends a settled focus.
    fn focus_changed(&self, focused: bool) -> bool {
        let mut since = self.focused_since.lock();
        if focused {
            *since = Some(Instant::now());
            false
        } else {
            since
                .take()
                .is_some_and(|since| since.elapsed() >= SETTLED_FOCUS)
        }
    }
}

/// Gives the window the size it had when last put away.
pub fn restore_size(app: &AppHandle) {
    let Some(window) = app.get_webview_window(MAIN_WINDOW) else {
        return;
    };
    if let Some(size) = app.state::<Preferences>().get().window_size {
        let logical = LogicalSize::new(f64::from(size.width), f64::from(size.height));
        if let Err(err) = window.set_size(logical) {
            tracing::debug!(error = %err, "cannot restore the window's size");
        }
    }
}

/// Shows and focuses the window; the first time, by the tray icon.
pub fn show(app: &AppHandle) {
    let Some(window) = app.get_webview_window(MAIN_WINDOW) else {
        return;
    };
    let _ = window.unminimize();
    let _ = window.show();
    // Placed once shown: a window never shown has no size yet to place by.
    if !app.state::<Popover>().placed.swap(true, Ordering::SeqCst) {
        let by_tray = window.move_window_constrained(Position::TrayCenter);
        if let Err(err) = by_tray {
            tracing::debug!(error = %err, "tray position unknown: the window goes top-right");
            if let Err(err) = place_top_right(&window) {
                tracing::debug!(error = %err, "cannot place the window");
            }
        }
    }
    let _ = window.set_focus();
}

/// Puts the window in its screen's top-right corner. (The positioner's own
/// corner placement goes by the outer size, which GTK does not know yet for
/// a window just mapped without a window manager; the inner size it does.)
fn place_top_right<R: Runtime>(window: &tauri::WebviewWindow<R>) -> tauri::Result<()> {
    let monitor = match window.current_monitor()? {
        Some(monitor) => monitor,
        None => match window.primary_monitor()? {
            Some(monitor) => monitor,
            None => return Ok(()),
        },
    };
    let (inner, outer) = (window.inner_size()?, window.outer_size()?);
    let width = i32::try_from(inner.width.max(outer.width)).unwrap_or(i32::MAX);
    let screen_width = i32::try_from(monitor.size().width).unwrap_or(i32::MAX);
    let corner = PhysicalPosition::new(
        monitor.position().x + screen_width.saturating_sub(width).max(0),
        monitor.position().y,
    );
    window.set_position(corner)
}

/// Shows the window with one pod's row open and in view.
pub fn show_pod(app: &AppHandle, pod_id: &str) {
    show(app);
    if let Err(err) = app.emit_to(MAIN_WINDOW, FOCUS_POD_EVENT, pod_id) {
        tracing::debug!(error = %err, "cannot point the window at the pod");
    }
}

/// Puts the window away, remembering its size for next time.
pub fn hide<R: Runtime>(window: &Window<R>) -> tauri::Result<()> {
    remember_size(window);
    window.hide()
}

/// Keeps the size of a window still open at Quit (hiding keeps it too).
pub fn remember_open_size(app: &AppHandle) {
    if let Some(window) = app.get_webview_window(MAIN_WINDOW) {
        if window.is_visible().unwrap_or(false) {
            remember_size(&window.as_ref().window());
        }
    }
}

/// Keeps the window's size for the next start.
fn remember_size<R: Runtime>(window: &Window<R>) {
    let (Ok(size), Ok(scale)) = (window.inner_size(), window.scale_factor()) else {
        return;
    };
    let logical = size.to_logical::<f64>(scale);
    // Whole logical pixels: what the window is given back.
    let size = WindowSize {
        width: logical.width.round() as u32,
        height: logical.height.round() as u32,
    };
    if size.width > 0 && size.height > 0 {
        window
            .state::<Preferences>()
            .update(|settings| settings.window_size = Some(size));
    }
}

/// The window's events: closing keeps the app in the tray; losing focus
/// puts the window away unless it is pinned.
pub fn on_event<R: Runtime>(window: &Window<R>, event: &WindowEvent) {
    match event {
        WindowEvent::CloseRequested { api, .. } => {
            api.prevent_close();
            let _ = hide(window);
        }
        WindowEvent::Focused(focused) => {
            let settled_loss = window.state::<Popover>().focus_changed(*focused);
            if settled_loss && !window.state::<Preferences>().get().pinned {
                let _ = hide(window);
            }
        }
        _ => {}
    }
}
