//! `tidepool-agent`: wiring only. Parse the configuration, start the agent,
//! feed it pools from the chosen source, run until SIGTERM, drain.

use anyhow::Context as _;
use clap::Parser as _;
use tidepool_agent::app::{App, AppOptions, runtime_builder};
use tidepool_agent::config::{Args, Config, Mode};
use tidepool_agent::{control, standalone};
use tidepool_common::log::init_tracing;
use tidepool_common::signal::signal;

fn main() -> anyhow::Result<()> {
    let config = Config::from_args(Args::parse())?;
    init_tracing(config.log_format, &config.log_filter)?;
    runtime_builder(config.worker_threads)
        .build()
        .context("starting the async runtime")?
        .block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let mut app = App::start(AppOptions::from(&config)).await?;
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
            let runtime = app.runtime().clone();
            app.supervise("control stream", control::run(options, runtime, sources));
        }
        Mode::Standalone {
            file,
            reload_interval,
        } => {
            let count = standalone::load_and_apply(file, app.runtime())
                .with_context(|| format!("standalone pools file {}", file.display()))?;
            tracing::info!(file = %file.display(), pools = count, "standalone pools loaded");
            let runtime = app.runtime().clone();
            app.supervise(
                "standalone file watch",
                standalone::watch(file.clone(), runtime, *reload_interval, sources),
            );
        }
    }
    app.run(signal, config.drain_delay, config.drain_timeout)
        .await?;
    Ok(())
}
