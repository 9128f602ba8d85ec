//! The benchmark's peer for tunnels through the staging API: the way
//! kftray forwards, one kube `Portforwarder` per connection joined to the
//! client with `copy_bidirectional`, on one client for every connection.
//!
//! `kube-portforward-peer KUBECONFIG CONTEXT NAMESPACE/POD LISTEN_PORT:POD_PORT...`

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kubeconfig, context, pod, forwards @ ..] = args.as_slice() else {
        bail!("usage: kube-portforward-peer KUBECONFIG CONTEXT NAMESPACE/POD LISTEN:POD...");
    };
    let (namespace, name) = pod.split_once('/').context("the pod is NAMESPACE/NAME")?;
    let options = KubeConfigOptions {
        context: Some(context.clone()),
        ..KubeConfigOptions::default()
    };
    let config =
        kube::Config::from_custom_kubeconfig(Kubeconfig::read_from(kubeconfig)?, &options).await?;
    let pods: Api<Pod> = Api::namespaced(kube::Client::try_from(config)?, namespace);
    let mut listeners = Vec::new();
    for forward in forwards {
        let (listen, port) = forward
            .split_once(':')
            .context("a forward is LISTEN_PORT:POD_PORT")?;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", listen.parse::<u16>()?)).await?;
        listeners.push((listener, port.parse::<u16>()?));
    }
    for (listener, port) in listeners {
        let (pods, name) = (pods.clone(), name.to_owned());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let (pods, name) = (pods.clone(), name.clone());
                tokio::spawn(async move {
                    let Ok(mut forwarder) = pods.portforward(&name, &[port]).await else {
                        return;
                    };
                    let Some(mut upstream) = forwarder.take_stream(port) else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    drop(upstream);
                    let _ = forwarder.join().await;
                });
            }
        });
    }
    println!("listening");
    std::future::pending::<()>().await;
    Ok(())
}
