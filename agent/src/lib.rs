//! tidepool's node agent.
//!
//! - [`pool`]: go-micro's linked-list stream pool, made concurrent and observable.

pub mod pool;
