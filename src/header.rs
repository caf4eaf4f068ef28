//! The request header stage, first in `request_filter`: what pingora parsed is held to
//! tollgate's limits and framing rules before anything else looks at it. Pure checks; `proxy.rs`
//! answers a refusal with 400 or 431 and closes the connection.

use crate::error::GatewayError;

/// `[server] max_header_bytes` and `max_headers`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: usize,
    pub max_fields: usize,
}

/// Every check of this stage, in order; any refusal closes the connection. `raw` is the header
/// section as received (HTTP/1), when there is one.
pub fn check(
    headers: &http::HeaderMap,
    raw: Option<&[u8]>,
    limits: Limits,
) -> Result<(), GatewayError> {
    check_header_size(headers, limits.max_bytes, limits.max_fields)?;
    if raw.is_some_and(bare_line_feed) {
        return Err(GatewayError::BadRequest(
            "a header line ends in a bare line feed (CRLF required)".into(),
        ));
    }
    check_framing(headers)
        .map_err(|why| GatewayError::BadRequest(format!("ambiguous body framing: {why}")))
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

/// A line of the header section that ends in a bare line feed (no carriage return before it).
/// RFC 9112 §2.2 lets a recipient accept them, but a proxy and its upstream that split lines
/// differently are a smuggling vector, so tollgate refuses them (400 and close). `raw` is the
/// header section as received. Pure.
pub fn bare_line_feed(raw: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', raw).any(|at| at == 0 || raw[at - 1] != b'\r')
}

#[cfg(test)]
mod tests {
    use super::{bare_line_feed, check_framing, check_header_size};

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

    #[test]
    fn bare_line_feeds() {
        let check = |raw: &str, expected: bool| {
            assert_eq!(bare_line_feed(raw.as_bytes()), expected, "{raw:?}")
        };
        check("GET / HTTP/1.1\r\nhost: a\r\n\r\n", false);
        check("GET / HTTP/1.1\nhost: a\r\n\r\n", true);
        check("GET / HTTP/1.1\r\nhost: a\n\r\n", true);
        check("GET / HTTP/1.1\r\nhost: a\r\n\n", true);
        check("\n", true);
        check("", false);
        check("GET / HTTP/1.1\r\nx: a\rb\r\n\r\n", false);
    }
}
