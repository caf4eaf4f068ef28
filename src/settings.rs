//! Typed settings, validated once: built from the config file (`config.rs`) after the environment
//! overrides, with durations as [`Duration`], counts that cannot be zero as `NonZero*`, and every
//! zero, negative or absurd value refused as `PATH:LINE: what is wrong` (never clamped where it
//! is used). Everything the program reads of its configuration comes from here.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderValue;

use crate::config::{expand_env, AccountConfig, Config, ConfigError, Locator};
use crate::cost::{Price, PriceTable};
use crate::upstream::{AccountType, Endpoint};

/// Environment variable that overrides `[database] url` (validated like the file's value).
pub const DATABASE_URL_ENV: &str = "TOLLGATE_DATABASE_URL";

/// Everything the gateway and the CLI read of their configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub server: Server,
    pub database: Database,
    pub auth: Auth,
    pub upstream: Upstream,
    /// Path prefix → account type, as written (the router orders them).
    pub routes: Vec<(String, AccountType)>,
    /// Accounts declared in the file (validated: unique names, URLs, `${VAR}`s that resolve).
    pub upstream_accounts: Vec<AccountConfig>,
    pub metering: Metering,
    /// `[limits]`: the rate limits of keys without their own.
    pub limits: crate::limits::Defaults,
    /// `[limits] redis_*`: where limits are shared across instances (`None`: per instance).
    pub shared_limits: Option<crate::shared_limits::Settings>,
    /// `[spend]`: reservations and leases of budgets and credits.
    pub spend: crate::spend::SpendSettings,
    pub writer: Writer,
    pub metrics: Metrics,
    pub admin: Admin,
    pub prices: PriceTable,
    pub default_prices: HashMap<AccountType, Price>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    pub listen: SocketAddr,
    pub threads: NonZeroUsize,
    pub grace_period: Duration,
    pub idle_timeout: Duration,
    pub max_body_bytes: NonZeroUsize,
    pub max_header_bytes: NonZeroUsize,
    pub max_headers: NonZeroUsize,
    pub client_timeout: Duration,
    pub header_timeout: Duration,
    pub max_connections: NonZeroUsize,
    /// At least `max_body_bytes`: one largest body always fits.
    pub max_buffered_body_bytes: NonZeroUsize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Database {
    /// `sqlite://…` (a relative file resolved against the config file's directory) or
    /// `postgres://…`.
    pub url: String,
    pub max_connections: NonZeroU32,
    pub connect_timeout: Duration,
    /// The master key file (`keyring.rs`): `[database] master_key_file` resolved against the
    /// config's directory (`explicit`: must exist), else the default created on first start.
    pub master_key_file: PathBuf,
    pub master_key_file_explicit: bool,
}

