//! Standalone mode: pools from a file of ConnectionPool manifests — the same
//! YAML people `kubectl apply`, with static `spec.target.addresses` — and no
//! Kubernetes.
//!
//! The file may hold several documents (`---`) and `kind: List` documents.
//! It is checked whole against the CRD's rules; an error names the file, the
//! resource and the field. It is polled for changes; a changed file that is
//! invalid is refused and the last good configuration keeps running.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tidepool_crds::validate::{FieldError, SpecErrors, check_namespace, check_resource_name};
use tidepool_crds::{ConnectionPool, PoolKey};
use tokio_util::sync::CancellationToken;

use crate::config::PoolConfig;
use crate::runtime::{ApplyError, Runtime};

/// The API version standalone files must use.
pub const API_VERSION: &str = "tidepool.dev/v1alpha1";

/// Why a standalone file was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A document is not valid YAML or does not fit the ConnectionPool
    /// schema (the message names the field).
    #[error("{file}: document {document}{resource}: {source}")]
    Yaml {
        /// The file.
        file: PathBuf,
        /// The document's position, from 1.
        document: usize,
        /// ` (ConnectionPool ns/name)` when known.
        resource: String,
        /// What the parser said.
        #[source]
        source: serde_yaml::Error,
    },
    /// A document is not a `tidepool.dev/v1alpha1` ConnectionPool.
    #[error(
        "{file}: document {document}: apiVersion {api_version:?} kind {kind:?}: only {API_VERSION} ConnectionPool is accepted"
    )]
    Kind {
        /// The file.
        file: PathBuf,
        /// The document's position, from 1.
        document: usize,
        /// What it said.
        api_version: String,
        /// What it said.
        kind: String,
    },
    /// A ConnectionPool has no `metadata.name`.
    #[error("{file}: document {document}: metadata.name: a ConnectionPool needs a name")]
    NoName {
        /// The file.
        file: PathBuf,
        /// The document's position, from 1.
        document: usize,
    },
    /// A ConnectionPool breaks a CRD rule.
    #[error("{file}: ConnectionPool {pool}: {errors}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// `namespace/name`.
        pool: String,
        /// Every broken rule, by field.
        #[source]
        errors: SpecErrors,
    },
    /// A ConnectionPool targets a Service, which needs the operator.
    #[error(
        "{file}: ConnectionPool {pool}: spec.target.service needs the operator to resolve it; standalone mode accepts only spec.target.addresses"
    )]
    ServiceTarget {
        /// The file.
        file: PathBuf,
        /// `namespace/name`.
        pool: String,
    },
    /// A ConnectionPool lists `spec.clients`, which needs the operator's
    /// pod map: standalone, every client would be refused.
    #[error(
        "{file}: ConnectionPool {pool}: spec.clients needs the operator, which tells the agent the namespace of each pod IP; standalone mode would refuse every client, so remove spec.clients"
    )]
    Clients {
        /// The file.
        file: PathBuf,
        /// `namespace/name`.
        pool: String,
    },
    /// The runtime refused the pools (duplicates, port clashes, binding).
    #[error("{file}: {source}")]
    Apply {
        /// The file.
        file: PathBuf,
        /// What the runtime said.
        #[source]
        source: ApplyError,
    },
}

/// A `kind: List` document.
#[derive(Deserialize)]
struct List {
    items: Vec<serde_yaml::Value>,
}

/// Parses ConnectionPool manifests into the pools they declare. Resources
/// without a namespace go to `default`, as `kubectl apply` puts them.
pub fn parse(file: &Path, text: &str) -> Result<Vec<PoolConfig>, Error> {
    let mut pools = Vec::new();
    let mut position = 0;
    for document in serde_yaml::Deserializer::from_str(text) {
        position += 1;
        let yaml_error = |source, resource: String| Error::Yaml {
            file: file.to_owned(),
            document: position,
            resource,
            source,
        };
        let value =
            serde_yaml::Value::deserialize(document).map_err(|e| yaml_error(e, String::new()))?;
        if value.is_null() {
            continue;
        }
        let field = |name: &str| {
            value
                .get(name)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_owned()
        };
        let is_list = field("kind") == "List";
        let items = if is_list {
            serde_yaml::from_value::<List>(value.clone())
                .map_err(|e| yaml_error(e, String::new()))?
                .items
        } else {
            vec![value]
        };
        for item in items {
            let text_of = |name: &str| {
                item.get(name)
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_owned()
            };
            let (api_version, kind) = (text_of("apiVersion"), text_of("kind"));
            if api_version != API_VERSION || kind != "ConnectionPool" {
                return Err(Error::Kind {
                    file: file.to_owned(),
                    document: position,
                    api_version,
                    kind,
                });
            }
            let resource = item
                .get("metadata")
                .map(|m| {
                    let text = |name: &str| m.get(name).and_then(|v| v.as_str()).unwrap_or("");
                    let ns = match text("namespace") {
                        "" => "default",
                        ns => ns,
                    };
                    format!(" (ConnectionPool {ns}/{})", text("name"))
                })
                .unwrap_or_default();
            let pool: ConnectionPool = serde_yaml::from_value(item).map_err(|e| {
                // A value has lost its place in the file: parse the document
                // again from the text for an error naming the field's path.
                yaml_error(with_path(text, position, is_list).unwrap_or(e), resource)
            })?;
            pools.push(pool_config(file, position, pool)?);
        }
    }
    Ok(pools)
}

