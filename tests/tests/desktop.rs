//! The tray app on a real (virtual) desktop: its window driven over WebDriver
//! (tauri-driver + WebKitWebDriver), its tray menu clicked with xdotool in a
//! tray host, and its notifications read off a private D-Bus session.
//! Screenshots of each step go to target/desktop-screenshots/.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use k3s_local_agent_e2e::desktop::{tray_binary, Desktop, SCREEN_WIDTH};
use k3s_local_agent_e2e::{
    greeting_server, read_from, refuses, refusing_port, serve_control_plane, wait_until, Sandbox,
    DEADLINE,
};
use serde_json::{json, Value};

fn screenshots() -> PathBuf {
    k3s_local_agent_e2e::agent_binary()
        .parent()
        .and_then(|debug| debug.parent())
        .map(|target| target.join("desktop-screenshots"))
        .unwrap_or_else(|| PathBuf::from("desktop-screenshots"))
}

/// A control plane stand-in that takes every report (so the app is not in demo mode).
fn control_plane() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    serve_control_plane(listener);
    addr
}

/// The app's settings for a test: its own agent port, files and port range.
fn app_args(
    sandbox: &Sandbox,
    agent_port: u16,
    range: &str,
    control_plane: SocketAddr,
) -> Vec<String> {
    vec![
        "--agent-port".into(),
        agent_port.to_string(),
        "--port-range".into(),
        range.into(),
        "--hosts-file".into(),
        sandbox.hosts_str(),
        "--state-dir".into(),
        sandbox.state_dir(),
        "--control-plane-url".into(),
        format!("http://{control_plane}"),
        "--no-cluster".into(),
    ]
}

/// Pushes pods to the app's agent as a control plane would.
async fn push(agent: &str, action: &str, pods: Value) -> Value {
    let http = reqwest::Client::new();
    let health: Value = http
        .get(format!("{agent}/health"))
        .send()
        .await
        .expect("agent up")
        .json()
        .await
        .expect("json");
    let response = http
        .post(format!("{agent}/api/v1/pods"))
        .json(&json!({"agent_id": health["agent_id"], "action": action, "pods": pods}))
        .send()
        .await
        .expect("push");
    assert_eq!(response.status(), 200);
    response.json().await.expect("json")
}

async fn status(agent: &str) -> Value {
    reqwest::get(format!("{agent}/api/v1/pods/status"))
        .await
        .expect("status")
        .json()
        .await
        .expect("json")
}

async fn port_of(agent: &str, id: &str) -> u16 {
    let status = status(agent).await;
    status["redirections"][id]["local_port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or_else(|| panic!("{id} has no port: {status}"))
}

/// Waits (async) until `check` holds, with the suite's deadline.
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(
        holds_within(DEADLINE, check).await,
        "timed out waiting for {what}"
    );
}

/// Whether `check` comes to hold within `limit`, asked every 50 ms: the one
/// async polling loop here, as `wait_until` is for the synchronous waits.
async fn holds_within<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    tokio::time::timeout(limit, async {
        while !check().await {
            poll.tick().await;
        }
    })
    .await
    .is_ok()
}

async fn shot(client: &Client, name: &str) {
    let png = client.screenshot().await.expect("screenshot");
    let dir = screenshots();
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    std::fs::write(dir.join(format!("{name}.png")), png).expect("save screenshot");
}

async fn row_state(client: &Client, id: &str) -> Option<String> {
    let row = client
        .find(Locator::Css(&format!("tr[data-pod-id=\"{id}\"]")))
        .await
        .ok()?;
    row.attr("data-state").await.ok().flatten()
}

/// Opens a row's details by clicking its name. The rows are drawn anew on
/// every snapshot, so a click that lands on a row just replaced is tried
/// again.
async fn open_details(client: &Client, id: &str) {
    let name = format!("tr[data-pod-id=\"{id}\"] .name");
    let open = format!("tr.open[data-pod-id=\"{id}\"]");
    eventually(&format!("the details of {id}"), || async {
        if client.find(Locator::Css(&open)).await.is_ok() {
            return true;
        }
        if let Ok(element) = client.find(Locator::Css(&name)).await {
            let _ = element.click().await;
        }
        client.find(Locator::Css(&open)).await.is_ok()
    })
    .await;
}

