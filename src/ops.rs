//! Operator actions — users, keys, accounts, usage, credits, budgets, plans, the audit log — shared by the CLI and the
//! admin API, with their input validation. Each returns typed data; the callers print it or send
//! it as JSON. Every action that changes something takes the [`Actor`] doing it and writes its
//! `admin_log` row in the transaction of the change: validate, `store.begin()`, snapshot
//! `before`, change, snapshot `after`, `tx.audit(actor, "thing.verb", target, before, after)`,
//! `tx.commit()` (which refuses a change without its row).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::auth::Permissions;
use crate::budget::{Metric, Period};
use crate::keys;
use crate::limits::{MAX_CONCURRENT, MAX_RATE};
use crate::secrets::{self, Keyring};
use crate::store::{
    AccountLimitColumns, AccountLimitPatch, AccountPatch, AccountRow, Actor, AuditQuery, AuditRow,
    BudgetListing, BudgetOwner, BudgetRow, CreditBalance, Grant, GrantOutcome, GroupBy, KeyListing,
    KeyPatch, LedgerEntry, LimitColumns, LimitPatch, NewAccount, PlanBudget, PlanRow, Store,
    StoreError, SubscriptionRow, Target, UsageTotals, UserRow,
};
use crate::upstream::{AccountType, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// Bad input, naming the field.
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Conflict(String),
    /// An idempotency key used with another request (or by one at the same moment).
    #[error("{0}")]
    Idempotency(String),
    #[error("{0}")]
    Store(StoreError),
    /// The credentials could not be sealed (no randomness from the system).
    #[error("sealing the credentials: {0}")]
    Sealing(String),
}

impl From<StoreError> for OpsError {
    fn from(e: StoreError) -> OpsError {
        match e {
            StoreError::NotFound(what) => OpsError::NotFound(what),
            StoreError::Conflict(what) => OpsError::Conflict(what),
            StoreError::Idempotency(what) => OpsError::Idempotency(what),
            StoreError::Invalid(message) => OpsError::Invalid {
                field: "request",
                message,
            },
            other => OpsError::Store(other),
        }
    }
}

impl OpsError {
    /// HTTP status for the admin API.
    pub fn status(&self) -> u16 {
        match self {
            OpsError::Invalid { .. } => 400,
            OpsError::NotFound(_) => 404,
            OpsError::Conflict(_) | OpsError::Idempotency(_) => 409,
            OpsError::Store(_) | OpsError::Sealing(_) => 500,
        }
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> OpsError {
    OpsError::Invalid {
        field,
        message: message.into(),
    }
}

/// Largest count per unit of a duration: 99999 days, about 273 years (openapi.json's duration
/// pattern says the same with digit counts). Keeps every lifetime and age far inside RFC 3339's
/// years 0000-9999 and never overflows.
const MAX_DURATION: [(&str, u64, u64); 5] = [
    ("d", 86_400, 99_999),
    ("h", 3_600, 999_999),
    ("m", 60, 99_999_999),
    ("s", 1, 9_999_999_999),
    ("", 1, 9_999_999_999),
];

/// Parses `30d`, `12h`, `90m`, `3600s` (bare digits are seconds): positive, at most 99999d,
/// 999999h, 99999999m or 9999999999s.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let want = || format!("bad duration {s:?}: want e.g. 30d, 12h, 90m, 3600s");
    let &(_, unit_secs, max) = MAX_DURATION
        .iter()
        .find(|(u, _, _)| *u == unit)
        .ok_or_else(want)?;
    if num.is_empty() {
        return Err(want());
    }
    let n = match num.parse::<u64>() {
        Ok(n) if n <= max => n,
        _ => {
            return Err(format!(
                "bad duration {s:?}: too long (at most 99999d, 999999h, 99999999m or 9999999999s)"
            ))
        }
    };
    if n == 0 {
        return Err(format!("bad duration {s:?}: must be positive"));
    }
    Ok(std::time::Duration::from_secs(n * unit_secs))
}

/// The earliest and latest instants RFC 3339 can write in UTC (years 0000-9999), to the second
/// (PostgreSQL keeps microseconds: a later fraction would round into year 10000).
pub fn rfc3339_bounds() -> (DateTime<Utc>, DateTime<Utc>) {
    let first = chrono::NaiveDate::from_ymd_opt(0, 1, 1).unwrap_or(chrono::NaiveDate::MIN);
    let last = chrono::NaiveDate::from_ymd_opt(9999, 12, 31).unwrap_or(chrono::NaiveDate::MAX);
    (
        first.and_time(chrono::NaiveTime::MIN).and_utc(),
        last.and_hms_opt(23, 59, 59)
            .unwrap_or(chrono::NaiveDateTime::MAX)
            .and_utc(),
    )
}

/// An RFC 3339 time that falls outside years 0000-9999 once converted to UTC (only possible at
/// the very ends, through its offset: `9999-12-31T23:00:00-05:00`) becomes the nearest end.
pub fn clamp_to_rfc3339(t: DateTime<Utc>) -> DateTime<Utc> {
    let (first, last) = rfc3339_bounds();
    t.clamp(first, last)
}

/// `now + d`, refused when it leaves years 0000-9999 (RFC 3339 cannot write it).
fn later_by(now: DateTime<Utc>, d: std::time::Duration) -> Result<DateTime<Utc>, String> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .filter(|t| *t <= rfc3339_bounds().1)
        .ok_or_else(|| "too long: the time would be after 9999-12-31T23:59:59Z".to_string())
}

/// Parses a time: RFC 3339, a UTC date (YYYY-MM-DD), or an age before `now` like `7d`.
/// The result is always within years 0000-9999 (see [`clamp_to_rfc3339`]).
pub fn parse_time(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(clamp_to_rfc3339(t.with_timezone(&Utc)));
    }
    // Exactly YYYY-MM-DD: chrono alone would also take `+12345-01-01` or `2026-1-5`.
    let date_shaped = s.len() == 10
        && s.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    if date_shaped {
        return chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .map(|d| d.and_time(chrono::NaiveTime::MIN).and_utc())
            .map_err(|_| format!("bad time {s:?}: no such date"));
    }
    let age = parse_duration(s).map_err(|e| {
        if s.bytes().next().is_some_and(|b| b.is_ascii_digit()) && e.contains("too long") {
            format!("bad time {s:?}: too far back (at most 99999d)")
        } else {
            format!("bad time {s:?}: want RFC 3339, YYYY-MM-DD, or an age like 7d")
        }
    })?;
    chrono::Duration::from_std(age)
        .ok()
        .and_then(|a| now.checked_sub_signed(a))
        .map(clamp_to_rfc3339)
        .ok_or_else(|| format!("bad time {s:?}: too far back"))
}

/// A name-like field: trimmed, not empty, no control characters. (Control characters have no
/// place in a name, and PostgreSQL refuses NUL in text.)
fn label<'a>(field: &'static str, s: &'a str) -> Result<&'a str, OpsError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(invalid(field, "must not be empty or only spaces"));
    }
    if let Some(c) = t.chars().find(|c| c.is_control()) {
        return Err(invalid(
            field,
            format!("must not contain control characters (found {c:?})"),
        ));
    }
    Ok(t)
}

// ---------------------------------------------------------------- users

#[derive(Debug, Clone, Deserialize)]
pub struct NewUser {
    pub email: String,
    pub username: String,
    #[serde(default = "default_role")]
    pub role: String,
}

fn default_role() -> String {
    "user".into()
}