impl Database {
    /// The SQLite file, for a `sqlite://` URL naming one.
    pub fn sqlite_file(&self) -> Option<PathBuf> {
        let rest = self
            .url
            .strip_prefix("sqlite://")
            .or_else(|| self.url.strip_prefix("sqlite:"))?;
        let file = rest.split('?').next().unwrap_or(rest);
        (!file.is_empty() && file != ":memory:").then(|| PathBuf::from(file))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Auth {
    pub cache_ttl: Duration,
    /// At least `cache_ttl`.
    pub max_stale: Duration,
    pub negative_ttl: Duration,
    pub cache_capacity: NonZeroU64,
    /// Failed authentications per minute per client address (`address_limits.rs`); 0 = no limit.
    pub failures_per_minute_per_address: u64,
    /// Most client addresses tracked at once by that limit.
    pub address_table_capacity: NonZeroU64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub max_attempts: NonZeroUsize,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub cooldown: Duration,
    pub max_cooldown: Duration,
    pub pool_idle_timeout: Duration,
    /// 0 = no connection reuse.
    pub pool_max_idle: usize,
    pub refresh: Duration,
    pub anthropic_version: HeaderValue,
    /// Hosts allowed although link-local or cloud metadata (see `upstream::forbidden_host`).
    pub allow_hosts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Metering {
    pub inject_stream_usage: bool,
    pub max_json_body_bytes: NonZeroUsize,
    /// After a client leaves mid-response: how long, and how many bytes, the upstream is still read
    /// for its usage report.
    pub abort_drain: Duration,
    pub abort_drain_bytes: NonZeroU64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Writer {
    pub batch_size: NonZeroUsize,
    pub flush_interval: Duration,
    pub queue_capacity: NonZeroUsize,
    /// At most `queue_capacity`.
    pub high_water: NonZeroUsize,
    /// Resolved against the config file's directory when relative.
    pub spool_dir: PathBuf,
    pub spool_segment_bytes: NonZeroU64,
    pub flush_timeout: Duration,
    pub max_backoff: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    pub listen: SocketAddr,
    pub key_refresh: Duration,
    /// The admin token's name in the audit log (`admin-token:<name>`).
    pub token_name: String,
}

/// What is wrong and where: a `[section] key`, a span of the text, or an environment variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub at: Place,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    Key(&'static str, &'static str),
    Span(std::ops::Range<usize>),
    Env(&'static str),
}

fn invalid(at: Place, message: impl Into<String>) -> Invalid {
    Invalid {
        at,
        message: message.into(),
    }
}

const SECOND: u64 = 1;
const MINUTE: u64 = 60;
const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;
const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
/// Largest rate limit (requests or tokens per period) and concurrency limit; the same bounds
/// as a key's or user's own (`ops.rs`), stated in `limits.rs`.
const MAX_RATE: u64 = crate::limits::MAX_RATE;
const MAX_CONCURRENT: u64 = crate::limits::MAX_CONCURRENT;

/// `value` within `min..=max`, else an error naming the setting and the range.
fn within(
    section: &'static str,
    key: &'static str,
    value: u64,
    min: u64,
    max: u64,
) -> Result<u64, Invalid> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(invalid(
            Place::Key(section, key),
            format!(
                "[{section}] {key} = {value} is out of range: it must be between {min} and {max}"
            ),
        ))
    }
}

fn secs(
    section: &'static str,
    key: &'static str,
    value: u64,
    max: u64,
) -> Result<Duration, Invalid> {
    within(section, key, value, SECOND, max).map(Duration::from_secs)
}

fn millis(
    section: &'static str,
    key: &'static str,
    value: u64,
    min: u64,
    max: u64,
) -> Result<Duration, Invalid> {
    within(section, key, value, min, max).map(Duration::from_millis)
}

/// `value` within `min..=max` (`min` ≥ 1), as a non-zero count.
fn nonzero_u64(
    section: &'static str,
    key: &'static str,
    value: u64,
    min: u64,
    max: u64,
) -> Result<NonZeroU64, Invalid> {
    let v = within(section, key, value, min.max(1), max)?;
    NonZeroU64::new(v).ok_or_else(|| invalid(Place::Key(section, key), "must not be 0"))
}

fn nonzero_usize(
    section: &'static str,
    key: &'static str,
    value: usize,
    max: u64,
) -> Result<NonZeroUsize, Invalid> {
    let v = within(section, key, value as u64, 1, max)?;
    // In range 1..=max, so neither zero nor wider than usize.
    NonZeroUsize::new(v as usize).ok_or_else(|| invalid(Place::Key(section, key), "must not be 0"))
}

impl Settings {
    /// Reads the file (a missing file at the default location gives the defaults), applies the
    /// environment overrides, and validates everything once.
    pub fn load(path: &Path, explicit: bool) -> Result<Settings, ConfigError> {
        let origin = path.display().to_string();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => String::new(),
            Err(e) => {
                return Err(ConfigError {
                    path: origin,
                    line: 0,
                    message: format!("cannot read: {e}"),
                })
            }
        };
        let env_url = std::env::var(DATABASE_URL_ENV)
            .ok()
            .filter(|u| !u.is_empty());
        let base = path.parent().unwrap_or(Path::new("."));
        Settings::from_text(&text, &origin, base, env_url)
    }

    /// Parses and validates TOML text; `origin` names the file in errors, `base` is the
    /// directory relative paths are resolved against, `env_url` the database URL override.
    pub fn from_text(
        text: &str,
        origin: &str,
        base: &Path,
        env_url: Option<String>,
    ) -> Result<Settings, ConfigError> {
        let mut file = Config::parse(text, origin)?;
        let url_from_env = env_url.is_some();
        if let Some(url) = env_url {
            file.database.url = url;
        }
        Settings::build(&file, base, url_from_env).map_err(|e| {
            let at = Locator::new(text);
            let (path, line) = match e.at {
                Place::Key(section, key) => (origin.to_string(), at.line(section, key)),
                Place::Span(span) => (origin.to_string(), at.line_of_span(span)),
                Place::Env(var) => (var.to_string(), 0),
            };
            ConfigError {
                path,
                line,
                message: e.message,
            }
        })
    }

    /// Validates a parsed file. `url_from_env`: the database URL came from
    /// [`DATABASE_URL_ENV`] (errors name the variable; a relative SQLite path stays relative to
    /// the working directory, as for any path given on the command line).
    pub fn build(file: &Config, base: &Path, url_from_env: bool) -> Result<Settings, Invalid> {
        let s = &file.server;
        let server = Server {
            listen: s.listen,
            threads: nonzero_usize("server", "threads", s.threads, 256)?,
            grace_period: secs("server", "grace_period_secs", s.grace_period_secs, HOUR)?,
            idle_timeout: secs("server", "idle_timeout_secs", s.idle_timeout_secs, HOUR)?,
            max_body_bytes: nonzero_usize("server", "max_body_bytes", s.max_body_bytes, GIB)?,
            // pingora itself refuses more than 1 MiB or 256 fields: tighter limits only.
            max_header_bytes: nonzero_usize("server", "max_header_bytes", s.max_header_bytes, MIB)?,
            max_headers: nonzero_usize("server", "max_headers", s.max_headers, 256)?,
            client_timeout: secs("server", "client_timeout_secs", s.client_timeout_secs, HOUR)?,
            header_timeout: secs("server", "header_timeout_secs", s.header_timeout_secs, 600)?,
            max_connections: nonzero_usize(
                "server",
                "max_connections",
                s.max_connections,
                1_000_000,
            )?,
            max_buffered_body_bytes: nonzero_usize(
                "server",
                "max_buffered_body_bytes",
                s.max_buffered_body_bytes,
                64 * GIB,
            )?,
        };
        if server.max_buffered_body_bytes < server.max_body_bytes {
            return Err(invalid(
                Place::Key("server", "max_buffered_body_bytes"),
                format!(
                    "[server] max_buffered_body_bytes = {} is below max_body_bytes ({}): a body of the largest allowed size could never be buffered",
                    server.max_buffered_body_bytes, server.max_body_bytes
                ),
            ));
        }

        let url_place = if url_from_env {
            Place::Env(DATABASE_URL_ENV)
        } else {
            Place::Key("database", "url")
        };
        let database = Database {
            url: database_url(&file.database.url, base, url_from_env)
                .map_err(|m| invalid(url_place, m))?,
            max_connections: NonZeroU32::new(within(
                "database",
                "max_connections",
                u64::from(file.database.max_connections),
                1,
                1000,
            )? as u32)
            .ok_or_else(|| invalid(Place::Key("database", "max_connections"), "must not be 0"))?,
            connect_timeout: secs(
                "database",
                "connect_timeout_secs",
                file.database.connect_timeout_secs,
                10 * MINUTE,
            )?,
            master_key_file: PathBuf::new(),
            master_key_file_explicit: file.database.master_key_file.is_some(),
        };
        let database = Database {
            master_key_file: master_key_file(
                &database,
                file.database.master_key_file.as_deref(),
                base,
            )?,
            ..database
        };

        let a = &file.auth;
        let cache_ttl = secs("auth", "cache_ttl_secs", a.cache_ttl_secs, DAY)?;
        let max_stale = secs("auth", "max_stale_secs", a.max_stale_secs, 30 * DAY)?;
        if max_stale < cache_ttl {
            return Err(invalid(
                Place::Key("auth", "max_stale_secs"),
                format!(
                    "[auth] max_stale_secs = {} must be at least cache_ttl_secs = {}",
                    a.max_stale_secs, a.cache_ttl_secs
                ),
            ));
        }
        let auth = Auth {
            cache_ttl,
            max_stale,
            negative_ttl: secs("auth", "negative_ttl_secs", a.negative_ttl_secs, HOUR)?,
            cache_capacity: nonzero_u64(
                "auth",
                "cache_capacity",
                a.cache_capacity,
                1,
                100_000_000,
            )?,
            failures_per_minute_per_address: within(
                "auth",
                "failures_per_minute_per_address",
                a.failures_per_minute_per_address,
                0,
                MAX_RATE,
            )?,
            address_table_capacity: nonzero_u64(
                "auth",
                "address_table_capacity",
                a.address_table_capacity,
                1,
                100_000_000,
            )?,
        };

        let u = &file.upstream;
        let cooldown = secs("upstream", "cooldown_secs", u.cooldown_secs, DAY)?;
        let max_cooldown = secs(
            "upstream",
            "max_cooldown_secs",
            u.max_cooldown_secs,
            7 * DAY,
        )?;
        if max_cooldown < cooldown {
            return Err(invalid(
                Place::Key("upstream", "max_cooldown_secs"),
                format!(
                    "[upstream] max_cooldown_secs = {} must be at least cooldown_secs = {}",
                    u.max_cooldown_secs, u.cooldown_secs
                ),
            ));
        }
        let upstream = Upstream {
            max_attempts: nonzero_usize("upstream", "max_attempts", u.max_attempts, 10)?,
            connect_timeout: millis(
                "upstream",
                "connect_timeout_ms",
                u.connect_timeout_ms,
                1,
                10 * MINUTE * 1000,
            )?,
            read_timeout: secs("upstream", "read_timeout_secs", u.read_timeout_secs, DAY)?,
            cooldown,
            max_cooldown,
            pool_idle_timeout: secs(
                "upstream",
                "pool_idle_timeout_secs",
                u.pool_idle_timeout_secs,
                HOUR,
            )?,
            pool_max_idle: within(
                "upstream",
                "pool_max_idle",
                u.pool_max_idle as u64,
                0,
                100_000,
            )? as usize,
            refresh: secs("upstream", "refresh_secs", u.refresh_secs, HOUR)?,
            anthropic_version: HeaderValue::from_str(&u.anthropic_version)
                .ok()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    invalid(
                        Place::Key("upstream", "anthropic_version"),
                        format!(
                            "[upstream] anthropic_version {:?} is not a header value",
                            u.anthropic_version
                        ),
                    )
                })?,
            allow_hosts: u
                .allow_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
        };

