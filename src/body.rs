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

/// How the request says its body is framed, when that is ambiguous (RFC 9112 §6.1, §6.3): both
/// `Content-Length` and `Transfer-Encoding`, a transfer coding other than `chunked` alone, or
/// several `Content-Length`s that disagree. Proxies that read such framing differently are how
/// requests are smuggled, so it is refused (400) and the connection closed. Pure. (pingora
/// itself drops the `Content-Length` of a request that has both and turns keep-alive off, so
/// such a request is served and its connection closed: `proxy.rs` keeps keep-alive off.)
pub fn check_framing(headers: &http::HeaderMap) -> Result<(), &'static str> {
    let te: Vec<&http::HeaderValue> = headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .collect();
    let cl: Vec<&http::HeaderValue> = headers
        .get_all(http::header::CONTENT_LENGTH)
        .iter()
        .collect();
    if !te.is_empty() && !cl.is_empty() {
        return Err("both Content-Length and Transfer-Encoding");
    }
    if !te.is_empty() {
        let chunked_alone = te.len() == 1
            && te[0]
                .to_str()
                .is_ok_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
        if !chunked_alone {
            return Err("a Transfer-Encoding other than chunked");
        }
    }
    if cl.len() > 1 && cl.iter().any(|v| *v != cl[0]) {
        return Err("conflicting Content-Length values");
    }
    Ok(())
}

/// The header section within `[server] max_header_bytes` and `max_headers` (pingora's own limits
/// are 1 MiB and 256 fields); `Err` says which was exceeded. Pure.
pub fn check_header_size(
    headers: &http::HeaderMap,
    max_bytes: usize,
    max_fields: usize,
) -> Result<(), GatewayError> {
    if headers.len() > max_fields {
        return Err(GatewayError::HeadersTooLarge(format!(
            "{} header fields (at most {max_fields})",
            headers.len()
        )));
    }
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if bytes > max_bytes {
        return Err(GatewayError::HeadersTooLarge(format!(
            "{bytes} bytes of headers (at most {max_bytes})"
        )));
    }
    Ok(())
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

/// Longest and most a refused oversized body is read (and discarded) before its connection closes.
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(2);
const LINGER_BYTES: usize = 8 * 1024 * 1024;

/// After a 413 that closes the connection, reads and discards what the client is still sending,
/// for at most [`LINGER_TIME`] and [`LINGER_BYTES`], before the close: closing a socket with
/// unread bytes makes the kernel reset the connection, and a client still writing its body then
/// gets the reset instead of the answer (nginx's lingering close). Nothing is kept.
pub async fn linger(session: &mut Session) {
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    let mut read = 0;
    while read < LINGER_BYTES {
        match tokio::time::timeout_at(deadline, session.read_request_body()).await {
            Ok(Ok(Some(chunk))) => read += chunk.len(),
            _ => break,
        }
    }
}

#[cfg(test)]
mod framing_tests {
    use super::{check_framing, check_header_size};

    #[test]
    fn header_limits() {
        let mut map = http::HeaderMap::new();
        map.insert("a", "x".repeat(10).parse().unwrap()); // 1 + 10 + 4 = 15 bytes
        map.insert("b", "y".parse().unwrap()); // 1 + 1 + 4 = 6 bytes
        assert!(check_header_size(&map, 21, 2).is_ok());
        assert_eq!(
            check_header_size(&map, 20, 2).unwrap_err().to_string(),
            "request header too large: 21 bytes of headers (at most 20)"
        );
        assert_eq!(
            check_header_size(&map, 100, 1).unwrap_err().to_string(),
            "request header too large: 2 header fields (at most 1)"
        );
    }

    fn check(headers: &[(&str, &str)], expected: Result<(), &str>) {
        let mut map = http::HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        assert_eq!(check_framing(&map), expected, "{headers:?}");
    }

    #[test]
    fn framing() {
        check(&[], Ok(()));
        check(&[("content-length", "5")], Ok(()));
        check(&[("transfer-encoding", "chunked")], Ok(()));
        check(&[("transfer-encoding", " Chunked ")], Ok(()));
        check(
            &[("content-length", "5"), ("transfer-encoding", "chunked")],
            Err("both Content-Length and Transfer-Encoding"),
        );
        check(
            &[("transfer-encoding", "identity, chunked")],
            Err("a Transfer-Encoding other than chunked"),
        );
        check(
            &[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ],
            Err("a Transfer-Encoding other than chunked"),
        );
        check(
            &[("transfer-encoding", "gzip")],
            Err("a Transfer-Encoding other than chunked"),
        );
        check(&[("content-length", "5"), ("content-length", "5")], Ok(()));
        check(
            &[("content-length", "5"), ("content-length", "6")],
            Err("conflicting Content-Length values"),
        );
    }
}
