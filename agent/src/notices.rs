//! What the desktop tells the user: the tray's health at a glance, and which
//! changes deserve a notification (tunnels coming up, tunnels breaking with the
//! reason, the control plane going away and coming back). Notices come from
//! comparing two snapshots, so they are the same whatever caused the change,
//! and a push of many pods gives one summary rather than one per pod. The tray
//! app shows these; this module decides them.

use std::collections::BTreeMap;

use crate::model::{PodView, Snapshot, TunnelState};

/// More tunnels than this changing at once are summarised in one notice.
pub const SUMMARY_THRESHOLD: usize = 3;

/// One desktop notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub summary: String,
    pub body: String,
    /// Problems stay on screen longer than good news.
    pub urgent: bool,
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
        (TunnelState::Active, None) => Health::Up,
        (TunnelState::Stopped, _) => Health::Off,
    }
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
        }),
        (Some(false), Some(true)) => notices.push(Notice {
            summary: "Control plane reachable again".to_owned(),
            body: after.health.control_plane.url.clone(),
            urgent: false,
        }),
        _ => {}
    }
    notices
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
                names: NamesHealth {
                    hosts_file: "/etc/hosts".into(),
                    system_wide: true,
                    mode: crate::model::NamesMode::SystemHosts,
                    why: String::new(),
                    warning: None,
                },
                control_plane: ControlPlaneHealth {
                    url: "http://cp".into(),
                    reachable,
                    last_sync: None,
                    last_error: Some("connection refused".into()),
                },
                cluster_status: "disabled".into(),
                cluster_reason: None,
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
    fn the_first_snapshot_is_not_news() {
        let now = snapshot(vec![view("a", TunnelState::Active, None)], Some(true));
        assert!(between(None, &now).is_empty());
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
