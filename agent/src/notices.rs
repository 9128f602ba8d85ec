//! What the desktop tells the user: the tray's health at a glance, and which
//! changes deserve a notification (tunnels coming up, tunnels breaking with the
//! reason, the control plane going away and coming back). Notices come from
//! comparing two snapshots, so they are the same whatever caused the change,
//! and a push of many pods gives one summary rather than one per pod. The tray
//! app shows these; this module decides them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::model::{PodView, Protocol, Snapshot, TunnelState};

/// Changes closer together than this make one notice: what they add up to.
pub const COALESCE: Duration = Duration::from_secs(2);

/// More tunnels than this changing at once are summarised in one notice.
pub const SUMMARY_THRESHOLD: usize = 3;

/// One desktop notification. Its text is plain text, as written: the
/// summary holds only our words and pod names (DNS-1123 labels, which carry
/// no markup), the body may hold what a pod, the staging API or the control
/// plane said. A server that reads the body as markup gets
/// [`Notice::body_markup`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub summary: String,
    pub body: String,
    /// Problems stay on screen longer than good news.
    pub urgent: bool,
    /// The one pod it is about, if it is about one (a click on it then
    /// shows that pod).
    pub pod_id: Option<String>,
}

impl Notice {
    /// The body for a notification server that reads it as markup (the
    /// freedesktop spec's `body-markup`: `<b>`, `<i>`, `<a href>`, `<img>`).
    /// Error text comes from outside (an API server's message, a pod's
    /// refusal): escaped, it is shown as written, never turned into a link
    /// to click or an image the server fetches.
    pub fn body_markup(&self) -> String {
        escape_markup(&self.body)
    }
}

/// `text` with `&`, `<` and `>` escaped for notification body markup.
pub fn escape_markup(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

/// The tray icon's one-word state, worst first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Glance {
    /// The control plane does not take our reports.
    ControlPlaneUnreachable,
    /// At least one tunnel is failed or cannot reach its pod.
    SomeFailing,
    /// Every tunnel that should forward does.
    AllUp,
    /// Nothing to show yet.
    NoPods,
}

impl Glance {
    pub fn of(snapshot: &Snapshot) -> Self {
        if snapshot.health.control_plane.reachable == Some(false) {
            Self::ControlPlaneUnreachable
        } else if snapshot
            .pods
            .iter()
            .any(|v| matches!(health_of(v), Health::Broken(_)))
        {
            Self::SomeFailing
        } else if snapshot.pods.is_empty() {
            Self::NoPods
        } else {
            Self::AllUp
        }
    }

    /// A tooltip line for the tray.
    pub fn describe(self, snapshot: &Snapshot) -> String {
        let active = snapshot
            .pods
            .iter()
            .filter(|v| health_of(v) == Health::Up)
            .count();
        let total = snapshot.pods.len();
        match self {
            Self::ControlPlaneUnreachable => {
                format!("K3s Local Agent: control plane unreachable; {active}/{total} tunnels up")
            }
            Self::SomeFailing => {
                format!("K3s Local Agent: {active}/{total} tunnels up, some failing")
            }
            Self::AllUp => format!("K3s Local Agent: all {total} tunnels up"),
            Self::NoPods => "K3s Local Agent: no pods yet".to_owned(),
        }
    }
}

/// How a tunnel looks for notification purposes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Health {
    Up,
    Broken(String),
    Off,
}

fn health_of(view: &PodView) -> Health {
    match (view.tunnel.status, &view.tunnel.error) {
        (TunnelState::Failed, error) => Health::Broken(error.clone().unwrap_or_default()),
        (TunnelState::Active, Some(error)) => Health::Broken(error.clone()),
        (TunnelState::Active, None) => other_port_broken(view).map_or(Health::Up, Health::Broken),
        (TunnelState::Stopped, _) => Health::Off,
    }
}

