//! `k3s-local-agent status`: the agent's health in a few lines, then a table
//! of its pods (a row per pod, one more per port of a pod with several).

use anyhow::Result;
use k3s_local_agent::model::{NamesMode, Protocol, Snapshot, StatusResponse};

use super::table::{human_bytes, Align, Table};
use super::tunnels::port_label;
use crate::ClientArgs;

pub async fn status(args: ClientArgs) -> Result<()> {
    let client = super::client(&args)?;
    let snapshot = client.snapshot().await?;
    let status = client.status().await?;
    if args.json {
        let both = serde_json::json!({
            "health": snapshot.health,
            "status": status,
            "ports": snapshot.ports,
            "activity": snapshot.pods.iter().map(|v| (v.pod.id.clone(), v.activity.clone()))
                .collect::<std::collections::BTreeMap<_, _>>(),
        });
        println!("{}", serde_json::to_string_pretty(&both)?);
        return Ok(());
    }
    for line in summary(&snapshot, &status) {
        println!("{line}");
    }
    if snapshot.pods.is_empty() {
        return Ok(());
    }
    println!();
    for line in pod_table(&snapshot) {
        println!("{line}");
    }
    Ok(())
}

/// The lines above the table: who the agent is, its tunnels and ports, the
/// control plane, where names go, and what is switched off.
fn summary(snapshot: &Snapshot, status: &StatusResponse) -> Vec<String> {
    let health = &snapshot.health;
    let mut lines = vec![format!(
        "agent {} (pid {}){}",
        health.agent_id,
        health.pid,
        if health.demo { " (DEMO MODE)" } else { "" }
    )];
    let (tried, failed) = snapshot.pods.iter().fold((0, 0), |(tried, failed), view| {
        (
            tried + view.activity.connections,
            failed + view.activity.errors,
        )
    });
    let error_rate = if tried == 0 {
        "no connections in the last minute".to_owned()
    } else {
        format!(
            "{:.1} % of {tried} connections failed in the last minute",
            100.0 * failed as f64 / tried as f64
        )
    };
    lines.push(format!(
        "tunnels: {} total, {} active, {} stopped, {} failed; ports {}/{} in use; {error_rate}",
        status.total_redirections,
        status.active_redirections,
        status.stopped_redirections,
        status.failed_redirections,
        snapshot.ports.used,
        snapshot.ports.size,
    ));
    let cp = &health.control_plane;
    let reach = match cp.reachable {
        Some(true) => "reachable",
        Some(false) => "UNREACHABLE",
        None => "not yet contacted",
    };
    lines.push(format!("control plane {}: {reach}", cp.url));
    if let Some(at) = cp.last_sync {
        lines.push(format!("last sync: {at}"));
    }
    if health.names.mode == NamesMode::Off {
        lines.push("names: off (--names off): addresses are localhost:<range port>".to_owned());
    } else {
        lines.push(format!("names: {}", health.names.hosts_file));
    }
    if !health.forwarding {
        lines.push(
            "forwarding: off (--forwarding off): pods are held, mirrored and reported; no port \
             listens"
                .to_owned(),
        );
    }
    if let Some(warning) = &health.names.warning {
        lines.push(format!("warning: {warning}"));
    }
    lines
}

/// The pods' table: port, name port, state, connections open of all, bytes
/// each way, the last minute's connect latency and errors.
fn pod_table(snapshot: &Snapshot) -> Vec<String> {
    use Align::{Left, Right};
    let mut table = Table::new(&[Left, Right, Right, Left, Right, Right, Right, Right]);
    table.row([
        "POD",
        "PORT",
        "NAME PORT",
        "STATE",
        "OPEN/TOTAL",
        "TO/FROM POD",
        "CONNECT P50/P99",
        "ERRORS",
    ]);
    let port = |p: Option<u16>| p.map_or_else(|| "-".to_owned(), |p| p.to_string());
    let name_port = |p: Option<u16>| p.map_or_else(|| "-".to_owned(), |p| format!(":{p}"));
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
    for view in &snapshot.pods {
        let (tunnel, activity) = (&view.tunnel, &view.activity);
        table.row([
            view.pod.name.clone(),
            port(tunnel.local_port),
            name_port(tunnel.name_port),
            tunnel.status.as_str().to_owned(),
            format!("{}/{}", tunnel.open_connections, tunnel.total_connections),
            format!(
                "{}/{}",
                human_bytes(tunnel.bytes_to_pod),
                human_bytes(tunnel.bytes_from_pod)
            ),
            format!(
                "{}/{} ms",
                ms(activity.connect_p50_ms),
                ms(activity.connect_p99_ms)
            ),
            activity.errors.to_string(),
        ]);
        // A pod with several ports: one row more per port, counters its own.
        if tunnel.ports.len() > 1 {
            for each in &tunnel.ports {
                let state = match each.protocol {
                    Protocol::Tcp => each.status.as_str(),
                    _ => "not fwd",
                };
                table.row([
                    format!("  {}", port_label(each)),
                    port(each.local_port),
                    name_port(each.name_port),
                    state.to_owned(),
                    format!("{}/{}", each.open_connections, each.total_connections),
                    format!(
                        "{}/{}",
                        human_bytes(each.bytes_to_pod),
                        human_bytes(each.bytes_from_pod)
                    ),
                ]);
            }
        }
    }
    table.lines()
}
