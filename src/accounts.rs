//! Upstream accounts at run time: `[[upstream_accounts]]` from the config copied into the
//! database (so every instance sees the same ids), the [`AccountSet`] built from the database
//! (host names resolved, credentials opened: the only place they are decrypted), and the
//! `account-refresher` task that swaps in a new set.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::sync::{watch, Notify};

use crate::account_limits::AccountLimits;
use crate::config::{expand_env, AccountConfig};
use crate::secrets::{self, Keyring};
use crate::settings;
use crate::store::{AccountLimitColumns, NewAccount, Store, Tx};
use crate::upstream::{
    forbidden_destination, is_own_listener, Account, AccountSet, AccountSpec, Endpoint,
    PeerTimeouts, StatsRegistry,
};

/// `[[upstream_accounts]]` from the file go into the database, matched by name, their
/// credentials sealed, in the caller's transaction (which writes the audit row: `config.load` at
/// start, `config.reload`).
pub async fn upsert_from_config(
    tx: &mut Tx,
    keys: &Keyring,
    accounts: &[AccountConfig],
) -> anyhow::Result<()> {
    for a in accounts {
        let mut credentials = serde_json::json!({ "api_key": keys.seal(a.api_key.get_ref())? });
        if let Some(h) = &a.header {
            credentials["header"] = serde_json::Value::String(h.clone());
        }
        tx.upsert_account(&NewAccount {
            name: a.name.get_ref(),
            kind: a.kind,
            email: a.email.as_deref(),
            base_url: a.base_url.get_ref(),
            credentials,
            priority: a.priority,
            weight: a.weight as i32,
            is_active: a.is_active,
            // Validated in settings.rs: within 0..=MAX_RATE / MAX_CONCURRENT.
            limits: AccountLimitColumns {
                rpm: a.rpm.as_ref().map(|v| *v.get_ref() as i64),
                tpm: a.tpm.as_ref().map(|v| *v.get_ref() as i64),
                max_concurrent: a.max_concurrent.as_ref().map(|v| *v.get_ref() as i64),
            },
        })
        .await
        .with_context(|| format!("saving account {:?} from the config", a.name.get_ref()))?;
    }
    Ok(())
}

/// Builds [`AccountSet`]s from the database, keeping per-account stats across loads.
pub struct AccountLoader {
    store: Store,
    /// Opens the stored credentials (and seals those of config accounts on a reload).
    pub keys: Arc<Keyring>,
    /// tollgate's own listeners: no account may point at them.
    own: Vec<std::net::SocketAddr>,
    /// Timeouts, cooldowns and the refresh period; swapped by a config reload.
    pub settings: ArcSwap<settings::Upstream>,
    stats: StatsRegistry,
    epoch: Instant,
}

impl AccountLoader {
    pub fn new(
        store: Store,
        keys: Arc<Keyring>,
        settings: settings::Upstream,
        own: Vec<std::net::SocketAddr>,
    ) -> AccountLoader {
        AccountLoader {
            store,
            keys,
            own,
            settings: ArcSwap::from_pointee(settings),
            stats: StatsRegistry::default(),
            epoch: Instant::now(),
        }
    }

