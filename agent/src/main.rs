//! `tidepool-agent`: wiring only. Parse the configuration, start the agent,
//! feed it pools from the chosen source, run until SIGTERM, drain.

use anyhow::Context as _;
use clap::Parser as _;
use tidepool_agent::app::{App, AppOptions, runtime_builder};
use tidepool_agent::config::{Args, Config, LogFormat, Mode};
use tidepool_agent::{control, shutdown, standalone};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let config = Config::from_args(Args::parse())?;
    init_tracing(config.log_format, &config.log_filter)?;
    runtime_builder(config.worker_threads)
        .build()
        .context("starting the async runtime")?
        .block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let app = App::start(AppOptions::from(&config)).await?;
    let sources = app.runtime().drain().token().child_token();
    match &config.mode {
        Mode::Operator {
            url,
            security,
            node,
            pod,
        } => {
            let mut options = control::ControlOptions::new(url.clone(), node.clone(), pod.clone());
            options.security = security.clone();
            tokio::spawn(control::run(options, app.runtime().clone(), sources));
        }
        Mode::Standalone {
            file,
            reload_interval,
        } => {
            let count = standalone::load_and_apply(file, app.runtime())
                .with_context(|| format!("standalone pools file {}", file.display()))?;
            tracing::info!(file = %file.display(), pools = count, "standalone pools loaded");
            tokio::spawn(standalone::watch(
                file.clone(),
                app.runtime().clone(),
                *reload_interval,
                sources,
            ));
        }
    }

    let signal = shutdown::signal().await.context("waiting for a signal")?;
    tracing::info!(signal, "stopping");
    // A second signal cuts the delay short.
    tokio::select! {
        _ = app.leave(config.drain_delay) => {}
        again = shutdown::signal() => {
            tracing::info!(signal = again.unwrap_or("?"), "second signal: draining now");
        }
    }
    app.shutdown(config.drain_timeout).await;
    Ok(())
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