pub async fn add_user(store: &Store, actor: &Actor, u: &NewUser) -> Result<UserRow, OpsError> {
    let email = u.email.trim();
    if !email.contains('@') || email.len() > 320 {
        return Err(invalid(
            "email",
            format!("{email:?} is not an email address"),
        ));
    }
    if let Some(c) = email.chars().find(|c| c.is_control()) {
        return Err(invalid(
            "email",
            format!("must not contain control characters (found {c:?})"),
        ));
    }
    let username = label("username", &u.username)?;
    let role = label("role", &u.role)?;
    let mut tx = store.begin().await?;
    let id = tx.create_user(email, username, role).await?;
    let after = tx.user_snapshot(id).await?;
    tx.audit(actor, "user.create", &Target::user(id), None, after)
        .await?;
    tx.commit().await?;
    Ok(UserRow {
        id,
        email: email.into(),
        username: username.into(),
        role: role.into(),
        is_active: true,
        limits: LimitColumns::default(),
    })
}

pub async fn list_users(store: &Store) -> Result<Vec<UserRow>, OpsError> {
    Ok(store.list_users().await?)
}

/// Returns the hashes of the user's keys, to drop from caches.
pub async fn deactivate_user(
    store: &Store,
    actor: &Actor,
    id: i64,
) -> Result<Vec<String>, OpsError> {
    set_user_active(store, actor, id, false).await
}

async fn set_user_active(
    store: &Store,
    actor: &Actor,
    id: i64,
    active: bool,
) -> Result<Vec<String>, OpsError> {
    let mut tx = store.begin().await?;
    let before = tx
        .user_snapshot(id)
        .await?
        .ok_or_else(|| OpsError::NotFound(format!("user {id}")))?;
    let hashes = tx.set_user_active(id, active).await?;
    let after = tx.user_snapshot(id).await?;
    let action = if active {
        "user.activate"
    } else {
        "user.deactivate"
    };
    tx.audit(actor, action, &Target::user(id), Some(before), after)
        .await?;
    tx.commit().await?;
    Ok(hashes)
}

/// One limit as given: 0 (no limit) up to [`MAX_RATE`] ([`MAX_CONCURRENT`] for
/// `max_concurrent`).
fn check_limit(field: &'static str, value: i64) -> Result<(), OpsError> {
    let max = if field == "max_concurrent" {
        MAX_CONCURRENT
    } else {
        MAX_RATE
    };
    match u64::try_from(value) {
        Err(_) => Err(invalid(
            field,
            format!("{value} is negative (0 = no limit)"),
        )),
        Ok(v) if v > max => Err(invalid(
            field,
            format!("{value} is above the most allowed, {max}"),
        )),
        Ok(_) => Ok(()),
    }
}

/// Every limit set in `patch` is within bounds.
pub fn check_limit_patch(patch: &LimitPatch) -> Result<(), OpsError> {
    for (field, v) in patch.fields() {
        if let Some(Some(v)) = v {
            check_limit(field, v)?;
        }
    }
    Ok(())
}

fn check_limit_columns(c: &LimitColumns) -> Result<(), OpsError> {
    check_limit_patch(&LimitPatch {
        rpm: Some(c.rpm),
        rpd: Some(c.rpd),
        tpm: Some(c.tpm),
        max_concurrent: Some(c.max_concurrent),
    })
}

/// Changes a user's rate limits (over all their keys together; `Some(None)` removes one).
/// Returns the hashes of the user's keys, to drop from caches.
pub async fn update_user(
    store: &Store,
    actor: &Actor,
    id: i64,
    patch: &LimitPatch,
) -> Result<Vec<String>, OpsError> {
    check_limit_patch(patch)?;
    let mut tx = store.begin().await?;
    let before = tx
        .user_snapshot(id)
        .await?
        .ok_or_else(|| OpsError::NotFound(format!("user {id}")))?;
    let hashes = tx.update_user_limits(id, patch).await?;
    let after = tx.user_snapshot(id).await?;
    tx.audit(actor, "user.update", &Target::user(id), Some(before), after)
        .await?;
    tx.commit().await?;
    Ok(hashes)
}

/// Undoes [`deactivate_user`]: the user's keys work again (unless revoked or expired).
/// Returns the hashes of the user's keys, to drop from caches.
pub async fn activate_user(store: &Store, actor: &Actor, id: i64) -> Result<Vec<String>, OpsError> {
    set_user_active(store, actor, id, true).await
}

// ---------------------------------------------------------------- keys

#[derive(Debug, Clone, Deserialize)]
pub struct NewKey {
    /// Email of the owning user.
    pub user: String,
    pub name: String,
    /// Lifetime such as `30d`.
    #[serde(default)]
    pub expires_in: Option<String>,
    #[serde(default = "all_permissions")]
    pub permissions: serde_json::Value,
    /// The key's own rate limits; absent = `[limits]`, 0 = no limit.
    #[serde(default, deserialize_with = "opt_count")]
    pub rpm: Option<i64>,
    #[serde(default, deserialize_with = "opt_count")]
    pub rpd: Option<i64>,
    #[serde(default, deserialize_with = "opt_count")]
    pub tpm: Option<i64>,
    #[serde(default, deserialize_with = "opt_count")]
    pub max_concurrent: Option<i64>,
}

/// An integer count within i64 (`3.0` too, as JSON Schema counts integers); `null` = absent.
fn opt_count<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    match Option::<serde_json::Number>::deserialize(d)? {
        None => Ok(None),
        Some(n) => n
            .as_i64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                    .map(|f| f as i64)
            })
            .map(Some)
            .ok_or_else(|| {
                serde::de::Error::custom(format!("invalid value {n}, expected an integer"))
            }),
    }
}

fn all_permissions() -> serde_json::Value {
    serde_json::Value::Array(Vec::new())
}

/// A key as created: the plaintext exists only here, once.
#[derive(Debug, Clone, Serialize)]
pub struct CreatedKey {
    pub id: i64,
    pub key: String,
    pub key_prefix: String,
    pub expires_at: Option<DateTime<Utc>>,
}

pub fn check_permissions(v: &serde_json::Value) -> Result<(), OpsError> {
    Permissions::parse(v).map_err(|e| invalid("permissions", e))?;
    let entries = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.as_str());
    if let Some(e) = entries
        .into_iter()
        .find(|e| e.chars().any(char::is_control))
    {
        return Err(invalid(
            "permissions",
            format!("{e:?} contains control characters"),
        ));
    }
    Ok(())
}

pub async fn create_key(store: &Store, actor: &Actor, k: &NewKey) -> Result<CreatedKey, OpsError> {
    check_permissions(&k.permissions)?;
    let limits = LimitColumns {
        rpm: k.rpm,
        rpd: k.rpd,
        tpm: k.tpm,
        max_concurrent: k.max_concurrent,
    };
    check_limit_columns(&limits)?;
    let name = label("name", &k.name)?;
    let expires_at = match &k.expires_in {
        Some(d) => {
            let d = parse_duration(d).map_err(|e| invalid("expires_in", e))?;
            Some(later_by(Utc::now(), d).map_err(|e| invalid("expires_in", e))?)
        }
        None => None,
    };
    let user_id = store.user_id_by_email(&k.user).await?;
    let key = keys::generate()
        .map_err(|e| OpsError::Store(StoreError::Invalid(format!("OS random source: {e}"))))?;
    let key_prefix = keys::display_prefix(&key).to_string();
    let mut tx = store.begin().await?;
    let id = tx
        .create_key(
            user_id,
            name,
            &keys::hash_hex(&key),
            &key_prefix,
            &k.permissions,
            expires_at,
            &limits,
        )
        .await?;
    let after = tx.key_snapshot(id).await?;
    tx.audit(actor, "key.create", &Target::key(id), None, after)
        .await?;
    tx.commit().await?;
    Ok(CreatedKey {
        id,
        key,
        key_prefix,
        expires_at,
    })
}