        let m = &file.metering;
        let metering = Metering {
            inject_stream_usage: m.inject_stream_usage,
            max_json_body_bytes: nonzero_usize(
                "metering",
                "max_json_body_bytes",
                m.max_json_body_bytes,
                GIB,
            )?,
            abort_drain: secs("metering", "abort_drain_secs", m.abort_drain_secs, HOUR)?,
            abort_drain_bytes: nonzero_u64(
                "metering",
                "abort_drain_bytes",
                m.abort_drain_bytes,
                1,
                GIB,
            )?,
        };

        let l = &file.limits;
        let limits = crate::limits::Defaults {
            key: crate::limits::Limits {
                rpm: within("limits", "rpm", l.rpm, 0, MAX_RATE)?,
                rpd: within("limits", "rpd", l.rpd, 0, MAX_RATE)?,
                tpm: within("limits", "tpm", l.tpm, 0, MAX_RATE)?,
                max_concurrent: within(
                    "limits",
                    "max_concurrent",
                    l.max_concurrent,
                    0,
                    MAX_CONCURRENT,
                )?,
            },
            default_max_tokens: nonzero_u64(
                "limits",
                "default_max_tokens",
                l.default_max_tokens,
                1,
                MAX_RATE,
            )?,
        };

        let shared_limits = shared_limits(l)?;
        let spend = spend(&file.spend)?;

