//! Building and running the agent: the registry, the runtime, the shared
//! listener and the admin server, in the order `main` needs them, and a
//! drain at the end. Tests start the same [`App`] in-process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;

use crate::config::{Config, ProxyOptions};
use crate::metrics::Metrics;
use crate::pool::PoolMetrics;
use crate::pool::h2::H2Connector;
use crate::runtime::{Runtime, RuntimeOptions, bind};
use crate::shutdown::Drain;
use crate::{admin, proxy};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Which listener.
        what: &'static str,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

/// The async runtime the agent runs on, for `worker_threads` threads
/// (`None`: one per CPU; the binary's default is 1). One thread runs on tokio's current-thread
/// scheduler: the same single thread, without the work-stealing
/// scheduler's cross-thread bookkeeping on every wake-up.
pub fn runtime_builder(worker_threads: Option<usize>) -> tokio::runtime::Builder {
    let mut builder = match worker_threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(threads) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(threads);
            builder
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all();
    builder
}

/// What an [`App`] is started with: the parts of [`Config`] that do not
/// choose a mode.
#[derive(Debug, Clone)]
pub struct AppOptions {
    /// The shared proxy listener (port 0 picks one).
    pub listen: SocketAddr,
    /// The admin listener (port 0 picks one).
    pub admin_listen: SocketAddr,
    /// Listener settings.
    pub proxy: ProxyOptions,
    /// How backend connections are made.
    pub connector: H2Connector,
}

impl From<&Config> for AppOptions {
    fn from(config: &Config) -> Self {
        Self {
            listen: config.listen,
            admin_listen: config.admin_listen,
            proxy: config.proxy.clone(),
            connector: config.connector.clone(),
        }
    }
}

/// A running agent: listeners bound and serving, no pool until a
/// configuration is applied to [`App::runtime`].
#[derive(Debug)]
pub struct App {
    runtime: Runtime,
    drain: Drain,
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
}

impl App {
    /// Binds the shared and admin listeners and starts serving them.
    pub async fn start(options: AppOptions) -> Result<Self, StartError> {
        let mut registry = Registry::with_prefix("tidepool");
        let pool_metrics = PoolMetrics::new(&mut registry);
        let metrics = Metrics::new(&mut registry);
        let drain = Drain::new();

        let shared = bind(options.listen).map_err(|source| StartError::Bind {
            addr: options.listen,
            what: "proxy",
            source,
        })?;
        let admin_listener = bind(options.admin_listen).map_err(|source| StartError::Bind {
            addr: options.admin_listen,
            what: "admin",
            source,
        })?;
        let proxy_addr = shared.local_addr().map_err(|source| StartError::Bind {
            addr: options.listen,
            what: "proxy",
            source,
        })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                addr: options.admin_listen,
                what: "admin",
                source,
            })?;

        let runtime = Runtime::new(
            RuntimeOptions {
                listen_ip: proxy_addr.ip(),
                shared_port: proxy_addr.port(),
                connector: options.connector,
                proxy: options.proxy,
            },
            Arc::new(|listener, port, runtime, stop| {
                tokio::spawn(proxy::serve(
                    listener,
                    proxy::Target::Dedicated(port),
                    runtime,
                    stop,
                ));
            }),
            metrics,
            pool_metrics,
            drain.clone(),
        );
        tokio::spawn(proxy::serve(
            shared,
            proxy::Target::Shared,
            runtime.clone(),
            drain.token().child_token(),
        ));
        // The admin server outlives the drain's start so /readyz can say
        // "draining"; it stops when the App is dropped or shut down.
        tokio::spawn(admin::serve(
            admin_listener,
            runtime.clone(),
            Arc::new(registry),
            admin_stop(&drain),
        ));
        tracing::info!(proxy = %proxy_addr, admin = %admin_addr, "agent listening");
        Ok(Self {
            runtime,
            drain,
            proxy_addr,
            admin_addr,
        })
    }

    /// The configuration every source applies to.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// The shared proxy listener's address.
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Turns not ready and keeps serving for `delay` ([`Drain::leave`]);
    /// call before [`App::shutdown`].
    pub async fn leave(&self, delay: Duration) {
        if !delay.is_zero() {
            tracing::info!(?delay, "leaving: not ready, still serving");
        }
        self.drain.leave(delay).await;
    }

    /// Stops accepting, lets open streams finish for at most `timeout`, and
    /// returns how many client connections were still open then.
    pub async fn shutdown(self, timeout: Duration) -> usize {
        tracing::info!(?timeout, "draining");
        let left = self.drain.run(timeout).await;
        if left > 0 {
            tracing::warn!(connections = left, "drain timeout passed; closing the rest");
        } else {
            tracing::info!("drained");
        }
        left
    }
}

/// The admin server stops only after the drain tracker is empty.
fn admin_stop(drain: &Drain) -> tokio_util::sync::CancellationToken {
    let stop = tokio_util::sync::CancellationToken::new();
    let (token, tracker, admin) = (drain.token().clone(), drain.tracker().clone(), stop.clone());
    tokio::spawn(async move {
        token.cancelled().await;
        tracker.wait().await;
        admin.cancel();
    });
    stop
}
