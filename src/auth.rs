//! Who is calling: reads the key from the request, checks its format offline, finds it through the
//! key cache (database on a miss, concurrent misses coalesced) and checks its permissions.
//!
//! Keys survive database outages: a found key is fresh for `[auth] cache_ttl_secs`; after that it
//! is still served at once while one background lookup refreshes it, and when the database cannot
//! answer it keeps being served (stale-if-error) for up to `[auth] max_stale_secs`. A revocation
//! still evicts it at once when it reaches this instance (admin API, NOTIFY, the change poll). A
//! key never seen needs the database: while lookups fail, a circuit breaker refuses such misses
//! at once (503) instead of letting each wait on the pool.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use http::HeaderMap;
use moka::sync::Cache;
use tokio::sync::OnceCell;

use crate::keys::{self, KeyHash};
use crate::limits::{Entries, Overrides};
use crate::spend::{BudgetRef, SpendPolicy};
use crate::store::{KeyRow, LimitColumns, Store};

/// Why a request was refused before reaching an upstream. `label()` is the metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'")]
    Missing,
    #[error("malformed API key: {0}")]
    Malformed(keys::KeyFormatError),
    #[error("unknown API key")]
    Unknown,
    #[error("this API key has been revoked")]
    Revoked,
    #[error("this API key has expired")]
    Expired,
    #[error("the user owning this API key is deactivated")]
    UserInactive,
    #[error("the user owning this API key is banned")]
    UserBanned,
    #[error("this API key may not use {0}")]
    Forbidden(String),
    #[error("the key store is unavailable")]
    StoreUnavailable,
}

impl AuthError {
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed(_) => "malformed",
            AuthError::Unknown => "unknown",
            AuthError::Revoked | AuthError::UserInactive => "revoked",
            AuthError::Expired => "expired",
            AuthError::Forbidden(_) => "forbidden",
            AuthError::UserBanned => "banned",
            AuthError::StoreUnavailable => "store_unavailable",
        }
    }
}

/// What a key may do. Parsed once when the key is cached.
///
/// JSON form: an array of strings; `"/v1/chat"` (or `"path:/v1/chat"`) allows a path prefix,
/// `"model:gpt-4o"` allows a model (`"model:gpt-4o*"` a model prefix). No path entries means every
/// path, no model entries every model; `[]` allows everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    pub paths: Vec<String>,
    pub models: Vec<String>,
}

impl Permissions {
    pub fn parse(v: &serde_json::Value) -> Result<Permissions, String> {
        let items = v
            .as_array()
            .ok_or("permissions must be a JSON array of strings")?;
        let mut p = Permissions::default();
        for item in items {
            let s = item
                .as_str()
                .ok_or("permissions must be a JSON array of strings")?;
            if let Some(m) = s.strip_prefix("model:") {
                if m.is_empty() {
                    return Err("empty model in permissions".into());
                }
                p.models.push(m.to_string());
            } else {
                let path = s.strip_prefix("path:").unwrap_or(s);
                if !path.starts_with('/') {
                    return Err(format!(
                        "permission {s:?}: want a path starting with '/' or model:NAME"
                    ));
                }
                p.paths.push(path.to_string());
            }
        }
        Ok(p)
    }

    pub fn restricts_models(&self) -> bool {
        !self.models.is_empty()
    }

    /// `path` (normalised, `path.rs`) is under one of the allowed prefixes, on a segment boundary.
    pub fn allows_path(&self, path: &str) -> bool {
        self.paths.is_empty() || self.paths.iter().any(|p| crate::path::has_prefix(path, p))
    }

    pub fn allows_model(&self, model: Option<&str>) -> bool {
        if self.models.is_empty() {
            return true;
        }
        let Some(model) = model else { return false };
        self.models.iter().any(|m| match m.strip_suffix('*') {
            Some(prefix) => model.starts_with(prefix),
            None => model == m,
        })
    }
}

