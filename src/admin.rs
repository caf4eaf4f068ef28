//! The admin API: JSON over HTTP on its own listener, every route behind
//! `Authorization: Bearer $TOLLGATE_ADMIN_TOKEN` (compared in constant time). The actions are the
//! CLI's (`ops.rs`); this module adds routing, the token, and the effects on this running
//! instance: a changed key is dropped from the key cache at once, a changed account reloads the
//! account set. Every change is audited as done by `admin-token:<[admin] token_name>`, and
//! `GET /admin/audit` reads the log. Credit grants take an `Idempotency-Key` header (Stripe's
//! contract: the same key and body answer the first receipt again, marked
//! `Idempotent-Replayed: true`; the same key with another body is refused, `409`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use crate::auth::KeyCache;
use crate::httpd::{query_param, Handler, Request, Response};
use crate::ops::{self, OpsError, UserRef};
use crate::secrets::Keyring;
use crate::store::{Actor, GrantOutcome, GroupBy, KeyPatch, Store};

pub const TOKEN_ENV: &str = "TOLLGATE_ADMIN_TOKEN";

/// The OpenAPI document, kept in the repo next to the code it describes.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Re-reads the config on behalf of the actor (audited); returns what was wrong when it is refused.
pub type ReloadFn =
    Arc<dyn Fn(Actor) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

pub struct Admin {
    pub store: Store,
    /// Seals the credentials of accounts added or changed here.
    pub sealing: Arc<Keyring>,
    pub keys: Arc<KeyCache>,
    /// Wakes the account refresher.
    pub accounts_changed: Arc<Notify>,
    pub reload: ReloadFn,
    /// Who the token's holder is in the audit log: `admin-token:<[admin] token_name>`.
    pub actor: Actor,
    /// SHA-256 of the token: comparing digests keeps the comparison constant-time in length too.
    token_digest: [u8; 32],
}

impl Admin {
    pub fn new(
        store: Store,
        sealing: Arc<Keyring>,
        keys: Arc<KeyCache>,
        accounts_changed: Arc<Notify>,
        reload: ReloadFn,
        token: &str,
        actor: Actor,
    ) -> Admin {
        Admin {
            store,
            sealing,
            keys,
            accounts_changed,
            reload,
            actor,
            token_digest: Sha256::digest(token.as_bytes()).into(),
        }
    }

    pub fn handler(self: Arc<Self>) -> Handler {
        Arc::new(move |req| {
            let admin = self.clone();
            Box::pin(async move { admin.handle(req).await })
        })
    }

    fn authorized(&self, req: &Request) -> bool {
        let Some(token) = req
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
        else {
            return false;
        };
        let digest: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        constant_time_eq(&digest, &self.token_digest)
    }

