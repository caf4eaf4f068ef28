//! Prometheus metrics: the families tollgate exports, their handles (registered once at start,
//! or when what they count is loaded: a price's cost counter when the price table loads), and
//! the exporter's text. The request path only bumps registered handles and atomics, takes no lock
//! and allocates nothing here. What other modules keep in atomics (account stats, key cache,
//! writer) is copied in at scrape time by `health.rs`. No label carries a key, a user, a raw path
//! or a client-sent string: labels come from fixed sets, account names (bounded by the accounts)
//! and price-table keys.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use rust_decimal::Decimal;
use tokio::sync::watch;

use crate::limits;
use crate::record::UsageRecord;
use crate::upstream::AccountType;

/// Buckets for latencies: sub-millisecond resolution for tollgate's own overhead, up to the
/// minutes an LLM stream can take.
const SECONDS_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
const ROWS_BUCKETS: &[f64] = &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0];

const STATUS_CLASSES: [&str; 6] = ["none", "1xx", "2xx", "3xx", "4xx", "5xx"];
const UPSTREAM_TYPES: [&str; 4] = ["none", "openai", "anthropic", "generic"];
pub const AUTH_REASONS: [&str; 7] = [
    "missing",
    "malformed",
    "unknown",
    "revoked",
    "expired",
    "forbidden",
    "store_unavailable",
];
const TOKEN_KINDS: [&str; 4] = ["prompt", "completion", "cached", "cache_creation"];

/// Cost is counted in units of 1e-10 USD inside (see [`CostCounter`]), rendered as USD.
const COST_UNITS_PER_USD: u64 = 10_000_000_000;

pub struct Metrics {
    exporter: Option<PrometheusHandle>,
    requests: Vec<Counter>,
    pub request_duration: Histogram,
    pub upstream_duration: Histogram,
    pub overhead: Histogram,
    auth_failures: Vec<Counter>,
    /// `tollgate_rate_limited_total{scope,kind}`, indexed scope × kind.
    rate_limited: Vec<Counter>,
    tokens: Vec<Counter>,
    unpriced: Vec<Counter>,
    /// `tollgate_cost_total`: one counter per (account type, price key), made when prices load.
    pub cost: CostCounters,
    pub writer_batch_rows: Histogram,
    pub writer_flush_seconds: Histogram,
    reloads_ok: Counter,
    reloads_failed: Counter,
    /// What `conn.rs` refuses below HTTP.
    pub connections: crate::conn::Counters,
}

