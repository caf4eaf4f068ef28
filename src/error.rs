//! The client-facing error boundary: every way tollgate itself refuses or fails a request, each
//! mapped in one place to a status, an OpenAI-style JSON body and a low-cardinality label.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use crate::auth::AuthError;

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
    #[error("no upstream account is available for this request")]
    NoAccount,
    #[error("all {attempts} upstream attempts failed; last: {last}")]
    UpstreamFailed { attempts: usize, last: String },
}

impl GatewayError {
    /// Status, OpenAI-style error `type`, and the metric label.
    pub fn parts(&self) -> (u16, &'static str, &'static str) {
        match self {
            GatewayError::Auth(AuthError::Forbidden(_)) => (403, "permission_error", "forbidden"),
            GatewayError::Auth(AuthError::StoreUnavailable) => {
                (503, "service_unavailable", "store_unavailable")
            }
            GatewayError::Auth(e) => (401, "authentication_error", e.label()),
            GatewayError::BodyTooLarge { .. } => (413, "invalid_request_error", "body_too_large"),
            GatewayError::BadRequest(_) => (400, "invalid_request_error", "bad_request"),
            GatewayError::NoRoute => (404, "invalid_request_error", "no_route"),
            GatewayError::NoAccount => (503, "service_unavailable", "no_account"),
            GatewayError::UpstreamFailed { .. } => (503, "service_unavailable", "upstream_failed"),
        }
    }

    pub fn status(&self) -> u16 {
        self.parts().0
    }

    pub fn label(&self) -> &'static str {
        self.parts().2
    }

    /// `{"error":{"type":…,"code":…,"message":…}}`
    pub fn body(&self) -> Bytes {
        let (_, kind, code) = self.parts();
        let body = serde_json::json!({
            "error": { "type": kind, "code": code, "message": self.to_string() }
        });
        Bytes::from(body.to_string())
    }

    /// Writes the error response. The connection is kept alive unless `close` (e.g. an unread
    /// oversized body is still on the wire).
    pub async fn respond(
        &self,
        session: &mut Session,
        request_id: &str,
        close: bool,
    ) -> pingora::Result<()> {
        let body = self.body();
        let mut resp = ResponseHeader::build(self.status(), Some(4))?;
        resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
        resp.insert_header(http::header::CONTENT_LENGTH, body.len())?;
        resp.insert_header("x-request-id", request_id)?;
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
        assert_eq!(e.body(), body);
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
    }
}
