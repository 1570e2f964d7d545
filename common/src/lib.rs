//! What tidepool's two binaries, the agent and the operator, share, so it
//! is written once:
//!
//! - [`log`]: the log format and filter flags, and the subscriber they set up.
//! - [`flags`]: value parsers for flags (durations, log filters) whose
//!   messages name the value and the accepted form.
//! - [`signal`]: waiting for SIGTERM or SIGINT.
//! - [`net`]: binding a listener, and the error that names it.
//! - [`admin`]: the `/metrics` and `/healthz` responses.
//! - [`supervise`]: long-lived tasks under one supervisor, and the health
//!   `/healthz` reports.
//! - [`text_enum!`]: enums of fixed words (condition reasons, metric label
//!   values), each word written once.

pub mod admin;
pub mod flags;
pub mod log;
pub mod net;
pub mod signal;
pub mod supervise;
pub mod text_enum;
