//! The config file's format: `config.toml` as serde reads it, with every default stated once (the
//! `Default` impls, documented on each field), and where in the text a setting is written (for
//! `PATH:LINE` errors). What the program uses is the validated `Settings` built from it
//! (`settings.rs`); nothing outside that module reads these raw numbers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use crate::cost::{Price, PriceTable};
use crate::upstream::AccountType;

/// Environment variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "TOLLGATE_CONFIG";

/// The whole file. Every section has defaults, so an empty file is valid.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub auth: AuthConfig,
    pub upstream: UpstreamConfig,
    pub routes: Vec<Route>,
    pub upstream_accounts: Vec<AccountConfig>,
    pub metering: MeteringConfig,
    pub limits: LimitsConfig,
    pub spend: SpendConfig,
    pub writer: WriterConfig,
    pub metrics: MetricsConfig,
    pub admin: AdminConfig,
    /// Model → price (USD per million tokens, decimal strings). See `cost.rs`.
    pub prices: PriceTable,
    /// Account type → price used for models missing from `prices`.
    pub default_prices: HashMap<AccountType, Price>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::default(),
            database: DatabaseConfig::default(),
            auth: AuthConfig::default(),
            upstream: UpstreamConfig::default(),
            routes: default_routes(),
            upstream_accounts: Vec::new(),
            metering: MeteringConfig::default(),
            limits: LimitsConfig::default(),
            spend: SpendConfig::default(),
            writer: WriterConfig::default(),
            metrics: MetricsConfig::default(),
            admin: AdminConfig::default(),
            prices: PriceTable::default(),
            default_prices: HashMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the proxy listens on.
    pub listen: SocketAddr,
    /// Worker threads for the proxy.
    pub threads: usize,
    /// Seconds in-flight requests get to finish after SIGTERM.
    pub grace_period_secs: u64,
    /// Seconds a kept-alive client connection may sit idle between requests.
    pub idle_timeout_secs: u64,
    /// Largest request body accepted (and buffered for replay); larger gets 413.
    pub max_body_bytes: usize,
    /// Largest request header section (names + values) and most header fields accepted; above
    /// either, 431 and the connection closed, before any upstream sees the request. Envoy's limits.
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// Longest wait on one read from or write to a client (slow or stalled clients are cut off).
    pub client_timeout_secs: u64,
    /// Longest a request's header section may take to arrive; then 408 and close.
    pub header_timeout_secs: u64,
    /// Most client connections open at once; over it, new connections get 503 and are closed.
    pub max_connections: usize,
    /// Most request-body bytes buffered in memory across all requests; over it, a request whose
    /// body does not fit gets 503 with Retry-After.
    pub max_buffered_body_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            threads: 2,
            grace_period_secs: 30,
            idle_timeout_secs: 75,
            max_body_bytes: 32 * 1024 * 1024,
            max_header_bytes: 60 * 1024,
            max_headers: 100,
            client_timeout_secs: 60,
            header_timeout_secs: 10,
            max_connections: 10_000,
            max_buffered_body_bytes: 256 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://FILE` (created if missing) or `postgres://…`.
    pub url: String,
    pub max_connections: u32,
    /// Longest wait to reach the database (at start, for a CLI command, for a pooled connection).
    pub connect_timeout_secs: u64,
    /// The master key file sealing upstream credentials (64 hex digits); must exist. Unset (and no
    /// `TOLLGATE_MASTER_KEY`): `<sqlite file>.key`, or `tollgate.key` beside the config for
    /// PostgreSQL, created on first start.
    pub master_key_file: Option<String>,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "sqlite://tollgate.db".into(),
            max_connections: 8,
            connect_timeout_secs: 10,
            master_key_file: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// How long a found key is served without asking the database again.
    pub cache_ttl_secs: u64,
    /// How long past its load a found key is still served while the database cannot be reached
    /// (stale-if-error); revocations still evict it at once.
    pub max_stale_secs: u64,
    /// How long an unknown key hash stays cached as unknown.
    pub negative_ttl_secs: u64,
    /// Most keys kept in the cache.
    pub cache_capacity: u64,
    /// Failed authentications (401) a client address may cause per minute (GCRA: a burst of
    /// this many, then one every 60 s / this); over it, its keys that are not in the cache are
    /// refused (429) before the database is asked. 0 = no limit. `address_limits.rs`.
    pub failures_per_minute_per_address: u64,
    /// Most client addresses (IPv4, or IPv6 /64) whose failures are tracked at once.
    pub address_table_capacity: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            cache_ttl_secs: 60,
            max_stale_secs: 86_400,
            negative_ttl_secs: 5,
            cache_capacity: 100_000,
            failures_per_minute_per_address: 30,
            address_table_capacity: 100_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Accounts tried per request (first try included).
    pub max_attempts: usize,
    pub connect_timeout_ms: u64,
    /// Longest silence between two reads from the upstream; long LLM streams must survive it.
    pub read_timeout_secs: u64,
    /// Cooldown of a failing account when the upstream sends no `Retry-After`.
    pub cooldown_secs: u64,
    /// Upper bound on any cooldown, `Retry-After` included.
    pub max_cooldown_secs: u64,
    /// How long an idle upstream connection stays in the pool.
    pub pool_idle_timeout_secs: u64,
    /// Idle upstream connections kept per account per proxy thread (0 = no reuse).
    pub pool_max_idle: usize,
    /// How often accounts are re-read from the database (and DNS re-resolved).
    pub refresh_secs: u64,
    /// `anthropic-version` sent to Anthropic when the client sends none.
    pub anthropic_version: String,
    /// Hosts (names or addresses) an account may point at although they are link-local or
    /// cloud-metadata addresses, refused otherwise. Loopback and private networks need no entry.
    pub allow_hosts: Vec<String>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            max_attempts: 3,
            connect_timeout_ms: 5_000,
            read_timeout_secs: 600,
            cooldown_secs: 30,
            max_cooldown_secs: 600,
            pool_idle_timeout_secs: 90,
            pool_max_idle: 128,
            refresh_secs: 10,
            anthropic_version: "2023-06-01".into(),
            allow_hosts: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeteringConfig {
    /// Add `stream_options.include_usage` to OpenAI streaming requests that lack it (and strip the
    /// extra usage-only chunk from what the client receives), so streams are metered.
    pub inject_stream_usage: bool,
    /// Largest non-streaming JSON response read for usage; larger ones pass through with 0 tokens.
    pub max_json_body_bytes: usize,
    /// After a client leaves mid-response, how long tollgate keeps reading the upstream (which
    /// bills what it generates anyway) to see its usage report.
    pub abort_drain_secs: u64,
    /// ... and how many bytes it reads at most while doing so.
    pub abort_drain_bytes: u64,
}