/// Every key. Expiries stored before lifetimes were bounded (a year past 9999, which RFC 3339
/// cannot write) are shown as the end of 9999.
pub async fn list_keys(store: &Store) -> Result<Vec<KeyListing>, OpsError> {
    let mut keys = store.list_keys().await?;
    for k in &mut keys {
        k.expires_at = k.expires_at.map(clamp_to_rfc3339);
        k.last_used_at = k.last_used_at.map(clamp_to_rfc3339);
    }
    Ok(keys)
}

/// Returns the key's hash, to drop from caches.
pub async fn revoke_key(store: &Store, actor: &Actor, id: i64) -> Result<String, OpsError> {
    let patch = KeyPatch {
        is_active: Some(false),
        ..KeyPatch::default()
    };
    change_key(store, actor, "key.revoke", id, &patch).await
}

/// Returns the key's hash, to drop from caches.
pub async fn update_key(
    store: &Store,
    actor: &Actor,
    id: i64,
    patch: &KeyPatch,
) -> Result<String, OpsError> {
    if let Some(p) = &patch.permissions {
        check_permissions(p)?;
    }
    check_limit_patch(&patch.limits)?;
    let mut patch = patch.clone();
    if let Some(Some(t)) = patch.expires_at.as_mut() {
        *t = clamp_to_rfc3339(*t);
    }
    change_key(store, actor, "key.update", id, &patch).await
}

async fn change_key(
    store: &Store,
    actor: &Actor,
    action: &'static str,
    id: i64,
    patch: &KeyPatch,
) -> Result<String, OpsError> {
    let mut tx = store.begin().await?;
    let before = tx
        .key_snapshot(id)
        .await?
        .ok_or_else(|| OpsError::NotFound(format!("key {id}")))?;
    let hash = tx.update_key(id, patch).await?;
    let after = tx.key_snapshot(id).await?;
    tx.audit(actor, action, &Target::key(id), Some(before), after)
        .await?;
    tx.commit().await?;
    Ok(hash)
}

// ---------------------------------------------------------------- accounts

#[derive(Debug, Clone, Deserialize)]
pub struct NewAccountInput {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub base_url: String,
    pub api_key: String,
    #[serde(default = "one", deserialize_with = "int32")]
    pub priority: i32,
    #[serde(default = "one", deserialize_with = "int32")]
    pub weight: i32,
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    /// Declared provider limits (`account_limits.rs`): absent, null or 0 = none.
    #[serde(default, deserialize_with = "opt_count")]
    pub rpm: Option<i64>,
    #[serde(default, deserialize_with = "opt_count")]
    pub tpm: Option<i64>,
    #[serde(default, deserialize_with = "opt_count")]
    pub max_concurrent: Option<i64>,
}

fn one() -> i32 {
    1
}

/// A present field: `null` (clear) or a count (set); absent (`None`) leaves it as it is.
fn double_opt_count<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<i64>>, D::Error> {
    opt_count(d).map(Some)
}

/// Every account limit set in `patch` is within bounds (as a key's: 0 up to the most allowed).
fn check_account_limits(patch: &AccountLimitPatch) -> Result<(), OpsError> {
    for (field, v) in patch.fields() {
        if let Some(Some(v)) = v {
            check_limit(field, v)?;
        }
    }
    Ok(())
}

/// A JSON Schema `integer` within i32: `3` and `3.0` alike (openapi.json says `"type": "integer"`,
/// and JSON Schema counts a number with a zero fraction as an integer).
fn as_i32(n: &serde_json::Number) -> Option<i32> {
    match n.as_i64() {
        Some(i) => i32::try_from(i).ok(),
        None => n
            .as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= f64::from(i32::MIN) && *f <= f64::from(i32::MAX))
            .map(|f| f as i32),
    }
}

fn int32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    as_i32(&n).ok_or_else(|| {
        serde::de::Error::custom(format!("invalid value {n}, expected a 32-bit integer"))
    })
}

fn opt_int32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i32>, D::Error> {
    match Option::<serde_json::Number>::deserialize(d)? {
        None => Ok(None),
        Some(n) => as_i32(&n).map(Some).ok_or_else(|| {
            serde::de::Error::custom(format!("invalid value {n}, expected a 32-bit integer"))
        }),
    }
}

/// Characters of a header name (RFC 9110 `token`).
fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

fn credentials(api_key: &str, header: Option<&str>) -> Result<serde_json::Value, OpsError> {
    if api_key.is_empty() {
        return Err(invalid("api_key", "must not be empty"));
    }
    // It is sent as a header value: no control characters but tab.
    if api_key
        .chars()
        .any(|c| c != '\t' && (c < ' ' || c == '\x7f'))
    {
        return Err(invalid(
            "api_key",
            "must not contain control characters (it is sent in a header)",
        ));
    }
    let mut c = serde_json::json!({ "api_key": api_key });
    if let Some(h) = header {
        if h.is_empty() || !h.chars().all(is_tchar) {
            return Err(invalid(
                "header",
                format!("{h:?} is not a header name (letters, digits and !#$%&'*+-.^_`|~)"),
            ));
        }
        http::HeaderName::from_bytes(h.as_bytes())
            .map_err(|_| invalid("header", format!("{h:?} is not a header name")))?;
        c["header"] = serde_json::Value::String(h.to_string());
    }
    Ok(c)
}

/// Validated credentials sealed for the database (`secrets.rs`).
fn seal(sealing: &Keyring, plain: serde_json::Value) -> Result<serde_json::Value, OpsError> {
    secrets::seal_credentials(sealing, &plain).map_err(|e| OpsError::Sealing(e.to_string()))
}

/// An upstream URL: `http(s)://host[:port][/path[?query]]` in ASCII (RFC 3986 characters,
/// `%XX` escapes; an IPv6 literal in brackets, with or without a port: `http://[::1]:8000`). The same grammar as the
/// `pattern` of `base_url` in openapi.json. `https://Ï` is refused: write `https://xn--4ca`.
pub fn check_base_url(url: &str) -> Result<(), OpsError> {
    let bad = |m: String| invalid("base_url", m);
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| bad("must start with http:// or https://".into()))?;
    const SUB_DELIMS: &str = "-._~!$&'()*+,;=";
    if let Some(c) = rest
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || SUB_DELIMS.contains(c) || ":@/?[]%".contains(c)))
    {
        return Err(bad(format!(
            "{c:?} is not allowed in a URL (ASCII only: percent-encode, or punycode a host)"
        )));
    }
    let b = rest.as_bytes();
    let hex = |i: usize| b.get(i).is_some_and(u8::is_ascii_hexdigit);
    if rest
        .match_indices('%')
        .any(|(i, _)| !(hex(i + 1) && hex(i + 2)))
    {
        return Err(bad("a % must start a %XX escape".into()));
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if path.contains(['[', ']']) {
        return Err(bad("[ and ] are only allowed around an IPv6 host".into()));
    }
    let port_ok = |p: &str| {
        (1..=5).contains(&p.len())
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u16>().is_ok()
    };
    let authority_ok = match authority.strip_prefix('[') {
        Some(v6) => v6.split_once(']').is_some_and(|(h, after)| {
            h.parse::<std::net::Ipv6Addr>().is_ok()
                && (after.is_empty() || after.strip_prefix(':').is_some_and(port_ok))
        }),
        None => {
            let (host, port) = match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            };
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || SUB_DELIMS.contains(c) || c == '%')
                && port.is_none_or(port_ok)
        }
    };
    if !authority_ok {
        return Err(bad(format!(
            "{authority:?} is not host[:port] (no user info; an IPv6 host as [addr] or [addr]:port)"
        )));
    }
    Endpoint::parse(url).map_err(|e| invalid("base_url", e))?;
    Ok(())
}

