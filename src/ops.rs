//! Operator actions — users, keys, accounts, usage — shared by the CLI and the admin API, with
//! their input validation. Each returns typed data; the callers print it or send it as JSON.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::auth::Permissions;
use crate::keys;
use crate::store::{
    AccountPatch, AccountRow, GroupBy, KeyListing, KeyPatch, NewAccount, Store, StoreError,
    UsageTotals, UserRow,
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
    #[error("{0}")]
    Store(StoreError),
}

impl From<StoreError> for OpsError {
    fn from(e: StoreError) -> OpsError {
        match e {
            StoreError::NotFound(what) => OpsError::NotFound(what),
            StoreError::Conflict(what) => OpsError::Conflict(what),
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
            OpsError::Conflict(_) => 409,
            OpsError::Store(_) => 500,
        }
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> OpsError {
    OpsError::Invalid {
        field,
        message: message.into(),
    }
}

/// Parses `30d`, `12h`, `90m`, `3600s`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?}: want e.g. 30d, 12h, 90m, 3600s"))?;
    let secs = match unit {
        "d" => n.checked_mul(86_400),
        "h" => n.checked_mul(3_600),
        "m" => n.checked_mul(60),
        "s" | "" => Some(n),
        _ => None,
    }
    .ok_or_else(|| format!("bad duration {s:?}: want e.g. 30d, 12h, 90m, 3600s"))?;
    if secs == 0 {
        return Err(format!("bad duration {s:?}: must be positive"));
    }
    Ok(std::time::Duration::from_secs(secs))
}

/// Parses a time: RFC 3339, a UTC date (YYYY-MM-DD), or an age before `now` like `7d`.
pub fn parse_time(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_time(chrono::NaiveTime::MIN).and_utc());
    }
    let age = parse_duration(s)
        .map_err(|_| format!("bad time {s:?}: want RFC 3339, YYYY-MM-DD, or an age like 7d"))?;
    chrono::Duration::from_std(age)
        .map(|a| now - a)
        .map_err(|_| format!("bad time {s:?}: too far back"))
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

pub async fn add_user(store: &Store, u: &NewUser) -> Result<UserRow, OpsError> {
    let email = u.email.trim();
    if !email.contains('@') || email.len() > 320 {
        return Err(invalid(
            "email",
            format!("{email:?} is not an email address"),
        ));
    }
    if u.username.trim().is_empty() {
        return Err(invalid("username", "must not be empty"));
    }
    let id = store.create_user(email, u.username.trim(), &u.role).await?;
    Ok(UserRow {
        id,
        email: email.into(),
        username: u.username.trim().into(),
        role: u.role.clone(),
        is_active: true,
    })
}

pub async fn list_users(store: &Store) -> Result<Vec<UserRow>, OpsError> {
    Ok(store.list_users().await?)
}

/// Returns the hashes of the user's keys, to drop from caches.
pub async fn deactivate_user(store: &Store, id: i64) -> Result<Vec<String>, OpsError> {
    Ok(store.set_user_active(id, false).await?)
}

/// Undoes [`deactivate_user`]: the user's keys work again (unless revoked or expired).
/// Returns the hashes of the user's keys, to drop from caches.
pub async fn activate_user(store: &Store, id: i64) -> Result<Vec<String>, OpsError> {
    Ok(store.set_user_active(id, true).await?)
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
    Permissions::parse(v)
        .map(|_| ())
        .map_err(|e| invalid("permissions", e))
}

pub async fn create_key(store: &Store, k: &NewKey) -> Result<CreatedKey, OpsError> {
    check_permissions(&k.permissions)?;
    if k.name.trim().is_empty() {
        return Err(invalid("name", "must not be empty"));
    }
    let expires_at = match &k.expires_in {
        Some(d) => {
            let d = parse_duration(d).map_err(|e| invalid("expires_in", e))?;
            let d = chrono::Duration::from_std(d).map_err(|_| invalid("expires_in", "too long"))?;
            Some(
                Utc::now()
                    .checked_add_signed(d)
                    .ok_or_else(|| invalid("expires_in", "too long"))?,
            )
        }
        None => None,
    };
    let user_id = store.user_id_by_email(&k.user).await?;
    let key = keys::generate()
        .map_err(|e| OpsError::Store(StoreError::Invalid(format!("OS random source: {e}"))))?;
    let key_prefix = keys::display_prefix(&key).to_string();
    let id = store
        .create_key(
            user_id,
            k.name.trim(),
            &keys::hash_hex(&key),
            &key_prefix,
            &k.permissions,
            expires_at,
        )
        .await?;
    Ok(CreatedKey {
        id,
        key,
        key_prefix,
        expires_at,
    })
}

pub async fn list_keys(store: &Store) -> Result<Vec<KeyListing>, OpsError> {
    Ok(store.list_keys().await?)
}