impl Default for MeteringConfig {
    fn default() -> Self {
        MeteringConfig {
            inject_stream_usage: true,
            max_json_body_bytes: 4 * 1024 * 1024,
            abort_drain_secs: 60,
            abort_drain_bytes: 4 * 1024 * 1024,
        }
    }
}

/// Rate limits of every key without its own (set per key or per user in the database: `keys
/// create/update --rpm …`, `users update`). 0 = no limit.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Requests per minute.
    pub rpm: u64,
    /// Requests per day.
    pub rpd: u64,
    /// Tokens (input + output) per minute; a request is admitted on an estimate and settled on
    /// its usage.
    pub tpm: u64,
    /// Requests in flight at once.
    pub max_concurrent: u64,
    /// The completion tokens a request that names no `max_tokens` is admitted on.
    pub default_max_tokens: u64,
    /// `redis://…`: limits shared by every instance using it (unset: each instance alone).
    pub redis_url: Option<String>,
    /// Prefix of every Redis key; instances that share limits share it.
    pub redis_key_prefix: String,
    /// Longest an admission waits on Redis before `fail` applies.
    pub redis_timeout_ms: u64,
    /// While Redis is unreachable: "local" (each instance its share) or "closed" (refuse).
    pub fail: String,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            rpm: 0,
            rpd: 0,
            tpm: 0,
            max_concurrent: 0,
            default_max_tokens: 4096,
            redis_url: None,
            redis_key_prefix: "tollgate:limits:".into(),
            redis_timeout_ms: 250,
            fail: "local".into(),
        }
    }
}

/// Budgets and prepaid credits (`spend.rs`): how a request's worst case is reserved before it
/// is sent, and the leases instances take from budgets and balances. The budgets and balances
/// themselves are in the database (`tollgate budgets set`, `tollgate credits grant`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpendConfig {
    /// Output tokens reserved for a request that states no `max_tokens` (what such a request
    /// spends beyond it is settled all the same: the bound in ARCHITECTURE.md).
    pub default_max_output_tokens: u64,
    /// Tokens reserved for each image or audio part of a request.
    pub tokens_per_media_part: u64,
    /// A lease holds this many reservations like the request that asked for it (at most what
    /// is left).
    pub reservations_per_lease: u64,
    /// A lease not renewed for this long (its instance died) goes back to its budget.
    pub lease_ttl_secs: u64,
    /// Longest a request waits for a lease from the database before `fail` applies.
    pub lease_wait_ms: u64,
    /// The unused part of a lease goes back after this long without a request.
    pub idle_return_secs: u64,
    /// When a lease is needed and the database cannot answer: "closed" (refuse, 503) or "open"
    /// (admit without a reservation).
    pub fail: String,
    /// Cut a stream of a request without `max_tokens` when its output passes what its
    /// reservation covers and no lease can extend it (README "Budgets and prepaid credits").
    pub cut_streams: bool,
}