/// A new account's input, checked: its type, name, email and (plaintext) credentials.
type CheckedAccount<'a> = (AccountType, &'a str, Option<&'a str>, serde_json::Value);

fn check_new_account(a: &NewAccountInput) -> Result<CheckedAccount<'_>, OpsError> {
    let kind: AccountType = a.kind.parse().map_err(|e: String| invalid("type", e))?;
    check_base_url(&a.base_url)?;
    if a.weight < 1 {
        return Err(invalid("weight", "must be at least 1"));
    }
    let name = label("name", &a.name)?;
    let email = a.email.as_deref().map(|e| label("email", e)).transpose()?;
    check_account_limits(&AccountLimitPatch {
        rpm: Some(a.rpm),
        tpm: Some(a.tpm),
        max_concurrent: Some(a.max_concurrent),
    })?;
    let creds = credentials(&a.api_key, a.header.as_deref())?;
    Ok((kind, name, email, creds))
}

/// Checks a new account without writing anything (the CLI does, before it opens the keyring).
pub fn check_account(a: &NewAccountInput) -> Result<(), OpsError> {
    check_new_account(a).map(|_| ())
}

pub async fn add_account(
    store: &Store,
    sealing: &Keyring,
    actor: &Actor,
    a: &NewAccountInput,
) -> Result<i64, OpsError> {
    let (kind, name, email, creds) = check_new_account(a)?;
    let creds = seal(sealing, creds)?;
    let mut tx = store.begin().await?;
    let id = tx
        .create_account(&NewAccount {
            name,
            kind,
            email,
            base_url: &a.base_url,
            credentials: creds,
            priority: a.priority,
            weight: a.weight,
            is_active: true,
            limits: AccountLimitColumns {
                rpm: a.rpm,
                tpm: a.tpm,
                max_concurrent: a.max_concurrent,
            },
        })
        .await?;
    let after = tx.account_snapshot(id).await?;
    tx.audit(actor, "account.create", &Target::account(id), None, after)
        .await?;
    tx.commit().await?;
    Ok(id)
}

