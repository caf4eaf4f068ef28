//! The admin API: JSON over HTTP on its own listener, every route behind
//! `Authorization: Bearer $TOLLGATE_ADMIN_TOKEN` (compared in constant time). The actions are the
//! CLI's (`ops.rs`); this module adds routing, the token, and the effects on this running
//! instance: a changed key is dropped from the key cache at once, a changed account reloads the
//! account set. Every change is audited as done by `admin-token:<[admin] token_name>`, and
//! `GET /admin/audit` reads the log.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use crate::auth::KeyCache;
use crate::httpd::{query_param, Handler, Request, Response};
use crate::ops::{self, OpsError};
use crate::secrets::Keyring;
use crate::store::{Actor, GroupBy, KeyPatch, Store};

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
            let kind = match e.status() {
                400 => "invalid_request_error",
                404 => "not_found",
                409 => "conflict",
                _ => "server_error",
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

/// Every request body is a JSON object: serde would also read a struct from an array of its
/// fields in order (`[null, null]`), which no route documents.
fn body<T: serde::de::DeserializeOwned>(req: &Request) -> Result<T, OpsError> {
    let value: serde_json::Value =
        serde_json::from_slice(&req.body).map_err(|e| bad("body", &e.to_string()))?;
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