impl Default for SpendConfig {
    fn default() -> Self {
        SpendConfig {
            default_max_output_tokens: 4096,
            tokens_per_media_part: 3000,
            reservations_per_lease: 32,
            lease_ttl_secs: 30,
            lease_wait_ms: 2000,
            idle_return_secs: 10,
            fail: "closed".into(),
            cut_streams: false,
        }
    }
}

/// The Prometheus and health listener.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `GET /metrics`, `/healthz`, `/readyz`. Loopback by default.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
        }
    }
}

/// The admin API listener. Every route needs `Authorization: Bearer $TOLLGATE_ADMIN_TOKEN`; without
/// that variable the admin API is off.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// How often every instance re-checks keys and users changed in the database (the safety net
    /// behind PostgreSQL LISTEN/NOTIFY, and the only mechanism on SQLite).
    pub key_refresh_ms: u64,
    /// The admin token's name in the audit log: its actions are by `admin-token:<token_name>`
    /// (never the token itself). Letters, digits, `.`, `_`, `-`; at most 64.
    pub token_name: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9091)),
            key_refresh_ms: 1000,
            token_name: "default".into(),
        }
    }
}

/// The usage writer; see `writer.rs` for the guarantees these bound.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WriterConfig {
    /// Rows per flush (one transaction).
    pub batch_size: usize,
    /// Longest a queued row waits before a flush.
    pub flush_interval_ms: u64,
    /// Records the request path can queue before it counts a loss.
    pub queue_capacity: usize,
    /// Queue depth above which batches go to the spool instead of the database.
    pub high_water: usize,
    /// Where batches go while the database is down or slow.
    pub spool_dir: PathBuf,
    pub spool_segment_bytes: u64,
    /// A flush that takes longer counts as failed (and the batch is spooled).
    pub flush_timeout_ms: u64,
    /// Upper bound of the exponential backoff between attempts to reach a down database.
    pub max_backoff_ms: u64,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            batch_size: 1000,
            flush_interval_ms: 200,
            queue_capacity: 200_000,
            high_water: 100_000,
            spool_dir: PathBuf::from("spool"),
            spool_segment_bytes: 16 * 1024 * 1024,
            flush_timeout_ms: 5_000,
            max_backoff_ms: 5_000,
        }
    }
}

/// A path prefix and the account type that serves it. The longest matching prefix wins.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub prefix: String,
    #[serde(rename = "type")]
    pub kind: AccountType,
}

fn default_routes() -> Vec<Route> {
    vec![
        Route {
            prefix: "/v1/messages".into(),
            kind: AccountType::Anthropic,
        },
        Route {
            prefix: "/v1/".into(),
            kind: AccountType::Openai,
        },
    ]
}

/// An upstream account declared in the file; upserted into `upstream_accounts` by name at start.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    pub name: Spanned<String>,
    #[serde(rename = "type")]
    pub kind: AccountType,
    pub base_url: Spanned<String>,
    /// The secret, or `${ENV_VAR}` to read it from the environment at start.
    pub api_key: Spanned<String>,
    /// For `generic` accounts: the header that carries `api_key` (default `authorization`, as a bearer).
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default = "one")]
    pub priority: i32,
    #[serde(default = "one_u")]
    pub weight: u32,
    #[serde(default = "yes")]
    pub is_active: bool,
    #[serde(default)]
    pub email: Option<String>,
    /// The provider's limits on this account, declared so it is skipped at them instead of
    /// answering 429 (`account_limits.rs`); unset or 0 = none. Requests per minute.
    #[serde(default)]
    pub rpm: Option<Spanned<u64>>,
    /// Tokens (input + output) per minute.
    #[serde(default)]
    pub tpm: Option<Spanned<u64>>,
    /// Requests in flight at once.
    #[serde(default)]
    pub max_concurrent: Option<Spanned<u64>>,
}

fn one() -> i32 {
    1
}
fn one_u() -> u32 {
    1
}
fn yes() -> bool {
    true
}

/// A configuration that cannot be used, with where and why.
#[derive(Debug)]
pub struct ConfigError {
    pub path: String,
    /// 1-based line of the offending value; 0 when the problem has no single place.
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            0 => write!(f, "{}: {}", self.path, self.message),
            n => write!(f, "{}:{}: {}", self.path, n, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Parses TOML text (no validation beyond types and unknown keys: that is `settings.rs`);
    /// `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(0, |s| line_of(text, s.start));
            // toml says nothing about some bytes (a control character in a comment): found by
            // the `config` fuzz target; the error must still say what is wrong.
            let message = match e.message().trim() {
                "" => "not valid TOML (a control character?)".to_string(),
                m => m.to_string(),
            };
            ConfigError {
                path: origin.to_string(),
                line,
                message,
            }
        })
    }
}