    async fn handle(&self, req: Request) -> Response {
        if !self.authorized(&req) {
            return Response::error(401, "authentication_error", "missing or wrong admin token");
        }
        let segments: Vec<&str> = req.path.trim_matches('/').split('/').collect();
        let id = |s: &str| {
            s.parse::<i64>()
                .map_err(|_| bad("id", "must be an integer"))
        };
        let actor = &self.actor;
        let result: Result<Response, OpsError> = async {
            use http::Method as M;
            Ok(match (&req.method, segments.as_slice()) {
                (&M::GET, ["openapi.json"]) => Response::text(200, "application/json", OPENAPI),
                (&M::GET, ["admin", "users"]) => {
                    Response::json(200, &ops::list_users(&self.store).await?)
                }
                (&M::POST, ["admin", "users"]) => {
                    Response::json(201, &ops::add_user(&self.store, actor, &body(&req)?).await?)
                }
                (&M::POST, ["admin", "users", uid, "deactivate"]) => {
                    for hash in ops::deactivate_user(&self.store, actor, id(uid)?).await? {
                        self.keys.invalidate_hex(&hash);
                    }
                    Response::json(200, &serde_json::json!({ "deactivated": true }))
                }
                (&M::POST, ["admin", "users", uid, "activate"]) => {
                    for hash in ops::activate_user(&self.store, actor, id(uid)?).await? {
                        self.keys.invalidate_hex(&hash);
                    }
                    Response::json(200, &serde_json::json!({ "activated": true }))
                }
                (&M::PATCH, ["admin", "users", uid]) => {
                    for hash in ops::update_user(&self.store, actor, id(uid)?, &body(&req)?).await?
                    {
                        self.keys.invalidate_hex(&hash);
                    }
                    Response::json(200, &serde_json::json!({ "updated": true }))
                }
                (&M::POST, ["admin", "users", uid, "credits"]) => {
                    let user = UserRef::Id(id(uid)?);
                    let key = idempotency_key(&req)?;
                    let input: ops::GrantInput = decimal_body(&req, "amount")?;
                    match ops::grant_credits(&self.store, actor, user, &input, key.as_deref())
                        .await?
                    {
                        GrantOutcome::Granted(receipt) => Response::json(201, &receipt),
                        GrantOutcome::Replayed(receipt) => {
                            Response::json(201, &receipt).with_header(REPLAYED_HEADER, "true")
                        }
                    }
                }
                (&M::GET, ["admin", "users", uid, "credits"]) => Response::json(
                    200,
                    &ops::credit_balance(&self.store, UserRef::Id(id(uid)?)).await?,
                ),
                (&M::GET, ["admin", "users", uid, "credits", "history"]) => {
                    let user = UserRef::Id(id(uid)?);
                    let limit = match query_param(req.query.as_deref(), "limit") {
                        Some(l) => l
                            .parse::<i64>()
                            .map_err(|_| bad("limit", "must be an integer between 1 and 100000"))?,
                        None => ops::HISTORY_LIMIT.0,
                    };
                    Response::json(200, &ops::credit_history(&self.store, user, limit).await?)
                }
                (&M::GET, ["admin", "budgets"]) => {
                    Response::json(200, &ops::list_budgets(&self.store).await?)
                }
                (&M::POST, ["admin", "budgets"]) => {
                    let input: ops::BudgetInput = decimal_body(&req, "limit")?;
                    Response::json(200, &ops::set_budget(&self.store, actor, &input).await?)
                }
                (&M::DELETE, ["admin", "budgets", bid]) => {
                    ops::delete_budget(&self.store, actor, id(bid)?).await?;
                    Response::no_content()
                }
                (&M::GET, ["admin", "keys"]) => {
                    Response::json(200, &ops::list_keys(&self.store).await?)
                }
                (&M::POST, ["admin", "keys"]) => Response::json(
                    201,
                    &ops::create_key(&self.store, actor, &body(&req)?).await?,
                ),
                (&M::POST, ["admin", "keys", kid, "revoke"]) => {
                    let hash = ops::revoke_key(&self.store, actor, id(kid)?).await?;
                    self.keys.invalidate_hex(&hash);
                    Response::json(200, &serde_json::json!({ "revoked": true }))
                }
                (&M::PATCH, ["admin", "keys", kid]) => {
                    let patch: KeyPatch = body(&req)?;
                    let hash = ops::update_key(&self.store, actor, id(kid)?, &patch).await?;
                    self.keys.invalidate_hex(&hash);
                    Response::json(200, &serde_json::json!({ "updated": true }))
                }
                (&M::GET, ["admin", "accounts"]) => {
                    Response::json(200, &ops::list_accounts(&self.store).await?)
                }
                (&M::POST, ["admin", "accounts"]) => {
                    let new_id =
                        ops::add_account(&self.store, &self.sealing, actor, &body(&req)?).await?;
                    self.accounts_changed.notify_one();
                    Response::json(201, &serde_json::json!({ "id": new_id }))
                }
                (&M::PATCH, ["admin", "accounts", aid]) => {
                    let update = body(&req)?;
                    ops::update_account(&self.store, &self.sealing, actor, id(aid)?, &update)
                        .await?;
                    self.accounts_changed.notify_one();
                    Response::json(200, &serde_json::json!({ "updated": true }))
                }
                (&M::DELETE, ["admin", "accounts", aid]) => {
                    ops::delete_account(&self.store, actor, id(aid)?).await?;
                    self.accounts_changed.notify_one();
                    Response::json(200, &serde_json::json!({ "deleted": true }))
                }
                (&M::GET, ["admin", "usage"]) => {
                    let q = req.query.as_deref();
                    let by = match query_param(q, "by").as_deref().unwrap_or("key") {
                        "key" => GroupBy::Key,
                        "account" => GroupBy::Account,
                        "model" => GroupBy::Model,
                        "served_model" => GroupBy::ServedModel,
                        "day" => GroupBy::Day,
                        "user" => GroupBy::User,
                        _ => {
                            return Err(bad(
                                "by",
                                "want key, account, model, served_model, day or user",
                            ))
                        }
                    };
                    let since = query_param(q, "since").unwrap_or_else(|| "30d".into());
                    let until = query_param(q, "until");
                    Response::json(
                        200,
                        &ops::usage(&self.store, &since, until.as_deref(), by).await?,
                    )
                }
                (&M::GET, ["admin", "audit"]) => {
                    let q = req.query.as_deref();
                    let limit =
                        match query_param(q, "limit") {
                            Some(l) => Some(l.parse::<i64>().map_err(|_| {
                                bad("limit", "must be an integer between 1 and 10000")
                            })?),
                            None => None,
                        };
                    let target_type = query_param(q, "target_type");
                    let target_id = query_param(q, "target_id");
                    let rows = ops::audit_log(
                        &self.store,
                        limit,
                        target_type.as_deref(),
                        target_id.as_deref(),
                    )
                    .await?;
                    Response::json(200, &rows)
                }
                (&M::POST, ["admin", "reload"]) => match (self.reload)(actor.clone()).await {
                    Ok(()) => Response::json(200, &serde_json::json!({ "reloaded": true })),
                    Err(e) => Response::error(400, "invalid_config", &e),
                },
                _ => Response::error(404, "not_found", "no such route"),
            })
        }
        .await;
        result.unwrap_or_else(|e| {
            let kind = match &e {
                OpsError::Invalid { .. } => "invalid_request_error",
                OpsError::NotFound(_) => "not_found",
                OpsError::Conflict(_) => "conflict",
                OpsError::Idempotency(_) => "idempotency_error",
                OpsError::Store(_) | OpsError::Sealing(_) => "server_error",
            };
            if e.status() == 500 {
                tracing::error!(error = %e, "admin request failed");
            }
            Response::error(e.status(), kind, &e.to_string())
        })
    }
}

