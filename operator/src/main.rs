//! `tidepool-operator`: wiring only. Parse the configuration, connect to
//! Kubernetes, run until SIGTERM or SIGINT.

use anyhow::Context as _;
use clap::Parser as _;
use tidepool_operator::app;
use tidepool_operator::config::{Args, Config, LogFormat};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

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
            let signal = signal().await;
            tracing::info!(signal, "stopping");
            stop.cancel();
        });
    }
    app::run(config, client, stop).await?;
    Ok(())
}

async fn signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return "SIGINT";
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}

/// Logs with the filter the configuration checked (`--log`, `TIDEPOOL_LOG`);
/// a filter `tracing` still cannot parse fails the start with its value.
fn init_tracing(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter)
        .with_context(|| format!("TIDEPOOL_LOG {filter:?} is not a log filter"))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}