impl Metrics {
    /// Installs the Prometheus recorder and registers every fixed handle. Without a recorder
    /// (tests, CLI) use [`Metrics::noop`].
    pub fn install() -> Result<Metrics, String> {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("tollgate_writer_batch_rows".into()),
                    ROWS_BUCKETS,
                )
            })
            .map_err(|e| e.to_string())?
            .install_recorder()
            .map_err(|e| e.to_string())?;
        describe();
        Ok(Metrics::register(Some(handle)))
    }

    /// Folds the histogram samples recorded since the last upkeep or scrape into their buckets.
    pub fn run_upkeep(&self) {
        if let Some(h) = &self.exporter {
            h.run_upkeep();
        }
    }

    pub fn noop() -> Metrics {
        Metrics::register(None)
    }

    fn register(exporter: Option<PrometheusHandle>) -> Metrics {
        let mut requests = Vec::new();
        for class in STATUS_CLASSES {
            for kind in UPSTREAM_TYPES {
                requests.push(counter!("tollgate_requests_total", "status_class" => class, "upstream_type" => kind));
            }
        }
        gauge!("tollgate_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        Metrics {
            exporter,
            requests,
            request_duration: histogram!("tollgate_request_duration_seconds"),
            upstream_duration: histogram!("tollgate_upstream_duration_seconds"),
            overhead: histogram!("tollgate_overhead_seconds"),
            auth_failures: AUTH_REASONS
                .iter()
                .map(|r| counter!("tollgate_auth_failures_total", "reason" => *r))
                .collect(),
            rate_limited: limits::Scope::ALL
                .iter()
                .flat_map(|s| {
                    limits::Kind::ALL.iter().map(move |k| {
                        counter!("tollgate_rate_limited_total", "scope" => s.label(), "kind" => k.label())
                    })
                })
                .collect(),
            tokens: TOKEN_KINDS
                .iter()
                .map(|k| counter!("tollgate_tokens_total", "kind" => *k))
                .collect(),
            unpriced: AccountType::ALL
                .iter()
                .map(|t| counter!("tollgate_unpriced_requests_total", "account_type" => t.as_str()))
                .collect(),
            cost: CostCounters::default(),
            writer_batch_rows: histogram!("tollgate_writer_batch_rows"),
            writer_flush_seconds: histogram!("tollgate_writer_flush_duration_seconds"),
            reloads_ok: counter!("tollgate_config_reloads_total", "result" => "ok"),
            reloads_failed: counter!("tollgate_config_reloads_total", "result" => "error"),
            connections: crate::conn::Counters {
                refused: counter!("tollgate_client_connections_refused_total"),
                header_timeouts: counter!("tollgate_header_refusals_total", "reason" => "timeout"),
                header_too_large: counter!("tollgate_header_refusals_total", "reason" => "too_large"),
            },
        }
    }

    /// One finished request.
    pub fn request(
        &self,
        status: u16,
        kind: Option<AccountType>,
        total_s: f64,
        upstream_s: Option<f64>,
    ) {
        let class = match status {
            100..=599 => (status / 100) as usize,
            _ => 0,
        };
        let t = kind.map_or(0, |k| {
            1 + AccountType::ALL.iter().position(|x| *x == k).unwrap_or(0)
        });
        if let Some(c) = self.requests.get(class * UPSTREAM_TYPES.len() + t) {
            c.increment(1);
        }
        self.request_duration.record(total_s);
        if let Some(up) = upstream_s {
            self.upstream_duration.record(up);
            self.overhead.record((total_s - up).max(0.0));
        }
    }

    pub fn auth_failure(&self, reason: &str) {
        if let Some(i) = AUTH_REASONS.iter().position(|r| *r == reason) {
            self.auth_failures[i].increment(1);
        }
    }

    /// A request refused by a rate limit.
    pub fn rate_limited(&self, scope: limits::Scope, kind: limits::Kind) {
        let s = limits::Scope::ALL
            .iter()
            .position(|x| *x == scope)
            .unwrap_or(0);
        let k = limits::Kind::ALL
            .iter()
            .position(|x| *x == kind)
            .unwrap_or(0);
        if let Some(c) = self.rate_limited.get(s * limits::Kind::ALL.len() + k) {
            c.increment(1);
        }
    }

    /// Tokens and cost of one metered request, served by an account of `kind`. `cost` is the
    /// counter of the price used; `None` = unpriced.
    pub fn usage(&self, kind: AccountType, r: &UsageRecord, cost: Option<&CostCounter>) {
        let counts = [
            r.prompt_tokens,
            r.completion_tokens,
            r.cached_tokens,
            r.cache_creation_tokens,
        ];
        for (c, n) in self.tokens.iter().zip(counts) {
            if n > 0 {
                c.increment(n as u64);
            }
        }
        match cost {
            Some(counter) => counter.add(r.cost),
            None => {
                if let Some(c) = self.unpriced.get(kind.index()) {
                    c.increment(1);
                }
            }
        }
    }

    pub fn reload(&self, ok: bool) {
        if ok {
            &self.reloads_ok
        } else {
            &self.reloads_failed
        }
        .increment(1);
    }

    /// The exporter's text followed by the cost counters. Callers copy their atomics into the
    /// registered handles first (`health.rs`).
    pub fn render(&self) -> String {
        let mut out = self
            .exporter
            .as_ref()
            .map(|h| h.render())
            .unwrap_or_default();
        self.cost.render(&mut out);
        out
    }
}

