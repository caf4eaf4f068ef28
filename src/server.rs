//! `tollgate serve`: builds the gateway from the config, starts pingora and the background tasks,
//! and owns them until shutdown.
//!
//! Background work runs on a dedicated runtime (`tollgate-db`) that owns the database pool, so
//! the proxy's runtimes never drive database I/O; the request path reaches it only on a key-cache
//! miss. Tasks on it: the usage writer (`writer.rs`; drained by the shutdown step) and the account
//! refresher (re-reads accounts, re-resolves DNS every `refresh_secs`; stops with the runtime).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use arc_swap::ArcSwap;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};

use crate::auth::KeyCache;
use crate::config::{expand_env, Config};
use crate::forward::Forwarder;
use crate::lifecycle::{Drain, Signals};
use crate::meter::Pricing;
use crate::proxy::Gateway;
use crate::spool::Spool;
use crate::store::{redact_url, NewAccount, Store};
use crate::upstream::{Account, AccountSet, AccountSpec, PeerTimeouts, Router, StatsRegistry};
use crate::writer::{self, WriterOptions};

pub fn serve(cfg: Config) -> anyhow::Result<()> {
    let db_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("tollgate-db")
        .enable_all()
        .build()
        .context("starting the background runtime")?;
    let store = db_rt
        .block_on(Store::connect(
            &cfg.database.url,
            cfg.database.max_connections,
        ))
        .with_context(|| format!("opening the database {}", redact_url(&cfg.database.url)))?;
    db_rt.block_on(upsert_config_accounts(&store, &cfg))?;

    let loader = Arc::new(AccountLoader {
        store: store.clone(),
        cfg: cfg.clone(),
        stats: StatsRegistry::default(),
        epoch: Instant::now(),
    });
    let initial = db_rt.block_on(loader.load())?;
    if initial.is_empty() {
        tracing::warn!("no active upstream accounts yet: requests will get 503 until one is added");
    }
    let accounts = Arc::new(ArcSwap::from_pointee(initial));
    db_rt.spawn(refresh_accounts(loader.clone(), accounts.clone()));

    let spool =
        Spool::open(&cfg.writer.spool_dir, cfg.writer.spool_segment_bytes).with_context(|| {
            format!(
                "opening the spool directory {}",
                cfg.writer.spool_dir.display()
            )
        })?;
    let (usage_sink, writer) = {
        let _on_db_runtime = db_rt.enter();
        writer::start(
            Arc::new(store.clone()),
            spool,
            WriterOptions::from_config(&cfg.writer),
        )
    };

    let drain = Arc::new(Drain::default());
    let keys = Arc::new(KeyCache::new(
        store.clone(),
        db_rt.handle().clone(),
        cfg.auth.cache_capacity,
        Duration::from_secs(cfg.auth.cache_ttl_secs),
        Duration::from_secs(cfg.auth.negative_ttl_secs),
    ));
    let gateway = Gateway {
        keys,
        accounts,
        router: Router::new(cfg.routes.iter().map(|r| (r.prefix.clone(), r.kind))),
        forwarder: Forwarder::new(
            cfg.upstream.max_attempts,
            cfg.upstream.read_timeout(),
            &cfg.upstream.anthropic_version,
            cfg.metering.max_json_body_bytes,
        ),
        max_body_bytes: cfg.server.max_body_bytes,
        idle_timeout_secs: cfg.server.idle_timeout_secs,
        drain: drain.clone(),
        usage: usage_sink,
        pricing: Arc::new(Pricing {
            models: cfg.prices.clone(),
            defaults: cfg.default_prices.clone(),
        }),
        inject_stream_usage: cfg.metering.inject_stream_usage,
    };

    let conf = ServerConf {
        threads: cfg.server.threads,
        work_stealing: false,
        grace_period_seconds: Some(cfg.server.grace_period_secs),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy =
        pingora::proxy::http_proxy_service_with_name(&server.configuration, gateway, "tollgate");
    proxy.add_tcp(&cfg.server.listen.to_string());
    server.add_service(proxy);

    let finish_store = store.clone();
    let finish_handle = db_rt.handle().clone();
    drain.on_finish(move || {
        // Every request has finished: flush what they queued, then close the database.
        finish_handle.block_on(async {
            writer.shutdown().await;
            finish_store.close().await;
        });
        tracing::info!("stopped");
    });
    tracing::info!(listen = %cfg.server.listen, database = %redact_url(&cfg.database.url), "tollgate listening");
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals {
            drain: drain.clone(),
            grace: Duration::from_secs(cfg.server.grace_period_secs),
        }),
    });
    drain.finish();
    Ok(())
}

