//! The small HTTP/1 server the metrics and admin listeners run on (hyper), with a body limit and
//! a shutdown signal. Handlers get the whole (bounded) request and return a whole response.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Largest request body the admin API accepts.
const MAX_BODY: usize = 1024 * 1024;

pub struct Request {
    pub method: http::Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

pub struct Response {
    pub status: u16,
    /// Empty: no body and no `Content-Type` (a `204`).
    pub content_type: &'static str,
    pub body: Bytes,
    /// More response headers (`Idempotent-Replayed`).
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl Response {
    pub fn json(status: u16, value: &impl serde::Serialize) -> Response {
        let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
        Response {
            status,
            content_type: "application/json",
            body: body.into(),
            headers: Vec::new(),
        }
    }

    /// `204 No Content`.
    pub fn no_content() -> Response {
        Response::text(204, "", Bytes::new())
    }

    pub fn with_header(mut self, name: &'static str, value: &'static str) -> Response {
        self.headers.push((
            http::HeaderName::from_static(name),
            http::HeaderValue::from_static(value),
        ));
        self
    }

    /// `{"error":{"type":…,"message":…}}`
    pub fn error(status: u16, kind: &str, message: &str) -> Response {
        Response::json(
            status,
            &serde_json::json!({ "error": { "type": kind, "message": message } }),
        )
    }

    pub fn text(status: u16, content_type: &'static str, body: impl Into<Bytes>) -> Response {
        Response {
            status,
            content_type,
            body: body.into(),
            headers: Vec::new(),
        }
    }
}

pub type Handler =
    Arc<dyn Fn(Request) -> Pin<Box<dyn Future<Output = Response> + Send>> + Send + Sync>;

/// Serves `handler` on `listener` until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    name: &'static str,
    handler: Handler,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(listener = name, error = %e, "accept failed");
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handle(req, &handler).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(req: hyper::Request<Incoming>, handler: &Handler) -> hyper::Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let response = match Limited::new(body, MAX_BODY).collect().await {
        Ok(body) => {
            handler(Request {
                method: parts.method,
                path: parts.uri.path().to_string(),
                query: parts.uri.query().map(str::to_string),
                headers: parts.headers,
                body: body.to_bytes(),
            })
            .await
        }
        Err(_) => Response::error(
            413,
            "invalid_request_error",
            "request body too large (1 MiB max)",
        ),
    };
    let mut r = hyper::Response::new(Full::new(response.body));
    *r.status_mut() = http::StatusCode::from_u16(response.status)
        .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    if !response.content_type.is_empty() {
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(response.content_type),
        );
    }
    for (name, value) in response.headers {
        r.headers_mut().append(name, value);
    }
    r
}

/// Query-string parameter `name`, percent-decoding only `%XX` and `+`.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(
                    std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"),
                    16,
                ) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn query() {
        for (q, name, expected) in [
            (Some("since=7d&by=model"), "by", Some("model")),
            (
                Some("since=2026-11-01T00%3A00%3A00%2B02%3A00"),
                "since",
                Some("2026-11-01T00:00:00+02:00"),
            ),
            (Some("a=1"), "b", None),
            (None, "a", None),
            (Some("x=%zz"), "x", Some("%zz")),
        ] {
            assert_eq!(super::query_param(q, name).as_deref(), expected, "{q:?}");
        }
    }
}
