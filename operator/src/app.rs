//! Building and running the operator: reflectors, the controller, the
//! pusher, the status writer, the control service, the admin server and
//! leader election, stopped together.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::controller::{self, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Resource, ResourceExt as _};
use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;
use tidepool_common::net::{BindError, bind};
use tidepool_common::supervise::{Cause, Exit, Health, Supervisor};
use tidepool_crds::control::pb::control_server::ControlServer;
use tidepool_crds::{ConnectionPool, PoolKey};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::agents::Agents;
use crate::auth::{Authenticator, KubeReviewer};
use crate::ca::Keeper;
use crate::config::Config;
use crate::control::ControlService;
use crate::desired::Desired;
use crate::leader::{LeaderError, LeaseLock};
use crate::metrics::Metrics;
use crate::reconcile::{Context, error_policy, pools_targeting, reconcile};
use crate::resolve::SERVICE_NAME_LABEL;
use crate::status::StatusWriter;
use crate::tls::Resolver;
use crate::{admin, push};

/// Why the operator stopped other than by a signal.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listener could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The control service failed.
    #[error("the control service on {addr} failed: {source}")]
    Serve {
        /// Its address.
        addr: SocketAddr,
        /// What failed.
        #[source]
        source: tonic::transport::Error,
    },
    /// Leadership was lost.
    #[error(transparent)]
    Leader(#[from] LeaderError),
    /// The control CA could not be read or made.
    #[error("the control CA: {0}")]
    Ca(#[from] crate::ca::CaError),
    /// The TLS configuration could not be built.
    #[error("the control port's TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// A long-lived task ended before the operator stopped.
    #[error("the operator's {0}; exiting so the kubelet restarts it")]
    TaskExited(Exit),
}

fn api<K>(client: &kube::Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// A reflector of `api`, its watch supervised, waking `wake` (if any) on
/// every event.
fn reflect_waking<K>(
    tasks: &mut Supervisor,
    api: Api<K>,
    config: watcher::Config,
    stop: &CancellationToken,
    wake: Option<Arc<tokio::sync::Notify>>,
) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, config)
        .default_backoff()
        .reflect(writer)
        .inspect(move |_| {
            if let Some(w) = &wake {
                w.notify_one();
            }
        })
        .applied_objects();
    let stop = stop.clone();
    let task = match K::kind(&()).as_ref() {
        "Node" => "node watch",
        "Pod" => "agent pod watch",
        _ => "watch",
    };
    tasks.spawn(task, async move {
        let drain = stream.for_each(|r| async move {
            if let Err(error) = r {
                tracing::warn!(kind = %K::kind(&()), %error, "watch failed; retrying with backoff");
            }
        });
        tokio::select! {
            _ = drain => {}
            _ = stop.cancelled() => {}
        }
    });
    reader
}

/// Waits until a store has its first full list.
///
/// Polled with a timeout: a store's readiness wakes only its last waiter
/// (kube-runtime keeps one waker), and the controller waits on the pools
/// store too.
async fn listed<K: kube::runtime::reflector::Lookup + Clone + 'static>(store: &Store<K>)
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    while tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready())
        .await
        .is_err()
    {}
}