        let w = &file.writer;
        let queue_capacity =
            nonzero_usize("writer", "queue_capacity", w.queue_capacity, 100_000_000)?;
        let writer = Writer {
            batch_size: nonzero_usize("writer", "batch_size", w.batch_size, 100_000)?,
            flush_interval: millis(
                "writer",
                "flush_interval_ms",
                w.flush_interval_ms,
                1,
                MINUTE * 1000,
            )?,
            queue_capacity,
            high_water: nonzero_usize(
                "writer",
                "high_water",
                w.high_water,
                queue_capacity.get() as u64,
            )?,
            spool_dir: if w.spool_dir.as_os_str().is_empty() {
                return Err(invalid(
                    Place::Key("writer", "spool_dir"),
                    "[writer] spool_dir must not be empty",
                ));
            } else {
                base.join(&w.spool_dir)
            },
            spool_segment_bytes: nonzero_u64(
                "writer",
                "spool_segment_bytes",
                w.spool_segment_bytes,
                4 * KIB,
                GIB,
            )?,
            flush_timeout: millis(
                "writer",
                "flush_timeout_ms",
                w.flush_timeout_ms,
                1,
                10 * MINUTE * 1000,
            )?,
            max_backoff: millis(
                "writer",
                "max_backoff_ms",
                w.max_backoff_ms,
                100,
                HOUR * 1000,
            )?,
        };

        let metrics = Metrics {
            listen: file.metrics.listen,
        };
        let admin = Admin {
            listen: file.admin.listen,
            key_refresh: millis(
                "admin",
                "key_refresh_ms",
                file.admin.key_refresh_ms,
                100,
                MINUTE * 1000,
            )?,
            token_name: token_name(&file.admin.token_name)?,
        };
        distinct_listeners(&[
            ("server", server.listen),
            ("metrics", metrics.listen),
            ("admin", admin.listen),
        ])?;

        let mut routes = Vec::with_capacity(file.routes.len());
        for r in &file.routes {
            if !r.prefix.starts_with('/') {
                return Err(invalid(
                    Place::Key("routes", "prefix"),
                    format!("route prefix {:?} must start with '/'", r.prefix),
                ));
            }
            routes.push((r.prefix.clone(), r.kind));
        }
        check_accounts(&file.upstream_accounts)?;

        Ok(Settings {
            server,
            database,
            auth,
            upstream,
            routes,
            upstream_accounts: file.upstream_accounts.clone(),
            metering,
            limits,
            shared_limits,
            spend,
            writer,
            metrics,
            admin,
            prices: file.prices.clone(),
            default_prices: file.default_prices.clone(),
        })
    }
}

