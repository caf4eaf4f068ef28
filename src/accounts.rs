//! Upstream accounts at run time: `[[upstream_accounts]]` from the config copied into the
//! database (so every instance sees the same ids), the [`AccountSet`] built from the database
//! (host names resolved), and the `account-refresher` task that swaps in a new set.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::sync::{watch, Notify};

use crate::config::{expand_env, AccountConfig};
use crate::settings;
use crate::store::{NewAccount, Store};
use crate::upstream::{Account, AccountSet, AccountSpec, Endpoint, PeerTimeouts, StatsRegistry};

/// `[[upstream_accounts]]` from the file go into the database, matched by name.
pub async fn upsert_from_config(store: &Store, accounts: &[AccountConfig]) -> anyhow::Result<()> {
    for a in accounts {
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
pub struct AccountLoader {
    store: Store,
    /// Timeouts, cooldowns and the refresh period; swapped by a config reload.
    pub settings: ArcSwap<settings::Upstream>,
    stats: StatsRegistry,
    epoch: Instant,
}

impl AccountLoader {
    pub fn new(store: Store, settings: settings::Upstream) -> AccountLoader {
        AccountLoader {
            store,
            settings: ArcSwap::from_pointee(settings),
            stats: StatsRegistry::default(),
            epoch: Instant::now(),
        }
    }

    /// The active accounts now; one that cannot be used (its `${VAR}` unset, its host not
    /// resolving, a bad credential) is skipped with an error log, never fatal to the others.
    pub async fn load(&self) -> anyhow::Result<AccountSet> {
        let cfg = self.settings.load();
        let rows = self
            .store
            .list_accounts()
            .await
            .context("loading upstream accounts")?;
        let timeouts = PeerTimeouts {
            connect: cfg.connect_timeout,
            read: cfg.read_timeout,
        };
        let mut accounts = Vec::new();
        for row in rows.into_iter().filter(|r| r.is_active) {
            let raw_key = row
                .credentials
                .get("api_key")
                .and_then(|v| v.as_str())
                .unwrap_or("");
            let api_key = match expand_env(raw_key) {
                Ok(k) => k,
                Err(e) => {
                    tracing::error!(account = %row.name, error = %e, "account skipped");
                    continue;
                }
            };
            let spec = AccountSpec {
                id: row.id,
                name: row.name.clone(),
                kind: row.kind,
                priority: row.priority,
                // The schema checks weight >= 1.
                weight: u32::try_from(row.weight).unwrap_or(1),
                base_url: row.base_url.clone(),
                api_key,
                header: row
                    .credentials
                    .get("header")
                    .and_then(|v| v.as_str())
                    .map(str::to_string),
            };
            match resolve(&spec).await {
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
            cfg.cooldown,
            cfg.max_cooldown,
            self.epoch,
        ))
    }
}

async fn resolve(spec: &AccountSpec) -> anyhow::Result<std::net::SocketAddr> {
    let ep = Endpoint::parse(&spec.base_url).map_err(anyhow::Error::msg)?;
    let mut addrs = tokio::net::lookup_host((ep.host.as_str(), ep.port)).await?;
    addrs.next().context("no address")
}

/// Task `account-refresher`: reloads the accounts every `[upstream] refresh_secs` (re-resolving
/// DNS), or at once when `changed` is notified (admin API, PostgreSQL NOTIFY, the change poll,
/// a config reload). A failed load keeps the current set.
pub async fn refresh(
    loader: Arc<AccountLoader>,
    accounts: Arc<ArcSwap<AccountSet>>,
    changed: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let period = loader.settings.load().refresh;
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = changed.notified() => {}
            _ = stop.changed() => return,
        }
        match loader.load().await {
            Ok(set) => accounts.store(Arc::new(set)),
            Err(e) => {
                tracing::warn!(error = %e, "account refresh failed; keeping the current accounts")
            }
        }
    }
}
