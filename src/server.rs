//! `tollgate serve`: wires the gateway together from the settings, binds every listener, starts
//! the background tasks, runs pingora, and owns all of it until shutdown. It only wires: each
//! piece lives in the module named after what it owns.
//!
//! Background work runs on a dedicated runtime (`tollgate-db`) that owns the database pool, so
//! the proxy's runtimes never drive database I/O; the request path reaches it only on a key-cache
//! miss. The tasks on it, each named and owned by [`Tasks`]:
//! - `usage-writer` (`writer.rs`, owned by its handle): batches usage rows into the database or
//!   the spool;
//! - `account-refresher` (`accounts.rs`): reloads accounts every `refresh_secs`, or at once when
//!   woken (admin API, NOTIFY, the change poll, a config reload); re-resolves DNS;
//! - `key-refresher` (`invalidation.rs`): every `key_refresh_ms`, drops cached keys whose key or
//!   user row changed and wakes the account refresher when an account changed;
//! - `notify-listener` (`invalidation.rs`, PostgreSQL only): LISTEN for those changes;
//! - `sighup` (`reload.rs`): reloads the config on SIGHUP;
//! - `metrics-upkeep` (`metrics.rs`): folds histogram samples into their buckets every second;
//! - `readiness` (`health.rs`): marks the gateway ready once the proxy accepts connections;
//! - `metrics-listener` and `admin-listener` (`httpd.rs`).
//!
//! Shutdown order (SIGTERM/SIGINT, `lifecycle.rs`): readiness goes false and pingora stops
//! accepting; in-flight requests finish within the grace period; then the background tasks are
//! stopped and awaited, the writer flushes everything queued (database or spool), and the
//! database pool closes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use tokio::sync::Notify;

use crate::accounts::{self, AccountLoader, OnDemand};
use crate::admin::{self, Admin};
use crate::auth::KeyCache;
use crate::body;
use crate::conn;
use crate::forward::{AbortDrain, Forwarder};
use crate::header;
use crate::health::{self, Health};
use crate::httpd;
use crate::invalidation;
use crate::keyring;
use crate::lifecycle::{Drain, Signals};
use crate::metrics::{self, Metrics};
use crate::pool::UpstreamPool;
use crate::proxy::Gateway;
use crate::reload::{self, Reloader};
use crate::settings::Settings;
use crate::spool::Spool;
use crate::store::{redact_url, Actor, Store, Target};
use crate::tasks::Tasks;
use crate::writer::{self, UsageSink, WriterHandle, WriterOptions};

/// Keys loaded into the cache at start (the most recently used).
const WARM_KEYS: u64 = 10_000;