/// Clicks a row's forwarding switch until the agent has forwarding `on`.
/// A click is made again only when the agent still disagrees a few seconds
/// later: one that landed while the page was busy is lost, as a person's
/// would be, and they too would click again.
async fn switch_forwarding(client: &Client, agent: &str, id: &str, on: bool) {
    let slider = format!("tr[data-pod-id=\"{id}\"] .slider");
    let forwarding =
        || async { status(agent).await["redirections"][id]["forwarding"].as_bool() == Some(on) };
    for _ in 0..3 {
        if let Ok(element) = client.find(Locator::Css(&slider)).await {
            let _ = element.click().await;
        }
        if holds_within(Duration::from_secs(5), &forwarding).await {
            return;
        }
    }
    panic!("the switch of {id} did not set forwarding {on}");
}

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Fixed ports for each test's agent API (and its WebDriver), below the
/// kernel's ephemeral range (32768 and up), so no `bind(0)` or outgoing
/// connection of a test running beside it can take one first, as a port
/// found free and released could be.
const WINDOW_TEST_PORTS: u16 = 21440;
const MENU_TEST_PORTS: u16 = 21450;
const INSTANCE_TEST_PORTS: u16 = 21460;
const KILL_TEST_PORTS: u16 = 21480;

#[tokio::test(flavor = "multi_thread")]
async fn the_window_shows_pods_live_and_its_buttons_work() {
    let desktop = Desktop::start(110).expect("a private desktop");
    let sandbox = Sandbox::new().expect("sandbox");
    let agent_port = WINDOW_TEST_PORTS;
    let agent = format!("http://127.0.0.1:{agent_port}");
    let args = app_args(&sandbox, agent_port, "21400-21419", control_plane());

    let (driver_port, native_port) = (WINDOW_TEST_PORTS + 1, WINDOW_TEST_PORTS + 2);
    let driver = desktop
        .command("tauri-driver")
        .args([
            "--port",
            &driver_port.to_string(),
            "--native-port",
            &native_port.to_string(),
        ])
        .env("TAURI_WEBVIEW_AUTOMATION", "true")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect(
            "tauri-driver is installed (cargo install tauri-driver --locked; scripts/test does)",
        );
    let _driver = Driver(driver);
    // tauri-driver proxies to WebKitWebDriver: both must listen.
    wait_until("tauri-driver and WebKitWebDriver to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", driver_port)).is_ok()
            && std::net::TcpStream::connect(("127.0.0.1", native_port)).is_ok()
    })
    .expect("tauri-driver up");

    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "tauri:options".into(),
        json!({"application": tray_binary(), "args": args}),
    );
    capabilities.insert("browserName".into(), json!("wry"));
    let connecting = tokio::spawn(async move {
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{driver_port}"))
            .await
    });
    // The window starts hidden, WebDriver or not: while the session waits
    // for it, a person opens it from the tray menu ("Open dashboard", whose
    // mnemonic is d: one key, so a key lost on a busy machine never lands
    // on another item).
    tokio::task::block_in_place(|| {
        desktop.wait_for_tray_icon().expect("the tray icon");
        assert!(
            !desktop.window_visible("K3s Local Agent"),
            "the window starts hidden"
        );
        desktop
            .choose_in_tray_menu(&["d"], "the window to show", || {
                desktop.window_visible("K3s Local Agent")
            })
            .expect("Open dashboard shows the window");
    });
    let client = connecting
        .await
        .expect("the session task")
        .expect("a WebDriver session on the app");

    // A newcomer sees how to push a pod.
    let empty = client
        .wait()
        .at_most(DEADLINE)
        .for_element(Locator::Css("#empty"))
        .await
        .expect("the empty state");
    eventually("the empty state to show", || async {
        empty.is_displayed().await.unwrap_or(false)
    })
    .await;
    let curl_line = client
        .find(Locator::Css("#curl-line"))
        .await
        .expect("curl line")
        .text()
        .await
        .expect("text");
    // The example names this agent's own address: the window has no HTTP
    // origin to take it from.
    assert!(
        curl_line.contains(&format!("curl -X POST {agent}/api/v1/pods")),
        "{curl_line}"
    );
    shot(&client, "01-empty").await;

    // Pods pushed over HTTP appear as rows, by events, without a reload.
    let web = greeting_server("web page").expect("pod");
    let api = greeting_server("api answer").expect("pod");
    push(
        &agent,
        "create",
        json!([
            {"id": "web-1", "name": "web", "namespace": "staging", "status": "running", "ip": "127.0.0.1", "port": web.port()},
            {"id": "api-1", "name": "api", "namespace": "staging", "status": "running", "ip": "127.0.0.1", "port": api.port()},
        ]),
    )
    .await;
    let web_row = client
        .wait()
        .at_most(DEADLINE)
        .for_element(Locator::Css("tr[data-pod-id=\"web-1\"]"))
        .await
        .expect("the web row");
    // The window is tray-sized: a compact row per pod, its details (names,
    // ways in, Stop) opened by a click on the row.
    drop(web_row);
    open_details(&client, "web-1").await;
    // Every snapshot renders the rows anew: find the row again.
    let web_row = client
        .wait()
        .at_most(DEADLINE)
        .for_element(Locator::Css("tr.open[data-pod-id=\"web-1\"]"))
        .await
        .expect("the web row, open");
    let text = web_row.text().await.expect("row text");
    let web_port = port_of(&agent, "web-1").await;
    assert!(text.contains("web-staging.local"), "{text}");
    assert!(text.contains(&format!(":{web_port}")), "{text}");
    shot(&client, "02-rows").await;

    // The toggle closes the port, and opens it again.
    assert_eq!(read_from(web_port).expect("tunnel"), "web page");
    switch_forwarding(&client, &agent, "web-1", false).await;
    eventually("the row to show stopped", || async {
        row_state(&client, "web-1").await.as_deref() == Some("stopped")
    })
    .await;
    assert!(refuses(web_port), "a stopped tunnel refuses");
    shot(&client, "03-toggled-off").await;
    switch_forwarding(&client, &agent, "web-1", true).await;
    eventually("the row to show active", || async {
        row_state(&client, "web-1").await.as_deref() == Some("active")
    })
    .await;
    assert_eq!(read_from(web_port).expect("tunnel again"), "web page");

    // Stop removes the tunnel.
    let api_port = port_of(&agent, "api-1").await;
    open_details(&client, "api-1").await;
    client
        .find(Locator::Css("tr[data-pod-id=\"api-1\"] button.stop"))
        .await
        .expect("stop button")
        .click()
        .await
        .expect("click");
    eventually("the api row to go", || async {
        client
            .find_all(Locator::Css("tr[data-pod-id=\"api-1\"]"))
            .await
            .is_ok_and(|rows| rows.is_empty())
    })
    .await;
    assert!(refuses(api_port));
    assert!(status(&agent).await["redirections"].get("api-1").is_none());

    // A failing upstream shows the failed state with its reason.
    let (_reserved, dead) = refusing_port();
    push(
        &agent,
        "create",
        json!([{"id": "dead-1", "name": "dead", "ip": "127.0.0.1", "port": dead}]),
    )
    .await;
    let dead_port = port_of(&agent, "dead-1").await;
    let _ = read_from(dead_port);
    open_details(&client, "dead-1").await;
    let error = client
        .wait()
        .at_most(DEADLINE)
        .for_element(Locator::Css("tr[data-pod-id=\"dead-1\"] .error-text"))
        .await
        .expect("the error shows");
    let reason = error.text().await.expect("text");
    assert!(reason.contains("refused"), "{reason}");
    shot(&client, "04-failing").await;

    // Notifications went out over D-Bus for what happened, coalesced: what
    // lasted (the dead pod broken), each said once; a tunnel turned back on
    // is not news. (That a pod failing within two seconds of coming is one
    // notice, not two, depends on this machine's speed here: notices.rs
    // tests it on a clock of its own.)
    eventually("the notifications", || async {
        desktop
            .notifications()
            .iter()
            .any(|n| n.summary == "Tunnel broken: dead" && n.body.contains("refused"))
    })
    .await;
    let seen = desktop.notifications();
    for summary in ["Tunnel up: web", "Tunnel broken: dead"] {
        assert!(
            seen.iter().filter(|n| n.summary == summary).count() <= 1,
            "{summary} said more than once: {seen:?}"
        );
    }
    assert!(desktop
        .notifications()
        .iter()
        .all(|n| n.app == "K3s Local Agent"));
    desktop
        .screenshot(&screenshots().join("05-desktop.png"))
        .expect("desktop screenshot");

    // Escape puts the window away, as a popover goes.
    client
        .find(Locator::Css("body"))
        .await
        .expect("the page")
        .send_keys("\u{e00c}")
        .await
        .expect("press Escape");
    eventually("the window to hide", || async {
        !desktop.window_visible("K3s Local Agent")
    })
    .await;

    // A click on a notice about one pod brings the window back at that
    // pod: its details open and its row holding the keyboard. (The
    // notification daemon invokes the notice's default action, as a click
    // on it does.)
    desktop.dunstctl(&["close-all"]).expect("clear the notices");
    let late = greeting_server("late").expect("pod");
    push(
        &agent,
        "create",
        json!([{"id": "late-1", "name": "late", "ip": "127.0.0.1", "port": late.port()}]),
    )
    .await;
    eventually("the notice for late", || async {
        desktop
            .notifications()
            .iter()
            .any(|n| n.summary == "Tunnel up: late")
    })
    .await;
    desktop
        .dunstctl(&["action", "0"])
        .expect("click the notice");
    eventually("the window to come back", || async {
        desktop.window_visible("K3s Local Agent")
    })
    .await;
    client
        .wait()
        .at_most(DEADLINE)
        .for_element(Locator::Css("tr.open[data-pod-id=\"late-1\"]"))
        .await
        .expect("the pod's details open");
    eventually("the pod's row to hold the keyboard", || async {
        client
            .execute(
                "return document.activeElement && document.activeElement.dataset.podId",
                vec![],
            )
            .await
            .is_ok_and(|id| id == json!("late-1"))
    })
    .await;
    shot(&client, "06-notice-clicked").await;
    client.close().await.expect("end the session");
}