/// The error of document `position` (from 1) parsed straight from the text,
/// which serde_yaml reports with the field's path and line.
fn with_path(text: &str, position: usize, is_list: bool) -> Option<serde_yaml::Error> {
    #[derive(Deserialize)]
    struct Pools {
        #[allow(dead_code)]
        items: Vec<ConnectionPool>,
    }
    let document = serde_yaml::Deserializer::from_str(text).nth(position - 1)?;
    if is_list {
        Pools::deserialize(document).err()
    } else {
        ConnectionPool::deserialize(document).err()
    }
}

fn pool_config(file: &Path, document: usize, pool: ConnectionPool) -> Result<PoolConfig, Error> {
    let name = pool.metadata.name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(Error::NoName {
            file: file.to_owned(),
            document,
        });
    }
    let namespace = pool
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let key = PoolKey::new(&namespace, &name).to_string();
    // The API server would refuse these names; unchecked, a pool named
    // `a@b` loads but no authority reaches it.
    let mut names = Vec::new();
    if let Err(message) = check_resource_name(&name) {
        names.push(FieldError {
            field: "metadata.name".into(),
            message,
        });
    }
    if let Err(message) = check_namespace(&namespace) {
        names.push(FieldError {
            field: "metadata.namespace".into(),
            message,
        });
    }
    let invalid = |errors| Error::Invalid {
        file: file.to_owned(),
        pool: key.clone(),
        errors,
    };
    if !names.is_empty() {
        return Err(invalid(SpecErrors(names)));
    }
    pool.spec.settings().map_err(invalid)?;
    let Some(addresses) = &pool.spec.target.addresses else {
        return Err(Error::ServiceTarget {
            file: file.to_owned(),
            pool: key,
        });
    };
    if pool.spec.clients.is_some() {
        return Err(Error::Clients {
            file: file.to_owned(),
            pool: key,
        });
    }
    Ok(PoolConfig {
        uid: pool
            .metadata
            .uid
            .clone()
            .unwrap_or_else(|| format!("standalone:{key}")),
        generation: pool.metadata.generation.unwrap_or(1),
        addresses: addresses.iter().map(|a| a.0.clone()).collect(),
        namespace,
        name,
        spec: pool.spec,
    })
}

/// Reads and parses `file`.
pub fn load(file: &Path) -> Result<Vec<PoolConfig>, Error> {
    let text = std::fs::read_to_string(file).map_err(|source| Error::Read {
        file: file.to_owned(),
        source,
    })?;
    parse(file, &text)
}

/// Loads `file` and applies it.
pub fn load_and_apply(file: &Path, runtime: &Runtime) -> Result<usize, Error> {
    let pools = match load(file) {
        Ok(pools) => pools,
        Err(error) => {
            // Counted like a configuration the runtime refused.
            runtime.metrics().applied(false, 0);
            return Err(error);
        }
    };
    let count = pools.len();
    runtime.apply(pools).map_err(|source| Error::Apply {
        file: file.to_owned(),
        source,
    })?;
    Ok(count)
}