/// A key as cached: everything the request path needs, no secrets.
#[derive(Debug)]
pub struct KeyInfo {
    pub id: i64,
    pub user_id: i64,
    pub name: String,
    pub is_active: bool,
    pub user_active: bool,
    pub expires_at: Option<DateTime<Utc>>,
    pub permissions: Permissions,
    /// The key's own rate limits (`None` = `[limits]`) and its user's: the user's own, else their
    /// plan's, limit by limit (`None` = none).
    pub key_limits: Overrides,
    pub user_limits: Overrides,
    /// This key's and its user's limit state, held once the rate-limit stage has looked it up.
    pub limit_entries: Entries,
    /// `users.role` is `banned`: every request of the user's keys is refused (403).
    pub user_banned: bool,
    /// The budgets and credit balance the key's requests are reserved against (`spend.rs`);
    /// `None` when there are none.
    pub spend: Option<Arc<SpendPolicy>>,
}

/// Stored limits as the stage reads them. A negative value (only writable by hand: the CLI and
/// the admin API refuse it) reads as 0, no limit.
fn overrides(c: LimitColumns) -> Overrides {
    let count = |v: Option<i64>| v.map(|n| u64::try_from(n).unwrap_or(0));
    Overrides {
        rpm: count(c.rpm),
        rpd: count(c.rpd),
        tpm: count(c.tpm),
        max_concurrent: count(c.max_concurrent),
    }
}

/// The spend policy of a key from what its lookup found; `None` when nothing applies.
fn spend_policy(
    key_id: i64,
    user_id: i64,
    budgets: &[(crate::store::BudgetRow, Option<DateTime<Utc>>)],
    prepaid: bool,
) -> Option<Arc<SpendPolicy>> {
    let policy = SpendPolicy {
        budgets: budgets
            .iter()
            .map(|(b, anchor)| BudgetRef {
                budget_id: b.id,
                subject_id: if b.api_key_id.is_some() {
                    key_id
                } else {
                    user_id
                },
                metric: b.metric,
                period: b.period,
                anchor: *anchor,
                owner: match (b.api_key_id, b.user_id) {
                    (Some(_), _) => "key",
                    (_, Some(_)) => "user",
                    _ => "plan",
                },
                cache: Default::default(),
            })
            .collect(),
        credit_user: prepaid.then_some(user_id),
        credit_cache: Default::default(),
    };
    (!policy.is_empty()).then(|| Arc::new(policy))
}

impl KeyInfo {
    fn from_row(row: KeyRow) -> KeyInfo {
        // A permissions value the gateway cannot read allows nothing rather than everything.
        let permissions = Permissions::parse(&row.permissions).unwrap_or_else(|_| Permissions {
            paths: vec!["\u{0}".into()],
            models: Vec::new(),
        });
        KeyInfo {
            id: row.id,
            user_id: row.user_id,
            name: row.name,
            is_active: row.is_active,
            user_active: row.user_active,
            expires_at: row.expires_at,
            permissions,
            key_limits: overrides(row.key_limits),
            user_limits: overrides(row.user_limits),
            limit_entries: Entries::default(),
            user_banned: row.user_role.eq_ignore_ascii_case("banned"),
            spend: spend_policy(row.id, row.user_id, &row.budgets, row.prepaid),
        }
    }

    /// Refusals that depend only on the key, checked on every request (expiry moves with time).
    pub fn check_usable(&self, now: DateTime<Utc>) -> Result<(), AuthError> {
        if !self.is_active {
            return Err(AuthError::Revoked);
        }
        if !self.user_active {
            return Err(AuthError::UserInactive);
        }
        if self.user_banned {
            return Err(AuthError::UserBanned);
        }
        if self.expires_at.is_some_and(|e| e <= now) {
            return Err(AuthError::Expired);
        }
        Ok(())
    }
}

/// The key from `Authorization: Bearer …` or `x-api-key`.
pub fn credential(headers: &HeaderMap) -> Result<&str, AuthError> {
    if let Some(v) = headers.get(http::header::AUTHORIZATION) {
        let v = v
            .to_str()
            .map_err(|_| AuthError::Malformed(keys::KeyFormatError::Charset))?;
        let (scheme, token) = v
            .split_once(' ')
            .ok_or(AuthError::Malformed(keys::KeyFormatError::Prefix))?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Malformed(keys::KeyFormatError::Prefix));
        }
        return Ok(token.trim());
    }
    if let Some(v) = headers.get("x-api-key") {
        return v
            .to_str()
            .map(str::trim)
            .map_err(|_| AuthError::Malformed(keys::KeyFormatError::Charset));
    }
    Err(AuthError::Missing)
}