fn bad(field: &'static str, message: &str) -> OpsError {
    OpsError::Invalid {
        field,
        message: message.into(),
    }
}

/// Marks a grant answered again from its idempotency record (Stripe's name for it).
const REPLAYED_HEADER: &str = "idempotent-replayed";

/// The `Idempotency-Key` header, surrounding spaces removed (as HTTP does); at most one.
fn idempotency_key(req: &Request) -> Result<Option<String>, OpsError> {
    let mut values = req.headers.get_all("idempotency-key").iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(bad(
            "idempotency_key",
            "give the Idempotency-Key header once",
        ));
    }
    let text = value
        .to_str()
        .map_err(|_| bad("idempotency_key", "must be printable ASCII"))?;
    Ok(Some(text.trim().to_string()))
}

/// [`body`] whose `field` is an amount: a JSON string (`"10.50"`), never a JSON number, which
/// would not be exact; named in the error.
fn decimal_body<T: serde::de::DeserializeOwned>(
    req: &Request,
    field: &'static str,
) -> Result<T, OpsError> {
    let value: serde_json::Value =
        serde_json::from_slice(&req.body).map_err(|e| bad("body", &e.to_string()))?;
    match value.get(field) {
        Some(serde_json::Value::String(_)) | None => {}
        Some(_) => return Err(bad(
            field,
            "must be a decimal string such as \"10.50\" (not a JSON number: it would not be exact)",
        )),
    }
    object(value)
}

/// Every request body is a JSON object: serde would also read a struct from an array of its
/// fields in order (`[null, null]`), which no route documents.
fn body<T: serde::de::DeserializeOwned>(req: &Request) -> Result<T, OpsError> {
    let value: serde_json::Value =
        serde_json::from_slice(&req.body).map_err(|e| bad("body", &e.to_string()))?;
    object(value)
}

fn object<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, OpsError> {
    if !value.is_object() {
        return Err(bad("body", "must be a JSON object"));
    }
    serde_json::from_value(value).map_err(|e| bad("body", &e.to_string()))
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn bodies_must_be_objects() {
        fn check(body: &str, ok: bool) {
            let req = super::Request {
                method: http::Method::PATCH,
                path: "/".into(),
                query: None,
                headers: http::HeaderMap::new(),
                body: bytes::Bytes::copy_from_slice(body.as_bytes()),
            };
            let got: Result<crate::store::LimitPatch, _> = super::body(&req);
            assert_eq!(got.is_ok(), ok, "{body}");
        }
        check(r#"{"rpm": 5}"#, true);
        check("{}", true);
        check("[null, null]", false);
        check("[]", false);
        check("null", false);
        check("5", false);
        check("{", false);
    }

    #[test]
    fn openapi_is_valid_json_and_lists_the_routes() {
        let doc: serde_json::Value = serde_json::from_str(super::OPENAPI).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/admin/users",
            "/admin/users/{id}",
            "/admin/users/{id}/deactivate",
            "/admin/users/{id}/activate",
            "/admin/keys",
            "/admin/keys/{id}",
            "/admin/keys/{id}/revoke",
            "/admin/accounts",
            "/admin/accounts/{id}",
            "/admin/usage",
            "/admin/reload",
            "/admin/audit",
            "/admin/users/{id}/credits",
            "/admin/users/{id}/credits/history",
            "/admin/budgets",
            "/admin/budgets/{id}",
        ] {
            assert!(paths.contains_key(p), "{p} missing from openapi.json");
        }
    }

    #[test]
    fn constant_time_eq() {
        assert!(super::constant_time_eq(&[1; 32], &[1; 32]));
        let mut b = [1; 32];
        b[31] = 2;
        assert!(!super::constant_time_eq(&[1; 32], &b));
    }
}