/// `[spend]`.
fn spend(c: &crate::config::SpendConfig) -> Result<crate::spend::SpendSettings, Invalid> {
    use crate::spend::FailPolicy;
    let fail = match c.fail.as_str() {
        "closed" => FailPolicy::Closed,
        "open" => FailPolicy::Open,
        other => {
            return Err(invalid(
                Place::Key("spend", "fail"),
                format!("[spend] fail = {other:?}: it must be \"closed\" or \"open\""),
            ))
        }
    };
    let ttl = secs("spend", "lease_ttl_secs", c.lease_ttl_secs, 3600)?;
    let idle = secs("spend", "idle_return_secs", c.idle_return_secs, 3600)?;
    Ok(crate::spend::SpendSettings {
        sizing: crate::budget::Sizing {
            default_max_output_tokens: within(
                "spend",
                "default_max_output_tokens",
                c.default_max_output_tokens,
                1,
                10_000_000,
            )?,
            tokens_per_media_part: within(
                "spend",
                "tokens_per_media_part",
                c.tokens_per_media_part,
                1,
                1_000_000,
            )?,
        },
        reservations_per_lease: within(
            "spend",
            "reservations_per_lease",
            c.reservations_per_lease,
            1,
            100_000,
        )? as i64,
        lease_ttl: ttl,
        lease_wait: millis("spend", "lease_wait_ms", c.lease_wait_ms, 10, 60_000)?,
        idle_return: idle,
        fail,
        cut_streams: c.cut_streams,
    })
}

/// `[admin] token_name`: 1 to 64 letters, digits, `.`, `_` or `-` (it names an actor in the
/// audit log, so no spaces, colons or control characters).
fn token_name(name: &str) -> Result<String, Invalid> {
    let ok = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(name.to_string())
    } else {
        Err(invalid(
            Place::Key("admin", "token_name"),
            format!("[admin] token_name {name:?} must be 1 to 64 letters, digits, '.', '_' or '-'"),
        ))
    }
}

/// `[limits] redis_url` and what goes with it.
fn shared_limits(
    l: &crate::config::LimitsConfig,
) -> Result<Option<crate::shared_limits::Settings>, Invalid> {
    use crate::shared_limits::FailPolicy;
    let fail = match l.fail.as_str() {
        "local" => FailPolicy::Local,
        "closed" => FailPolicy::Closed,
        other => {
            return Err(invalid(
                Place::Key("limits", "fail"),
                format!("[limits] fail = {other:?}: it must be \"local\" or \"closed\""),
            ))
        }
    };
    let timeout = millis("limits", "redis_timeout_ms", l.redis_timeout_ms, 1, 60_000)?;
    let Some(url) = l.redis_url.as_deref() else {
        return Ok(None);
    };
    if !url.starts_with("redis://") {
        return Err(invalid(
            Place::Key("limits", "redis_url"),
            format!(
                "[limits] redis_url must start with redis:// (got {url:?}; TLS is not supported)"
            ),
        ));
    }
    if let Err(e) = redis::Client::open(url) {
        return Err(invalid(
            Place::Key("limits", "redis_url"),
            format!("[limits] redis_url is not a Redis URL: {e}"),
        ));
    }
    if l.redis_key_prefix.is_empty() || l.redis_key_prefix.len() > 200 {
        return Err(invalid(
            Place::Key("limits", "redis_key_prefix"),
            "[limits] redis_key_prefix must be 1 to 200 characters",
        ));
    }
    Ok(Some(crate::shared_limits::Settings {
        url: url.to_string(),
        key_prefix: l.redis_key_prefix.clone(),
        timeout,
        fail,
    }))
}

impl Default for Settings {
    /// The built-in defaults (what an empty file gives), relative paths against the working
    /// directory. `defaults_are_valid` proves they validate.
    fn default() -> Settings {
        match Settings::build(&Config::default(), Path::new(""), false) {
            Ok(s) => s,
            Err(e) => panic!("the built-in defaults do not validate: {}", e.message),
        }
    }
}

/// `[database] master_key_file` against `base`; unset: `<sqlite file>.key` beside the database,
/// or `tollgate.key` beside the config (PostgreSQL, in-memory SQLite).
fn master_key_file(db: &Database, set: Option<&str>, base: &Path) -> Result<PathBuf, Invalid> {
    match (set, db.sqlite_file()) {
        (Some(""), _) => Err(invalid(
            Place::Key("database", "master_key_file"),
            "[database] master_key_file must not be empty (leave it out for the default)",
        )),
        (Some(f), _) => Ok(base.join(f)),
        (None, Some(file)) => {
            let mut name = file.into_os_string();
            name.push(".key");
            Ok(PathBuf::from(name))
        }
        (None, None) => Ok(base.join("tollgate.key")),
    }
}