/// Every `upkeep` (1 s), folds the histogram samples recorded since into their buckets. The
/// Prometheus recorder keeps every sample until upkeep (or a scrape) folds it, so without this
/// task a gateway nobody scrapes grows with its traffic (measured: peak RSS 109 MiB without it,
/// 77 MiB with it, after 20 s at ~35k req/s, unscraped). Every sample is folded once whatever the
/// period, so a short period adds little CPU and holds fewer samples: at 1 s instead of 5 s, peak
/// RSS under load fell from 51–53 to 47–48 MiB. Background task `metrics-upkeep`.
pub async fn upkeep(metrics: Arc<Metrics>, mut stop: watch::Receiver<bool>) {
    const PERIOD: Duration = Duration::from_secs(1);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PERIOD) => metrics.run_upkeep(),
            _ = stop.changed() => return,
        }
    }
}

/// One `tollgate_cost_total` series: cost in units of 1e-10 USD (exact for costs rounded to 10
/// places), rendered as USD. Cloning shares the series.
#[derive(Debug, Clone, Default)]
pub struct CostCounter(Arc<AtomicU64>);

impl PartialEq for CostCounter {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
impl Eq for CostCounter {}

impl CostCounter {
    pub fn add(&self, cost: Decimal) {
        let units = (cost * Decimal::from(COST_UNITS_PER_USD)).trunc();
        self.0
            .fetch_add(u64::try_from(units).unwrap_or(0), Ordering::Relaxed);
    }

    fn usd(&self) -> f64 {
        self.0.load(Ordering::Relaxed) as f64 / COST_UNITS_PER_USD as f64
    }
}

/// The cost counters by (account type, price key). The lock is taken when a price table loads
/// and at scrape, never per request. Series of prices removed by a reload stay (a counter does
/// not go back), as Prometheus expects of counters.
#[derive(Debug, Default)]
pub struct CostCounters(Mutex<BTreeMap<(AccountType, String), CostCounter>>);

impl CostCounters {
    /// The counter of one series, made on first use.
    pub fn get(&self, kind: AccountType, key: &str) -> CostCounter {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.entry((kind, key.to_string())).or_default().clone()
    }

