//! Building and running the agent: the registry, the runtime, the shared
//! listener and the admin server, in the order `main` needs them, and a
//! drain at the end. Tests start the same [`App`] in-process.
//!
//! The agent's long-lived tasks (the shared listener, the admin server, the
//! source of pools `main` adds) run on the App's
//! [`Supervisor`]: one that ends before the drain starts is a fault
//! ([`App::fault`]), which fails `/healthz` naming the task and makes
//! [`App::run`] return [`RunError::TaskExited`], so the process exits
//! non-zero. Per-connection tasks are on the drain's tracker instead, and
//! a pool's dedicated listener lives only as long as its pool (the
//! runtime stops it when the pool is removed), so neither is supervised.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tidepool_common::net::BindError;
use tidepool_common::supervise::{Exit, Health, Supervisor};

use crate::config::{Config, ProxyOptions};
use crate::metrics::Metrics;
use crate::pool::h2::H2Connector;
use crate::pool::{ObserveWindow, PoolMetrics};
use crate::runtime::{Runtime, RuntimeOptions, bind};
use crate::shutdown::Drain;
use crate::{admin, proxy};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
}

/// Why a running agent stopped other than by a signal.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The signal handlers could not be installed.
    #[error("waiting for a signal: {0}")]
    Signal(#[source] std::io::Error),
    /// A long-lived task ended while the agent served.
    #[error("the agent's {0}; exiting so the kubelet restarts it")]
    TaskExited(Exit),
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
    /// The window pools observe their addresses over.
    pub observe_window: ObserveWindow,
}

impl From<&Config> for AppOptions {
    fn from(config: &Config) -> Self {
        Self {
            listen: config.listen,
            admin_listen: config.admin_listen,
            proxy: config.proxy.clone(),
            connector: config.connector.clone(),
            observe_window: config.observe_window,
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
    tasks: Supervisor,
    health: Health,
}

impl App {
    /// Binds the shared and admin listeners and starts serving them.
    pub async fn start(options: AppOptions) -> Result<Self, StartError> {
        let mut registry = Registry::with_prefix("tidepool");
        let pool_metrics = PoolMetrics::new(&mut registry);
        let metrics = Metrics::new(&mut registry);
        let drain = Drain::new();

        let (shared, proxy_addr) = bind_named(options.listen, "proxy")?;
        let (admin_listener, admin_addr) = bind_named(options.admin_listen, "admin")?;

        let runtime = Runtime::new(
            RuntimeOptions {
                listen_ip: proxy_addr.ip(),
                shared_port: proxy_addr.port(),
                connector: options.connector,
                proxy: options.proxy,
                observe_window: options.observe_window,
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
        let mut tasks = Supervisor::new("agent");
        let health = Health::default();
        tasks.spawn(
            "shared listener",
            proxy::serve(
                shared,
                proxy::Target::Shared,
                runtime.clone(),
                drain.token().child_token(),
            ),
        );
        // The admin server outlives the drain's start so /readyz can say
        // "draining"; it stops once every drained connection has ended, or
        // when the App is dropped.
        let (token, tracker) = (drain.token().clone(), drain.tracker().clone());
        tasks.spawn_fallible(
            "admin server",
            admin::serve(
                admin_listener,
                runtime.clone(),
                Arc::new(registry),
                health.clone(),
                async move {
                    token.cancelled().await;
                    tracker.wait().await;
                },
            ),
        );
        tracing::info!(proxy = %proxy_addr, admin = %admin_addr, "agent listening");
        Ok(Self {
            runtime,
            drain,
            proxy_addr,
            admin_addr,
            tasks,
            health,
        })
    }

    /// Spawns `task`, which should run until the drain starts, under the
    /// App's supervisor (the source of pools: the control stream or the
    /// standalone file's watch).
    pub fn supervise<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(name, task);
    }

    /// What `/healthz` answers.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Waits for a supervised task to end before the drain starts: logs it
    /// with its cause, fails `/healthz` naming it, and returns it. Never
    /// returns while every task runs.
    pub async fn fault(&mut self) -> Exit {
        loop {
            let Some(exit) = self.tasks.next_exit().await else {
                return std::future::pending().await;
            };
            if self.drain.is_draining() {
                // Draining: every task ends with the drain.
                continue;
            }
            tracing::error!(task = exit.task, cause = %exit.cause, "a long-lived task ended; the agent exits so the kubelet restarts it");
            self.health.fail(exit.to_string());
            return exit;
        }
    }

    /// Serves until `signal` (called again for a second signal) gives a
    /// signal, then leaves for `delay` (a second signal cuts it short) and
    /// drains for at most `timeout`; or, if a supervised task ends first
    /// ([`App::fault`]), drains and returns [`RunError::TaskExited`].
    pub async fn run<S, F>(
        mut self,
        mut signal: S,
        delay: Duration,
        timeout: Duration,
    ) -> Result<(), RunError>
    where
        S: FnMut() -> F,
        F: Future<Output = std::io::Result<&'static str>>,
    {
        let first = tokio::select! {
            first = signal() => first.map_err(RunError::Signal)?,
            exit = self.fault() => {
                self.shutdown(timeout).await;
                return Err(RunError::TaskExited(exit));
            }
        };
        tracing::info!(signal = first, "stopping");
        tokio::select! {
            _ = self.leave(delay) => {}
            again = signal() => {
                tracing::info!(signal = again.unwrap_or("?"), "second signal: draining now");
            }
        }
        self.shutdown(timeout).await;
        Ok(())
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

/// Binds listener `what` the way every proxy listener is bound
/// ([`bind`]) and returns it with the address it got.
fn bind_named(
    addr: SocketAddr,
    what: &'static str,
) -> Result<(tokio::net::TcpListener, SocketAddr), BindError> {
    let listener = bind(addr).map_err(BindError::at(addr, what))?;
    let local = listener.local_addr().map_err(BindError::at(addr, what))?;
    Ok((listener, local))
}