/// Where settings are written in a file's text, to point errors at their line.
pub struct Locator<'a> {
    text: &'a str,
    doc: Option<toml_edit::ImDocument<&'a str>>,
}

impl<'a> Locator<'a> {
    pub fn new(text: &'a str) -> Locator<'a> {
        Locator {
            text,
            doc: toml_edit::ImDocument::parse(text).ok(),
        }
    }

    /// 1-based line of `[section] key`'s value; 0 when it is not written in the file (a default).
    pub fn line(&self, section: &str, key: &str) -> usize {
        self.doc
            .as_ref()
            .and_then(|d| d.get(section)?.get(key)?.span())
            .map_or(0, |s| line_of(self.text, s.start))
    }

    /// 1-based line of a byte range (from a `Spanned` value).
    pub fn line_of_span(&self, span: Range<usize>) -> usize {
        line_of(self.text, span.start)
    }
}

/// Replaces a whole-value `${VAR}` with the variable's value; anything else is taken literally.
pub fn expand_env(value: &str) -> Result<String, String> {
    match value.strip_prefix("${").and_then(|v| v.strip_suffix('}')) {
        Some(var) => {
            std::env::var(var).map_err(|_| format!("environment variable {var} is not set"))
        }
        None => Ok(value.to_string()),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The config file to read: `$TOLLGATE_CONFIG`, else `./config.toml`; `true` when it was named
/// explicitly (then it must exist; the default location may be missing, which means defaults).
pub fn default_path() -> (PathBuf, bool) {
    match std::env::var(CONFIG_ENV) {
        Ok(p) if !p.is_empty() => (PathBuf::from(p), true),
        _ => (PathBuf::from("config.toml"), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_err(text: &str, expected: &str) {
        let err = Config::parse(text, "config.toml").expect_err("must fail");
        assert_eq!(err.to_string(), expected);
    }

    /// Found by the `config` fuzz target: toml's message for a control character in a comment
    /// is empty, which printed `config.toml:2: ` and nothing else.
    #[test]
    fn a_control_character_is_named() {
        check_err(
            "# a\u{1e}b\n",
            "config.toml:1: not valid TOML (a control character?)",
        );
        check_err(
            "[server]\n# x\0\n",
            "config.toml:2: not valid TOML (a control character?)",
        );
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::parse("", "config.toml").unwrap(), Config::default());
    }

    /// The shipped config.toml documents the defaults: parsed, it is exactly `Config::default()`
    /// apart from the example prices it ships.
    #[test]
    fn shipped_config_is_the_defaults() {
        let mut shipped = Config::parse(include_str!("../config.toml"), "config.toml").unwrap();
        let models: Vec<&str> = {
            let mut m: Vec<&str> = shipped.prices.keys().collect();
            m.sort_unstable();
            m
        };
        assert_eq!(
            models,
            [
                "claude-3-5-sonnet",
                "gpt-4o",
                "gpt-4o-mini",
                "text-embedding-3-small"
            ]
        );
        shipped.prices = PriceTable::default();
        assert_eq!(shipped, Config::default());
    }

    #[test]
    fn type_errors_name_the_line() {
        check_err(
            "[server]\nlisten = \"nope\"\n",
            "config.toml:2: invalid socket address syntax",
        );
        check_err("[server]\nbogus = 1\n", "config.toml:2: unknown field `bogus`, expected one of `listen`, `threads`, `grace_period_secs`, `idle_timeout_secs`, `max_body_bytes`, `max_header_bytes`, `max_headers`, `client_timeout_secs`, `header_timeout_secs`, `max_connections`, `max_buffered_body_bytes`");
        check_err(
            "[[upstream_accounts]]\nname = \"a\"\ntype = \"nope\"\nbase_url = \"http://x\"\napi_key = \"k\"\n",
            "config.toml:3: unknown variant `nope`, expected one of `openai`, `anthropic`, `generic`",
        );
        check_err(
            "[server]\nthreads = -1\n",
            "config.toml:2: invalid value: integer `-1`, expected usize",
        );
    }

    #[test]
    fn locator_finds_lines() {
        let text = "# c\n[server]\nthreads = 0\n\n[writer]\nbatch_size = 1\n";
        let at = Locator::new(text);
        assert_eq!(at.line("server", "threads"), 3);
        assert_eq!(at.line("writer", "batch_size"), 6);
        assert_eq!(at.line("writer", "flush_interval_ms"), 0);
        assert_eq!(at.line("nope", "x"), 0);
    }
}