pub async fn list_accounts(store: &Store) -> Result<Vec<AccountRow>, OpsError> {
    Ok(store.list_accounts().await?)
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountUpdate {
    #[serde(default, deserialize_with = "opt_int32")]
    pub priority: Option<i32>,
    #[serde(default, deserialize_with = "opt_int32")]
    pub weight: Option<i32>,
    pub is_active: Option<bool>,
    pub base_url: Option<String>,
    pub api_key: Option<String>,
    pub header: Option<String>,
    /// Declared provider limits: a count sets one (0 = none), null clears it, absent leaves it.
    #[serde(default, deserialize_with = "double_opt_count")]
    pub rpm: Option<Option<i64>>,
    #[serde(default, deserialize_with = "double_opt_count")]
    pub tpm: Option<Option<i64>>,
    #[serde(default, deserialize_with = "double_opt_count")]
    pub max_concurrent: Option<Option<i64>>,
}

impl AccountUpdate {
    fn limits(&self) -> AccountLimitPatch {
        AccountLimitPatch {
            rpm: self.rpm,
            tpm: self.tpm,
            max_concurrent: self.max_concurrent,
        }
    }
}

pub async fn update_account(
    store: &Store,
    sealing: &Keyring,
    actor: &Actor,
    id: i64,
    u: &AccountUpdate,
) -> Result<(), OpsError> {
    if u.weight.is_some_and(|w| w < 1) {
        return Err(invalid("weight", "must be at least 1"));
    }
    if let Some(url) = &u.base_url {
        check_base_url(url)?;
    }
    check_account_limits(&u.limits())?;
    let creds = match &u.api_key {
        Some(k) => Some(seal(sealing, credentials(k, u.header.as_deref())?)?),
        None if u.header.is_some() => return Err(invalid("header", "give api_key with it")),
        None => None,
    };
    let patch = AccountPatch {
        priority: u.priority,
        weight: u.weight,
        is_active: u.is_active,
        credentials: creds,
        base_url: u.base_url.clone(),
        limits: u.limits(),
    };
    let mut tx = store.begin().await?;
    let before = tx
        .account_snapshot(id)
        .await?
        .ok_or_else(|| OpsError::NotFound(format!("account {id}")))?;
    tx.update_account(id, &patch).await?;
    let mut after = tx.account_snapshot(id).await?;
    if let Some(credentials) = after
        .as_mut()
        .and_then(|a| a.get_mut("credentials"))
        .and_then(|c| c.as_object_mut())
        .filter(|_| patch.credentials.is_some())
    {
        // Both sides say "[sealed]": say that the credential was replaced, not what it is.
        credentials.insert("api_key".into(), REPLACED.into());
    }
    tx.audit(
        actor,
        "account.update",
        &Target::account(id),
        Some(before),
        after,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// An account's credential in the `after` of an update that replaced it.
pub const REPLACED: &str = "[sealed, replaced]";

pub async fn delete_account(store: &Store, actor: &Actor, id: i64) -> Result<(), OpsError> {
    let mut tx = store.begin().await?;
    let before = tx
        .account_snapshot(id)
        .await?
        .ok_or_else(|| OpsError::NotFound(format!("account {id}")))?;
    tx.delete_account(id).await?;
    tx.audit(
        actor,
        "account.delete",
        &Target::account(id),
        Some(before),
        None,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

// ---------------------------------------------------------------- usage

#[derive(Debug, Clone, Serialize)]
pub struct UsageReport {
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub by: GroupBy,
    pub groups: Vec<UsageTotals>,
}

pub async fn usage(
    store: &Store,
    since: &str,
    until: Option<&str>,
    by: GroupBy,
) -> Result<UsageReport, OpsError> {
    let now = Utc::now();
    let since = parse_time(since, now).map_err(|e| invalid("since", e))?;
    let until = match until {
        Some(u) => parse_time(u, now).map_err(|e| invalid("until", e))?,
        None => clamp_to_rfc3339(now + chrono::Duration::seconds(1)),
    };
    if until <= since {
        return Err(invalid("until", "must be after since"));
    }
    let mut groups = store.usage_totals(since, until, by).await?;
    for g in &mut groups {
        g.cost = crate::cost::fixed_dp(g.cost);
    }
    Ok(UsageReport {
        since,
        until,
        by,
        groups,
    })
}

// ---------------------------------------------------------------- credits and budgets

/// Largest amount of credit granted at once, and largest budget limit: far above any real one,
/// far below where exact arithmetic could overflow.
const MAX_AMOUNT: i64 = 1_000_000_000;

/// An exact, non-negative amount with at most 10 decimal places (`positive`: above 0), at most
/// [`MAX_AMOUNT`], written plainly: digits, optionally `.` and digits; no sign, exponent,
/// spaces, `_` or leading zeros (`0.5`, not `00.5` or `.5`). openapi.json's `pattern`s for
/// `amount` and `limit` say the same.
pub fn parse_amount(field: &'static str, s: &str, positive: bool) -> Result<Decimal, OpsError> {
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (s, None),
    };
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || frac.is_some_and(|f| !digits(f)) || (int.len() > 1 && int.starts_with('0')) {
        return Err(invalid(
            field,
            format!("{s:?} is not a plain decimal number (write e.g. \"10\" or \"0.25\")"),
        ));
    }
    if frac.is_some_and(|f| f.len() > crate::cost::COST_DP as usize) {
        return Err(invalid(
            field,
            format!("{s:?} has more than 10 decimal places"),
        ));
    }
    let above = || invalid(field, format!("{s:?} is above {MAX_AMOUNT}"));
    if int.len() > 10 {
        return Err(above());
    }
    let d = Decimal::from_str_exact(s)
        .map_err(|_| invalid(field, format!("{s:?} is not a decimal number")))?;
    if positive && d.is_zero() {
        return Err(invalid(field, format!("{s:?} must be positive")));
    }
    if d > Decimal::from(MAX_AMOUNT) {
        return Err(above());
    }
    Ok(d.normalize())
}

/// A user named by the CLI (email) or the admin API (`/admin/users/{id}/…`).
#[derive(Debug, Clone, Copy)]
pub enum UserRef<'a> {
    Email(&'a str),
    Id(i64),
}

impl UserRef<'_> {
    /// The user's id; `NotFound` when there is no such user.
    async fn resolve(self, store: &Store) -> Result<i64, OpsError> {
        Ok(match self {
            UserRef::Email(email) => store.user_id_by_email(email).await?,
            UserRef::Id(id) => store.user_id_exists(id).await?,
        })
    }
}

/// A credit grant as asked for (the CLI's flags, the body of `POST /admin/users/{id}/credits`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantInput {
    /// USD, a decimal string.
    pub amount: String,
    /// Lifetime such as 30d; none = never expires.
    #[serde(default)]
    pub expires_in: Option<String>,
    /// `refund` instead of a `grant` in the ledger.
    #[serde(default)]
    pub refund: bool,
    #[serde(default)]
    pub note: Option<String>,
}

/// How long an idempotency record is kept (Stripe keeps them 24 hours).
pub const IDEMPOTENCY_TTL: chrono::Duration = chrono::Duration::hours(24);

/// Grants credit to a user. With an idempotency key, the same key and the same request answer
/// the first grant again (nothing granted twice); the same key with another request is refused.
pub async fn grant_credits(
    store: &Store,
    actor: &Actor,
    user: UserRef<'_>,
    g: &GrantInput,
    idempotency_key: Option<&str>,
) -> Result<GrantOutcome, OpsError> {
    let amount = parse_amount("amount", &g.amount, true)?;
    let now = Utc::now();
    let expires_at = match &g.expires_in {
        Some(e) => Some(clamp_to_rfc3339(
            now + chrono::Duration::from_std(
                parse_duration(e).map_err(|m| invalid("expires_in", m))?,
            )
            .map_err(|_| invalid("expires_in", "too long"))?,
        )),
        None => None,
    };
    if let Some(k) = idempotency_key {
        if k.is_empty() || k.len() > 255 {
            return Err(invalid("idempotency_key", "must be 1 to 255 characters"));
        }
        if let Some(c) = k.chars().find(|c| c.is_control()) {
            return Err(invalid(
                "idempotency_key",
                format!("must not contain control characters (found {c:?})"),
            ));
        }
    }
    if let Some(n) = &g.note {
        if n.chars().count() > 1000 {
            return Err(invalid("note", "at most 1000 characters"));
        }
        if let Some(c) = n.chars().find(|c| c.is_control()) {
            return Err(invalid(
                "note",
                format!("must not contain control characters (found {c:?})"),
            ));
        }
    }
    let user_id = user.resolve(store).await?;
    // What the key stands for: the request as asked (the user by id, however it was named, so
    // the CLI and the admin API share one key space; a lifetime, not the time it ends).
    let digest = {
        use sha2::{Digest, Sha256};
        let canonical = serde_json::json!({
            "user_id": user_id, "amount": amount.to_string(), "expires_in": g.expires_in,
            "refund": g.refund, "note": g.note,
        });
        hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
    };
    let grant = Grant {
        user_id,
        amount,
        expires_at,
        action: if g.refund { "refund" } else { "grant" },
        note: g.note.as_deref(),
        idempotency: idempotency_key.map(|k| (k, digest.as_str())),
        idempotency_ttl: IDEMPOTENCY_TTL,
    };
    Ok(store.grant_credits(actor, &grant, now).await?)
}

pub async fn credit_balance(store: &Store, user: UserRef<'_>) -> Result<CreditBalance, OpsError> {
    let user_id = user.resolve(store).await?;
    Ok(store.credit_balance(user_id, Utc::now()).await?)
}

/// Ledger rows [`credit_history`] returns when no limit is given (admin API), and the most.
pub const HISTORY_LIMIT: (i64, i64) = (100, 100_000);

pub async fn credit_history(
    store: &Store,
    user: UserRef<'_>,
    limit: i64,
) -> Result<Vec<LedgerEntry>, OpsError> {
    if !(1..=HISTORY_LIMIT.1).contains(&limit) {
        return Err(invalid("limit", "must be between 1 and 100000"));
    }
    let user_id = user.resolve(store).await?;
    Ok(store.credit_history(user_id, limit).await?)
}

/// A budget as asked for (the CLI's flags, the body of `POST /admin/budgets`): exactly one owner.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetInput {
    /// The key's id.
    #[serde(default, deserialize_with = "opt_count")]
    pub key: Option<i64>,
    /// The user's email.
    #[serde(default)]
    pub user: Option<String>,
    /// The plan's name (the budget applies to each subscriber on their own).
    #[serde(default)]
    pub plan: Option<String>,
    /// `cost`, `tokens` or `requests`.
    pub metric: String,
    /// A decimal (cost, USD) or a count (tokens, requests); 0 refuses everything.
    pub limit: String,
    /// `day`, `week`, `month` or `total`.
    pub period: String,
}

pub fn parse_metric(s: &str) -> Result<Metric, OpsError> {
    Metric::ALL
        .into_iter()
        .find(|m| m.as_str() == s)
        .ok_or_else(|| invalid("metric", format!("{s:?}: want cost, tokens or requests")))
}

pub fn parse_period(s: &str) -> Result<Period, OpsError> {
    Period::ALL
        .into_iter()
        .find(|p| p.as_str() == s)
        .ok_or_else(|| invalid("period", format!("{s:?}: want day, week, month or total")))
}

/// A budget's metric, limit and period, checked: a count for tokens and requests.
fn budget_parts(metric: &str, limit: &str, period: &str) -> Result<PlanBudget, OpsError> {
    let metric = parse_metric(metric)?;
    let period = parse_period(period)?;
    let limit = parse_amount("limit", limit, false)?;
    if metric != Metric::Cost && !limit.fract().is_zero() {
        return Err(invalid(
            "limit",
            format!("{} are counted whole", metric.as_str()),
        ));
    }
    Ok(PlanBudget {
        metric,
        period,
        limit,
    })
}

/// Sets (or replaces) a budget; running gateways apply it within a second.
pub async fn set_budget(
    store: &Store,
    actor: &Actor,
    b: &BudgetInput,
) -> Result<BudgetRow, OpsError> {
    let PlanBudget {
        metric,
        period,
        limit,
    } = budget_parts(&b.metric, &b.limit, &b.period)?;
    let owner = match (&b.key, &b.user, &b.plan) {
        (Some(k), None, None) => BudgetOwner::Key(*k),
        (None, Some(email), None) => BudgetOwner::User(store.user_id_by_email(email).await?),
        (None, None, Some(name)) => BudgetOwner::Plan(store.plan_id_by_name(name).await?),
        _ => return Err(invalid("owner", "give exactly one of key, user or plan")),
    };
    Ok(store
        .set_budget(actor, owner, metric, period, limit, Utc::now())
        .await?)
}

/// One user's spend against their budgets and credit, for `tollgate usage --by user`.
#[derive(Debug, Clone, Serialize)]
pub struct UserSpend {
    pub user: String,
    /// `None`: never granted credits.
    pub credit_balance: Option<Decimal>,
    /// The budgets on the user and on each of their keys, with the current period's use.
    pub budgets: Vec<BudgetListing>,
}

/// Budgets and credit of the users in `report` (grouped by user: `"ID EMAIL"`).
pub async fn user_spend(store: &Store, report: &UsageReport) -> Result<Vec<UserSpend>, OpsError> {
    let budgets = store.list_budgets(None, Utc::now()).await?;
    let keys = store.list_keys().await?;
    let mut out = Vec::new();
    for g in &report.groups {
        let Some((id, email)) = g.group.split_once(' ') else {
            continue;
        };
        let Ok(user_id) = id.parse::<i64>() else {
            continue;
        };
        let credit = store.credit_balance(user_id, Utc::now()).await?;
        let theirs = |b: &BudgetListing| {
            b.budget.user_id == Some(user_id)
                || b.budget.api_key_id.is_some_and(|k| {
                    keys.iter()
                        .any(|key| key.id == k && key.user_email == email)
                })
        };
        out.push(UserSpend {
            user: email.to_string(),
            credit_balance: credit.prepaid.then_some(credit.balance.normalize()),
            budgets: budgets.iter().filter(|b| theirs(b)).cloned().collect(),
        });
    }
    Ok(out)
}

pub async fn list_budgets(store: &Store) -> Result<Vec<BudgetListing>, OpsError> {
    Ok(store.list_budgets(None, Utc::now()).await?)
}

pub async fn delete_budget(store: &Store, actor: &Actor, id: i64) -> Result<(), OpsError> {
    Ok(store.delete_budget(actor, id, Utc::now()).await?)
}

// ---------------------------------------------------------------- plans and subscriptions

/// A budget of a plan as asked for.
#[derive(Debug, Clone, Deserialize)]
pub struct PlanBudgetInput {
    /// `cost`, `tokens` or `requests`.
    pub metric: String,
    /// A decimal (cost, USD) or a count (tokens, requests).
    pub limit: String,
    /// `day`, `week`, `month` (from each subscriber's period start) or `total`.
    pub period: String,
}

/// A plan as asked for: rate limits per subscriber (`None` = none, 0 = none) and budgets.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PlanInput {
    pub name: String,
    #[serde(default)]
    pub rpm: Option<i64>,
    #[serde(default)]
    pub rpd: Option<i64>,
    #[serde(default)]
    pub tpm: Option<i64>,
    #[serde(default)]
    pub max_concurrent: Option<i64>,
    #[serde(default)]
    pub budgets: Vec<PlanBudgetInput>,
}