#[test]
fn the_tray_menu_lists_toggles_opens_and_quits() {
    let desktop = Desktop::start(140).expect("a private desktop");
    let sandbox = Sandbox::new().expect("sandbox");
    let agent_port = MENU_TEST_PORTS;
    let agent = format!("http://127.0.0.1:{agent_port}");
    let args = app_args(&sandbox, agent_port, "21420-21439", control_plane());
    let mut app = desktop
        .command(tray_binary())
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the app starts");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    wait_until("the agent in the app", || {
        std::net::TcpStream::connect(("127.0.0.1", agent_port)).is_ok()
    })
    .expect("agent up");
    let pod = greeting_server("through the tray").expect("pod");
    runtime.block_on(push(
        &agent,
        "create",
        json!([{"id": "one", "name": "one", "ip": "127.0.0.1", "port": pod.port()}]),
    ));
    let port = runtime.block_on(port_of(&agent, "one"));
    assert_eq!(read_from(port).expect("tunnel"), "through the tray");
    assert!(
        !desktop.window_visible("K3s Local Agent"),
        "the window starts hidden"
    );
    // The icon is in the tray host.
    desktop.wait_for_tray_icon().expect("the icon in the tray");
    desktop
        .screenshot(&screenshots().join("10-tray.png"))
        .expect("screenshot");

    // The first item of the menu is the tunnel: choosing it turns it off...
    desktop.open_tray_menu().expect("the menu opens, drawn");
    desktop
        .screenshot(&screenshots().join("12-menu.png"))
        .expect("screenshot");
    desktop.close_menus().expect("the menu closes");
    desktop
        .choose_in_tray_menu(&["Down", "Return"], "the tunnel to stop", || refuses(port))
        .expect("toggled off from the tray");
    // ...and on again.
    desktop
        .choose_in_tray_menu(&["Down", "Return"], "the tunnel to forward", || {
            read_from(port).is_ok_and(|t| t == "through the tray")
        })
        .expect("toggled on from the tray");

    // "Open dashboard" (d).
    desktop
        .choose_in_tray_menu(&["d"], "the dashboard window", || {
            desktop.window_visible("K3s Local Agent")
        })
        .expect("Open dashboard shows the window");
    // Hidden since start, the window must still draw its page when shown.
    let window = desktop
        .wait_for_drawn_window("K3s Local Agent")
        .expect("the shown window draws its page");
    desktop
        .screenshot(&screenshots().join("11-dashboard.png"))
        .expect("screenshot");
    // Placed by the tray the first time: where the tray does not say where
    // it is (Linux), at the screen's top-right corner.
    let geometry = desktop.window_geometry(&window).expect("geometry");
    let (x, y, width, _) = geometry;
    assert_eq!(
        (x + width, y),
        (SCREEN_WIDTH, 0),
        "the window sits top-right: {geometry:?}"
    );

    // Unpinned, the window goes away when another window takes the focus,
    // as a popover does.
    desktop.focus_window(&window).expect("focus the window");
    desktop.focus_elsewhere().expect("focus the tray host");
    wait_until("the unpinned window to hide", || {
        !desktop.window_visible("K3s Local Agent")
    })
    .expect("a popover hides on focus loss");

    // "Pin window" (p) keeps it open, and is kept.
    let settings = std::path::Path::new(&sandbox.state_dir()).join("desktop.json");
    desktop
        .choose_in_tray_menu(&["p"], "the pin to be saved", || {
            std::fs::read_to_string(&settings).is_ok_and(|t| t.contains("\"pinned\": true"))
        })
        .expect("pinned");
    desktop
        .choose_in_tray_menu(&["d"], "the dashboard window", || {
            desktop.window_visible("K3s Local Agent")
        })
        .expect("Open dashboard shows the window again");
    desktop.focus_window(&window).expect("focus the window");
    desktop.focus_elsewhere().expect("focus the tray host");

    // Mute (m) silences notifications, and is kept.
    desktop
        .choose_in_tray_menu(&["m"], "the mute setting to be saved", || {
            std::fs::read_to_string(&settings)
                .is_ok_and(|t| t.contains("\"notifications_muted\": true"))
        })
        .expect("muted");
    // The app took the menu's keys after the focus moved: a pinned window
    // that was to hide would have hidden by now.
    assert!(
        desktop.window_visible("K3s Local Agent"),
        "a pinned window stays when it loses focus"
    );
    let two = greeting_server("two").expect("pod");
    runtime.block_on(push(
        &agent,
        "create",
        json!([{"id": "two", "name": "two", "ip": "127.0.0.1", "port": two.port()}]),
    ));
    desktop
        .choose_in_tray_menu(&["m"], "the unmute to be saved", || {
            std::fs::read_to_string(&settings)
                .is_ok_and(|t| t.contains("\"notifications_muted\": false"))
        })
        .expect("unmuted");
    let three = greeting_server("three").expect("pod");
    runtime.block_on(push(
        &agent,
        "create",
        json!([{"id": "three", "name": "three", "ip": "127.0.0.1", "port": three.port()}]),
    ));
    wait_until("the notice for three", || {
        desktop
            .notifications()
            .iter()
            .any(|n| n.summary == "Tunnel up: three")
    })
    .expect("unmuted notices show");
    // Notices go out in order: "two" came while muted and never showed.
    assert!(
        !desktop
            .notifications()
            .iter()
            .any(|n| n.summary == "Tunnel up: two"),
        "{:?}",
        desktop.notifications()
    );

    // Pause all (u) closes every port; then Resume all (u).
    let ports = [
        port,
        runtime.block_on(port_of(&agent, "two")),
        runtime.block_on(port_of(&agent, "three")),
    ];
    desktop
        .choose_in_tray_menu(&["u"], "every tunnel to pause", || {
            ports.iter().all(|p| refuses(*p))
        })
        .expect("paused");
    desktop
        .choose_in_tray_menu(&["u"], "every tunnel to resume", || {
            ports.iter().all(|p| !refuses(*p))
        })
        .expect("resumed");

    // A pod with several ports: its line opens a submenu, the pod's toggle
    // first, then a line per port.
    let metrics = greeting_server("metrics through the tray").expect("pod");
    runtime.block_on(push(
        &agent,
        "update",
        json!([{"id": "one", "name": "one", "ip": "127.0.0.1",
                "ports": [pod.port(), {"name": "metrics", "port": metrics.port()}]}]),
    ));
    let metrics_port = runtime.block_on(async {
        let tunnel = &status(&agent).await["redirections"]["one"];
        tunnel["ports"][1]["local_port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or_else(|| panic!("the metrics port listens: {tunnel}"))
    });
    assert_eq!(
        read_from(metrics_port).expect("metrics tunnel"),
        "metrics through the tray"
    );
    let submenu = desktop
        .open_tray_submenu(&["Down", "Right"])
        .expect("the pod's ports submenu opens");
    desktop
        .screenshot(&screenshots().join("14-ports-submenu.png"))
        .expect("screenshot");
    assert!(!submenu.is_empty());
    desktop.close_menus().expect("the menus close");
    desktop
        .choose_in_tray_menu(
            &["Down", "Right", "Return"],
            "every port of one to stop",
            || refuses(port) && refuses(metrics_port),
        )
        .expect("the pod's toggle turns all its ports off");
    desktop
        .choose_in_tray_menu(
            &["Down", "Right", "Return"],
            "every port of one to forward",
            || {
                read_from(port).is_ok_and(|t| t == "through the tray")
                    && read_from(metrics_port).is_ok_and(|t| t == "metrics through the tray")
            },
        )
        .expect("and on again");

    // Quit (q): the agent stops cleanly.
    assert!(sandbox.hosts_text().contains("one-staging.local"));
    let mut status = None;
    desktop
        .choose_in_tray_menu(&["q"], "the app to quit", || {
            status = status.or_else(|| app.try_wait().expect("wait"));
            status.is_some()
        })
        .expect("Quit ends the app");
    let status = status.expect("the app ended");
    assert!(status.success(), "{status}");
    assert!(refuses(port));
    assert!(
        !sandbox.hosts_text().contains("one-staging.local"),
        "names removed on quit"
    );
}