/// Returns the key's hash, to drop from caches.
pub async fn revoke_key(store: &Store, id: i64) -> Result<String, OpsError> {
    Ok(store.revoke_key(id).await?)
}

/// Returns the key's hash, to drop from caches.
pub async fn update_key(store: &Store, id: i64, patch: &KeyPatch) -> Result<String, OpsError> {
    if let Some(p) = &patch.permissions {
        check_permissions(p)?;
    }
    Ok(store.update_key(id, patch).await?)
}

// ---------------------------------------------------------------- accounts

#[derive(Debug, Clone, Deserialize)]
pub struct NewAccountInput {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub base_url: String,
    pub api_key: String,
    #[serde(default = "one")]
    pub priority: i32,
    #[serde(default = "one")]
    pub weight: i32,
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
}

fn one() -> i32 {
    1
}

fn credentials(api_key: &str, header: Option<&str>) -> Result<serde_json::Value, OpsError> {
    if api_key.is_empty() {
        return Err(invalid("api_key", "must not be empty"));
    }
    let mut c = serde_json::json!({ "api_key": api_key });
    if let Some(h) = header {
        http::HeaderName::from_bytes(h.as_bytes())
            .map_err(|_| invalid("header", format!("{h:?} is not a header name")))?;
        c["header"] = serde_json::Value::String(h.to_string());
    }
    Ok(c)
}

pub async fn add_account(store: &Store, a: &NewAccountInput) -> Result<i64, OpsError> {
    let kind: AccountType = a.kind.parse().map_err(|e: String| invalid("type", e))?;
    Endpoint::parse(&a.base_url).map_err(|e| invalid("base_url", e))?;
    if a.weight < 1 {
        return Err(invalid("weight", "must be at least 1"));
    }
    if a.name.trim().is_empty() {
        return Err(invalid("name", "must not be empty"));
    }
    let creds = credentials(&a.api_key, a.header.as_deref())?;
    Ok(store
        .create_account(&NewAccount {
            name: a.name.trim(),
            kind,
            email: a.email.as_deref(),
            base_url: &a.base_url,
            credentials: creds,
            priority: a.priority,
            weight: a.weight,
            is_active: true,
        })
        .await?)
}

pub async fn list_accounts(store: &Store) -> Result<Vec<AccountRow>, OpsError> {
    Ok(store.list_accounts().await?)
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountUpdate {
    pub priority: Option<i32>,
    pub weight: Option<i32>,
    pub is_active: Option<bool>,
    pub base_url: Option<String>,
    pub api_key: Option<String>,
    pub header: Option<String>,
}

pub async fn update_account(store: &Store, id: i64, u: &AccountUpdate) -> Result<(), OpsError> {
    if u.weight.is_some_and(|w| w < 1) {
        return Err(invalid("weight", "must be at least 1"));
    }
    if let Some(url) = &u.base_url {
        Endpoint::parse(url).map_err(|e| invalid("base_url", e))?;
    }
    let creds = match &u.api_key {
        Some(k) => Some(credentials(k, u.header.as_deref())?),
        None if u.header.is_some() => return Err(invalid("header", "give api_key with it")),
        None => None,
    };
    let patch = AccountPatch {
        priority: u.priority,
        weight: u.weight,
        is_active: u.is_active,
        credentials: creds,
        base_url: u.base_url.clone(),
    };
    Ok(store.update_account(id, &patch).await?)
}

pub async fn delete_account(store: &Store, id: i64) -> Result<(), OpsError> {
    Ok(store.delete_account(id).await?)
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
        None => now + chrono::Duration::seconds(1),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        for (input, expected) in [
            ("30d", Ok(30 * 86_400)),
            ("12h", Ok(43_200)),
            ("90m", Ok(5_400)),
            ("3600s", Ok(3_600)),
            ("45", Ok(45)),
            (
                "0d",
                Err("bad duration \"0d\": must be positive".to_string()),
            ),
            (
                "3w",
                Err("bad duration \"3w\": want e.g. 30d, 12h, 90m, 3600s".to_string()),
            ),
            (
                "d",
                Err("bad duration \"d\": want e.g. 30d, 12h, 90m, 3600s".to_string()),
            ),
        ] {
            assert_eq!(
                parse_duration(input).map(|d| d.as_secs()),
                expected,
                "{input}"
            );
        }
    }

    #[test]
    fn times() {
        let now = DateTime::parse_from_rfc3339("2026-11-27T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        for (input, expected) in [
            ("2026-11-01", Ok("2026-11-01T00:00:00+00:00")),
            ("2026-11-01T10:00:00+02:00", Ok("2026-11-01T08:00:00+00:00")),
            ("7d", Ok("2026-11-20T12:00:00+00:00")),
            ("yesterday", Err(())),
        ] {
            assert_eq!(
                parse_time(input, now)
                    .map(|t| t.to_rfc3339())
                    .map_err(|_| ()),
                expected.map(str::to_string),
                "{input}"
            );
        }
    }
}
