//! Fixtures the benches share (each bench is its own crate: included with `#[path]`).

use rust_decimal::Decimal;
use tollgate::store::{Actor, Grant, Store};

/// A user `name@example.com` with one key (`tg_<name>`) and a grant of 10⁹ USD of credit (far
/// above what a run spends): a prepaid user whose requests are reserved and charged. Returns
/// (user id, key id). The user and key are fixtures (committed without audit rows); the grant
/// goes through the store's admin API.
pub async fn prepaid_user(store: &Store, name: &str) -> (i64, i64) {
    let mut tx = store.begin().await.expect("transaction");
    let user = tx
        .create_user(&format!("{name}@example.com"), name, "user")
        .await
        .expect("user");
    let key = tx
        .create_key(
            user,
            name,
            &tollgate::keys::hash_hex(&tollgate::keys::generate().expect("key")),
            &format!("tg_{name}"),
            &serde_json::json!([]),
            None,
            &Default::default(),
        )
        .await
        .expect("key");
    tx.commit_unaudited().await.expect("commit");
    let grant = Grant {
        user_id: user,
        amount: Decimal::from(1_000_000_000),
        expires_at: None,
        action: "grant",
        note: None,
        idempotency: None,
        idempotency_ttl: chrono::Duration::hours(24),
    };
    store
        .grant_credits(&Actor::system("bench"), &grant, chrono::Utc::now())
        .await
        .expect("grant");
    (user, key)
}
