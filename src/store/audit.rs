//! The audit log (`admin_log`, migration 0009): who did which admin action to what, with the
//! target before and after, written by [`Tx::audit`] in the transaction of the change; and its
//! reading (`tollgate audit`, `GET /admin/audit`). Snapshots never hold a secret: stored
//! credentials become `"[sealed]"` ([`redact_credentials`]), keys appear by id and prefix.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::Row;

use super::{Store, StoreError, Tx, TxConn};

/// Who did it, as written in `admin_log.actor`: `admin-token:<name>` (the admin API, the token
/// named by `[admin] token_name`), `cli:<OS user>` (the local CLI), `system:<what>` (the
/// gateway itself: `system:start` saving config accounts, `system:sighup` reloading).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor(String);

impl Actor {
    pub fn admin_token(name: &str) -> Actor {
        Actor(format!("admin-token:{name}"))
    }

    pub fn cli(os_user: &str) -> Actor {
        Actor(format!("cli:{os_user}"))
    }

    pub fn system(what: &str) -> Actor {
        Actor(format!("system:{what}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an action was done to: `admin_log.target_type` and `target_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub kind: &'static str,
    pub id: String,
}

impl Target {
    pub fn new(kind: &'static str, id: impl std::fmt::Display) -> Target {
        Target {
            kind,
            id: id.to_string(),
        }
    }

    pub fn user(id: i64) -> Target {
        Target::new("user", id)
    }

    pub fn key(id: i64) -> Target {
        Target::new("key", id)
    }

    pub fn account(id: i64) -> Target {
        Target::new("account", id)
    }
}

/// What stands for a secret in a snapshot.
pub const SEALED: &str = "[sealed]";

/// Stored credentials as a snapshot shows them: the header name (not a secret) kept, every other
/// field (`api_key`, sealed or not) replaced by [`SEALED`].
pub fn redact_credentials(stored: &serde_json::Value) -> serde_json::Value {
    match stored.as_object() {
        Some(fields) => fields
            .iter()
            .map(|(k, v)| {
                let v = if k == "header" && v.is_string() {
                    v.clone()
                } else {
                    serde_json::Value::String(SEALED.into())
                };
                (k.clone(), v)
            })
            .collect::<serde_json::Map<_, _>>()
            .into(),
        None => serde_json::Value::String(SEALED.into()),
    }
}

/// One `admin_log` row.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AuditRow {
    pub id: i64,
    pub actor: String,
    pub action: String,
    pub target_type: String,
    pub target_id: String,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
    pub created_at: DateTime<Utc>,
}

/// Which rows [`Store::audit_log`] returns: the newest `limit`, optionally only those of one
/// target type and/or id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditQuery {
    pub limit: i64,
    pub target_type: Option<String>,
    pub target_id: Option<String>,
}

impl Tx {
    /// Writes the audit row of the change made in this transaction (`action`: a low-cardinality
    /// verb such as `user.create`; `before`/`after`: the target's snapshots, `None` when it did
    /// not exist / no longer does). [`Tx::commit`] needs at least one.
    pub async fn audit(
        &mut self,
        actor: &Actor,
        action: &'static str,
        target: &Target,
        before: Option<serde_json::Value>,
        after: Option<serde_json::Value>,
    ) -> Result<(), StoreError> {
        let sql = "INSERT INTO admin_log (actor, action, target_type, target_id, before, after) \
                   VALUES ($1, $2, $3, $4, $5, $6)";
        dispatch_tx!(self, c => sqlx::query(sql)
            .bind(actor.as_str()).bind(action).bind(target.kind).bind(target.id.as_str())
            .bind(before.as_ref().map(Json)).bind(after.as_ref().map(Json))
            .execute(&mut **c).await.map(|_| ()))?;
        self.audited = true;
        Ok(())
    }
}

impl Store {
    /// The newest rows first.
    pub async fn audit_log(&self, q: &AuditQuery) -> Result<Vec<AuditRow>, StoreError> {
        let sql = match self {
            // PostgreSQL must be told the parameters' type to compare them with NULL.
            Store::Postgres(_) => "SELECT id, actor, action, target_type, target_id, before, after, created_at \
                 FROM admin_log \
                 WHERE ($1::text IS NULL OR target_type = $1) AND ($2::text IS NULL OR target_id = $2) \
                 ORDER BY id DESC LIMIT $3",
            Store::Sqlite(_) => "SELECT id, actor, action, target_type, target_id, before, after, created_at \
                 FROM admin_log \
                 WHERE ($1 IS NULL OR target_type = $1) AND ($2 IS NULL OR target_id = $2) \
                 ORDER BY id DESC LIMIT $3",
        };
        let rows = dispatch!(self, p => sqlx::query(sql)
            .bind(q.target_type.as_deref()).bind(q.target_id.as_deref()).bind(q.limit)
            .fetch_all(p).await.and_then(|rows| rows.iter().map(|r| Ok(AuditRow {
                id: r.try_get("id")?,
                actor: r.try_get("actor")?,
                action: r.try_get("action")?,
                target_type: r.try_get("target_type")?,
                target_id: r.try_get("target_id")?,
                before: r.try_get::<Option<Json<serde_json::Value>>, _>("before")?.map(|j| j.0),
                after: r.try_get::<Option<Json<serde_json::Value>>, _>("after")?.map(|j| j.0),
                created_at: r.try_get("created_at")?,
            })).collect::<Result<Vec<_>, sqlx::Error>>()))?;
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_redacted() {
        for (stored, expected) in [
            (
                serde_json::json!({"api_key": "enc:v1:0a1b2c3d:AAAA"}),
                serde_json::json!({"api_key": SEALED}),
            ),
            (
                serde_json::json!({"api_key": "sk-plain", "header": "x-api-key"}),
                serde_json::json!({"api_key": SEALED, "header": "x-api-key"}),
            ),
            (
                serde_json::json!({"api_key": "k", "other": {"nested": "secret"}, "header": 5}),
                serde_json::json!({"api_key": SEALED, "other": SEALED, "header": SEALED}),
            ),
            (serde_json::json!("sk-bare"), serde_json::json!(SEALED)),
        ] {
            assert_eq!(redact_credentials(&stored), expected, "{stored}");
        }
    }

    /// A transaction that wrote no audit row does not commit, and what it wrote is gone; with
    /// its row it commits, and the row reads back.
    #[tokio::test]
    async fn no_commit_without_an_audit_row() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = Store::connect(&url, 1).await.unwrap();
        let users = |store: Store| async move { store.list_users().await.unwrap().len() };

        let mut tx = store.begin().await.unwrap();
        tx.create_user("a@example.com", "a", "user").await.unwrap();
        assert!(matches!(tx.commit().await, Err(StoreError::Unaudited)));
        assert_eq!(users(store.clone()).await, 0);

        let mut tx = store.begin().await.unwrap();
        let id = tx.create_user("a@example.com", "a", "user").await.unwrap();
        let after = tx.user_snapshot(id).await.unwrap();
        let actor = Actor::cli("alice");
        tx.audit(
            &actor,
            "user.create",
            &Target::user(id),
            None,
            after.clone(),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(users(store.clone()).await, 1);
        let query = |t: Option<&str>, i: Option<&str>| AuditQuery {
            limit: 10,
            target_type: t.map(str::to_string),
            target_id: i.map(str::to_string),
        };
        let rows = store
            .audit_log(&query(Some("user"), Some("1")))
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(
            (
                r.actor.as_str(),
                r.action.as_str(),
                r.target_type.as_str(),
                r.target_id.as_str()
            ),
            ("cli:alice", "user.create", "user", "1")
        );
        assert_eq!((r.before.clone(), r.after.clone()), (None, after));
        assert!(store
            .audit_log(&query(Some("key"), None))
            .await
            .unwrap()
            .is_empty());
        assert_eq!(
            store
                .audit_log(&query(None, Some("1")))
                .await
                .unwrap()
                .len(),
            1
        );
        store.close().await;
    }

    #[test]
    fn actors() {
        assert_eq!(Actor::admin_token("ops").as_str(), "admin-token:ops");
        assert_eq!(Actor::cli("alice").to_string(), "cli:alice");
        assert_eq!(Actor::system("start").as_str(), "system:start");
    }
}