pub fn serve(cfg: Settings, config_path: PathBuf) -> anyhow::Result<()> {
    let db_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("tollgate-db")
        .enable_all()
        .build()
        .context("starting the background runtime")?;
    let metrics = Arc::new(
        Metrics::install().map_err(|e| anyhow::anyhow!("installing the metrics recorder: {e}"))?,
    );
    let store = db_rt
        .block_on(Store::connect_within(
            &cfg.database.url,
            cfg.database.max_connections.get(),
            cfg.database.connect_timeout,
        ))
        .with_context(|| format!("opening the database {}", redact_url(&cfg.database.url)))?;
    tracing::info!(database = %redact_url(&cfg.database.url), "database opened");
    let started = Actor::system("start");
    let sealing = Arc::new(db_rt.block_on(keyring::unlock(&store, &cfg.database, &started))?);
    if !cfg.upstream_accounts.is_empty() {
        db_rt.block_on(async {
            let mut tx = store.begin().await?;
            accounts::upsert_from_config(&mut tx, &sealing, &cfg.upstream_accounts).await?;
            let target = Target::new("config", config_path.display());
            let after = Some(reload::summary(&cfg));
            tx.audit(&started, "config.load", &target, None, after)
                .await?;
            tx.commit().await?;
            anyhow::Ok(())
        })?;
    }

    // Every listener is bound before anything starts: a taken port fails the start at once.
    let listeners = Listeners::bind(&cfg)?;

    let loader = Arc::new(AccountLoader::new(
        store.clone(),
        sealing.clone(),
        cfg.upstream.clone(),
        listeners.addresses(),
    ));
    let initial = db_rt.block_on(loader.load())?;
    if initial.is_empty() {
        tracing::warn!("no active upstream accounts yet: requests will get 503 until one is added");
    }
    let accounts = Arc::new(ArcSwap::from_pointee(initial));
    let accounts_changed = Arc::new(Notify::new());
    let on_demand = Arc::new(OnDemand::new(accounts_changed.clone()));

    let keys = key_cache(&cfg, &store, &db_rt)?;
    let (usage_sink, writer) = start_writer(&cfg, &store, &metrics, &db_rt)?;

    let shared_limits = match &cfg.shared_limits {
        Some(s) => {
            // The connection's driver runs on the background runtime.
            let _on_db_runtime = db_rt.enter();
            let (redis, worker) =
                crate::shared_limits::Redis::new(s).map_err(anyhow::Error::msg)?;
            tracing::info!(policy = s.fail.label(), "rate limits shared through Redis");
            Some((redis, worker))
        }
        None => None,
    };

    let spend = Arc::new(crate::spend::Spend::new(
        cfg.spend.clone(),
        store.clone(),
        db_rt.handle().clone(),
        crate::spend::Spend::instance_name(),
        Arc::new(chrono::Utc::now),
    ));

    let drain = Arc::new(Drain::default());
    let body_budget = body::Budget::new(cfg.server.max_buffered_body_bytes.get());
    let router = Arc::new(ArcSwap::from_pointee(reload::router_of(&cfg)));
    let pricing = Arc::new(ArcSwap::from_pointee(reload::pricing_of(&cfg, &metrics)));
    let gateway = Gateway {
        keys: keys.clone(),
        accounts: accounts.clone(),
        router: router.clone(),
        forwarder: Forwarder::new(
            UpstreamPool::new(cfg.upstream.pool_idle_timeout, cfg.upstream.pool_max_idle),
            cfg.upstream.max_attempts.get(),
            cfg.upstream.read_timeout,
            cfg.upstream.anthropic_version.clone(),
            cfg.metering.max_json_body_bytes.get(),
            AbortDrain {
                time: cfg.metering.abort_drain,
                bytes: cfg.metering.abort_drain_bytes.get(),
            },
            cfg.limits.default_max_tokens,
        ),
        max_body_bytes: cfg.server.max_body_bytes.get(),
        body_budget: body_budget.clone(),
        header_limits: header::Limits {
            max_bytes: cfg.server.max_header_bytes.get(),
            max_fields: cfg.server.max_headers.get(),
        },
        idle_timeout_secs: cfg.server.idle_timeout.as_secs(),
        client_timeout: cfg.server.client_timeout,
        drain: drain.clone(),
        usage: usage_sink.clone(),
        pricing: pricing.clone(),
        metrics: metrics.clone(),
        accounts_on_demand: on_demand.clone(),
        inject_stream_usage: cfg.metering.inject_stream_usage,
        limiter: crate::limits::Limiter::new(
            cfg.limits,
            shared_limits.as_ref().map(|(redis, _)| redis.clone()),
        ),
        address_limits: crate::address_limits::AddressLimiter::new(
            cfg.auth.failures_per_minute_per_address,
            cfg.auth.address_table_capacity.get(),
        ),
        spend: spend.clone(),
    };
    let reload = Arc::new(Reloader {
        path: config_path,
        running: cfg.clone(),
        store: store.clone(),
        loader: loader.clone(),
        router,
        pricing,
        metrics: metrics.clone(),
        accounts_changed: accounts_changed.clone(),
        applied: ArcSwap::from_pointee(reload::summary(&cfg)),
    })
    .into_fn();

    let announce = listeners.announce();
    let Listeners {
        proxy: proxy_listener,
        metrics: metrics_listener,
        admin: admin_listener,
    } = listeners;
    let (server, connections) = pingora_server(&cfg, gateway, proxy_listener, &metrics);

    let ready = Arc::new(AtomicBool::new(false));
    let mut tasks = Tasks::new(db_rt.handle().clone());
    let (a, changed) = (accounts.clone(), accounts_changed.clone());
    tasks.spawn("account-refresher", |stop| {
        accounts::refresh(loader, a, changed, on_demand, stop)
    });
    let (st, k, changed) = (store.clone(), keys.clone(), accounts_changed.clone());
    let period = cfg.admin.key_refresh;
    tasks.spawn("key-refresher", |stop| {
        invalidation::poll_changes(st, k, changed, period, stop)
    });
    if store.pg_pool().is_some() {
        let (st, k, changed) = (store.clone(), keys.clone(), accounts_changed.clone());
        tasks.spawn("notify-listener", |stop| {
            invalidation::listen(st, k, changed, stop)
        });
    }
    if let Some((_, worker)) = shared_limits {
        tasks.spawn("rate-limit-redis", |stop| worker.run(stop));
    }
    tasks.spawn("spend-leases", |stop| spend.run(stop));
    let r = reload.clone();
    tasks.spawn("sighup", |stop| reload::on_sighup(r, stop));
    let m = metrics.clone();
    tasks.spawn("metrics-upkeep", |stop| metrics::upkeep(m, stop));
    let health = Arc::new(Health::new(
        metrics.clone(),
        accounts,
        keys.clone(),
        usage_sink,
        drain.clone(),
        store.clone(),
        ready.clone(),
        cfg.writer.high_water.get(),
        connections,
        body_budget,
    ));
    let (phases, r) = (server.watch_execution_phase(), ready.clone());
    tasks.spawn("readiness", move |stop| {
        health::readiness(phases, r, announce, stop)
    });
    {
        let _on_db_runtime = db_rt.enter();
        let listener = tokio::net::TcpListener::from_std(metrics_listener)?;
        tasks.spawn("metrics-listener", |stop| {
            httpd::serve(listener, "metrics", health.handler(), stop)
        });
        if let Some((listener, token)) = admin_listener {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let admin = Arc::new(Admin::new(
                store.clone(),
                sealing,
                keys,
                accounts_changed,
                reload,
                &token,
                Actor::admin_token(&cfg.admin.token_name),
            ));
            tasks.spawn("admin-listener", |stop| {
                httpd::serve(listener, "admin", admin.handler(), stop)
            });
        }
    }
    tracing::debug!(tasks = ?tasks.names(), "background tasks started");

    let finish = db_rt.handle().clone();
    drain.on_finish(move || {
        // Every request has finished: stop the tasks (so none sees the pool close under it),
        // flush what the requests queued, close the database.
        finish.block_on(async {
            tasks.shutdown().await;
            writer.shutdown().await;
            store.close().await;
        });
        tracing::info!("stopped");
    });
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals {
            drain: drain.clone(),
            grace: cfg.server.grace_period,
        }),
    });
    drain.finish();
    Ok(())
}