#[test]
fn a_second_launch_shows_the_first_and_start_at_login_is_remembered() {
    let desktop = Desktop::start(170).expect("a private desktop");
    let sandbox = Sandbox::new().expect("sandbox");
    let config_home = sandbox.dir.path().join("config");
    let agent_port = INSTANCE_TEST_PORTS;
    let args = app_args(&sandbox, agent_port, "21470-21479", control_plane());
    let launch = || {
        let mut command = desktop.command(tray_binary());
        command
            .args(&args)
            .env("XDG_CONFIG_HOME", &config_home)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    };
    let mut first = launch().spawn().expect("the app starts");
    wait_until("the agent in the app", || {
        std::net::TcpStream::connect(("127.0.0.1", agent_port)).is_ok()
    })
    .expect("agent up");
    // Wait for the tray icon too: the app has finished setting up.
    desktop.wait_for_tray_icon().expect("the tray icon");
    assert!(
        !desktop.window_visible("K3s Local Agent"),
        "the window starts hidden"
    );

    // A second launch (the app menu's entry, clicked again) hands over to
    // the running app and ends with success; the first one's window shows.
    let mut second = launch().spawn().expect("the second launch starts");
    let mut exited = None;
    wait_until("the second launch to exit", || {
        exited = second.try_wait().expect("wait");
        exited.is_some()
    })
    .expect("the second launch exits");
    let status = exited.expect("an exit status");
    assert!(status.success(), "the second launch exits 0: {status}");
    let window = desktop
        .wait_for_drawn_window("K3s Local Agent")
        .expect("the running app shows its window, drawn");
    assert!(
        first.try_wait().expect("wait").is_none(),
        "the first app keeps running"
    );
    desktop
        .screenshot(&screenshots().join("13-second-launch.png"))
        .expect("screenshot");
    // The user makes the window bigger: the next start gives that size back.
    desktop
        .xdotool(&["windowsize", &window, "520", "700"])
        .expect("resize the window");
    wait_until("the window to take its new size", || {
        desktop
            .window_geometry(&window)
            .is_ok_and(|(_, _, width, height)| (width, height) == (520, 700))
    })
    .expect("resized");

    // "Start at login" (s) writes the XDG autostart entry that runs this
    // app; choosing it again removes it.
    let entry = config_home.join("autostart/k3s-local-agent.desktop");
    desktop
        .choose_in_tray_menu(&["s"], "the autostart entry", || entry.is_file())
        .expect("start at login on");
    let text = std::fs::read_to_string(&entry).expect("read the entry");
    assert!(
        text.contains(&format!("\nExec={}\n", tray_binary().display())),
        "{text}"
    );
    desktop
        .choose_in_tray_menu(&["s"], "the autostart entry to go", || !entry.exists())
        .expect("start at login off");

    desktop
        .choose_in_tray_menu(&["q"], "the app to quit", || {
            first.try_wait().expect("wait").is_some()
        })
        .expect("quit");

    // Started again, and shown (by a second launch): the size it was left at.
    let mut again = launch().spawn().expect("the app starts again");
    desktop.wait_for_tray_icon().expect("the tray icon");
    let mut shower = launch().spawn().expect("a second launch");
    let mut status = None;
    wait_until("the second launch to hand over", || {
        status = shower.try_wait().expect("wait");
        status.is_some()
    })
    .expect("the second launch ends");
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let window = desktop
        .wait_for_drawn_window("K3s Local Agent")
        .expect("the window shows");
    let (_, _, width, height) = desktop.window_geometry(&window).expect("geometry");
    assert_eq!((width, height), (520, 700), "the size is remembered");
    desktop
        .choose_in_tray_menu(&["q"], "the app to quit", || {
            again.try_wait().expect("wait").is_some()
        })
        .expect("quit");
}

