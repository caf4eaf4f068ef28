//! Config reload (SIGHUP, `POST /admin/reload`, `tollgate reload`): re-reads the file, and a valid
//! one replaces routes, prices and the accounts from the file at once (requests in flight finish
//! on what they started with); an invalid one changes nothing. Settings that only take effect at
//! a restart are named in a warning. Also the `sighup` task. A reload that took is audited
//! (`config.reload`, with what the file declared before and after) in the transaction that saves
//! the file's accounts; a refused one writes nothing.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::{watch, Notify};

use crate::accounts::{self, AccountLoader};
use crate::admin::ReloadFn;
use crate::metrics::Metrics;
use crate::pricing::Pricing;
use crate::route::Router;
use crate::settings::Settings;
use crate::store::{Actor, Store, Target};

/// What a reload swaps, and what it compares against.
pub struct Reloader {
    pub path: PathBuf,
    /// The settings the process started with: sections that differ need a restart.
    pub running: Settings,
    pub store: Store,
    pub loader: Arc<AccountLoader>,
    pub router: Arc<ArcSwap<Router>>,
    pub pricing: Arc<ArcSwap<Pricing>>,
    pub metrics: Arc<Metrics>,
    /// Wakes the account refresher.
    pub accounts_changed: Arc<Notify>,
    /// [`summary`] of the settings in effect: the `before` of the next reload's audit row.
    pub applied: ArcSwap<serde_json::Value>,
}

/// What a config declares that a reload applies, for the audit log: the names of its accounts
/// (never their credentials), its route prefixes and the models it prices.
pub fn summary(s: &Settings) -> serde_json::Value {
    serde_json::json!({
        "upstream_accounts": s.upstream_accounts.iter().map(|a| a.name.get_ref().clone()).collect::<Vec<_>>(),
        "routes": s.routes.iter().map(|(prefix, kind)| format!("{prefix} -> {}", kind.as_str())).collect::<Vec<_>>(),
        "prices": s.prices.keys().map(str::to_string).collect::<std::collections::BTreeSet<_>>(),
    })
}

/// The routes of the settings.
pub fn router_of(s: &Settings) -> Router {
    Router::new(s.routes.iter().cloned())
}

/// The prices of the settings, their cost counters registered.
pub fn pricing_of(s: &Settings, metrics: &Metrics) -> Pricing {
    Pricing::new(s.prices.clone(), s.default_prices.clone(), &metrics.cost)
}

/// Names of the sections of `new` that differ from `running` and need a restart.
pub fn needs_restart(running: &Settings, new: &Settings) -> Vec<&'static str> {
    [
        ("[server]", running.server != new.server),
        ("[database]", running.database != new.database),
        ("[auth]", running.auth != new.auth),
        ("[metering]", running.metering != new.metering),
        ("[limits]", running.limits != new.limits),
        ("[writer]", running.writer != new.writer),
        ("[metrics]", running.metrics != new.metrics),
        ("[admin]", running.admin != new.admin),
    ]
    .into_iter()
    .filter_map(|(name, changed)| changed.then_some(name))
    .collect()
}

impl Reloader {
    async fn reload(&self, actor: &Actor) -> Result<(), String> {
        let new = Settings::load(&self.path, true).map_err(|e| e.to_string())?;
        for section in needs_restart(&self.running, &new) {
            tracing::warn!(
                section,
                "changed in the config file; takes effect at the next restart"
            );
        }
        let after = summary(&new);
        let saved = async {
            let mut tx = self.store.begin().await?;
            accounts::upsert_from_config(&mut tx, &self.loader.keys, &new.upstream_accounts)
                .await?;
            let target = Target::new("config", self.path.display());
            let before = Some((*self.applied.load_full()).clone());
            tx.audit(actor, "config.reload", &target, before, Some(after.clone()))
                .await?;
            tx.commit().await?;
            anyhow::Ok(())
        };
        saved.await.map_err(|e| format!("{e:#}"))?;
        self.applied.store(Arc::new(after));
        self.router.store(Arc::new(router_of(&new)));
        self.pricing
            .store(Arc::new(pricing_of(&new, &self.metrics)));
        self.loader.settings.store(Arc::new(new.upstream));
        Ok(())
    }

    /// The reload as the admin API and the `sighup` task call it: logged and counted.
    pub fn into_fn(self: Arc<Self>) -> ReloadFn {
        Arc::new(move |actor| {
            let me = self.clone();
            Box::pin(async move {
                let result = me.reload(&actor).await;
                match &result {
                    Ok(()) => {
                        me.accounts_changed.notify_one();
                        tracing::info!(path = %me.path.display(), "config reloaded");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "config reload refused; the running config stays")
                    }
                }
                me.metrics.reload(result.is_ok());
                result
            })
        })
    }
}

/// Task `sighup`: reloads the config on SIGHUP.
pub async fn on_sighup(reload: ReloadFn, mut stop: watch::Receiver<bool>) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler: reload with `tollgate reload` instead");
        return;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => { let _ = reload(Actor::system("sighup")).await; }
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn sections_needing_a_restart() {
        let parse =
            |text: &str| Settings::from_text(text, "c.toml", Path::new("/x"), None).unwrap();
        let base = parse("");
        for (text, expected) in [
            ("", vec![]),
            ("[server]\nthreads = 3\n", vec!["[server]"]),
            (
                "[writer]\nbatch_size = 10\n[admin]\nkey_refresh_ms = 500\n",
                vec!["[writer]", "[admin]"],
            ),
            // Reloaded live: prices, routes, upstream.
            (
                "[upstream]\ncooldown_secs = 5\n[prices.m]\ninput = \"1\"\noutput = \"1\"\n",
                vec![],
            ),
        ] {
            assert_eq!(needs_restart(&base, &parse(text)), expected, "{text}");
        }
    }
}
