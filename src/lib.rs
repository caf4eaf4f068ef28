//! tollgate: an API-key gateway with usage metering. See ARCHITECTURE.md for the map.
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod auth;
pub mod body;
pub mod cli;
pub mod config;
pub mod ctx;
pub mod error;
pub mod forward;
pub mod keys;
pub mod lifecycle;
pub mod proxy;
pub mod server;
pub mod store;
pub mod upstream;