type Lookup = Arc<OnceCell<Option<Arc<KeyInfo>>>>;

/// Longest a key lookup may take before it counts as failed (and opens the breaker).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the breaker stays open after a failed lookup before one is let through again.
const BREAKER_OPEN: Duration = Duration::from_secs(2);

/// A found key in the cache.
#[derive(Debug)]
struct Cached {
    info: Arc<KeyInfo>,
    /// Served without a refresh until then; served while a refresh runs (or fails) after.
    fresh_until: Instant,
    /// A background refresh of this entry is running.
    refreshing: AtomicBool,
}

/// Fails key lookups fast while the database does not answer: open for [`BREAKER_OPEN`] after
/// a failed lookup, then one lookup is let through (and reopens it if it fails too).
#[derive(Debug)]
struct Breaker {
    /// Milliseconds since `epoch` until which lookups are refused; 0 = closed.
    open_until_ms: AtomicU64,
    epoch: Instant,
}

impl Breaker {
    fn new() -> Breaker {
        Breaker {
            open_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether a lookup may go to the database now.
    fn allows(&self) -> bool {
        self.open_until_ms.load(Ordering::Relaxed) <= self.now_ms()
    }

    fn failed(&self) {
        let until = self.now_ms() + BREAKER_OPEN.as_millis() as u64;
        if self.open_until_ms.swap(until, Ordering::Relaxed) == 0 {
            tracing::warn!(
                "key lookups fail: refusing keys not in the cache for now, serving cached ones"
            );
        }
    }

    fn succeeded(&self) {
        if self.open_until_ms.swap(0, Ordering::Relaxed) != 0 {
            tracing::info!("key lookups answer again");
        }
    }
}

/// Keys by SHA-256: found keys fresh for `ttl` and kept up to `max_stale` (see the module doc),
/// unknown hashes for `negative_ttl`, the database on a miss.
pub struct KeyCache {
    found: Cache<KeyHash, Arc<Cached>>,
    /// How long a found key is served without a refresh.
    fresh: Duration,
    breaker: Breaker,
    unknown: Cache<KeyHash, ()>,
    inflight: Mutex<HashMap<KeyHash, Lookup>>,
    /// Bumped by every invalidation. A lookup that started before an invalidation does not put
    /// its (possibly stale) answer into the cache, so a revoked key cannot be written back.
    generation: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    store: Store,
    /// The runtime that owns the database pool; lookups run there.
    db: tokio::runtime::Handle,
}

impl KeyCache {
    pub fn new(
        store: Store,
        db: tokio::runtime::Handle,
        capacity: u64,
        ttl: Duration,
        max_stale: Duration,
        negative_ttl: Duration,
    ) -> KeyCache {
        KeyCache {
            found: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(max_stale.max(ttl))
                .build(),
            fresh: ttl,
            breaker: Breaker::new(),
            unknown: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(negative_ttl)
                .build(),
            inflight: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            store,
            db,
        }
    }

    fn cached(&self, info: Arc<KeyInfo>) -> Arc<Cached> {
        Arc::new(Cached {
            info,
            fresh_until: Instant::now() + self.fresh,
            refreshing: AtomicBool::new(false),
        })
    }

    /// Authenticates a request's headers: format, lookup, state. Permissions are checked by the caller.
    pub async fn authenticate(
        self: &Arc<Self>,
        headers: &HeaderMap,
    ) -> Result<Arc<KeyInfo>, AuthError> {
        self.authenticate_gated(headers, || Ok(())).await
    }

    /// [`authenticate`](Self::authenticate), asking `may_look_up` once before a key that is not
    /// in the found cache goes to the negative cache or the database; its error is the answer
    /// (`address_limits.rs`: an address that spent its failed authentications). A found key
    /// never asks it, so a cache hit costs nothing more.
    pub async fn authenticate_gated<E: From<AuthError>>(
        self: &Arc<Self>,
        headers: &HeaderMap,
        may_look_up: impl FnOnce() -> Result<(), E>,
    ) -> Result<Arc<KeyInfo>, E> {
        let key = credential(headers)?;
        keys::validate(key).map_err(AuthError::Malformed)?;
        let hash = keys::hash(key);
        let info = match self.hit(hash) {
            Some(info) => info,
            None => {
                may_look_up()?;
                self.miss(hash).await?.ok_or(AuthError::Unknown)?
            }
        };
        info.check_usable(Utc::now())?;
        Ok(info)
    }

    /// Cache first (a stale entry is served and refreshed in the background); on a miss one
    /// database query per hash however many requests wait for it, refused at once while the
    /// breaker is open.
    pub async fn lookup(
        self: &Arc<Self>,
        hash: KeyHash,
    ) -> Result<Option<Arc<KeyInfo>>, AuthError> {
        match self.hit(hash) {
            Some(info) => Ok(Some(info)),
            None => self.miss(hash).await,
        }
    }

    /// The found cache alone; a stale entry is served and refreshed in the background.
    fn hit(self: &Arc<Self>, hash: KeyHash) -> Option<Arc<KeyInfo>> {
        let cached = self.found.get(&hash)?;
        self.hits.fetch_add(1, Ordering::Relaxed);
        if Instant::now() >= cached.fresh_until
            && self.breaker.allows()
            && !cached.refreshing.swap(true, Ordering::AcqRel)
        {
            self.refresh(hash, cached.clone());
        }
        Some(cached.info.clone())
    }

    /// A hash not in the found cache: the negative cache, else one database query per hash
    /// however many requests wait for it, refused at once while the breaker is open.
    async fn miss(self: &Arc<Self>, hash: KeyHash) -> Result<Option<Arc<KeyInfo>>, AuthError> {
        if self.unknown.contains_key(&hash) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        if !self.breaker.allows() {
            return Err(AuthError::StoreUnavailable);
        }
        let generation = self.generation.load(Ordering::Acquire);
        let cell = match self.inflight.lock() {
            Ok(mut m) => m.entry(hash).or_default().clone(),
            Err(_) => return Err(AuthError::StoreUnavailable),
        };
        let result = cell
            .get_or_try_init(|| async {
                let row = self.find(hash).await?;
                let info = row.map(|r| Arc::new(KeyInfo::from_row(r)));
                if self.generation.load(Ordering::Acquire) == generation {
                    match &info {
                        Some(i) => self.found.insert(hash, self.cached(i.clone())),
                        None => self.unknown.insert(hash, ()),
                    }
                }
                Ok::<_, AuthError>(info)
            })
            .await
            .cloned();
        if let Ok(mut m) = self.inflight.lock() {
            if m.get(&hash).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                m.remove(&hash);
            }
        }
        result
    }

    /// One lookup on the database runtime, within [`LOOKUP_TIMEOUT`]; feeds the breaker.
    async fn find(&self, hash: KeyHash) -> Result<Option<KeyRow>, AuthError> {
        let store = self.store.clone();
        let hex = hex::encode(hash);
        let found = self
            .db
            .spawn(async move { tokio::time::timeout(LOOKUP_TIMEOUT, store.find_key(&hex)).await })
            .await;
        match found {
            Ok(Ok(Ok(row))) => {
                self.breaker.succeeded();
                Ok(row)
            }
            Ok(Ok(Err(e))) => {
                tracing::warn!(error = %e, "key lookup failed");
                self.breaker.failed();
                Err(AuthError::StoreUnavailable)
            }
            Ok(Err(_)) | Err(_) => {
                self.breaker.failed();
                Err(AuthError::StoreUnavailable)
            }
        }
    }

    /// Refreshes a stale entry off the request path. The answer replaces it (or removes it: the
    /// key is gone); a failure keeps serving it, up to `max_stale` after it was loaded.
    fn refresh(self: &Arc<Self>, hash: KeyHash, cached: Arc<Cached>) {
        let me = self.clone();
        let generation = self.generation.load(Ordering::Acquire);
        self.db.spawn(async move {
            match me.find(hash).await {
                Ok(row) if me.generation.load(Ordering::Acquire) == generation => match row {
                    Some(r) => me
                        .found
                        .insert(hash, me.cached(Arc::new(KeyInfo::from_row(r)))),
                    None => {
                        me.found.invalidate(&hash);
                        me.unknown.insert(hash, ());
                    }
                },
                // Invalidated meanwhile: the entry is gone already; write nothing back.
                Ok(_) => {}
                Err(_) => cached.refreshing.store(false, Ordering::Release),
            }
        });
    }

    /// Drops every cached entry for `hash`, found or unknown (a revocation or an edit).
    pub fn invalidate(&self, hash: &KeyHash) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.found.invalidate(hash);
        self.unknown.invalidate(hash);
    }

