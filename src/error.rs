//! The client-facing error boundary: every way tollgate itself refuses or fails a request, each
//! mapped in one place to a status, its error type in each provider's vocabulary and a
//! low-cardinality label. The body takes the shape of the route family the request was for, so
//! the official SDKs raise their own exception with tollgate's message: OpenAI's
//! `{"error":{"type","code","message"}}`, Anthropic's `{"type":"error","error":{"type","message"}}`.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use crate::auth::AuthError;
use crate::limits::{self, Refusal};
use crate::upstream::AccountType;

/// The error body format a client of a route family expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorShape {
    OpenAi,
    Anthropic,
}

impl ErrorShape {
    /// The shape for a route family; OpenAI's when the path routes nowhere (or to a generic
    /// account), as most gateways' clients expect.
    pub fn of(kind: Option<AccountType>) -> ErrorShape {
        match kind {
            Some(AccountType::Anthropic) => ErrorShape::Anthropic,
            _ => ErrorShape::OpenAi,
        }
    }
}

/// How one error is told: status, OpenAI `type`, Anthropic `type`, metric label (= OpenAI `code`).
struct Parts {
    status: u16,
    openai: &'static str,
    anthropic: &'static str,
    label: &'static str,
}

const fn parts(
    status: u16,
    openai: &'static str,
    anthropic: &'static str,
    label: &'static str,
) -> Parts {
    Parts {
        status,
        openai,
        anthropic,
        label,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("could not read the request body: {0}")]
    BadRequest(String),
    #[error("no route for this path")]
    NoRoute,
    #[error("request header too large: {0}")]
    HeadersTooLarge(String),
    #[error("{0}")]
    BadPath(#[from] crate::path::PathError),
    #[error("no upstream account is available for this request")]
    NoAccount,
    #[error("the gateway is holding as many request bodies as it may; retry shortly")]
    BodyBudget,
    #[error("all {attempts} upstream attempts failed; last: {last}")]
    UpstreamFailed { attempts: usize, last: String },
    /// A rate limit of the key or its user (`limits.rs`); OpenAI's `type` says what was
    /// counted (`requests` or `tokens`), as OpenAI's own 429s do.
    #[error("{0}")]
    RateLimited(Refusal),
    /// Limits are shared through Redis, Redis cannot be reached and `[limits] fail = "closed"`.
    #[error("rate limits cannot be checked right now; retry shortly")]
    LimitsUnavailable,
    /// The spend stage (`spend.rs`): out of credits, a budget used up, or (`[spend] fail =
    /// "closed"`) no lease to be had from the database. `retry_after`: seconds until a budget
    /// resets.
    #[error("{refusal}")]
    Spend {
        refusal: crate::spend::Refusal,
        retry_after: Option<u64>,
    },
}

impl GatewayError {
    fn parts(&self) -> Parts {
        match self {
            GatewayError::Auth(AuthError::Forbidden(_)) => {
                parts(403, "permission_error", "permission_error", "forbidden")
            }
            GatewayError::Auth(AuthError::UserBanned) => {
                parts(403, "permission_error", "permission_error", "banned")
            }
            GatewayError::Auth(AuthError::StoreUnavailable) => {
                parts(503, "service_unavailable", "api_error", "store_unavailable")
            }
            GatewayError::Auth(e) => parts(
                401,
                "authentication_error",
                "authentication_error",
                e.label(),
            ),
            GatewayError::BodyTooLarge { .. } => parts(
                413,
                "invalid_request_error",
                "request_too_large",
                "body_too_large",
            ),
            GatewayError::BadRequest(_) => parts(
                400,
                "invalid_request_error",
                "invalid_request_error",
                "bad_request",
            ),
            GatewayError::HeadersTooLarge(_) => parts(
                431,
                "invalid_request_error",
                "invalid_request_error",
                "headers_too_large",
            ),
            GatewayError::BadPath(_) => parts(
                400,
                "invalid_request_error",
                "invalid_request_error",
                "bad_path",
            ),
            GatewayError::NoRoute => {
                parts(404, "invalid_request_error", "not_found_error", "no_route")
            }
            GatewayError::BodyBudget => parts(
                503,
                "service_unavailable",
                "overloaded_error",
                "body_budget",
            ),
            GatewayError::NoAccount => {
                parts(503, "service_unavailable", "overloaded_error", "no_account")
            }
            GatewayError::UpstreamFailed { .. } => parts(
                503,
                "service_unavailable",
                "overloaded_error",
                "upstream_failed",
            ),
            GatewayError::RateLimited(r) => parts(
                429,
                match r.kind {
                    limits::Kind::Tokens => "tokens",
                    limits::Kind::Requests | limits::Kind::Concurrency => "requests",
                },
                "rate_limit_error",
                "rate_limit_exceeded",
            ),
            GatewayError::LimitsUnavailable => parts(
                503,
                "service_unavailable",
                "overloaded_error",
                "rate_limits_unavailable",
            ),
            // OpenAI answers an exhausted quota 429 `insufficient_quota`; `x-should-retry: false`
            // (see `should_retry`) keeps the official SDKs from retrying what cannot change soon.
            GatewayError::Spend { refusal, .. } => match refusal {
                crate::spend::Refusal::OutOfCredits => parts(
                    429,
                    "insufficient_quota",
                    "billing_error",
                    "insufficient_quota",
                ),
                crate::spend::Refusal::Budget { .. } => parts(
                    429,
                    "insufficient_quota",
                    "rate_limit_error",
                    "budget_exceeded",
                ),
                crate::spend::Refusal::Unavailable => parts(
                    503,
                    "service_unavailable",
                    "overloaded_error",
                    "spend_unavailable",
                ),
            },
        }
    }

    pub fn status(&self) -> u16 {
        self.parts().status
    }

    pub fn label(&self) -> &'static str {
        self.parts().label
    }

    /// Seconds a client should wait before retrying, sent as `Retry-After`.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            GatewayError::BodyBudget | GatewayError::LimitsUnavailable => Some(1),
            GatewayError::RateLimited(r) => Some(r.retry_after_secs()),
            GatewayError::Spend { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// `x-should-retry`, which the official OpenAI and Anthropic SDKs obey before their own
    /// rules: `false` for a refusal a retry within the SDKs' backoff (seconds) cannot change —
    /// no credit, or a budget that resets in more than a minute.
    pub fn should_retry(&self) -> Option<bool> {
        match self {
            GatewayError::Spend {
                refusal,
                retry_after,
            } => match refusal {
                crate::spend::Refusal::Unavailable => None,
                _ => Some(retry_after.is_some_and(|s| s <= 60)),
            },
            _ => None,
        }
    }

    /// The JSON body in the route family's shape.
    pub fn body(&self, shape: ErrorShape) -> Bytes {
        let p = self.parts();
        let body = match shape {
            ErrorShape::OpenAi => serde_json::json!({
                "error": { "type": p.openai, "code": p.label, "message": self.to_string() }
            }),
            ErrorShape::Anthropic => serde_json::json!({
                "type": "error",
                "error": { "type": p.anthropic, "message": self.to_string() }
            }),
        };
        Bytes::from(body.to_string())
    }

    /// Writes the error response, with a limited key's `x-ratelimit-*` headers. The connection
    /// is kept alive unless `close` (e.g. an unread oversized body is still on the wire).
    pub async fn respond(
        &self,
        session: &mut Session,
        request_id: &str,
        close: bool,
        shape: ErrorShape,
        rate_headers: Option<&limits::Headers>,
    ) -> pingora::Result<()> {
        let body = self.body(shape);
        let mut resp = ResponseHeader::build(self.status(), Some(10))?;
        if let Some(h) = rate_headers {
            h.each(|name, value| {
                let _ = resp.insert_header(name, value);
            });
        }
        resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
        resp.insert_header(http::header::CONTENT_LENGTH, body.len())?;
        resp.insert_header("x-request-id", request_id)?;
        if let Some(secs) = self.retry_after() {
            resp.insert_header(http::header::RETRY_AFTER, secs)?;
        }
        if let Some(retry) = self.should_retry() {
            resp.insert_header("x-should-retry", if retry { "true" } else { "false" })?;
        }
        if close {
            resp.insert_header(http::header::CONNECTION, "close")?;
            session.set_keepalive(None);
        }
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(e: GatewayError, status: u16, label: &str, body: &str) {
        assert_eq!(e.status(), status);
        assert_eq!(e.label(), label);
        assert_eq!(e.body(ErrorShape::OpenAi), body);
    }

    fn check_anthropic(e: GatewayError, body: &str) {
        assert_eq!(e.body(ErrorShape::Anthropic), body);
    }

    #[test]
    fn mapping() {
        check(
            GatewayError::Auth(AuthError::Unknown),
            401,
            "unknown",
            r#"{"error":{"code":"unknown","message":"unknown API key","type":"authentication_error"}}"#,
        );
        check(
            GatewayError::Auth(AuthError::Forbidden("model gpt-4o".into())),
            403,
            "forbidden",
            r#"{"error":{"code":"forbidden","message":"this API key may not use model gpt-4o","type":"permission_error"}}"#,
        );
        check(
            GatewayError::BodyTooLarge { limit: 10 },
            413,
            "body_too_large",
            r#"{"error":{"code":"body_too_large","message":"request body is larger than the limit of 10 bytes","type":"invalid_request_error"}}"#,
        );
        assert_eq!(GatewayError::NoAccount.status(), 503);
        check_anthropic(
            GatewayError::Auth(AuthError::Unknown),
            r#"{"error":{"message":"unknown API key","type":"authentication_error"},"type":"error"}"#,
        );
        check_anthropic(
            GatewayError::BodyTooLarge { limit: 10 },
            r#"{"error":{"message":"request body is larger than the limit of 10 bytes","type":"request_too_large"},"type":"error"}"#,
        );
        check_anthropic(
            GatewayError::NoAccount,
            r#"{"error":{"message":"no upstream account is available for this request","type":"overloaded_error"},"type":"error"}"#,
        );
        assert_eq!(
            ErrorShape::of(Some(AccountType::Anthropic)),
            ErrorShape::Anthropic
        );
        assert_eq!(
            ErrorShape::of(Some(AccountType::Generic)),
            ErrorShape::OpenAi
        );
        assert_eq!(ErrorShape::of(None), ErrorShape::OpenAi);
    }

    #[test]
    fn rate_limited() {
        let refusal = |kind| {
            GatewayError::RateLimited(Refusal {
                scope: limits::Scope::Key,
                kind,
                per: "per minute (TPM)",
                limit: 100,
                requested: 150,
                retry_after: std::time::Duration::from_millis(200),
            })
        };
        check(
            refusal(limits::Kind::Tokens),
            429,
            "rate_limit_exceeded",
            r#"{"error":{"code":"rate_limit_exceeded","message":"Rate limit reached for tokens per minute (TPM) on this API key: limit 100, requested 150. Please try again in 200ms.","type":"tokens"}}"#,
        );
        assert_eq!(refusal(limits::Kind::Tokens).retry_after(), Some(1));
        check_anthropic(
            refusal(limits::Kind::Concurrency),
            r#"{"error":{"message":"Too many concurrent requests on this API key: limit 100. Please try again in 200ms.","type":"rate_limit_error"},"type":"error"}"#,
        );
    }
}
