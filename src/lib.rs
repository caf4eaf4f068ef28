//! tollgate: an API-key gateway with usage metering. See ARCHITECTURE.md for the map.
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod admin;
pub mod auth;
pub mod body;
pub mod cli;
pub mod config;
pub mod cost;
pub mod ctx;
pub mod error;
pub mod forward;
pub mod httpd;
pub mod keys;
pub mod lifecycle;
pub mod logging;
pub mod meter;
pub mod metrics;
pub mod ops;
pub mod pool;
pub mod proxy;
pub mod server;
pub mod spool;
pub mod sse;
pub mod store;
pub mod upstream;
pub mod usage;
pub mod writer;
