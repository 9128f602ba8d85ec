//! A pod's tunnels as the CLI prints them (`pods`, `forward`, `target`, the
//! demo banner): a row for the pod's first port, where it listens, where it
//! leads and its state, and a row under it for each of its other ports.

use k3s_local_agent::model::{PortTunnelView, Protocol, Redirection, TunnelState, Way};

use super::table::{Align, Table};

/// The columns of a tunnel's rows: name, local address, arrow, destination,
/// state (with its error, free to run on).
pub const COLUMNS: [Align; 5] = [
    Align::Left,
    Align::Left,
    Align::Left,
    Align::Left,
    Align::Left,
];

/// One tunnel's rows, laid out on their own (`forward`, `target`).
pub fn describe_tunnel(tunnel: &Redirection) -> String {
    let mut table = Table::new(&COLUMNS);
    for row in tunnel_rows(tunnel) {
        table.row(row);
    }
    table.lines().join("\n")
}

/// A tunnel's rows: its first port, then each other port indented under it.
pub fn tunnel_rows(tunnel: &Redirection) -> Vec<Vec<String>> {
    let state = match tunnel.status {
        TunnelState::Failed => "FAILED",
        status => status.as_str(),
    };
    let mut rows = vec![vec![
        tunnel.staging_pod_name.clone(),
        local_url(tunnel, tunnel.local_port),
        "->".to_owned(),
        destination(tunnel),
        with_error(state, tunnel.error.as_deref()),
    ]];
    rows.extend(
        tunnel
            .ports
            .iter()
            .filter(|port| {
                !(port.staging_port == tunnel.staging_port && port.protocol == Protocol::Tcp)
            })
            .map(|port| port_row(tunnel, port)),
    );
    rows
}

/// Where a tunnel's connections go now, and the way they take there
/// (`Way::describe`); a mirror is named as such, the way adding nothing.
fn destination(tunnel: &Redirection) -> String {
    match tunnel.way {
        Way::Mirror => format!("local mirror :{}", tunnel.staging_port),
        Way::Api => format!(
            "{}/{}:{} {}",
            tunnel.namespace,
            tunnel.staging_pod_name,
            tunnel.staging_port,
            tunnel.way.describe()
        ),
        Way::Direct => format!(
            "{}:{} {}",
            tunnel.staging_pod_ip,
            tunnel.staging_port,
            tunnel.way.describe()
        ),
    }
}

/// One of a pod's ports beyond its first: where it listens and its state.
fn port_row(tunnel: &Redirection, port: &PortTunnelView) -> Vec<String> {
    let state = match (port.protocol, port.status) {
        (Protocol::Tcp, TunnelState::Failed) => "FAILED",
        (Protocol::Tcp, status) => status.as_str(),
        _ => "not forwarded",
    };
    vec![
        format!("  {}", port_label(port)),
        local_url(tunnel, port.local_port),
        String::new(),
        String::new(),
        with_error(state, port.error.as_deref()),
    ]
}

fn local_url(tunnel: &Redirection, port: Option<u16>) -> String {
    match port {
        Some(number) => format!("http://{}:{number}/", tunnel.localhost_name),
        None => "-".to_owned(),
    }
}

fn with_error(state: &str, error: Option<&str>) -> String {
    match error {
        Some(error) => format!("{state}  ({error})"),
        None => state.to_owned(),
    }
}

/// `:9090 metrics` / `:53/UDP dns`: a port as the tables name it.
pub fn port_label(port: &PortTunnelView) -> String {
    format!(":{}", port.label())
}
