//! What the agent's integration tests and benchmarks share, compiled once
//! for all of them rather than once per test binary:
//! - [`backend`]: a tonic test backend with all four RPC kinds, counting what
//!   it saw, killable as a crashed process;
//! - [`client`]: a tonic client of it that talks raw bytes;
//! - [`agent`](mod@agent): an in-process agent and what its pools hold;
//! - [`fixtures`]: builders for pool configurations and in-memory pools;
//! - [`raw`]: HTTP/1.0 and single HTTP/2 exchanges below tonic;
//! - [`net`]: free ports and a TCP balancer;
//! - [`wait`]: waiting for a condition.
//!
//! Everything listens on loopback only. Helpers panic on what a test
//! cannot go on without (a port that will not bind), so a test reads as
//! its scenario. `use tidepool_testkit::*` brings all of it in.

pub mod agent;
pub mod backend;
pub mod client;
pub mod codec;
pub mod fixtures;
pub mod net;
pub mod raw;
pub mod wait;

pub use agent::{agent, agent_with, occupancy, streams_released};
pub use backend::{Backend, BackendState, Gate};
pub use client::{Client, backend_of, request};
pub use codec::{BytesCodec, MAX_MESSAGE, Raw, SERVICE};
pub use fixtures::{PoolBuilder, memory_pool, pool};
pub use net::{Balancer, free_port};
pub use raw::{RawResponse, grpc_frame, http_get, raw_call, raw_call_with_trailers};
pub use wait::eventually;
