//! Reading the client's request body: whole, up to the configured limit, before any upstream is
//! chosen — so permissions can see the model and every retry can replay it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use pingora::proxy::Session;

use crate::error::GatewayError;

/// Why the body could not be taken; `close` says the connection must not be reused.
pub struct BodyError {
    pub error: GatewayError,
    pub close: bool,
}

/// The gateway-wide budget of request-body bytes held in memory (`[server]
/// max_buffered_body_bytes`): every buffered body's capacity is taken from it as the buffer grows
/// and given back when the request ends ([`Held`] is dropped with the request's context).
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    limit: usize,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    /// Bytes held now, for `/metrics`.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// One request's share of the [`Budget`]; returned when dropped.
#[derive(Debug, Default)]
pub struct Held {
    budget: Option<Arc<Budget>>,
    bytes: usize,
}

impl Held {
    /// Takes `n` more bytes, unless the budget would pass its limit.
    fn grow(&mut self, budget: &Arc<Budget>, n: usize) -> bool {
        let taken = budget
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(n).filter(|&total| total <= budget.limit)
            })
            .is_ok();
        if taken {
            self.budget.get_or_insert_with(|| budget.clone());
            self.bytes += n;
        }
        taken
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            budget.used.fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }
}

/// Reads the whole body, refusing a declared or actual size above `limit` with 413, and a body
/// that does not fit in the gateway's [`Budget`] with 503. What is held never passes `limit`
/// bytes and is taken from the budget as it arrives: a body of declared length goes straight
/// into one buffer of that size; a chunked one is kept as the chunks that came and joined once
/// at the end (no doubling reallocations, whose freed blocks would stay in the allocator).
pub async fn read(
    session: &mut Session,
    limit: usize,
    budget: &Arc<Budget>,
) -> Result<(Bytes, Held), BodyError> {
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // The body is still unread on the wire after a refusal: answer and close rather than drain.
    let refuse = |error| BodyError { error, close: true };
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(refuse(GatewayError::BodyTooLarge { limit }));
    }
    let mut held = Held::default();
    let mut body = Body::default();
    if let Some(n) = declared.filter(|&n| n > 0) {
        let n = n as usize;
        if !held.grow(budget, n) {
            return Err(refuse(GatewayError::BodyBudget));
        }
        body = Body::Sized(Vec::with_capacity(n));
    }
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    return Err(refuse(GatewayError::BodyTooLarge { limit }));
                }
                if let Body::Chunks { .. } = body {
                    if !held.grow(budget, chunk.len()) {
                        return Err(refuse(GatewayError::BodyBudget));
                    }
                }
                body.push(chunk);
            }
            Ok(None) => return Ok((body.join(), held)),
            Err(e) => {
                return Err(BodyError {
                    error: GatewayError::BadRequest(e.etype().as_str().to_string()),
                    close: true,
                })
            }
        }
    }
}

/// A body while it is read.
enum Body {
    /// Declared length: one buffer of exactly that capacity.
    Sized(Vec<u8>),
    /// Chunked: the chunks as received, and their total length.
    Chunks { chunks: Vec<Bytes>, len: usize },
}

impl Default for Body {
    fn default() -> Body {
        Body::Chunks {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl Body {
    fn len(&self) -> usize {
        match self {
            Body::Sized(v) => v.len(),
            Body::Chunks { len, .. } => *len,
        }
    }

    fn push(&mut self, chunk: Bytes) {
        match self {
            Body::Sized(v) => v.extend_from_slice(&chunk),
            Body::Chunks { chunks, len } => {
                *len += chunk.len();
                chunks.push(chunk);
            }
        }
    }

    /// The whole body, contiguous (the model scan and every replay read it as one). One chunk is
    /// used as it is; several are copied once into a buffer of their total size.
    fn join(self) -> Bytes {
        match self {
            Body::Sized(v) => Bytes::from(v),
            Body::Chunks { mut chunks, len } => match chunks.len() {
                0 => Bytes::new(),
                1 => chunks.pop().unwrap_or_default(),
                _ => {
                    let mut all = Vec::with_capacity(len);
                    for c in &chunks {
                        all.extend_from_slice(c);
                    }
                    Bytes::from(all)
                }
            },
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
mod tests {
    use super::*;

    fn check(chunks: &[&str], expected: &str) {
        let mut body = Body::default();
        for c in chunks {
            body.push(Bytes::copy_from_slice(c.as_bytes()));
        }
        assert_eq!(body.len(), expected.len());
        assert_eq!(body.join(), expected.as_bytes(), "{chunks:?}");
    }

    #[test]
    fn chunks_join_into_the_body() {
        check(&[], "");
        check(&["{}"], "{}");
        check(&["{\"a\"", ":1", "}"], "{\"a\":1}");
        check(&["", "x", ""], "x");
        let mut sized = Body::Sized(Vec::with_capacity(4));
        sized.push(Bytes::from_static(b"ab"));
        sized.push(Bytes::from_static(b"cd"));
        assert_eq!(sized.len(), 4);
        assert_eq!(sized.join(), "abcd".as_bytes());
    }

    #[test]
    fn budget_is_shared_and_given_back() {
        let budget = Budget::new(100);
        let mut a = Held::default();
        let mut b = Held::default();
        assert!(a.grow(&budget, 60));
        assert!(!b.grow(&budget, 41));
        assert!(b.grow(&budget, 40));
        assert_eq!(budget.used(), 100);
        assert!(!a.grow(&budget, 1));
        drop(a);
        assert_eq!(budget.used(), 40);
        assert!(b.grow(&budget, 60));
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}