/// Runs the operator until `stop` is cancelled (or leadership is lost).
pub async fn run(
    config: Config,
    client: kube::Client,
    stop: CancellationToken,
) -> Result<(), Error> {
    let mut tasks = Supervisor::new("operator");
    let health = Health::default();
    let mut registry = Registry::with_prefix("tidepool");
    let metrics = Metrics::new(&mut registry);
    let registry = Arc::new(registry);
    let ns = config.watch_namespace.as_deref();

    let (leading_tx, leading) = watch::channel(config.leader.is_none());
    // Checked by every writer just before it writes (leader::Fence).
    let fence = if config.leader.is_some() {
        crate::leader::Fence::closed()
    } else {
        crate::leader::Fence::always()
    };
    let (initialized_tx, initialized) = watch::channel(false);
    let desired = Arc::new(Desired::default());
    let agents = Arc::new(Agents::default());
    let clients = Arc::new(crate::clients::NodeClients::default());

    // Listeners first: a port in use fails the start, not a task later.
    let (control_listener, control_addr) = bind(config.control_listen, "control").await?;
    let (admin_listener, admin_addr) = bind(config.admin_listen, "admin").await?;
    tracing::info!(control = %control_addr, admin = %admin::describe(admin_addr), "listening");

    // The control CA and this replica's serving certificate, before
    // anything is served: a CA Secret with garbage in it stops the start.
    let tls_config = match &config.security {
        Some(sec) => {
            let keeper = Keeper::new(client.clone(), sec.ca.clone());
            let signer = keeper.sync().await?;
            let resolver = Resolver::new(&signer, &sec.leaf, &metrics)?;
            let server_config = resolver.server_config()?;
            let (signer_tx, signer_rx) = watch::channel(signer);
            tasks.spawn("CA keeper", keeper.run(signer_tx, stop.clone()));
            tasks.spawn(
                "serving certificate renewal",
                resolver.renew(signer_rx, sec.leaf.clone(), metrics.clone(), stop.clone()),
            );
            tracing::info!(
                dns_names = ?sec.leaf.dns_names,
                ca_secret = %format!("{}/{}", sec.ca.namespace, sec.ca.secret),
                "control port serves TLS; agents authenticate with TokenReview"
            );
            Some((server_config, sec.handshake_timeout))
        }
        None => {
            tracing::warn!(
                "--insecure-control: the control port is plain text and accepts any agent; for tests only"
            );
            None
        }
    };

    let (waiting_tx, waiting) = watch::channel("the ConnectionPool list".to_string());
    let admin_state = admin::AdminState {
        waiting,
        health: health.clone(),
        registry: registry.clone(),
        leading: leading.clone(),
        initialized: initialized.clone(),
    };
    tasks.spawn_fallible(
        "admin server",
        admin::serve(admin_listener, admin_state, stop.clone()),
    );

    // Leader election.
    let leader_task = config.leader.clone().map(|l| {
        let lock = LeaseLock::new(
            client.clone(),
            &l.namespace,
            &l.name,
            &l.identity,
            l.duration,
        );
        let leader_stop = stop.child_token();
        // A replica first campaigns once it is warm (every pool read and
        // reconciled; one lease duration at the latest), and one retry
        // period after that: when a leader stops and releases the lease,
        // the standby that was already waiting (and retries every period)
        // takes it, not the replica the Deployment starts in its place,
        // which would otherwise win the race about half the time and lead
        // cold.
        let mut warm = initialized.clone();
        let (leading_tx, run_stop, fence) =
            (leading_tx.clone(), leader_stop.clone(), fence.clone());
        let handle = tokio::spawn(async move {
            let _ = tokio::time::timeout(l.duration, warm.wait_for(|w| *w)).await;
            tokio::select! {
                _ = run_stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(lock.retry_every()) => {}
            }
            lock.run(leading_tx, fence, run_stop).await
        });
        (handle, leader_stop)
    });
    if let Some(l) = &config.leader
        && let Some(pod) = &l.pod
    {
        tasks.spawn(
            "role label",
            crate::role::run(
                client.clone(),
                l.namespace.clone(),
                pod.clone(),
                leading.clone(),
                stop.clone(),
            ),
        );
    }
    {
        let metrics = metrics.clone();
        let mut leading = leading.clone();
        tasks.spawn("leader gauge", async move {
            loop {
                metrics.leader.set(i64::from(*leading.borrow_and_update()));
                if leading.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    // Reflectors. Every event that may change a node-local Service wakes
    // its sync loop.
    let local_wake = Arc::new(tokio::sync::Notify::new());
    let local_states = Arc::new(crate::local::LocalStates::default());
    let node_config = match &config.node_selector {
        Some(s) => watcher::Config::default().labels(s),
        None => watcher::Config::default(),
    };
    let nodes = reflect_waking(
        &mut tasks,
        Api::<Node>::all(client.clone()),
        node_config,
        &stop,
        None,
    );
    let (slices_reader, slices_writer) = reflector::store();
    let slice_stream = watcher(
        api::<EndpointSlice>(&client, ns),
        watcher::Config::default().labels(SERVICE_NAME_LABEL),
    )
    .default_backoff()
    .reflect(slices_writer)
    .inspect({
        let wake = local_wake.clone();
        move |_| wake.notify_one()
    })
    .touched_objects();
    let (services, services_writer) = reflector::store();
    let services_stream = watcher(api::<Service>(&client, ns), watcher::Config::default())
        .default_backoff()
        .reflect(services_writer)
        .inspect({
            let wake = local_wake.clone();
            move |_| wake.notify_one()
        })
        .touched_objects();

    let (pools, pools_writer) = reflector::store();
    // A deleted pool may free a listenPort another pool waits for: every
    // pool is reconciled again.
    let (pool_gone_tx, pool_gone) = tokio::sync::mpsc::unbounded_channel::<()>();
    let pool_stream = {
        let desired = desired.clone();
        let reader = pools.clone();
        let wake = local_wake.clone();
        watcher(
            api::<ConnectionPool>(&client, ns),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(pools_writer)
        .inspect_ok(move |event| {
            wake.notify_one();
            match event {
                watcher::Event::Delete(p) => {
                    if p.spec.listen_port.is_some() {
                        let _ = pool_gone_tx.send(());
                    }
                    let key = PoolKey::of(p).to_string();
                    if desired.remove(&key) {
                        tracing::info!(pool = %key, "pool deleted; agents drop it");
                    }
                }
                watcher::Event::InitDone => {
                    let live: std::collections::HashSet<String> = reader
                        .state()
                        .iter()
                        .map(|p| PoolKey::of(p).to_string())
                        .collect();
                    let gone = desired.retain(|k| live.contains(k));
                    if gone > 0 {
                        tracing::info!(
                            pools = gone,
                            "pools deleted while the watch was down; agents drop them"
                        );
                    }
                }
                _ => {}
            }
        })
        .touched_objects()
    };

    let ctx = Arc::new(Context {
        desired: desired.clone(),
        pools: pools.clone(),
        services: services.clone(),
        slices: slices_reader.clone(),
        metrics: metrics.clone(),
        address_map: config.address_map.clone(),
        failures: Mutex::default(),
    });
    let by_slice = {
        let pools = pools.clone();
        move |slice: EndpointSlice| {
            let svc = slice
                .labels()
                .get(SERVICE_NAME_LABEL)
                .cloned()
                .unwrap_or_default();
            pools_targeting(&pools, &slice.namespace().unwrap_or_default(), &svc)
        }
    };
    let by_service = {
        let pools = pools.clone();
        move |svc: Service| {
            pools_targeting(
                &pools,
                &svc.namespace().unwrap_or_default(),
                &svc.name_any(),
            )
        }
    };
    let controller_stop = stop.clone();
    let controller = Controller::for_stream(pool_stream, pools.clone())
        .with_config(controller::Config::default().concurrency(16))
        .watches_stream(slice_stream, by_slice)
        .watches_stream(services_stream, by_service)
        .reconcile_all_on(tokio_stream::wrappers::UnboundedReceiverStream::new(
            pool_gone,
        ))
        .graceful_shutdown_on(async move { controller_stop.cancelled().await })
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(error) = r {
                match error {
                    // A pool deleted before its turn: nothing to do.
                    controller::Error::ObjectNotFound(_) => {}
                    error => tracing::debug!(%error, "controller event"),
                }
            }
        });
    tasks.spawn("controller", controller);

    // Initialization: every pool listed once is reconciled once.
    {
        let pools = pools.clone();
        let nodes = nodes.clone();
        let services = services.clone();
        let slices = slices_reader.clone();
        let desired = desired.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let ready = async {
                listed(&pools).await;
                waiting_tx.send_replace("the Node list".into());
                listed(&nodes).await;
                waiting_tx.send_replace("the Service list".into());
                listed(&services).await;
                waiting_tx.send_replace("the EndpointSlice list".into());
                listed(&slices).await;
                let keys: Vec<String> = pools
                    .state()
                    .iter()
                    .map(|p| PoolKey::of(p).to_string())
                    .collect();
                let mut polls = 0u32;
                while !desired.has_all(&keys) {
                    if polls.is_multiple_of(25) {
                        let done = keys.iter().filter(|k| desired.get(k).is_some()).count();
                        waiting_tx.send_replace(format!(
                            "every pool's first reconcile ({done} of {} done)",
                            keys.len()
                        ));
                    }
                    polls = polls.wrapping_add(1);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                keys.len()
            };
            tokio::select! {
                n = ready => {
                    tracing::info!(pools = n, "every pool reconciled; pushing to agents");
                    initialized_tx.send_replace(true);
                }
                _ = stop.cancelled() => {}
            }
        });
    }

    // Node-local Services: once every pool is known (so nothing is swept
    // for a pool not read yet) and the agent pods are listed.
    {
        let agent_pods = config.agent_pods.as_ref().map(|a| {
            let api = Api::<Pod>::namespaced(client.clone(), &a.namespace);
            reflect_waking(
                &mut tasks,
                api,
                watcher::Config::default().labels(&a.selector),
                &stop,
                Some(local_wake.clone()),
            )
        });
        let sync = crate::local::Sync {
            client: client.clone(),
            pools: pools.clone(),
            services: services.clone(),
            slices: slices_reader.clone(),
            agents: agent_pods.clone(),
            wake: local_wake.clone(),
            states: local_states.clone(),
            fence: fence.clone(),
            metrics: metrics.clone(),
            debounce: config.push_debounce,
        };
        let mut initialized = initialized.clone();
        let stop = stop.clone();
        tasks.spawn("node-local Services", async move {
            let ready = async {
                initialized.wait_for(|i| *i).await.ok()?;
                if let Some(pods) = &agent_pods {
                    listed(pods).await;
                }
                Some(())
            };
            tokio::select! {
                r = ready => if r.is_some() { sync.run(stop).await },
                _ = stop.cancelled() => {}
            }
        });
    }

    // Pod maps for spec.clients: not part of initialization, since a pool
    // push must not wait for them (agents keep their last map meanwhile).
    crate::clients::start(
        &mut tasks,
        client.clone(),
        clients.clone(),
        config.push_debounce,
        stop.clone(),
    );

    tasks.spawn(
        "push",
        push::run(
            desired.clone(),
            agents.clone(),
            initialized.clone(),
            config.push_debounce,
            stop.clone(),
        ),
    );

    // The status writer runs while this replica leads.
    {
        let writer = StatusWriter {
            client: client.clone(),
            pools: pools.clone(),
            nodes: nodes.clone(),
            desired: desired.clone(),
            agents: agents.clone(),
            interval: config.status_interval,
            tuning: config.tuning,
            metrics: metrics.clone(),
            fence: fence.clone(),
            local: local_states.clone(),
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "tidepool-operator".into(),
                    instance: config.leader.as_ref().map(|l| l.identity.clone()),
                },
            ),
        };
        let mut leading = leading.clone();
        let mut initialized = initialized.clone();
        let stop = stop.clone();
        tasks.spawn("status writer", async move {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = async { leading.wait_for(|l| *l).await.map(|_| ())?; initialized.wait_for(|i| *i).await.map(|_| ()) } => {
                    if r.is_err() { return }
                }
            }
            writer.run(stop).await;
        });
    }

    let auth = config.security.as_ref().map(|sec| {
        Arc::new(Authenticator::new(
            sec.auth.clone(),
            Arc::new(KubeReviewer::new(client.clone(), sec.review_timeout)),
        ))
    });
    let service = ControlService {
        agents,
        desired,
        nodes,
        leading,
        initialized,
        clients,
        fanout: Arc::new(Semaphore::new(config.push_concurrency)),
        metrics: metrics.clone(),
        stop: stop.clone(),
        auth,
        max_session: config.max_session,
        fence,
    };
    let serve_stop = stop.clone();
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(ControlServer::new(service));
    let shutdown = async move { serve_stop.cancelled().await };
    let server: std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), tonic::transport::Error>> + Send>,
    > = match tls_config {
        Some(tls) => {
            let incoming = crate::tls::accept(
                control_listener,
                tls.0,
                tls.1,
                metrics.clone(),
                stop.clone(),
            );
            Box::pin(router.serve_with_incoming_shutdown(
                tokio_stream::wrappers::ReceiverStream::new(incoming),
                shutdown,
            ))
        }
        None => Box::pin(router.serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(control_listener),
            shutdown,
        )),
    };

    let (leader_handle, _leader_stop) = match leader_task {
        Some((h, s)) => (Some(h), Some(s)),
        None => (None, None),
    };
    let mut leader_handle = leader_handle;
    let leader = async {
        match leader_handle.as_mut() {
            Some(handle) => match handle.await {
                Ok(r) => r.map_err(Error::from),
                Err(join) => Err(Error::TaskExited(Exit {
                    process: "operator",
                    task: "leader election",
                    cause: Cause::Panicked(join.to_string()),
                })),
            },
            None => std::future::pending().await,
        }
    };
    tokio::pin!(server, leader);
    let result = loop {
        tokio::select! {
            r = &mut server => break r.map_err(|source| Error::Serve { addr: control_addr, source }),
            r = &mut leader => break r,
            Some(exit) = tasks.next_exit() => {
                if stop.is_cancelled() {
                    // Stopping: every task ends with the stop token.
                    continue;
                }
                tracing::error!(task = exit.task, cause = %exit.cause, "a long-lived task ended; the operator exits so the kubelet restarts it");
                health.fail(exit.to_string());
                break Err(Error::TaskExited(exit));
            }
        }
    };
    if let Err(error) = &result {
        health.fail(error.to_string());
    }
    stop.cancel();
    // Let the leader task release the lease, so a successor need not wait
    // for it to expire.
    if let Some(handle) = leader_handle.take()
        && !handle.is_finished()
    {
        let _ = tokio::time::timeout(Duration::from_secs(3), handle).await;
    }
    result
}