/// Every port's range port and toggle, by pod and staging port.
fn ports_and_toggles(status: &Value) -> Vec<(String, u64, u64, bool)> {
    let mut seen = Vec::new();
    for (id, tunnel) in status["redirections"].as_object().into_iter().flatten() {
        for port in tunnel["ports"].as_array().into_iter().flatten() {
            seen.push((
                id.clone(),
                port["staging_port"].as_u64().unwrap_or_default(),
                port["local_port"].as_u64().unwrap_or_default(),
                port["forwarding"].as_bool().unwrap_or_default(),
            ));
        }
    }
    seen.sort();
    seen
}

/// The names in our block of the hosts file.
fn named(hosts: &str) -> Vec<String> {
    let mut names: Vec<String> = hosts
        .lines()
        .skip_while(|line| !line.starts_with("# BEGIN k3s-local-agent"))
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split_whitespace().nth(1))
        .map(str::to_owned)
        .collect();
    names.sort();
    names
}

#[test]
fn the_tray_app_killed_outright_comes_back_with_every_port_toggle_and_name() {
    let desktop = Desktop::start(200).expect("a private desktop");
    let sandbox = Sandbox::new().expect("sandbox");
    let agent_port = KILL_TEST_PORTS;
    let agent = format!("http://127.0.0.1:{agent_port}");
    let args = app_args(&sandbox, agent_port, "21620-21629", control_plane());
    let launch = || {
        let mut command = desktop.command(tray_binary());
        command
            .args(&args)
            .env("XDG_CONFIG_HOME", sandbox.dir.path().join("config"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command.spawn().expect("the app starts")
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut app = launch();
    wait_until("the agent in the app", || {
        std::net::TcpStream::connect(("127.0.0.1", agent_port)).is_ok()
    })
    .expect("agent up");
    desktop.wait_for_tray_icon().expect("the tray icon");

    let web = greeting_server("web after the crash").expect("pod");
    let metrics = greeting_server("metrics after the crash").expect("pod");
    let paused = greeting_server("paused after the crash").expect("pod");
    runtime.block_on(push(
        &agent,
        "create",
        json!([
            {"id": "web-1", "name": "web", "ip": "127.0.0.1",
             "ports": [web.port(), {"name": "metrics", "port": metrics.port()}]},
            {"id": "paused-1", "name": "paused", "ip": "127.0.0.1", "port": paused.port()},
        ]),
    ));
    // One pod off, through the tray's own agent.
    let off = runtime.block_on(
        reqwest::Client::new()
            .post(format!("{agent}/api/v1/pods/paused-1/forwarding"))
            .json(&json!({"enabled": false}))
            .send(),
    );
    assert_eq!(off.expect("toggle").status(), 200);
    let before = runtime.block_on(status(&agent));
    let ports_before = ports_and_toggles(&before);
    assert_eq!(ports_before.len(), 3, "{before}");
    let web_port = runtime.block_on(port_of(&agent, "web-1"));
    let paused_port = runtime.block_on(port_of(&agent, "paused-1"));
    assert_eq!(read_from(web_port).expect("web"), "web after the crash");
    assert!(refuses(paused_port));
    let names_before = named(&sandbox.hosts_text());
    assert!(
        names_before.contains(&"web-staging.local".to_owned())
            && !names_before.iter().any(|name| name.starts_with("paused-")),
        "web named, the paused pod not: {names_before:?}"
    );

    // Killed outright: nothing of its own shutdown runs.
    app.kill().expect("kill -9 the app");
    app.wait().expect("reaped");
    assert!(refuses(web_port), "its ports died with it");

    let mut again = launch();
    wait_until("the agent in the app again", || {
        std::net::TcpStream::connect(("127.0.0.1", agent_port)).is_ok()
    })
    .expect("agent up again");
    desktop.wait_for_tray_icon().expect("the tray icon again");
    let after = runtime.block_on(status(&agent));
    assert_eq!(
        ports_and_toggles(&after),
        ports_before,
        "every port and toggle comes back: {after}"
    );
    wait_until("the tunnels to answer again", || {
        read_from(web_port).is_ok_and(|text| text == "web after the crash")
    })
    .expect("web answers on its old port");
    let metrics_port = after["redirections"]["web-1"]["ports"][1]["local_port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .expect("metrics port");
    assert_eq!(
        read_from(metrics_port).expect("metrics"),
        "metrics after the crash"
    );
    assert!(refuses(paused_port), "the paused pod stays off");
    let hosts = sandbox.hosts_text();
    assert_eq!(
        named(&hosts),
        names_before,
        "the names block is right: {hosts}"
    );
    assert_eq!(
        hosts.matches("# BEGIN k3s-local-agent").count(),
        1,
        "one block: {hosts}"
    );
    desktop
        .choose_in_tray_menu(&["q"], "the app to quit", || {
            again.try_wait().expect("wait").is_some()
        })
        .expect("quit");
}