/// The key cache, warmed with the most recently used keys.
fn key_cache(
    cfg: &Settings,
    store: &Store,
    db_rt: &tokio::runtime::Runtime,
) -> anyhow::Result<Arc<KeyCache>> {
    let keys = Arc::new(KeyCache::new(
        store.clone(),
        db_rt.handle().clone(),
        cfg.auth.cache_capacity.get(),
        cfg.auth.cache_ttl,
        cfg.auth.max_stale,
        cfg.auth.negative_ttl,
    ));
    let warmed = db_rt
        .block_on(keys.warm(cfg.auth.cache_capacity.get().min(WARM_KEYS)))
        .context("warming the key cache")?;
    tracing::info!(keys = warmed, "key cache warmed");
    Ok(keys)
}

/// The usage writer (task `usage-writer`, owned by the returned handle) over the spool.
fn start_writer(
    cfg: &Settings,
    store: &Store,
    metrics: &Metrics,
    db_rt: &tokio::runtime::Runtime,
) -> anyhow::Result<(UsageSink, WriterHandle)> {
    let w = &cfg.writer;
    let spool = Spool::open(&w.spool_dir, w.spool_segment_bytes.get())
        .with_context(|| format!("opening the spool directory {}", w.spool_dir.display()))?;
    let mut opts = WriterOptions::new(w);
    opts.batch_rows = metrics.writer_batch_rows.clone();
    opts.flush_seconds = metrics.writer_flush_seconds.clone();
    let _on_db_runtime = db_rt.enter();
    Ok(writer::start(Arc::new(store.clone()), spool, opts))
}