/// The first of the pod's other tunnelled ports that is on and broken,
/// named by its port: a broken `metrics` port is news too.
fn other_port_broken(view: &PodView) -> Option<String> {
    view.tunnel
        .ports
        .iter()
        .filter(|port| port.protocol == Protocol::Tcp && port.forwarding)
        .filter(|port| port.staging_port != view.tunnel.staging_port)
        .find_map(|port| {
            let error = port.error.as_ref()?;
            let name = port
                .name
                .as_ref()
                .map_or_else(String::new, |name| format!(" ({name})"));
            Some(format!("port {}{name}: {error}", port.staging_port))
        })
}

fn address(view: &PodView) -> String {
    match view.tunnel.local_port {
        Some(port) => format!("{}:{port}", view.tunnel.localhost_name),
        None => view.tunnel.localhost_name.clone(),
    }
}

/// The notices for going from `before` to `after` (`None`: the first snapshot,
/// when everything already up is not news).
pub fn between(before: Option<&Snapshot>, after: &Snapshot) -> Vec<Notice> {
    let Some(before) = before else {
        return Vec::new();
    };
    let old: BTreeMap<&str, Health> = before
        .pods
        .iter()
        .map(|v| (v.pod.id.as_str(), health_of(v)))
        .collect();
    let mut came_up = Vec::new();
    let mut broke = Vec::new();
    for view in &after.pods {
        let now = health_of(view);
        let was = old.get(view.pod.id.as_str());
        match (&now, was) {
            (Health::Up, Some(Health::Up)) => {}
            // Turned back on by the user: not a new tunnel, not news.
            (Health::Up, Some(Health::Off)) => {}
            (Health::Up, _) => came_up.push(view),
            (Health::Broken(reason), Some(Health::Broken(old_reason))) if reason == old_reason => {}
            (Health::Broken(reason), _) => broke.push((view, reason.clone())),
            (Health::Off, _) => {}
        }
    }

    let mut notices = Vec::new();
    match came_up.as_slice() {
        [] => {}
        few if few.len() <= SUMMARY_THRESHOLD => {
            for view in few {
                notices.push(Notice {
                    summary: format!("Tunnel up: {}", view.pod.name),
                    body: format!("http://{}/", address(view)),
                    urgent: false,
                    pod_id: Some(view.pod.id.clone()),
                });
            }
        }
        many => notices.push(Notice {
            summary: format!("{} tunnels up", many.len()),
            body: many
                .iter()
                .map(|v| v.pod.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            urgent: false,
            pod_id: None,
        }),
    }
    match broke.as_slice() {
        [] => {}
        few if few.len() <= SUMMARY_THRESHOLD => {
            for (view, reason) in few {
                notices.push(Notice {
                    summary: format!("Tunnel broken: {}", view.pod.name),
                    body: reason.clone(),
                    urgent: true,
                    pod_id: Some(view.pod.id.clone()),
                });
            }
        }
        many => notices.push(Notice {
            summary: format!("{} tunnels broken", many.len()),
            body: many
                .iter()
                .map(|(v, _)| v.pod.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            urgent: true,
            pod_id: None,
        }),
    }

    let was_reachable = before.health.control_plane.reachable;
    let now_reachable = after.health.control_plane.reachable;
    match (was_reachable, now_reachable) {
        (Some(true) | None, Some(false)) => notices.push(Notice {
            summary: "Control plane unreachable".to_owned(),
            body: format!(
                "{}: {}. Tunnels keep working; reports resume when it is back.",
                after.health.control_plane.url,
                after
                    .health
                    .control_plane
                    .last_error
                    .as_deref()
                    .unwrap_or("no answer")
            ),
            urgent: true,
            pod_id: None,
        }),
        (Some(false), Some(true)) => notices.push(Notice {
            summary: "Control plane reachable again".to_owned(),
            body: after.health.control_plane.url.clone(),
            urgent: false,
            pod_id: None,
        }),
        _ => {}
    }
    notices
}

/// Holds notices back for [`COALESCE`] after the first change, then tells
/// what the changes added up to: a pod that fails right after it appears is
/// one "broken" notice, not "up" and then "broken"; a flapping tunnel that
/// ends as it began says nothing. Time is given, not read, so tests are
/// exact.
#[derive(Debug, Default)]
pub struct Coalescer {
    /// What the user was last told about (or the first snapshot seen).
    told: Option<Snapshot>,
    /// The latest snapshot, not yet told.
    latest: Option<Snapshot>,
    /// When the first untold change arrived.
    since: Option<Instant>,
}

impl Coalescer {
    /// Takes a new snapshot at `now`; returns what is due now.
    pub fn observe(&mut self, snapshot: Snapshot, now: Instant) -> Vec<Notice> {
        if self.told.is_none() {
            // The first snapshot: what is already up is not news.
            self.told = Some(snapshot);
            return Vec::new();
        }
        self.latest = Some(snapshot);
        self.since.get_or_insert(now);
        self.flush(now)
    }

    /// Takes a snapshot as told without telling it (notifications muted):
    /// what changed meanwhile is never announced later.
    pub fn absorb(&mut self, snapshot: Snapshot) {
        self.told = Some(snapshot);
        self.latest = None;
        self.since = None;
    }

    /// When the held notices are due (`None`: nothing held).
    pub fn due(&self) -> Option<Instant> {
        self.since.map(|since| since + COALESCE)
    }

    /// The notices for the changes held, once [`COALESCE`] has passed.
    pub fn flush(&mut self, now: Instant) -> Vec<Notice> {
        match self.due() {
            Some(due) if now >= due => {}
            _ => return Vec::new(),
        }
        let Some(latest) = self.latest.take() else {
            return Vec::new();
        };
        self.since = None;
        let notices = between(self.told.as_ref(), &latest);
        self.told = Some(latest);
        notices
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        parse_pod, ControlPlaneHealth, HealthResponse, NamesHealth, PodView, Redirection,
    };
    use chrono::Utc;

    fn view(id: &str, status: TunnelState, error: Option<&str>) -> PodView {
        let pod = parse_pod(
            0,
            serde_json::json!({"id": id, "name": id, "ip": "127.0.0.1", "port": 80}),
        )
        .expect("pod");
        let tunnel = Redirection {
            staging_pod_id: id.into(),
            staging_pod_name: id.into(),
            staging_pod_ip: pod.ip,
            staging_port: 80,
            local_port: Some(8085),
            local_host: "localhost".into(),
            dns_name: pod.dns_name(),
            localhost_name: pod.localhost_name(),
            status,
            error: error.map(str::to_owned),
            forwarding: status != TunnelState::Stopped,
            target: crate::model::TunnelTarget::Staging,
            via: crate::model::StagingVia::Direct,
            way: crate::model::Way::Direct,
            way_label: crate::model::Way::Direct.describe().to_owned(),
            namespace: String::new(),
            pod_status: String::new(),
            open_connections: 0,
            total_connections: 0,
            bytes_to_pod: 0,
            bytes_from_pod: 0,
            last_error: None,
            last_error_at: None,
            port_note: None,
            mirror: None,
            address: None,
            name_port: None,
            name_port_error: None,
            name_url: None,
            names: Vec::new(),
            name_note: None,
            ports: Vec::new(),
        };
        PodView {
            pod,
            tunnel,
            activity: Default::default(),
        }
    }

    fn snapshot(pods: Vec<PodView>, reachable: Option<bool>) -> Snapshot {
        Snapshot {
            health: HealthResponse {
                status: "healthy".into(),
                agent_id: "a".into(),
                pid: 1,
                timestamp: Utc::now(),
                pod_count: pods.len(),
                version: "0".into(),
                demo: false,
                api_url: "http://127.0.0.1:8082".into(),
                names: NamesHealth {
                    hosts_file: "/etc/hosts".into(),
                    system_wide: true,
                    mode: crate::model::NamesMode::SystemHosts,
                    why: String::new(),
                    warning: None,
                },
                forwarding: true,
                control_plane: ControlPlaneHealth {
                    url: "http://cp".into(),
                    reachable,
                    last_sync: None,
                    last_error: Some("connection refused".into()),
                },
                cluster_status: "disabled".into(),
                cluster_reason: None,
                staging: None,
            },
            pods,
            ports: Default::default(),
        }
    }

    #[test]
    fn the_glance_shows_the_worst() {
        let up = view("a", TunnelState::Active, None);
        let broken = view(
            "b",
            TunnelState::Failed,
            Some("no available ports in range 1-2"),
        );
        assert_eq!(Glance::of(&snapshot(vec![], Some(true))), Glance::NoPods);
        assert_eq!(
            Glance::of(&snapshot(vec![up.clone()], Some(true))),
            Glance::AllUp
        );
        let failing = snapshot(vec![up.clone(), broken.clone()], Some(true));
        assert_eq!(Glance::of(&failing), Glance::SomeFailing);
        assert!(Glance::SomeFailing.describe(&failing).contains("1/2"));
        assert_eq!(
            Glance::of(&snapshot(vec![up, broken], Some(false))),
            Glance::ControlPlaneUnreachable
        );
    }

    #[test]
    fn a_pod_that_fails_right_after_it_appears_is_one_broken_notice() {
        let start = Instant::now();
        let mut coalescer = Coalescer::default();
        assert!(coalescer
            .observe(snapshot(vec![], Some(true)), start)
            .is_empty());
        let up = snapshot(vec![view("a", TunnelState::Active, None)], Some(true));
        assert!(coalescer.observe(up, start).is_empty(), "held back");
        let failing = snapshot(
            vec![view("a", TunnelState::Active, Some("connection refused"))],
            Some(true),
        );
        let half = start + COALESCE / 2;
        assert!(coalescer.observe(failing, half).is_empty(), "still held");
        assert_eq!(coalescer.due(), Some(start + COALESCE));
        let told = coalescer.flush(start + COALESCE);
        assert_eq!(told.len(), 1, "{told:?}");
        assert_eq!(told[0].summary, "Tunnel broken: a");
        assert!(told[0].urgent);
        assert_eq!(coalescer.due(), None);
    }

    #[test]
    fn turning_a_tunnel_back_on_is_not_announced() {
        let start = Instant::now();
        let mut coalescer = Coalescer::default();
        let up = || snapshot(vec![view("a", TunnelState::Active, None)], Some(true));
        coalescer.observe(up(), start);
        let off = snapshot(vec![view("a", TunnelState::Stopped, None)], Some(true));
        coalescer.observe(off, start);
        assert!(coalescer.flush(start + COALESCE).is_empty());
        // Off for a while, then on again: still not a new tunnel.
        let later = start + COALESCE * 5;
        coalescer.observe(up(), later);
        assert!(coalescer.flush(later + COALESCE).is_empty());
        // A brand-new pod is news.
        let both = snapshot(
            vec![
                view("a", TunnelState::Active, None),
                view("b", TunnelState::Active, None),
            ],
            Some(true),
        );
        let later = later + COALESCE * 5;
        coalescer.observe(both, later);
        let told = coalescer.flush(later + COALESCE);
        assert_eq!(told.len(), 1, "{told:?}");
        assert_eq!(told[0].summary, "Tunnel up: b");
    }

    #[test]
    fn what_changes_while_muted_is_never_told() {
        let start = Instant::now();
        let mut coalescer = Coalescer::default();
        coalescer.observe(snapshot(vec![], Some(true)), start);
        let two = snapshot(vec![view("two", TunnelState::Active, None)], Some(true));
        coalescer.absorb(two);
        let three = snapshot(
            vec![
                view("two", TunnelState::Active, None),
                view("three", TunnelState::Active, None),
            ],
            Some(true),
        );
        coalescer.observe(three, start);
        let told = coalescer.flush(start + COALESCE);
        assert_eq!(told.len(), 1, "{told:?}");
        assert_eq!(told[0].summary, "Tunnel up: three");
    }

    #[test]
    fn the_first_snapshot_is_not_news() {
        let now = snapshot(vec![view("a", TunnelState::Active, None)], Some(true));
        assert!(between(None, &now).is_empty());
    }

    #[test]
    fn a_pod_whose_other_port_breaks_is_told_with_that_port() {
        let with_metrics = |error: Option<&str>| {
            let mut pod = view("a", TunnelState::Active, None);
            let port = |staging_port: u16, name: &str, error: Option<&str>| {
                let spec = crate::model::PortSpec {
                    name: Some(name.into()),
                    ..crate::model::PortSpec::tcp(staging_port)
                };
                crate::model::PortTunnelView {
                    local_port: Some(8086),
                    forwarding: true,
                    status: TunnelState::Active,
                    error: error.map(str::to_owned),
                    ..crate::model::PortTunnelView::without_tunnel(&spec)
                }
            };
            pod.tunnel.ports = vec![port(80, "http", None), port(9090, "metrics", error)];
            snapshot(vec![pod], Some(true))
        };
        let notices = between(Some(&with_metrics(None)), &with_metrics(Some("refused")));
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert!(notices[0].urgent);
        assert!(
            notices[0].body.contains("port 9090 (metrics): refused"),
            "{notices:?}"
        );
        // Mended: not news (the pod was never down as a whole).
        assert!(
            between(Some(&with_metrics(Some("refused"))), &with_metrics(None))
                .iter()
                .all(|notice| !notice.urgent)
        );
    }

    #[test]
    fn a_new_tunnel_and_a_breaking_one_are_told_once() {
        let before = snapshot(vec![view("a", TunnelState::Active, None)], Some(true));
        let after = snapshot(
            vec![
                view("a", TunnelState::Active, Some("connection refused")),
                view("b", TunnelState::Active, None),
            ],
            Some(true),
        );
        let notices = between(Some(&before), &after);
        assert_eq!(notices.len(), 2, "{notices:?}");
        assert_eq!(notices[0].summary, "Tunnel up: b");
        assert_eq!(notices[0].body, "http://b-staging.localhost:8085/");
        assert_eq!(notices[1].summary, "Tunnel broken: a");
        assert_eq!(notices[1].body, "connection refused");
        assert!(notices[1].urgent);
        // The same state again is not news.
        assert!(between(Some(&after), &after).is_empty());
    }

    #[test]
    fn error_text_reaches_a_markup_reading_server_escaped() {
        let hostile = "<b>x</b> & <a href=\"http://evil.example/\">click</a><img src=\"http://evil.example/p.png\">";
        let before = snapshot(vec![view("a", TunnelState::Active, None)], Some(true));
        let after = snapshot(
            vec![view("a", TunnelState::Active, Some(hostile))],
            Some(true),
        );
        let notices = between(Some(&before), &after);
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert_eq!(notices[0].body, hostile, "the plain text is as written");
        assert_eq!(
            notices[0].body_markup(),
            "&lt;b&gt;x&lt;/b&gt; &amp; &lt;a href=\"http://evil.example/\"&gt;click&lt;/a&gt;\
             &lt;img src=\"http://evil.example/p.png\"&gt;"
        );
        // The control plane's error, in its outage notice, too.
        let mut down = snapshot(vec![], Some(false));
        down.health.control_plane.last_error = Some(hostile.to_owned());
        let notices = between(Some(&snapshot(vec![], Some(true))), &down);
        let markup = notices[0].body_markup();
        assert!(!markup.contains('<') && !markup.contains('>'), "{markup}");
        assert!(
            markup.contains("&lt;b&gt;x&lt;/b&gt; &amp; &lt;a href="),
            "{markup}"
        );
    }

    #[test]
    fn many_tunnels_at_once_make_one_summary() {
        let before = snapshot(vec![], Some(true));
        let pods = (0..50)
            .map(|i| view(&format!("p{i}"), TunnelState::Active, None))
            .collect();
        let notices = between(Some(&before), &snapshot(pods, Some(true)));
        assert_eq!(notices.len(), 1);
        assert_eq!(notices[0].summary, "50 tunnels up");
    }

    #[test]
    fn control_plane_outage_and_return() {
        let up = snapshot(vec![], Some(true));
        let down = snapshot(vec![], Some(false));
        let notices = between(Some(&up), &down);
        assert_eq!(notices[0].summary, "Control plane unreachable");
        assert!(notices[0].body.contains("connection refused"));
        assert_eq!(
            between(Some(&down), &up)[0].summary,
            "Control plane reachable again"
        );
        // Turning a tunnel off is the user's doing: no notice.
        let on = snapshot(vec![view("a", TunnelState::Active, None)], Some(true));
        let off = snapshot(vec![view("a", TunnelState::Stopped, None)], Some(true));
        assert!(between(Some(&on), &off).is_empty());
    }
}