/// Makes a plan with its rate limits and budgets (one per metric and period).
pub async fn create_plan(store: &Store, actor: &Actor, p: &PlanInput) -> Result<PlanRow, OpsError> {
    let name = label("name", &p.name)?;
    let limits = LimitColumns {
        rpm: p.rpm,
        rpd: p.rpd,
        tpm: p.tpm,
        max_concurrent: p.max_concurrent,
    };
    check_limit_columns(&limits)?;
    let mut budgets: Vec<PlanBudget> = Vec::new();
    for b in &p.budgets {
        let b = budget_parts(&b.metric, &b.limit, &b.period).map_err(|e| match e {
            OpsError::Invalid { message, .. } => invalid("budget", message),
            e => e,
        })?;
        if budgets
            .iter()
            .any(|o| o.metric == b.metric && o.period == b.period)
        {
            return Err(invalid(
                "budget",
                format!(
                    "two budgets of {} per {}",
                    b.metric.as_str(),
                    b.period.as_str()
                ),
            ));
        }
        budgets.push(b);
    }
    Ok(store
        .create_plan(actor, name, &limits, &budgets, Utc::now())
        .await?)
}

/// Changes a plan's rate limits (`Some(None)` removes one); running gateways apply them to every
/// subscriber within a second. Its budgets change with [`set_budget`] (`plan`).
pub async fn update_plan(
    store: &Store,
    actor: &Actor,
    name: &str,
    patch: &LimitPatch,
) -> Result<PlanRow, OpsError> {
    if patch.is_empty() {
        return Err(invalid("limits", "nothing to change"));
    }
    check_limit_patch(patch)?;
    let id = store.plan_id_by_name(name).await?;
    Ok(store.update_plan(actor, id, patch, Utc::now()).await?)
}

pub async fn list_plans(store: &Store) -> Result<Vec<PlanRow>, OpsError> {
    Ok(store.list_plans().await?)
}

/// A subscription as asked for.
#[derive(Debug, Clone, Deserialize)]
pub struct SubscribeInput {
    /// The user's email.
    pub user: String,
    /// The plan's name.
    pub plan: String,
    /// Where the plan's budget periods are anchored (RFC 3339 or YYYY-MM-DD; default now).
    #[serde(default)]
    pub period_start: Option<String>,
    /// The current period's end as the billing system has it (recorded; after `period_start`).
    #[serde(default)]
    pub period_end: Option<String>,
}

/// Subscribes a user to a plan, replacing any subscription they have; running gateways apply
/// the plan to the user's keys within a second.
pub async fn subscribe(
    store: &Store,
    actor: &Actor,
    s: &SubscribeInput,
) -> Result<SubscriptionRow, OpsError> {
    let now = Utc::now();
    let start = match &s.period_start {
        Some(t) => parse_time(t, now).map_err(|m| invalid("period_start", m))?,
        None => now,
    };
    let end = s
        .period_end
        .as_deref()
        .map(|t| parse_time(t, now).map_err(|m| invalid("period_end", m)))
        .transpose()?;
    if end.is_some_and(|e| e <= start) {
        return Err(invalid("period_end", "must be after the period start"));
    }
    let user_id = store.user_id_by_email(&s.user).await?;
    let plan_id = store.plan_id_by_name(&s.plan).await?;
    Ok(store
        .subscribe(actor, user_id, plan_id, start, end, now)
        .await?)
}

/// Ends a user's subscription: the plan's limits and budgets stop applying to them.
pub async fn unsubscribe(
    store: &Store,
    actor: &Actor,
    email: &str,
) -> Result<SubscriptionRow, OpsError> {
    let user_id = store.user_id_by_email(email).await?;
    Ok(store.unsubscribe(actor, user_id, Utc::now()).await?)
}

// ---------------------------------------------------------------- the audit log

/// Rows [`audit_log`] returns when no limit is given, and the most it returns.
pub const AUDIT_LIMIT: (i64, i64) = (100, 10_000);

