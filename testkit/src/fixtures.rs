//! Fixture builders: a pool's configuration as the agent runs it (and as
//! the operator sends it), and pools over the in-memory connector. Small
//! builders in the manner of controller-rs's `fixtures.rs`: a test says
//! only what it cares about.

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tidepool_agent::config::PoolConfig;
use tidepool_agent::pool::memory::MemoryConnector;
use tidepool_agent::pool::{Pool, PoolMetrics, Settings};
use tidepool_crds::ConnectionPoolSpec;
use tidepool_crds::control::{pb, spec_to_pb};
use tidepool_crds::v1alpha1::{Address, Clients, NamespaceName, ServiceTarget, Target, WhenFull};

/// A pool's configuration as the agent runs it:
/// `pool("echo", &[addr]).max_streams(5).build()`, or `.pb()` for the same
/// pool as the operator sends it.
#[derive(Debug, Clone)]
pub struct PoolBuilder {
    config: PoolConfig,
}

/// A static pool named `name` in namespace `default` over `addresses`, with
/// uid `uid-<name>`, generation 1 and every other setting at its default.
pub fn pool(name: &str, addresses: &[String]) -> PoolBuilder {
    let spec: ConnectionPoolSpec =
        serde_yaml::from_str("target: {addresses: ['127.0.0.1:1']}").unwrap();
    let mut builder = PoolBuilder {
        config: PoolConfig {
            namespace: "default".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            generation: 1,
            spec,
            addresses: vec![],
        },
    };
    builder = builder.addresses(addresses);
    builder
}

impl PoolBuilder {
    /// Sets the namespace.
    pub fn namespace(mut self, ns: &str) -> Self {
        self.config.namespace = ns.into();
        self
    }
    /// Sets the static addresses (spec and resolved).
    pub fn addresses(mut self, addresses: &[String]) -> Self {
        self.config.spec.target = Target {
            service: None,
            addresses: Some(addresses.iter().cloned().map(Address).collect()),
        };
        self.config.addresses = addresses.to_vec();
        self
    }
    /// Targets Service `name` on `port` instead of static addresses; the
    /// resolved addresses (what the agent dials) stay as they are.
    pub fn service(mut self, name: &str, port: i32) -> Self {
        self.config.spec.target = Target {
            service: Some(ServiceTarget {
                name: name.into(),
                port: IntOrString::Int(port),
            }),
            addresses: None,
        };
        self
    }
    /// Sets `size`.
    pub fn size(mut self, size: i32) -> Self {
        self.config.spec.size = size;
        if self.config.spec.max_idle.is_some_and(|m| m > size) {
            self.config.spec.max_idle = Some(size);
        }
        self
    }
    /// Sets `maxIdle`.
    pub fn max_idle(mut self, max_idle: i32) -> Self {
        self.config.spec.max_idle = Some(max_idle);
        self
    }
    /// Sets `maxStreams`.
    pub fn max_streams(mut self, max_streams: i32) -> Self {
        self.config.spec.max_streams = max_streams;
        self
    }
    /// Sets `ttl`.
    pub fn ttl(mut self, ttl: &str) -> Self {
        self.config.spec.ttl = ttl.into();
        self
    }
    /// `whenFull: Wait` with `acquireTimeout`.
    pub fn wait(mut self, acquire_timeout: &str) -> Self {
        self.config.spec.when_full = WhenFull::Wait;
        self.config.spec.acquire_timeout = acquire_timeout.into();
        self
    }
    /// Sets `listenPort`.
    pub fn listen_port(mut self, port: u16) -> Self {
        self.config.spec.listen_port = Some(i32::from(port));
        self
    }
    /// Sets `spec.clients.namespaces`.
    pub fn clients(mut self, namespaces: &[&str]) -> Self {
        self.config.spec.clients = Some(Clients {
            namespaces: namespaces
                .iter()
                .map(|n| NamespaceName((*n).into()))
                .collect(),
        });
        self
    }
    /// Sets the generation.
    pub fn generation(mut self, generation: i64) -> Self {
        self.config.generation = generation;
        self
    }
    /// The configuration.
    pub fn build(self) -> PoolConfig {
        self.config
    }
    /// The pool as the operator sends it on the control stream.
    pub fn pb(self) -> pb::Pool {
        let PoolConfig {
            namespace,
            name,
            uid,
            generation,
            spec,
            addresses,
        } = self.config;
        pb::Pool {
            namespace,
            name,
            uid,
            generation,
            spec: Some(spec_to_pb(&spec)),
            addresses,
        }
    }
}

/// A pool over the in-memory connector, named `shop/payments`, with
/// unregistered metrics, and the connector (a handle on the same
/// connections) to script and inspect them.
pub fn memory_pool(settings: Settings) -> (Pool<MemoryConnector>, MemoryConnector) {
    let connector = MemoryConnector::new();
    let pool = Pool::new(
        "shop/payments",
        settings,
        connector.clone(),
        PoolMetrics::unregistered(),
    )
    .unwrap();
    (pool, connector)
}