    /// The active accounts now; one that cannot be used (its `${VAR}` unset, its host not
    /// resolving, a bad credential) is skipped with an error log, never fatal to the others.
    /// A credential this key cannot open (rotated under a running gateway) fails the whole load:
    /// the refresher keeps the set it has.
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
        for mut row in rows.into_iter().filter(|r| r.is_active) {
            row.credentials = secrets::open_credentials(&self.keys, &row.credentials)
                .with_context(|| format!("account {:?}", row.name))?;
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
                limits: AccountLimits::from_columns(
                    row.limits.rpm,
                    row.limits.tpm,
                    row.limits.max_concurrent,
                ),
            };
            match resolve(&spec)
                .await
                .and_then(|addr| self.check_destination(&spec, addr))
            {
                Ok(addr) => match Account::build(&spec, addr, timeouts, self.stats.get(spec.id)) {
                    Ok(a) => accounts.push(a),
                    Err(e) => tracing::error!(account = %row.name, error = %e, "account skipped"),
                },
                Err(e) => {
                    tracing::error!(account = %row.name, error = %e, "account skipped")
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

impl AccountLoader {
    /// Refuses a destination an account may not have (checked after DNS resolution, so a name
    /// that resolves there is caught too), unless `[upstream] allow_hosts` names its host.
    fn check_destination(
        &self,
        spec: &AccountSpec,
        addr: std::net::SocketAddr,
    ) -> anyhow::Result<std::net::SocketAddr> {
        let ep = Endpoint::parse(&spec.base_url).map_err(anyhow::Error::msg)?;
        let settings = self.settings.load();
        let allowed = |h: &str| {
            settings
                .allow_hosts
                .iter()
                .any(|a| a.eq_ignore_ascii_case(h))
        };
        if allowed(&ep.host) || allowed(&addr.ip().to_string()) {
            return Ok(addr);
        }
        if let Some(why) = forbidden_destination(&ep.host, addr.ip()) {
            anyhow::bail!(
                "{} ({addr}) is {why}; name it in [upstream] allow_hosts to allow it",
                ep.host
            );
        }
        if is_own_listener(addr, &self.own) {
            anyhow::bail!("{addr} is one of tollgate's own listeners");
        }
        Ok(addr)
    }
}

async fn resolve(spec: &AccountSpec) -> anyhow::Result<std::net::SocketAddr> {
    let ep = Endpoint::parse(&spec.base_url).map_err(anyhow::Error::msg)?;
    let mut addrs = tokio::net::lookup_host((ep.host.as_str(), ep.port))
        .await
        .context("cannot resolve its host")?;
    addrs.next().context("its host has no address")
}

/// A request that finds no account of its type at all (say, one added with the CLI a moment ago,
/// before the change poll saw it) asks the refresher for a reload at once and waits for it. At
/// most one such reload a second: requests for a type nobody serves cost one reload a second,
/// not one each.
pub struct OnDemand {
    wake: Arc<Notify>,
    /// Bumped by the refresher each time it swaps in a set.
    loaded: watch::Sender<u64>,
    /// When the last on-demand reload was asked for (ms since `epoch`; 0 = never).
    last_ms: AtomicU64,
    /// tokio's clock, so tests run on paused time.
    epoch: tokio::time::Instant,
}

/// Least time between two on-demand reloads.
const ON_DEMAND_EVERY: Duration = Duration::from_secs(1);

impl OnDemand {
    pub fn new(wake: Arc<Notify>) -> OnDemand {
        OnDemand {
            wake,
            loaded: watch::channel(0).0,
            last_ms: AtomicU64::new(0),
            epoch: tokio::time::Instant::now(),
        }
    }

    fn published(&self) {
        self.loaded.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Asks for a reload and waits up to `wait` for a new set; `false` when one was asked for
    /// less than a second ago (the caller goes on with the set it has) or none came in time.
    pub async fn reload(&self, wait: Duration) -> bool {
        let now = (self.epoch.elapsed().as_millis() as u64).max(1);
        let last = self.last_ms.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < ON_DEMAND_EVERY.as_millis() as u64 {
            return false;
        }
        if self
            .last_ms
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        let mut loaded = self.loaded.subscribe();
        loaded.borrow_and_update();
        self.wake.notify_one();
        matches!(
            tokio::time::timeout(wait, loaded.changed()).await,
            Ok(Ok(()))
        )
    }
}

/// Task `account-refresher`: reloads the accounts every `[upstream] refresh_secs` (re-resolving
/// DNS), or at once when `changed` is notified (admin API, PostgreSQL NOTIFY, the change poll,
/// a config reload, a request that found no account: [`OnDemand`]). A failed load keeps the
/// current set.
pub async fn refresh(
    loader: Arc<AccountLoader>,
    accounts: Arc<ArcSwap<AccountSet>>,
    changed: Arc<Notify>,
    on_demand: Arc<OnDemand>,
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
            Ok(set) => {
                accounts.store(Arc::new(set));
                on_demand.published();
            }
            Err(e) => {
                tracing::warn!(error = %e, "account refresh failed; keeping the current accounts")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn on_demand_reloads_at_most_once_a_second() {
        let wake = Arc::new(Notify::new());
        let od = Arc::new(OnDemand::new(wake.clone()));
        // A refresher that answers each wake-up with a new set.
        let refresher = {
            let od = od.clone();
            tokio::spawn(async move {
                loop {
                    wake.notified().await;
                    od.published();
                }
            })
        };
        assert!(
            od.reload(Duration::from_secs(2)).await,
            "the first one waits for its set"
        );
        assert!(
            !od.reload(Duration::from_secs(2)).await,
            "a second within the second does not"
        );
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert!(
            od.reload(Duration::from_secs(2)).await,
            "a second later it may again"
        );
        refresher.abort();
        // Nobody answers: the wait ends at its bound.
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert!(!od.reload(Duration::from_millis(50)).await);
    }
}