/// Checks `file` every `interval` and applies it when its content changed,
/// until `stop`. Errors are logged (the last good configuration keeps
/// running) and counted by the runtime. The first load is the caller's, so
/// a bad file at start-up can fail the agent.
pub async fn watch(file: PathBuf, runtime: Runtime, interval: Duration, stop: CancellationToken) {
    let mut last = std::fs::read(&file).ok();
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let current = match tokio::fs::read(&file).await {
            Ok(bytes) => bytes,
            Err(error) => {
                if last.is_some() {
                    tracing::warn!(file = %file.display(), %error, "cannot read the pools file; keeping the last good configuration");
                    last = None;
                }
                continue;
            }
        };
        if last.as_ref() == Some(&current) {
            continue;
        }
        last = Some(current);
        match load_and_apply(&file, &runtime) {
            Ok(count) => {
                tracing::info!(file = %file.display(), pools = count, "pools file reloaded")
            }
            Err(error) => {
                tracing::error!(%error, "pools file refused; the last good configuration keeps running")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Vec<PoolConfig>, Error> {
        parse(Path::new("pools.yaml"), text)
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let pools = parse_str(include_str!("../../examples/standalone.yaml")).unwrap();
        let keys: Vec<String> = pools.iter().map(PoolConfig::key).collect();
        assert_eq!(keys, ["default/greeter", "shop/billing"]);
        assert_eq!(pools[1].spec.listen_port, Some(15001));
    }

    #[test]
    fn several_documents_and_lists_parse() {
        let pools = parse_str(
            "apiVersion: tidepool.dev/v1alpha1
kind: ConnectionPool
metadata: {name: echo, namespace: shop}
spec: {target: {addresses: ['127.0.0.1:50051', '[::1]:50051']}, size: 2, maxStreams: 10}
---
---
apiVersion: v1
kind: List
items:
- apiVersion: tidepool.dev/v1alpha1
  kind: ConnectionPool
  metadata: {name: other}
  spec: {target: {addresses: ['localhost:7']}, listenPort: 15001}
",
        )
        .unwrap();
        assert_eq!(pools.len(), 2);
        assert_eq!(pools[0].key(), "shop/echo");
        assert_eq!(pools[0].addresses, ["127.0.0.1:50051", "[::1]:50051"]);
        assert_eq!(pools[0].spec.size, 2);
        assert_eq!(pools[1].key(), "default/other");
        assert_eq!(pools[1].spec.listen_port, Some(15001));
        assert_eq!(pools[1].uid, "standalone:default/other");
    }

    /// Found by the `standalone` fuzz target (its crash input, reduced):
    /// the file loaded, and the runtime then refused the pool.
    #[test]
    fn a_zero_wait_is_refused_at_load_naming_the_field() {
        let err = parse_str(
            "apiVersion: tidepool.dev/v1alpha1
kind: ConnectionPool
metadata: {name: billing, namespace: shop}
spec:
  target: {addresses: ['localhost:50061']}
  whenFull: Wait
  acquireTimeout: 000ms
",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with(
                "pools.yaml: ConnectionPool shop/billing: spec.acquireTimeout: \"000ms\""
            ),
            "{err}"
        );
    }

    /// Found by the `standalone` fuzz target (its crash input, reduced): a
    /// name Kubernetes would refuse loaded, and no authority reached it.
    #[test]
    fn names_kubernetes_refuses_are_refused() {
        let file = |name: &str, namespace: &str| {
            format!(
                "apiVersion: tidepool.dev/v1alpha1\nkind: ConnectionPool\nmetadata: {{name: '{name}', namespace: '{namespace}'}}\nspec: {{target: {{addresses: ['127.0.0.1:50051']}}}}\n"
            )
        };
        let err = parse_str(&file("greeter@@", "default"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "pools.yaml: ConnectionPool default/greeter@@: metadata.name: \"greeter@@\""
            ),
            "{err}"
        );
        let err = parse_str(&file("greeter", "Default."))
            .unwrap_err()
            .to_string();
        assert!(err.contains("metadata.namespace: \"Default.\""), "{err}");
        assert!(parse_str(&file("greeter.v2", "shop")).is_ok());
    }

    #[test]
    fn a_broken_rule_names_file_resource_and_field() {
        let err = parse_str(
            "apiVersion: tidepool.dev/v1alpha1
kind: ConnectionPool
metadata: {name: echo, namespace: shop}
spec: {target: {addresses: ['127.0.0.1:50051']}, size: 2, maxIdle: 3}
",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("pools.yaml: ConnectionPool shop/echo: spec.maxIdle"),
            "{err}"
        );
    }

    #[test]
    fn a_wrong_type_names_the_resource_and_field() {
        let err = parse_str(
            "apiVersion: tidepool.dev/v1alpha1
kind: ConnectionPool
metadata: {name: echo}
spec: {target: {addresses: ['127.0.0.1:50051']}, size: lots}
",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("pools.yaml") && err.contains("default/echo") && err.contains("size"),
            "{err}"
        );
    }

    #[test]
    fn service_targets_and_other_kinds_are_refused() {
        let err = parse_str(
            "apiVersion: tidepool.dev/v1alpha1
kind: ConnectionPool
metadata: {name: echo}
spec: {target: {service: {name: echo, port: 50051}}}
",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("default/echo") && err.contains("spec.target.service"),
            "{err}"
        );
        let err = parse_str("apiVersion: v1\nkind: Service\nmetadata: {name: x}\n").unwrap_err();
        assert!(matches!(err, Error::Kind { document: 1, .. }), "{err}");
        let err = parse_str(
            "apiVersion: tidepool.dev/v1alpha1
kind: ConnectionPool
metadata: {name: echo, namespace: shop}
spec: {target: {addresses: ['127.0.0.1:1']}, clients: {namespaces: [shop]}}
",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("shop/echo") && err.contains("spec.clients needs the operator"),
            "{err}"
        );
    }
}
