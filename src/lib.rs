//! tollgate: an API-key gateway with usage metering. See ARCHITECTURE.md for the map.
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod account_limits;
pub mod accounts;
pub mod address_limits;
pub mod admin;
pub mod auth;
pub mod body;
pub mod budget;
pub mod cli;
pub mod config;
pub mod conn;
pub mod cost;
pub mod ctx;
pub mod error;
pub mod estimate;
pub mod forward;
pub mod gcra;
pub mod header;
pub mod health;
pub mod httpd;
pub mod invalidation;
pub mod keyring;
pub mod keys;
pub mod lifecycle;
pub mod limits;
pub mod logging;
pub mod meter;
pub mod metrics;
pub mod ops;
pub mod path;
pub mod pool;
pub mod pricing;
pub mod proxy;
pub mod record;
pub mod reload;
pub mod request;
pub mod route;
pub mod secrets;
pub mod server;
pub mod settings;
pub mod shared_limits;
pub mod spend;
pub mod spool;
pub mod sse;
pub mod store;
pub mod tap;
pub mod tasks;
pub mod upstream;
pub mod usage;
pub mod writer;