/// A supported database URL; a relative SQLite file is resolved against `base` (the config
/// file's directory) unless the URL came from the environment.
fn database_url(url: &str, base: &Path, from_env: bool) -> Result<String, String> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(url.to_string());
    }
    let Some(rest) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    else {
        return Err(format!(
            "database url must start with sqlite:// or postgres:// (got {:?})",
            crate::store::redact_url(url)
        ));
    };
    let (file, query) = match rest.split_once('?') {
        Some((f, q)) => (f, Some(q)),
        None => (rest, None),
    };
    if file.is_empty() {
        return Err("a sqlite url needs a file: sqlite://PATH".into());
    }
    if file == ":memory:" || Path::new(file).is_absolute() || from_env {
        return Ok(url.to_string());
    }
    let resolved = base.join(file);
    Ok(match query {
        Some(q) => format!("sqlite://{}?{q}", resolved.display()),
        None => format!("sqlite://{}", resolved.display()),
    })
}

/// Two listeners on one address (other than port 0, which picks a free port each) cannot bind.
fn distinct_listeners(listeners: &[(&'static str, SocketAddr)]) -> Result<(), Invalid> {
    for (i, (a, addr_a)) in listeners.iter().enumerate() {
        for (b, addr_b) in &listeners[i + 1..] {
            if addr_a.port() != 0 && addr_a == addr_b {
                return Err(invalid(
                    Place::Key(b, "listen"),
                    format!("[{b}] listen {addr_b} is also [{a}] listen: each listener needs its own address"),
                ));
            }
        }
    }
    Ok(())
}

fn check_accounts(accounts: &[AccountConfig]) -> Result<(), Invalid> {
    let mut names = HashSet::new();
    for a in accounts {
        let name = a.name.get_ref();
        let at_name = || Place::Span(a.name.span());
        if name.trim().is_empty() {
            return Err(invalid(at_name(), "account name must not be empty"));
        }
        if !names.insert(name.clone()) {
            return Err(invalid(
                at_name(),
                format!("account name {name:?} is declared twice"),
            ));
        }
        if let Err(e) = Endpoint::parse(a.base_url.get_ref()) {
            return Err(invalid(Place::Span(a.base_url.span()), e));
        }
        if a.weight == 0 {
            return Err(invalid(
                at_name(),
                format!("account {name:?}: weight must be at least 1"),
            ));
        }
        if let Err(e) = expand_env(a.api_key.get_ref()) {
            return Err(invalid(Place::Span(a.api_key.span()), e));
        }
        for (key, value, max) in [
            ("rpm", &a.rpm, MAX_RATE),
            ("tpm", &a.tpm, MAX_RATE),
            ("max_concurrent", &a.max_concurrent, MAX_CONCURRENT),
        ] {
            if let Some(v) = value.as_ref().filter(|v| *v.get_ref() > max) {
                return Err(invalid(
                    Place::Span(v.span()),
                    format!(
                        "account {name:?}: {key} = {} is out of range: it must be between 0 and {max}",
                        v.get_ref()
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, String> {
        Settings::from_text(text, "config.toml", Path::new("/etc/tollgate"), None)
            .map_err(|e| e.to_string())
    }

    fn check_err(text: &str, expected: &str) {
        assert_eq!(parse(text).expect_err(text), expected, "{text}");
    }

    #[test]
    fn defaults_are_valid() {
        let s = parse("").unwrap();
        assert_eq!(s.server.threads.get(), 2);
        assert_eq!(s.writer.flush_interval, Duration::from_millis(200));
        assert_eq!(s.database.url, "sqlite:///etc/tollgate/tollgate.db");
        assert_eq!(s.writer.spool_dir, PathBuf::from("/etc/tollgate/spool"));
        assert_eq!(Settings::default().database.url, "sqlite://tollgate.db");
        assert_eq!(
            s.database.master_key_file,
            PathBuf::from("/etc/tollgate/tollgate.db.key")
        );
        assert!(!s.database.master_key_file_explicit);
        for (text, file) in [
            (
                "[database]\nurl = \"postgres://h/db\"\n",
                "/etc/tollgate/tollgate.key",
            ),
            (
                "[database]\nurl = \"sqlite://:memory:\"\n",
                "/etc/tollgate/tollgate.key",
            ),
            (
                "[database]\nmaster_key_file = \"k/master.key\"\n",
                "/etc/tollgate/k/master.key",
            ),
            (
                "[database]\nmaster_key_file = \"/run/secrets/key\"\n",
                "/run/secrets/key",
            ),
        ] {
            assert_eq!(
                parse(text).unwrap().database.master_key_file,
                PathBuf::from(file),
                "{text}"
            );
        }
    }

    #[test]
    fn shipped_config_validates() {
        let s = parse(include_str!("../config.toml")).unwrap();
        assert_eq!(
            s,
            Settings {
                prices: s.prices.clone(),
                ..parse("").unwrap()
            }
        );
    }

    #[test]
    fn zero_and_absurd_values_name_the_line() {
        for (text, expected) in [
            ("[server]\nthreads = 100000\n", "config.toml:2: [server] threads = 100000 is out of range: it must be between 1 and 256"),
            ("[server]\nthreads = 0\n", "config.toml:2: [server] threads = 0 is out of range: it must be between 1 and 256"),
            ("\n[server]\nclient_timeout_secs = 0\n", "config.toml:3: [server] client_timeout_secs = 0 is out of range: it must be between 1 and 3600"),
            ("[server]\nheader_timeout_secs = 0\n", "config.toml:2: [server] header_timeout_secs = 0 is out of range: it must be between 1 and 600"),
            ("[server]\nmax_connections = 0\n", "config.toml:2: [server] max_connections = 0 is out of range: it must be between 1 and 1000000"),
            ("[limits]\nfail = \"open\"\n", "config.toml:2: [limits] fail = \"open\": it must be \"local\" or \"closed\""),
            ("[limits]\nredis_url = \"rediss://h:6379\"\n", "config.toml:2: [limits] redis_url must start with redis:// (got \"rediss://h:6379\"; TLS is not supported)"),
            ("[limits]\nredis_url = \"redis://h:notaport\"\n", "config.toml:2: [limits] redis_url is not a Redis URL: Redis URL did not parse - InvalidClientConfig"),
            ("[limits]\nredis_timeout_ms = 0\n", "config.toml:2: [limits] redis_timeout_ms = 0 is out of range: it must be between 1 and 60000"),
            ("[limits]\nredis_url = \"redis://h\"\nredis_key_prefix = \"\"\n", "config.toml:3: [limits] redis_key_prefix must be 1 to 200 characters"),
            ("[server]\nmax_body_bytes = 2048\nmax_buffered_body_bytes = 1024\n", "config.toml:3: [server] max_buffered_body_bytes = 1024 is below max_body_bytes (2048): a body of the largest allowed size could never be buffered"),
            ("[database]\nmax_connections = 0\n", "config.toml:2: [database] max_connections = 0 is out of range: it must be between 1 and 1000"),
            ("[admin]\ntoken_name = \"ops team\"\n", "config.toml:2: [admin] token_name \"ops team\" must be 1 to 64 letters, digits, '.', '_' or '-'"),
            ("[admin]\ntoken_name = \"\"\n", "config.toml:2: [admin] token_name \"\" must be 1 to 64 letters, digits, '.', '_' or '-'"),
            ("[database]\nmaster_key_file = \"\"\n", "config.toml:2: [database] master_key_file must not be empty (leave it out for the default)"),
            ("[auth]\ncache_ttl_secs = 0\n", "config.toml:2: [auth] cache_ttl_secs = 0 is out of range: it must be between 1 and 86400"),
            ("[auth]\ncache_ttl_secs = 60\nmax_stale_secs = 30\n", "config.toml:3: [auth] max_stale_secs = 30 must be at least cache_ttl_secs = 60"),
            ("[auth]\nfailures_per_minute_per_address = 1000000001\n", "config.toml:2: [auth] failures_per_minute_per_address = 1000000001 is out of range: it must be between 0 and 1000000000"),
            ("[auth]\naddress_table_capacity = 0\n", "config.toml:2: [auth] address_table_capacity = 0 is out of range: it must be between 1 and 100000000"),
            ("[writer]\nflush_timeout_ms = 0\n", "config.toml:2: [writer] flush_timeout_ms = 0 is out of range: it must be between 1 and 600000"),
            ("[writer]\nspool_segment_bytes = 0\n", "config.toml:2: [writer] spool_segment_bytes = 0 is out of range: it must be between 4096 and 1073741824"),
            ("[writer]\nbatch_size = 0\n", "config.toml:2: [writer] batch_size = 0 is out of range: it must be between 1 and 100000"),
            ("[writer]\nqueue_capacity = 10\nhigh_water = 11\n", "config.toml:3: [writer] high_water = 11 is out of range: it must be between 1 and 10"),
            ("[upstream]\nmax_attempts = 0\n", "config.toml:2: [upstream] max_attempts = 0 is out of range: it must be between 1 and 10"),
            ("[upstream]\ncooldown_secs = 60\nmax_cooldown_secs = 30\n", "config.toml:3: [upstream] max_cooldown_secs = 30 must be at least cooldown_secs = 60"),
            ("[upstream]\nanthropic_version = \"a\\nb\"\n", "config.toml:2: [upstream] anthropic_version \"a\\nb\" is not a header value"),
            ("[admin]\nkey_refresh_ms = 10\n", "config.toml:2: [admin] key_refresh_ms = 10 is out of range: it must be between 100 and 60000"),
            ("[metrics]\nlisten = \"127.0.0.1:8080\"\n", "config.toml:2: [metrics] listen 127.0.0.1:8080 is also [server] listen: each listener needs its own address"),
            ("[database]\nurl = \"mysql://x\"\n", "config.toml:2: database url must start with sqlite:// or postgres:// (got \"mysql://x\")"),
            ("[[routes]]\nprefix = \"v1\"\ntype = \"openai\"\n", "config.toml: route prefix \"v1\" must start with '/'"),
        ] {
            check_err(text, expected);
        }
    }

    #[test]
    fn account_errors_name_the_line() {
        check_err(
            "[[upstream_accounts]]\nname = \"a\"\ntype = \"openai\"\nbase_url = \"ftp://x\"\napi_key = \"k\"\n",
            "config.toml:4: base_url must start with http:// or https://",
        );
        check_err(
            "[[upstream_accounts]]\nname = \"a\"\ntype = \"openai\"\nbase_url = \"http://x\"\napi_key = \"k\"\n[[upstream_accounts]]\nname = \"a\"\ntype = \"openai\"\nbase_url = \"http://x\"\napi_key = \"k\"\n",
            "config.toml:7: account name \"a\" is declared twice",
        );
        check_err(
            "[[upstream_accounts]]\nname = \"a\"\ntype = \"openai\"\nbase_url = \"http://x\"\napi_key = \"${TOLLGATE_SURELY_UNSET_VAR}\"\n",
            "config.toml:5: environment variable TOLLGATE_SURELY_UNSET_VAR is not set",
        );
        let account = "[[upstream_accounts]]\nname = \"a\"\ntype = \"openai\"\nbase_url = \"http://x\"\napi_key = \"k\"\n";
        check_err(
            &format!("{account}rpm = 10\ntpm = 1000000001\n"),
            "config.toml:7: account \"a\": tpm = 1000000001 is out of range: it must be between 0 and 1000000000",
        );
        check_err(
            &format!("{account}max_concurrent = 1000001\n"),
            "config.toml:6: account \"a\": max_concurrent = 1000001 is out of range: it must be between 0 and 1000000",
        );
        let e = parse(&format!("{account}rpm = -1\n")).unwrap_err();
        assert!(e.starts_with("config.toml:6: "), "{e}");
        let s = parse(&format!("{account}rpm = 10\nmax_concurrent = 0\n")).unwrap();
        let a = &s.upstream_accounts[0];
        assert_eq!(a.rpm.as_ref().map(|v| *v.get_ref()), Some(10));
        assert_eq!(a.max_concurrent.as_ref().map(|v| *v.get_ref()), Some(0));
        assert!(a.tpm.is_none());
    }

    #[test]
    fn database_urls() {
        let base = Path::new("/srv/tg");
        for (url, from_env, expected) in [
            (
                "sqlite://tollgate.db",
                false,
                Ok("sqlite:///srv/tg/tollgate.db"),
            ),
            (
                "sqlite:tollgate.db?mode=rwc",
                false,
                Ok("sqlite:///srv/tg/tollgate.db?mode=rwc"),
            ),
            (
                "sqlite:///var/lib/t.db",
                false,
                Ok("sqlite:///var/lib/t.db"),
            ),
            ("sqlite://tollgate.db", true, Ok("sqlite://tollgate.db")),
            ("sqlite::memory:", false, Ok("sqlite::memory:")),
            ("postgres://u@h/db", false, Ok("postgres://u@h/db")),
            (
                "sqlite://",
                false,
                Err("a sqlite url needs a file: sqlite://PATH"),
            ),
        ] {
            assert_eq!(
                database_url(url, base, from_env).as_deref(),
                expected.map_err(str::to_string).as_deref(),
                "{url}"
            );
        }
    }

    #[test]
    fn spend_cut_streams() {
        assert!(!parse("").unwrap().spend.cut_streams, "off by default");
        assert!(
            parse("[spend]\ncut_streams = true\n")
                .unwrap()
                .spend
                .cut_streams
        );
        let e = parse("[spend]\ncut_streams = \"yes\"\n").unwrap_err();
        assert!(e.starts_with("config.toml:2"), "{e}");
    }

    #[test]
    fn sqlite_files() {
        let db = |url: &str| Database {
            url: url.into(),
            max_connections: NonZeroU32::MIN,
            connect_timeout: Duration::from_secs(1),
            master_key_file: PathBuf::new(),
            master_key_file_explicit: false,
        };
        assert_eq!(
            db("sqlite:///a/b.db?mode=rwc").sqlite_file(),
            Some(PathBuf::from("/a/b.db"))
        );
        assert_eq!(db("sqlite:x.db").sqlite_file(), Some(PathBuf::from("x.db")));
        assert_eq!(db("sqlite::memory:").sqlite_file(), None);
        assert_eq!(db("postgres://h/db").sqlite_file(), None);
    }

    #[test]
    fn env_url_is_validated_and_named() {
        let err = Settings::from_text("", "config.toml", Path::new("."), Some("mysql://x".into()))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "TOLLGATE_DATABASE_URL: database url must start with sqlite:// or postgres:// (got \"mysql://x\")"
        );
    }
}
