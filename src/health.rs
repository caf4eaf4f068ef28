//! The metrics listener's routes: `/metrics` (Prometheus), `/healthz` (process up) and `/readyz`
//! (proxy listening, database reachable, writer not wedged). At each scrape the state other
//! modules keep in atomics (key cache, writer, in-flight count) is copied into handles registered
//! once here, and the per-account families are written from the live account set, so a deleted
//! account's series disappear with it.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use metrics::{counter, gauge, Counter, Gauge};

use crate::auth::KeyCache;
use crate::body;
use crate::conn;
use crate::httpd::{Handler, Response};
use crate::lifecycle::Drain;
use crate::metrics::{escape, Metrics};
use crate::store::Store;
use crate::upstream::{Account, AccountSet, ErrorKind};
use crate::writer::UsageSink;

/// What the metrics listener reads.
pub struct Health {
    pub metrics: Arc<Metrics>,
    pub accounts: Arc<ArcSwap<AccountSet>>,
    pub keys: Arc<KeyCache>,
    pub usage: UsageSink,
    pub in_flight: Arc<Drain>,
    pub store: Store,
    /// Set once the proxy listener accepts connections; cleared from the stop signal on.
    pub ready: Arc<AtomicBool>,
    /// Queue depth above which the writer counts as wedged (`[writer] high_water`).
    pub high_water: usize,
    /// Client connections open (`conn.rs`).
    pub connections: conn::Gauge,
    /// Request bodies in memory (`body.rs`).
    pub body_budget: Arc<body::Budget>,
    handles: ScrapeHandles,
}

/// Handles of the families copied in at scrape, registered once.
struct ScrapeHandles {
    accounts: Gauge,
    key_hits: Counter,
    key_misses: Counter,
    key_entries: Gauge,
    queue_depth: Gauge,
    rows_written: Counter,
    rows_spooled: Counter,
    rows_replayed: Counter,
    rows_lost: Counter,
    rows_duplicate: Counter,
    flush_failures: Counter,
    torn_segments: Counter,
    spool_bytes: Gauge,
    degraded: Gauge,
    in_flight: Gauge,
    connections: Gauge,
    body_bytes: Gauge,
}

impl ScrapeHandles {
    fn register() -> ScrapeHandles {
        ScrapeHandles {
            accounts: gauge!("tollgate_upstream_accounts"),
            key_hits: counter!("tollgate_key_cache_hits_total"),
            key_misses: counter!("tollgate_key_cache_misses_total"),
            key_entries: gauge!("tollgate_key_cache_entries"),
            queue_depth: gauge!("tollgate_writer_queue_depth"),
            rows_written: counter!("tollgate_writer_rows_written_total"),
            rows_spooled: counter!("tollgate_writer_rows_spooled_total"),
            rows_replayed: counter!("tollgate_writer_rows_replayed_total"),
            rows_lost: counter!("tollgate_writer_rows_lost_total"),
            rows_duplicate: counter!("tollgate_writer_rows_duplicate_total"),
            flush_failures: counter!("tollgate_writer_flush_failures_total"),
            torn_segments: counter!("tollgate_writer_torn_segments_total"),
            spool_bytes: gauge!("tollgate_writer_spool_bytes"),
            degraded: gauge!("tollgate_writer_degraded"),
            in_flight: gauge!("tollgate_in_flight_requests"),
            connections: gauge!("tollgate_client_connections"),
            body_bytes: gauge!("tollgate_buffered_body_bytes"),
        }
    }
}