/// The newest `admin_log` rows (newest first), optionally only those of one target type and/or
/// target id.
pub async fn audit_log(
    store: &Store,
    limit: Option<i64>,
    target_type: Option<&str>,
    target_id: Option<&str>,
) -> Result<Vec<AuditRow>, OpsError> {
    let limit = limit.unwrap_or(AUDIT_LIMIT.0);
    if !(1..=AUDIT_LIMIT.1).contains(&limit) {
        return Err(invalid(
            "limit",
            format!("{limit} is not between 1 and {}", AUDIT_LIMIT.1),
        ));
    }
    let target_type = target_type.map(|t| label("target_type", t)).transpose()?;
    let target_id = target_id.map(|t| label("target_id", t)).transpose()?;
    Ok(store
        .audit_log(&AuditQuery {
            limit,
            target_type: target_type.map(str::to_string),
            target_id: target_id.map(str::to_string),
        })
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WANT: &str = "want e.g. 30d, 12h, 90m, 3600s";
    const TOO_LONG: &str = "too long (at most 99999d, 999999h, 99999999m or 9999999999s)";

    #[test]
    fn durations() {
        fn check(input: &str, expected: Result<u64, String>) {
            assert_eq!(
                parse_duration(input).map(|d| d.as_secs()),
                expected,
                "{input}"
            );
        }
        for (input, expected) in [
            ("30d", Ok(30 * 86_400)),
            ("12h", Ok(43_200)),
            ("90m", Ok(5_400)),
            ("3600s", Ok(3_600)),
            ("45", Ok(45)),
            ("007d", Ok(7 * 86_400)),
            ("99999d", Ok(99_999 * 86_400)),
            ("999999h", Ok(999_999 * 3_600)),
            ("99999999m", Ok(99_999_999 * 60)),
            ("9999999999s", Ok(9_999_999_999)),
            ("9999999999", Ok(9_999_999_999)),
            (
                "0d",
                Err("bad duration \"0d\": must be positive".to_string()),
            ),
            ("0", Err("bad duration \"0\": must be positive".to_string())),
            (
                "100000d",
                Err(format!("bad duration \"100000d\": {TOO_LONG}")),
            ),
            (
                "10000000000",
                Err(format!("bad duration \"10000000000\": {TOO_LONG}")),
            ),
            // the one from the issue: a year past 9999
            (
                "4611686018427387d",
                Err(format!("bad duration \"4611686018427387d\": {TOO_LONG}")),
            ),
            (
                "99999999999999999999999d",
                Err(format!(
                    "bad duration \"99999999999999999999999d\": {TOO_LONG}"
                )),
            ),
            ("3w", Err(format!("bad duration \"3w\": {WANT}"))),
            ("d", Err(format!("bad duration \"d\": {WANT}"))),
            ("", Err(format!("bad duration \"\": {WANT}"))),
            (" 30d", Err(format!("bad duration \" 30d\": {WANT}"))),
            ("-5d", Err(format!("bad duration \"-5d\": {WANT}"))),
            ("5dd", Err(format!("bad duration \"5dd\": {WANT}"))),
        ] {
            check(input, expected);
        }
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn times() {
        let now = at("2026-11-27T12:00:00Z");
        fn check(now: DateTime<Utc>, input: &str, expected: Result<&str, &str>) {
            assert_eq!(
                parse_time(input, now).map(|t| t.to_rfc3339()),
                expected.map(str::to_string).map_err(str::to_string),
                "{input}"
            );
        }
        for (input, expected) in [
            ("2026-11-01", Ok("2026-11-01T00:00:00+00:00")),
            ("2026-11-01T10:00:00+02:00", Ok("2026-11-01T08:00:00+00:00")),
            ("7d", Ok("2026-11-20T12:00:00+00:00")),
            ("99999d", Ok("1753-02-12T12:00:00+00:00")),
            ("0001-01-01", Ok("0001-01-01T00:00:00+00:00")),
            // past the ends in UTC only through the offset: the nearest end
            ("9999-12-31T23:00:00-05:00", Ok("9999-12-31T23:59:59+00:00")),
            ("0000-01-01T00:00:00+01:00", Ok("0000-01-01T00:00:00+00:00")),
            ("0001-01-01T00:00:00+23:59", Ok("0000-12-31T00:01:00+00:00")),
            (
                "yesterday",
                Err("bad time \"yesterday\": want RFC 3339, YYYY-MM-DD, or an age like 7d"),
            ),
            (
                "0",
                Err("bad time \"0\": want RFC 3339, YYYY-MM-DD, or an age like 7d"),
            ),
            ("2026-13-01", Err("bad time \"2026-13-01\": no such date")),
            (
                "2026-1-05",
                Err("bad time \"2026-1-05\": want RFC 3339, YYYY-MM-DD, or an age like 7d"),
            ),
            (
                "+12345-01-01",
                Err("bad time \"+12345-01-01\": want RFC 3339, YYYY-MM-DD, or an age like 7d"),
            ),
            (
                "100000d",
                Err("bad time \"100000d\": too far back (at most 99999d)"),
            ),
        ] {
            check(now, input, expected);
        }
    }

    #[test]
    fn lifetimes_stay_within_rfc3339() {
        let now = at("2026-11-27T12:00:00Z");
        let days = |n: u64| std::time::Duration::from_secs(n * 86_400);
        assert_eq!(
            later_by(now, days(30)).map(|t| t.to_rfc3339()),
            Ok("2026-12-27T12:00:00+00:00".to_string())
        );
        let near_the_end = at("9999-12-01T00:00:00Z");
        assert_eq!(
            later_by(near_the_end, days(31)).map(|t| t.to_rfc3339()),
            Err("too long: the time would be after 9999-12-31T23:59:59Z".to_string())
        );
        assert!(later_by(now, std::time::Duration::MAX).is_err());
    }

    #[test]
    fn permission_entries() {
        fn check(input: serde_json::Value, expected: Result<(), &str>) {
            assert_eq!(
                check_permissions(&input).map_err(|e| e.to_string()),
                expected.map_err(str::to_string),
                "{input}"
            );
        }
        for (input, expected) in [
            (serde_json::json!([]), Ok(())),
            (
                serde_json::json!(["/v1/chat", "path:/v1", "model:gpt-4o*"]),
                Ok(()),
            ),
            (
                serde_json::json!(["/v1\u{0}"]),
                Err("permissions: \"/v1\\0\" contains control characters"),
            ),
            (
                serde_json::json!(["model:a\nb"]),
                Err("permissions: \"model:a\\nb\" contains control characters"),
            ),
            (
                serde_json::json!(["v1"]),
                Err("permissions: permission \"v1\": want a path starting with '/' or model:NAME"),
            ),
        ] {
            check(input, expected);
        }
    }

    #[test]
    fn account_limits_in_bodies() {
        fn check(json: &str, expected: Result<AccountLimitPatch, &str>) {
            let got = serde_json::from_str::<AccountUpdate>(json)
                .map_err(|e| e.to_string())
                .and_then(|u| {
                    check_account_limits(&u.limits())
                        .map(|()| u.limits())
                        .map_err(|e| e.to_string())
                });
            match (&got, expected) {
                (Ok(g), Ok(e)) => assert_eq!(*g, e, "{json}"),
                (Err(g), Err(e)) => assert!(g.contains(e), "{json}: {g}"),
                _ => panic!("{json}: {got:?}"),
            }
        }
        let patch = |rpm, tpm, max_concurrent| AccountLimitPatch {
            rpm,
            tpm,
            max_concurrent,
        };
        check("{}", Ok(patch(None, None, None)));
        check(
            r#"{"rpm":10,"tpm":null,"max_concurrent":2.0}"#,
            Ok(patch(Some(Some(10)), Some(None), Some(Some(2)))),
        );
        check(r#"{"rpm":0}"#, Ok(patch(Some(Some(0)), None, None)));
        check(r#"{"rpm":-1}"#, Err("rpm: -1 is negative"));
        check(
            r#"{"max_concurrent":1000001}"#,
            Err("max_concurrent: 1000001 is above the most allowed, 1000000"),
        );
        check(r#"{"tpm":1.5}"#, Err("expected an integer"));
        check(r#"{"tpm":"5"}"#, Err("invalid type"));
        let new: NewAccountInput = serde_json::from_str(
            r#"{"name":"a","type":"openai","base_url":"http://a","api_key":"k","rpm":10}"#,
        )
        .unwrap();
        assert_eq!((new.rpm, new.tpm), (Some(10), None));
        assert!(check_account(&NewAccountInput {
            tpm: Some(MAX_RATE as i64 + 1),
            ..new
        })
        .is_err());
    }

    #[test]
    fn integers_as_json_schema_counts_them() {
        fn check(json: &str, expected: Result<(i32, i32), &str>) {
            let got = serde_json::from_str::<NewAccountInput>(&format!(
                r#"{{"name":"a","type":"openai","base_url":"http://a","api_key":"k",{json}}}"#
            ))
            .map(|a| (a.priority, a.weight))
            .map_err(|e| e.to_string());
            match (&got, expected) {
                (Ok(g), Ok(e)) => assert_eq!(*g, e, "{json}"),
                (Err(g), Err(e)) => assert!(g.starts_with(e), "{json}: {g}"),
                _ => panic!("{json}: {got:?}"),
            }
        }
        for (json, expected) in [
            (r#""priority":2"#, Ok((2, 1))),
            (r#""priority":-168.0,"weight":3.0"#, Ok((-168, 3))),
            (r#""priority":2147483647"#, Ok((i32::MAX, 1))),
            (
                r#""priority":2147483648"#,
                Err("invalid value 2147483648, expected a 32-bit integer"),
            ),
            (
                r#""priority":1.5"#,
                Err("invalid value 1.5, expected a 32-bit integer"),
            ),
            (
                r#""priority":1e300"#,
                Err("invalid value 1e+300, expected a 32-bit integer"),
            ),
            (r#""priority":"1""#, Err("invalid type: string")),
        ] {
            check(json, expected);
        }
        let u: AccountUpdate = serde_json::from_str(r#"{"weight":2.0,"priority":null}"#).unwrap();
        assert_eq!((u.priority, u.weight), (None, Some(2)));
    }

    #[test]
    fn limit_values() {
        fn check(json: &str, expected: Result<(), &str>) {
            let got = serde_json::from_str::<LimitPatch>(json)
                .map_err(|e| e.to_string())
                .and_then(|p| check_limit_patch(&p).map_err(|e| e.to_string()));
            match (&got, expected) {
                (Ok(()), Ok(())) => {}
                (Err(g), Err(e)) => assert!(g.starts_with(e), "{json}: {g}"),
                _ => panic!("{json}: {got:?}"),
            }
        }
        for (json, expected) in [
            (r#"{}"#, Ok(())),
            (
                r#"{"rpm":60,"rpd":0,"tpm":null,"max_concurrent":4.0}"#,
                Ok(()),
            ),
            (r#"{"tpm":1000000000}"#, Ok(())),
            (r#"{"rpm":-1}"#, Err("rpm: -1 is negative (0 = no limit)")),
            (
                r#"{"tpm":1000000001}"#,
                Err("tpm: 1000000001 is above the most allowed, 1000000000"),
            ),
            (
                r#"{"max_concurrent":1000001}"#,
                Err("max_concurrent: 1000001 is above the most allowed, 1000000"),
            ),
            (
                r#"{"rpm":1.5}"#,
                Err("invalid value 1.5, expected an integer"),
            ),
            (r#"{"rpm":"1"}"#, Err("invalid type: string")),
        ] {
            check(json, expected);
        }
        let p: LimitPatch = serde_json::from_str(r#"{"rpm":null,"tpm":5}"#).unwrap();
        assert_eq!((p.rpm, p.rpd, p.tpm), (Some(None), None, Some(Some(5))));
    }

    #[test]
    fn labels() {
        fn check(input: &str, expected: Result<&str, &str>) {
            assert_eq!(
                label("username", input).map_err(|e| e.to_string()),
                expected.map_err(str::to_string),
                "{input:?}"
            );
        }
        for (input, expected) in [
            ("ada", Ok("ada")),
            ("  ada lovelace ", Ok("ada lovelace")),
            ("Ïñtërnâtiônàl", Ok("Ïñtërnâtiônàl")),
            ("", Err("username: must not be empty or only spaces")),
            (" \t\n", Err("username: must not be empty or only spaces")),
            (
                "\u{3000}\u{a0}",
                Err("username: must not be empty or only spaces"),
            ),
            (
                "a\0b",
                Err("username: must not contain control characters (found '\\0')"),
            ),
            (
                "a\u{1c}",
                Err("username: must not contain control characters (found '\\u{1c}')"),
            ),
        ] {
            check(input, expected);
        }
    }

    #[test]
    fn base_urls() {
        fn check(input: &str, ok: bool) {
            assert_eq!(check_base_url(input).is_ok(), ok, "{input}");
        }
        for (input, ok) in [
            ("https://api.openai.com", true),
            ("http://127.0.0.1:8080/v1", true),
            ("https://[::1]:443/x?y=1", true),
            ("https://sub.example.com:8443/openai/v1", true),
            ("https://xn--4ca", true),
            ("https://\u{cf}", false),
            ("https://a b", false),
            ("https://a\n", false),
            ("ftp://a", false),
            ("https://", false),
            ("https://user@host", false),
            ("https://host:99999", false),
            ("https://host:65535", true),
            ("https://host:", false),
            ("https://a:80:90", false),
            ("https://a?b", false),
            ("https://a/b?c=%20d", true),
            ("https://a/%zz", false),
            ("https://a/#frag", false),
            ("https://a/[x]", false),
            ("http://[::1]:8000/v1", true),
            ("http://[::1]", true),
            ("http://[::1]x", false),
            ("http://[0]:0", false),
            ("http://[::ffff:1.2.3.4]:80", true),
        ] {
            check(input, ok);
        }
        assert_eq!(
            check_base_url("https://\u{cf}").map_err(|e| e.to_string()),
            Err("base_url: '\u{cf}' is not allowed in a URL (ASCII only: percent-encode, or punycode a host)".to_string())
        );
    }

    #[test]
    fn credential_headers() {
        fn check(api_key: &str, header: Option<&str>, expected: Result<(), String>) {
            assert_eq!(
                credentials(api_key, header)
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                expected,
                "{api_key:?} {header:?}"
            );
        }
        let not_a_name = |h: &str| {
            format!("header: {h:?} is not a header name (letters, digits and !#$%&'*+-.^_`|~)")
        };
        for (api_key, header, expected) in [
            ("sk-1", None, Ok(())),
            ("sk-1", Some("x-api-key"), Ok(())),
            ("sk-1", Some("X-Goog-Api-Key"), Ok(())),
            ("sk-1", Some("!#$%&'*+-.^_`|~09azAZ"), Ok(())),
            ("sk 1\tÏ", None, Ok(())),
            ("", None, Err("api_key: must not be empty".to_string())),
            (
                "sk\n1",
                None,
                Err(
                    "api_key: must not contain control characters (it is sent in a header)"
                        .to_string(),
                ),
            ),
            ("sk-1", Some(""), Err(not_a_name(""))),
            ("sk-1", Some("x api"), Err(not_a_name("x api"))),
            ("sk-1", Some("x:api"), Err(not_a_name("x:api"))),
            ("sk-1", Some("Ï"), Err(not_a_name("Ï"))),
            ("sk-1", Some("(x)"), Err(not_a_name("(x)"))),
        ] {
            check(api_key, header, expected);
        }
    }
}
