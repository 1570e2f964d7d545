//! An agent in this process, and what its pools hold.

use std::time::Duration;

use tidepool_agent::app::{App, AppOptions};
use tidepool_agent::config::ProxyOptions;
use tidepool_agent::pool::h2::H2Connector;

use crate::wait::eventually;

/// An agent in this process, listening on free loopback ports.
pub async fn agent() -> App {
    agent_with(ProxyOptions::default()).await
}

/// An agent with listener settings.
pub async fn agent_with(proxy: ProxyOptions) -> App {
    App::start(AppOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        proxy,
        connector: H2Connector {
            connect_timeout: Duration::from_secs(2),
            ..H2Connector::default()
        },
        observe_window: Default::default(),
    })
    .await
    .unwrap()
}

/// Total streams and connections the agent's pools report for `addr`.
pub fn occupancy(app: &App, addr: &str) -> (usize, usize) {
    app.runtime()
        .report()
        .iter()
        .flat_map(|p| p.addresses.iter())
        .filter(|a| a.address == addr)
        .fold((0, 0), |(s, c), a| {
            (s + a.streams, c + a.connections + a.draining + a.overflow)
        })
}

/// Waits at most `timeout` for the agent to hold no stream to `addr`;
/// returns whether it got there.
pub async fn streams_released(app: &App, addr: &str, timeout: Duration) -> bool {
    eventually(timeout, || occupancy(app, addr).0 == 0).await
}