impl Health {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        metrics: Arc<Metrics>,
        accounts: Arc<ArcSwap<AccountSet>>,
        keys: Arc<KeyCache>,
        usage: UsageSink,
        in_flight: Arc<Drain>,
        store: Store,
        ready: Arc<AtomicBool>,
        high_water: usize,
        connections: conn::Gauge,
        body_budget: Arc<body::Budget>,
    ) -> Health {
        Health {
            metrics,
            accounts,
            keys,
            usage,
            in_flight,
            store,
            ready,
            high_water,
            connections,
            body_budget,
            handles: ScrapeHandles::register(),
        }
    }

    pub fn handler(self: Arc<Self>) -> Handler {
        Arc::new(move |req| {
            let me = self.clone();
            Box::pin(async move {
                match (req.method.as_str(), req.path.as_str()) {
                    ("GET", "/metrics") => {
                        Response::text(200, "text/plain; version=0.0.4", me.scrape())
                    }
                    ("GET", "/healthz") => {
                        Response::json(200, &serde_json::json!({ "status": "ok" }))
                    }
                    ("GET", "/readyz") => me.readyz().await,
                    _ => Response::error(404, "not_found", "try /metrics, /healthz or /readyz"),
                }
            })
        })
    }

    async fn readyz(&self) -> Response {
        const PING: Duration = Duration::from_secs(2);
        let db = tokio::time::timeout(PING, self.store.ping()).await;
        let database = matches!(db, Ok(Ok(())));
        let started = self.ready.load(Ordering::Acquire);
        let writer = self.usage.depth() <= self.high_water;
        let ok = database && started && writer;
        Response::json(
            if ok { 200 } else { 503 },
            &serde_json::json!({ "ready": ok, "database": database, "started": started, "writer": writer }),
        )
    }

    /// The `/metrics` body.
    fn scrape(&self) -> String {
        self.sync();
        let mut out = self.metrics.render();
        render_accounts(&self.accounts.load(), &mut out);
        out
    }

    fn sync(&self) {
        let h = &self.handles;
        h.accounts.set(self.accounts.load().len() as f64);
        let (hits, misses, entries) = self.keys.stats();
        h.key_hits.absolute(hits);
        h.key_misses.absolute(misses);
        h.key_entries.set(entries as f64);
        let w = self.usage.stats();
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        h.queue_depth.set(self.usage.depth() as f64);
        h.rows_written.absolute(get(&w.rows_written));
        h.rows_spooled.absolute(get(&w.rows_spooled));
        h.rows_replayed.absolute(get(&w.rows_replayed));
        h.rows_lost.absolute(get(&w.rows_lost));
        h.rows_duplicate.absolute(get(&w.rows_duplicate));
        h.flush_failures.absolute(get(&w.flush_failures));
        h.torn_segments.absolute(get(&w.torn_segments));
        h.spool_bytes.set(get(&w.spool_bytes) as f64);
        h.degraded.set(get(&w.degraded) as f64);
        h.in_flight.set(self.in_flight.in_flight() as f64);
        h.connections.set(self.connections.open() as f64);
        h.body_bytes.set(self.body_budget.used() as f64);
    }
}

/// The per-account families, from the accounts loaded now (label: the account name).
fn render_accounts(set: &AccountSet, out: &mut String) {
    type Value = fn(&AccountSet, &Account) -> u64;
    const FAMILIES: [(&str, &str, &str, Value); 5] = [
        (
            "tollgate_upstream_attempts_total",
            "counter",
            "Attempts sent to each upstream account.",
            |_, a| a.stats.attempts.load(Ordering::Relaxed),
        ),
        (
            "tollgate_upstream_successes_total",
            "counter",
            "Attempts whose response reached the client without an upstream error.",
            |_, a| a.stats.successes.load(Ordering::Relaxed),
        ),
        (
            "tollgate_upstream_cooldown",
            "gauge",
            "1 while the account is cooling down after a failure.",
            |set, a| u64::from(set.in_cooldown(a)),
        ),
        (
            "tollgate_upstream_saturated",
            "gauge",
            "1 while the account's provider said it has no requests or tokens left (until its reset; skipped, not failing).",
            |set, a| u64::from(set.provider_out(a)),
        ),
        (
            "tollgate_upstream_in_flight",
            "gauge",
            "Requests in flight on the account, counted where it declares max_concurrent (0 otherwise).",
            |_, a| u64::from(a.stats.limits.in_flight()),
        ),
    ];
    let accounts: Vec<_> = set.accounts().collect();
    for (name, kind, help, value) in FAMILIES {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for a in &accounts {
            let v = value(set, a);
            let _ = writeln!(out, "{name}{{account=\"{}\"}} {v}", escape(&a.name));
        }
    }
    let name = "tollgate_upstream_errors_total";
    let _ = writeln!(
        out,
        "# HELP {name} Failed attempts per upstream account, by kind.\n# TYPE {name} counter"
    );
    for a in &accounts {
        for kind in ErrorKind::ALL {
            let v = a.stats.errors_of(kind);
            let _ = writeln!(
                out,
                "{name}{{account=\"{}\",kind=\"{}\"}} {v}",
                escape(&a.name),
                kind.as_str()
            );
        }
    }
}

/// Task `readiness`: once pingora runs its services, the gateway is ready (the proxy listener was
/// bound and listening before pingora started, so connections from then on are accepted): `/readyz`
/// says so, and one line says where every listener is (`tollgate ready proxy=… metrics=… admin=…`;
/// the tests read the addresses from it). From the stop signal on it is not ready again, so load
/// balancers stop sending before the listener closes.
pub async fn readiness(
    mut phases: tokio::sync::broadcast::Receiver<pingora::server::ExecutionPhase>,
    ready: Arc<AtomicBool>,
    announce: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use pingora::server::ExecutionPhase as P;
    loop {
        let phase = tokio::select! {
            p = phases.recv() => p,
            _ = stop.changed() => return,
        };
        match phase {
            Ok(P::Running) if !ready.load(Ordering::Acquire) => {
                ready.store(true, Ordering::Release);
                tracing::info!("tollgate ready {announce}");
            }
            Ok(P::Running | P::Setup | P::Bootstrap | P::BootstrapComplete) => {}
            Ok(_) => ready.store(false, Ordering::Release),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}