    /// [`invalidate`](Self::invalidate) by the hex form stored in the database.
    pub fn invalidate_hex(&self, hex_hash: &str) {
        let mut hash = [0u8; 32];
        if hex::decode_to_slice(hex_hash, &mut hash).is_ok() {
            self.invalidate(&hash);
        }
    }

    /// Loads recently used keys so the first requests after a start hit the cache.
    pub async fn warm(&self, limit: u64) -> Result<usize, crate::store::StoreError> {
        let rows = self
            .store
            .recent_keys(limit.min(i64::MAX as u64) as i64)
            .await?;
        let n = rows.len();
        for (hex_hash, row) in rows {
            let mut hash = [0u8; 32];
            if hex::decode_to_slice(&hex_hash, &mut hash).is_ok() {
                self.found
                    .insert(hash, self.cached(Arc::new(KeyInfo::from_row(row))));
            }
        }
        Ok(n)
    }

    /// (hits, misses, entries) for metrics.
    pub fn stats(&self) -> (u64, u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
            self.found.entry_count() + self.unknown.entry_count(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check_credential(headers: &[(&str, &str)], expected: Result<&str, AuthError>) {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        assert_eq!(credential(&map), expected, "{headers:?}");
    }

    #[test]
    fn credentials() {
        check_credential(&[("authorization", "Bearer tg_x")], Ok("tg_x"));
        check_credential(&[("authorization", "bearer  tg_x ")], Ok("tg_x"));
        check_credential(&[("x-api-key", "tg_y")], Ok("tg_y"));
        check_credential(
            &[("authorization", "Basic abc")],
            Err(AuthError::Malformed(keys::KeyFormatError::Prefix)),
        );
        check_credential(&[], Err(AuthError::Missing));
    }

    fn check_perm(perms: serde_json::Value, path: &str, model: Option<&str>, allowed: bool) {
        let p = Permissions::parse(&perms).unwrap();
        assert_eq!(
            p.allows_path(path) && p.allows_model(model),
            allowed,
            "{perms} {path} {model:?}"
        );
    }

    #[test]
    fn permissions() {
        check_perm(json!([]), "/v1/anything", Some("any"), true);
        check_perm(json!(["/v1/chat"]), "/v1/chat/completions", None, true);
        check_perm(json!(["/v1/chat"]), "/v1/embeddings", None, false);
        check_perm(
            json!(["path:/v1/chat", "model:gpt-4o-mini"]),
            "/v1/chat/completions",
            Some("gpt-4o-mini"),
            true,
        );
        check_perm(
            json!(["model:gpt-4o-mini"]),
            "/v1/chat/completions",
            Some("gpt-4o"),
            false,
        );
        check_perm(
            json!(["model:gpt-4o*"]),
            "/v1/chat/completions",
            Some("gpt-4o-2024-08-06"),
            true,
        );
        check_perm(
            json!(["model:gpt-4o*"]),
            "/v1/chat/completions",
            None,
            false,
        );
        assert!(Permissions::parse(&json!({"a": 1})).is_err());
        assert!(Permissions::parse(&json!(["chat"])).is_err());
        assert!(Permissions::parse(&json!([1])).is_err());
    }
}