/// pingora's server with the proxy service on the proxy listener (accepted by `conn.rs`, which
/// caps connections and guards header phases), and the gauge of open client connections.
fn pingora_server(
    cfg: &Settings,
    gateway: Gateway,
    listener: std::net::TcpListener,
    metrics: &Metrics,
) -> (Server, conn::Gauge) {
    let mut server = Server::new_with_opt_and_conf(
        None,
        ServerConf {
            threads: cfg.server.threads.get(),
            work_stealing: false,
            grace_period_seconds: Some(cfg.server.grace_period.as_secs()),
            graceful_shutdown_timeout_seconds: Some(1),
            ..ServerConf::default()
        },
    );
    server.bootstrap();
    let proxy = pingora::proxy::http_proxy(&server.configuration, gateway);
    // The raw header section may hold the request line and line endings besides the names and
    // values `max_header_bytes` counts: 16 KiB more is allowed while it arrives.
    let limits = conn::Limits {
        max_connections: cfg.server.max_connections.get(),
        header_timeout: cfg.server.header_timeout,
        header_budget: cfg.server.max_header_bytes.get() + 16 * 1024,
    };
    let service = conn::ProxyService::new(listener, proxy, limits, metrics.connections.clone());
    let gauge = service.gauge();
    server.add_service(service);
    (server, gauge)
}

/// Every listener of `serve`, bound before anything starts.
struct Listeners {
    /// The proxy listener (its port the kernel's choice when the setting said 0).
    proxy: std::net::TcpListener,
    metrics: std::net::TcpListener,
    /// The admin listener and its token; `None` when the admin API is off.
    admin: Option<(std::net::TcpListener, String)>,
}

impl Listeners {
    fn bind(cfg: &Settings) -> anyhow::Result<Listeners> {
        let proxy = proxy_listener(cfg.server.listen)
            .with_context(|| format!("binding the proxy listener {}", cfg.server.listen))?;
        let metrics = nonblocking(cfg.metrics.listen)
            .with_context(|| format!("binding the metrics listener {}", cfg.metrics.listen))?;
        let token = std::env::var(admin::TOKEN_ENV)
            .ok()
            .filter(|t| !t.is_empty());
        let admin = match token {
            Some(token) => Some((
                nonblocking(cfg.admin.listen)
                    .with_context(|| format!("binding the admin listener {}", cfg.admin.listen))?,
                token,
            )),
            None => {
                tracing::warn!("{} is not set: the admin API is off", admin::TOKEN_ENV);
                None
            }
        };
        Ok(Listeners {
            proxy,
            metrics,
            admin,
        })
    }

    /// Where every listener is bound.
    fn addresses(&self) -> Vec<SocketAddr> {
        let mut all = Vec::new();
        all.extend(self.proxy.local_addr().ok());
        all.extend(self.metrics.local_addr().ok());
        all.extend(self.admin.as_ref().and_then(|(l, _)| l.local_addr().ok()));
        all
    }

    /// The line that says where each listener is, logged once the gateway is ready.
    fn announce(&self) -> String {
        let addr = |l: &std::net::TcpListener| {
            l.local_addr()
                .map_or_else(|_| "?".to_string(), |a| a.to_string())
        };
        format!(
            "proxy={} metrics={} admin={}",
            addr(&self.proxy),
            addr(&self.metrics),
            self.admin
                .as_ref()
                .map_or("off".to_string(), |(l, _)| addr(l))
        )
    }
}

/// The proxy's listening socket: SO_REUSEADDR (a restart does not wait for TIME_WAIT) and a deep
/// accept backlog (as pingora's own listener: the kernel caps it at `net.core.somaxconn`).
fn proxy_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(65_535)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

fn nonblocking(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}
