//! `tidepool-operator`: wiring only. Parse the configuration, connect to
//! Kubernetes, run until SIGTERM or SIGINT.

use anyhow::Context as _;
use clap::Parser as _;
use tidepool_common::log::init_tracing;
use tidepool_common::signal::signal;
use tidepool_operator::app;
use tidepool_operator::config::{Args, Config};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::from_args(Args::parse())?;
    init_tracing(config.log_format, &config.log_filter)?;
    let client = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes (KUBECONFIG or in-cluster)")?;

    let stop = CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            match signal().await {
                Ok(signal) => tracing::info!(signal, "stopping"),
                // No handler, no way to stop gracefully later: stop now
                // rather than run unstoppable.
                Err(error) => tracing::error!(%error, "cannot wait for a signal; stopping"),
            }
            stop.cancel();
        });
    }
    app::run(config, client, stop).await?;
    Ok(())
}
