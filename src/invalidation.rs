//! Changes made elsewhere (the CLI, another instance's admin API) reaching this instance: the
//! `key-refresher` poll of `updated_at` (the only mechanism on SQLite, the safety net behind
//! NOTIFY on PostgreSQL) and the `notify-listener` task (PostgreSQL LISTEN). A changed key or
//! user drops its keys from the cache; a changed account wakes the account refresher.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

use crate::auth::KeyCache;
use crate::store::{Store, ACCOUNTS_CHANNEL, KEYS_CHANNEL};

/// Task `key-refresher`: every `period`, drops cached keys whose key or user row changed in the
/// database and wakes the account refresher when an account row changed.
pub async fn poll_changes(
    store: Store,
    keys: Arc<KeyCache>,
    accounts_changed: Arc<Notify>,
    period: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut watermark = match store.clock().await {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "reading the database clock; the change poll starts from now");
            String::new()
        }
    };
    // Accounts changed within the overlap window at the last poll: only a different list wakes
    // the account refresher (the window would otherwise reload them every poll for 10 s).
    let mut seen_accounts: Vec<(i64, String)> = Vec::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.changed() => return,
        }
        if watermark.is_empty() {
            watermark = store.clock().await.unwrap_or_default();
            continue;
        }
        match store.changed_since(&watermark).await {
            Ok(changes) => {
                for h in &changes.key_hashes {
                    keys.invalidate_hex(h);
                }
                if changes.accounts != seen_accounts {
                    if !changes.accounts.is_empty() {
                        accounts_changed.notify_one();
                    }
                    seen_accounts = changes.accounts;
                }
                watermark = changes.watermark;
            }
            Err(e) => tracing::debug!(error = %e, "change poll failed; retrying"),
        }
    }
}

/// Task `notify-listener` (PostgreSQL only): LISTEN for key and account changes of other
/// instances and the CLI; reconnects by itself (changes missed meanwhile are caught by the poll).
pub async fn listen(
    store: Store,
    keys: Arc<KeyCache>,
    accounts_changed: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    const RETRY: Duration = Duration::from_secs(1);
    let Some(pool) = store.pg_pool() else { return };
    let mut listener = loop {
        match sqlx::postgres::PgListener::connect_with(pool).await {
            Ok(mut l) => match l.listen_all([KEYS_CHANNEL, ACCOUNTS_CHANNEL]).await {
                Ok(()) => break l,
                Err(e) => tracing::warn!(error = %e, "LISTEN failed; retrying"),
            },
            Err(e) => tracing::warn!(error = %e, "LISTEN connection failed; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            _ = stop.changed() => return,
        }
    };
    loop {
        let note = tokio::select! {
            n = listener.recv() => n,
            _ = stop.changed() => return,
        };
        match note {
            Ok(n) if n.channel() == KEYS_CHANNEL => keys.invalidate_hex(n.payload()),
            Ok(_) => accounts_changed.notify_one(),
            Err(e) => {
                // sqlx reconnects on the next recv; changes missed meanwhile are caught by the poll.
                tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(RETRY / 5) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}
