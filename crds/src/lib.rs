//! The tidepool API.
//!
//! - [`v1alpha1`]: the `ConnectionPool` custom resource.
//! - [`validate`]: the same rules the API server enforces, for inputs that do
//!   not pass through it (the agent's standalone files, operator snapshots).
//! - [`crd`]: the CustomResourceDefinition as the chart ships it.
//! - [`control`]: the operator ↔ agent control protocol (tonic).
//! - [`key`]: [`PoolKey`], a pool's `namespace/name`.

pub mod control;
pub mod crd;
pub mod key;
pub mod v1alpha1;
pub mod validate;

pub use key::PoolKey;
pub use v1alpha1::{ConnectionPool, ConnectionPoolSpec, ConnectionPoolStatus};
