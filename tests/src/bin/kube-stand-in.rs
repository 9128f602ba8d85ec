//! The Kubernetes API emulator as a process, for the benchmark: one pod
//! whose port-forwards reach given TCP servers, and a kubeconfig whose
//! context points here. Runs until stdin closes.
//!
//! `kube-stand-in KUBECONFIG CONTEXT NAMESPACE/POD PORT=HOST:PORT...`

use std::io::Read;

use anyhow::{bail, Context, Result};
use k3s_local_agent_e2e::kube_emulator::KubeEmulator;

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kubeconfig, context, pod, backends @ ..] = args.as_slice() else {
        bail!("usage: kube-stand-in KUBECONFIG CONTEXT NAMESPACE/POD PORT=HOST:PORT...");
    };
    let (namespace, name) = pod.split_once('/').context("the pod is NAMESPACE/NAME")?;
    let emulator = KubeEmulator::start().await?;
    emulator.insert_pod(
        namespace,
        name,
        serde_json::json!({}),
        serde_json::json!({}),
    );
    for backend in backends {
        let (port, address) = backend
            .split_once('=')
            .context("a backend is PORT=HOST:PORT")?;
        let port: u16 = port.parse().context("a backend's port")?;
        let address = address.parse().context("a backend's address")?;
        if !emulator.set_port_backend(namespace, name, port, address) {
            bail!("no pod {pod}");
        }
    }
    emulator.write_kubeconfig(std::path::Path::new(kubeconfig), context)?;
    println!("ready {}", emulator.url());
    // Until whoever started us closes our stdin (or stops us).
    tokio::task::spawn_blocking(|| {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
    })
    .await?;
    Ok(())
}
