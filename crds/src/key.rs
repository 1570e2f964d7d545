//! [`PoolKey`]: which ConnectionPool, as one value.

use std::fmt;

use kube::ResourceExt as _;

use crate::ConnectionPool;

/// A ConnectionPool's identity: its namespace and name.
///
/// Displayed as `namespace/name`, the text the operator and the agent use
/// for a pool everywhere: desired-state keys, the agent's runtime, metric
/// labels, logs and error messages. Build that text from this type only,
/// so no two places can spell it differently.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    /// The pool's namespace.
    pub namespace: String,
    /// The pool's name.
    pub name: String,
}

impl PoolKey {
    /// The key of pool `name` in `namespace`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of `pool` (an empty namespace if it has none, as a
    /// cluster-scoped read would give).
    pub fn of(pool: &ConnectionPool) -> Self {
        Self::new(pool.namespace().unwrap_or_default(), pool.name_any())
    }
}

impl fmt::Display for PoolKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl From<PoolKey> for String {
    fn from(key: PoolKey) -> Self {
        key.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_as_namespace_slash_name() {
        assert_eq!(
            PoolKey::new("shop", "payments").to_string(),
            "shop/payments"
        );
        let pool = ConnectionPool::new(
            "payments",
            serde_yaml::from_str("target: {addresses: ['10.0.0.1:50051']}").unwrap(),
        );
        assert_eq!(PoolKey::of(&pool).to_string(), "/payments");
    }
}
