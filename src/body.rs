//! Reading the client's request body: whole, up to the configured limit, before any upstream is
//! chosen — so permissions can see the model and every retry can replay it.

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;

use crate::error::GatewayError;

/// Why the body could not be taken; `close` says the connection must not be reused.
pub struct BodyError {
    pub error: GatewayError,
    pub close: bool,
}

/// Reads the whole body, refusing a declared or actual size above `limit` with 413.
pub async fn read(session: &mut Session, limit: usize) -> Result<Bytes, BodyError> {
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        // The body is still unread on the wire: answer and close rather than drain it.
        return Err(BodyError {
            error: GatewayError::BodyTooLarge { limit },
            close: true,
        });
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0) as usize);
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > limit {
                    return Err(BodyError {
                        error: GatewayError::BodyTooLarge { limit },
                        close: true,
                    });
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(buf.freeze()),
            Err(e) => {
                return Err(BodyError {
                    error: GatewayError::BadRequest(e.etype().as_str().to_string()),
                    close: true,
                })
            }
        }
    }
}

/// Reads and discards what is left of the body so the connection can serve the next request.
/// Returns false (close the connection instead) for bodies declared larger than `limit` or that
/// fail or stall while draining.
pub async fn drain(session: &mut Session, limit: usize) -> bool {
    if session.is_body_done() {
        return true;
    }
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_none_or(|n| n > limit as u64) {
        return false;
    }
    session.set_total_drain_timeout(Some(std::time::Duration::from_secs(10)));
    session.drain_request_body().await.is_ok()
}