    fn render(&self, out: &mut String) {
        out.push_str("# HELP tollgate_cost_total Cost of metered requests in USD, by account type and price-table model.\n");
        out.push_str("# TYPE tollgate_cost_total counter\n");
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for ((kind, model), counter) in map.iter() {
            let _ = writeln!(
                out,
                "tollgate_cost_total{{account_type=\"{}\",model=\"{}\"}} {}",
                kind.as_str(),
                escape(model),
                counter.usd()
            );
        }
    }
}

/// A label value escaped for the Prometheus text format.
pub fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        "tollgate_build_info",
        "Always 1; the version label says which build runs."
    );
    describe_counter!(
        "tollgate_requests_total",
        "Requests answered, by status class and upstream account type."
    );
    describe_histogram!(
        "tollgate_request_duration_seconds",
        Unit::Seconds,
        "Time from request start to the end of the response."
    );
    describe_histogram!(
        "tollgate_upstream_duration_seconds",
        Unit::Seconds,
        "Time spent waiting on and streaming from upstreams."
    );
    describe_histogram!(
        "tollgate_overhead_seconds",
        Unit::Seconds,
        "Request duration minus upstream duration: what tollgate adds."
    );
    describe_gauge!("tollgate_in_flight_requests", "Requests being served now.");
    describe_gauge!(
        "tollgate_client_connections",
        "Client connections open now ([server] max_connections caps them)."
    );
    describe_counter!(
        "tollgate_client_connections_refused_total",
        "Client connections answered 503 and closed because max_connections were open."
    );
    describe_counter!(
        "tollgate_header_refusals_total",
        "Request header sections refused while arriving: too slow (408) or too large (431)."
    );
    describe_gauge!(
        "tollgate_buffered_body_bytes",
        "Request-body bytes held in memory now ([server] max_buffered_body_bytes caps them)."
    );
    describe_counter!(
        "tollgate_rate_limited_total",
        "Requests refused (429) by a rate limit of their key or its user, or (scope address) by their client address's failed authentications, by scope and by what was counted."
    );
    describe_gauge!(
        "tollgate_rate_limit_redis_up",
        "1 while the Redis sharing rate limits answers; 0 while [limits] fail applies."
    );
    describe_gauge!(
        "tollgate_rate_limit_redis_instances",
        "Instances sharing rate limits, as last seen in Redis ([limits] fail = local divides by it)."
    );
    describe_histogram!(
        "tollgate_rate_limit_redis_seconds",
        Unit::Seconds,
        "Round trip of one rate-limit admission in Redis."
    );
    describe_counter!(
        "tollgate_rate_limit_redis_errors_total",
        "Redis calls of the rate-limit stage that failed or timed out, by operation."
    );
    describe_counter!(
        "tollgate_rate_limit_redis_dropped_total",
        "Settlements and slot releases not sent to Redis (it was down or the queue full); a dropped release frees its slot when its lease expires."
    );
    describe_counter!(
        "tollgate_rate_limit_fallback_total",
        "Limited requests decided by the fail policy because Redis could not be reached."
    );
    describe_counter!(
        "tollgate_spend_refused_total",
        "Requests refused before reaching an upstream by budgets and credits: insufficient_quota (balance), budget_exceeded, spend_unavailable (no lease to be had, [spend] fail = closed)."
    );
    describe_counter!(
        "tollgate_spend_leases_total",
        "Leases of budgets and balances asked of the database, by outcome: granted, exhausted (the pool cannot hold the reservation), error."
    );
    describe_counter!(
        "tollgate_spend_fail_open_total",
        "Requests admitted without a reservation because the database could not give a lease ([spend] fail = open)."
    );
    describe_counter!(
        "tollgate_spend_streams_cut_total",
        "Streams cut because their output passed what their reservation covered and no lease could extend it ([spend] cut_streams; requests without max_tokens)."
    );
    describe_counter!(
        "tollgate_auth_failures_total",
        "Requests refused before reaching an upstream, by reason."
    );
    describe_counter!(
        "tollgate_key_cache_hits_total",
        "Key lookups answered by the cache."
    );
    describe_counter!(
        "tollgate_key_cache_misses_total",
        "Key lookups that went to the database."
    );
    describe_gauge!(
        "tollgate_key_cache_entries",
        "Keys in the cache (found and unknown)."
    );
    describe_gauge!(
        "tollgate_upstream_accounts",
        "Active upstream accounts loaded."
    );
    describe_counter!("tollgate_tokens_total", "Tokens metered, by kind.");
    describe_counter!(
        "tollgate_unpriced_requests_total",
        "Metered requests whose model has no price: recorded with cost 0."
    );
    describe_gauge!(
        "tollgate_writer_queue_depth",
        "Usage records waiting to be written."
    );
    describe_histogram!("tollgate_writer_batch_rows", "Rows per usage flush.");
    describe_histogram!(
        "tollgate_writer_flush_duration_seconds",
        Unit::Seconds,
        "Time one usage flush (one transaction) took."
    );
    describe_counter!(
        "tollgate_writer_rows_written_total",
        "Usage rows committed to the database."
    );
    describe_counter!(
        "tollgate_writer_rows_spooled_total",
        "Usage rows written to the local spool."
    );
    describe_counter!(
        "tollgate_writer_rows_replayed_total",
        "Spooled usage rows replayed into the database."
    );
    describe_counter!(
        "tollgate_writer_rows_lost_total",
        "Usage rows lost (queue full or spool unwritable). Should stay 0."
    );
    describe_gauge!("tollgate_writer_spool_bytes", "Bytes in the local spool.");
    describe_counter!(
        "tollgate_writer_rows_duplicate_total",
        "Rows skipped because their request id was already written (replays)."
    );
    describe_counter!(
        "tollgate_writer_flush_failures_total",
        "Usage flushes that failed or timed out (their batch was spooled)."
    );
    describe_counter!(
        "tollgate_writer_torn_segments_total",
        "Spool segments found with a torn or corrupt tail."
    );
    describe_gauge!(
        "tollgate_writer_degraded",
        "1 while the database is considered down and batches go to the spool."
    );
    describe_counter!(
        "tollgate_config_reloads_total",
        "Config reloads, by result."
    );
}