/// `[[upstream_accounts]]` from the file go into the database (matched by name) so usage rows can
/// reference them and every instance sees the same ids.
async fn upsert_config_accounts(store: &Store, cfg: &Config) -> anyhow::Result<()> {
    for a in &cfg.upstream_accounts {
        let mut credentials = serde_json::json!({ "api_key": a.api_key.get_ref() });
        if let Some(h) = &a.header {
            credentials["header"] = serde_json::Value::String(h.clone());
        }
        store
            .upsert_account(&NewAccount {
                name: a.name.get_ref(),
                kind: a.kind,
                email: a.email.as_deref(),
                base_url: a.base_url.get_ref(),
                credentials,
                priority: a.priority,
                weight: a.weight as i32,
                is_active: a.is_active,
            })
            .await
            .with_context(|| format!("saving account {:?} from the config", a.name.get_ref()))?;
    }
    Ok(())
}

/// Builds [`AccountSet`]s from the database, keeping per-account stats across loads.
struct AccountLoader {
    store: Store,
    cfg: Config,
    stats: StatsRegistry,
    epoch: Instant,
}

impl AccountLoader {
    async fn load(&self) -> anyhow::Result<AccountSet> {
        let rows = self
            .store
            .list_accounts()
            .await
            .context("loading upstream accounts")?;
        let timeouts = PeerTimeouts {
            connect: self.cfg.upstream.connect_timeout(),
            read: self.cfg.upstream.read_timeout(),
            pool_idle: Duration::from_secs(self.cfg.upstream.pool_idle_timeout_secs),
        };
        let mut accounts = Vec::new();
        for row in rows.into_iter().filter(|r| r.is_active) {
            let raw_key = row
                .credentials
                .get("api_key")
                .and_then(|v| v.as_str())
                .unwrap_or("");
            let spec = AccountSpec {
                id: row.id,
                name: row.name.clone(),
                kind: row.kind,
                priority: row.priority,
                weight: row.weight.max(1) as u32,
                base_url: row.base_url.clone(),
                api_key: match expand_env(raw_key) {
                    Ok(k) => k,
                    Err(e) => {
                        tracing::error!(account = %row.name, error = %e, "account skipped");
                        continue;
                    }
                },
                header: row
                    .credentials
                    .get("header")
                    .and_then(|v| v.as_str())
                    .map(str::to_string),
            };
            match self.resolve(&spec).await {
                Ok(addr) => match Account::build(&spec, addr, timeouts, self.stats.get(spec.id)) {
                    Ok(a) => accounts.push(a),
                    Err(e) => tracing::error!(account = %row.name, error = %e, "account skipped"),
                },
                Err(e) => {
                    tracing::error!(account = %row.name, error = %e, "account skipped: cannot resolve its host")
                }
            }
        }
        Ok(AccountSet::new(
            accounts,
            Duration::from_secs(self.cfg.upstream.cooldown_secs),
            Duration::from_secs(self.cfg.upstream.max_cooldown_secs),
            self.epoch,
        ))
    }

    async fn resolve(&self, spec: &AccountSpec) -> anyhow::Result<std::net::SocketAddr> {
        let ep = crate::upstream::Endpoint::parse(&spec.base_url).map_err(anyhow::Error::msg)?;
        let mut addrs = tokio::net::lookup_host((ep.host.as_str(), ep.port)).await?;
        addrs.next().context("no address")
    }
}

async fn refresh_accounts(loader: Arc<AccountLoader>, accounts: Arc<ArcSwap<AccountSet>>) {
    let period = Duration::from_secs(loader.cfg.upstream.refresh_secs.max(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match loader.load().await {
            Ok(set) => accounts.store(Arc::new(set)),
            Err(e) => {
                tracing::warn!(error = %e, "account refresh failed; keeping the current accounts")
            }
        }
    }
}
