//! The upstream leg: sends the buffered request to the selected account, retries on the next
//! account while nothing has reached the client, and streams the response back chunk by chunk.
//!
//! tollgate drives pingora's connector itself instead of pingora's built-in proxy loop because
//! that loop can replay at most 64 KiB of request body on retry; here the whole (size-limited)
//! body is kept in the request context and replayed on every attempt.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;

use crate::account_limits;
use crate::ctx::RequestCtx;
use crate::error::GatewayError;
use crate::limits::{self, Refusal};
use crate::pool::{hold_writes, UpstreamPool};
use crate::tap::ResponseTap;
use crate::upstream::{parse_retry_after, Account, AccountSet, AccountType, ErrorKind};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the client's
/// credentials, which never leave tollgate.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];
const CLIENT_CREDENTIALS: &[&str] = &["authorization", "x-api-key", "proxy-authorization"];

/// Names to drop from a forwarded message: the fixed hop-by-hop set, any header listed in
/// `Connection`, and (`request == true`) the client's credentials.
pub fn headers_to_drop(headers: &http::HeaderMap, request: bool) -> Vec<HeaderName> {
    let mut drop: Vec<HeaderName> = HOP_BY_HOP
        .iter()
        .chain(if request { CLIENT_CREDENTIALS } else { &[] })
        .filter(|n| headers.contains_key(**n))
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect();
    for v in headers.get_all(http::header::CONNECTION) {
        for name in v.to_str().unwrap_or("").split(',') {
            if let Ok(n) = HeaderName::from_bytes(name.trim().to_ascii_lowercase().as_bytes()) {
                if headers.contains_key(&n) && !drop.contains(&n) {
                    drop.push(n);
                }
            }
        }
    }
    drop
}

/// Largest request body sent in the same write as its header (larger ones are not copied).
const COALESCE_MAX_BODY: usize = 64 * 1024;

/// How long, and how far, the upstream is still read after the client left mid-response.
#[derive(Debug, Clone, Copy)]
pub struct AbortDrain {
    pub time: Duration,
    pub bytes: u64,
}

pub struct Forwarder {
    pool: UpstreamPool,
    /// Cap on a JSON response body held for usage extraction.
    json_cap: usize,
    abort_drain: AbortDrain,
    max_attempts: usize,
    read_timeout: Duration,
    anthropic_version: HeaderValue,
    /// `[limits] default_max_tokens`: the completion assumed for an account's token estimate.
    default_max_tokens: std::num::NonZeroU64,
}

/// Why one attempt did not produce the client's response.
enum AttemptFailure {
    /// Nothing reached the client: try another account. `cooldown` says whether this account
    /// should be skipped for a while (a stale pooled connection is not the account's fault).
    Retry {
        reason: String,
        kind: ErrorKind,
        cooldown: bool,
        retry_after: Option<Duration>,
    },
    /// The response had started; the request ends here with what was sent.
    Committed(&'static str),
}

impl Forwarder {
    pub fn new(
        pool: UpstreamPool,
        max_attempts: usize,
        read_timeout: Duration,
        anthropic_version: HeaderValue,
        json_cap: usize,
        abort_drain: AbortDrain,
        default_max_tokens: std::num::NonZeroU64,
    ) -> Forwarder {
        Forwarder {
            pool,
            json_cap,
            abort_drain,
            max_attempts,
            read_timeout,
            anthropic_version,
            default_max_tokens,
        }
    }

    /// Serves the request from the first account that answers. On `Err` nothing has been sent to
    /// the client and the caller writes the error response.
    pub async fn forward(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        accounts: &AccountSet,
    ) -> Result<(), GatewayError> {
        let Some(kind) = ctx.kind else {
            return Err(GatewayError::NoRoute);
        };
        let mut last_failure: Option<String> = None;
        let mut saturated: Option<account_limits::Saturated> = None;
        // The token estimate only when an account of this type declares a token limit.
        let estimate = if accounts.wants_estimate(kind) {
            limits::estimate_tokens(&ctx.body, self.default_max_tokens)
        } else {
            0
        };
        ctx.upstream_started = Some(Instant::now());
        while ctx.tried.len() < self.max_attempts {
            // At most one account's slot at a time: the last attempt's goes back first (its
            // token estimate refunded: a failed attempt used none).
            if let Some(mut hold) = ctx.account_hold.take() {
                hold.settle(accounts.now_ns(), 0);
            }
            let account = match accounts.take(kind, &ctx.tried, accounts.now_ns(), estimate) {
                Ok((account, hold)) => {
                    ctx.account_hold = hold;
                    account
                }
                Err(s) => {
                    saturated = s;
                    break;
                }
            };
            ctx.tried.push(account.id);
            account.stats.attempts.fetch_add(1, Ordering::Relaxed);
            let may_retry =
                ctx.tried.len() < self.max_attempts && accounts.has_eligible(kind, &ctx.tried);
            match self
                .attempt(session, ctx, accounts, &account, may_retry)
                .await
            {
                Ok(success) => {
                    if success {
                        account.stats.successes.fetch_add(1, Ordering::Relaxed);
                    } else {
                        account.stats.record_error(ErrorKind::Status);
                    }
                    ctx.account = Some(account);
                    return Ok(());
                }
                Err(AttemptFailure::Committed(reason)) => {
                    // A client that goes away is not the account's fault.
                    if reason == "upstream_aborted" {
                        account.stats.record_error(ErrorKind::Aborted);
                    }
                    ctx.error = Some(reason);
                    ctx.account = Some(account);
                    return Ok(());
                }
                Err(AttemptFailure::Retry {
                    reason,
                    kind,
                    cooldown,
                    retry_after,
                }) => {
                    account.stats.record_error(kind);
                    if cooldown {
                        accounts.cool_down(&account, retry_after);
                    }
                    tracing::warn!(request_id = %ctx.request_id, account = %account.name, %reason, "upstream attempt failed");
                    last_failure = Some(format!("{}: {reason}", account.name));
                }
            }
        }
        if let (None, Some(s)) = (&last_failure, saturated) {
            // Never sent anywhere: every account is at its limits.
            ctx.upstream_started = None;
            return Err(GatewayError::RateLimited(refusal(s, estimate)));
        }
        Err(match last_failure {
            None => GatewayError::NoAccount,
            Some(last) => GatewayError::UpstreamFailed {
                attempts: ctx.tried.len(),
                last,
            },
        })
    }

    /// One try against one account. `Ok(true)` = a 2xx/3xx/4xx response was streamed, `Ok(false)`
    /// = an upstream error status was passed through because no other account could take it.
    async fn attempt(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        accounts: &AccountSet,
        account: &Account,
        may_retry: bool,
    ) -> Result<bool, AttemptFailure> {
        let retry = |reason: String, kind: ErrorKind, cooldown: bool| AttemptFailure::Retry {
            reason,
            kind,
            cooldown,
            retry_after: None,
        };
        let kind_of = |e: &pingora::Error| match e.etype() {
            pingora::ErrorType::ConnectTimedout
            | pingora::ErrorType::ReadTimedout
            | pingora::ErrorType::WriteTimedout => ErrorKind::Timeout,
            _ => ErrorKind::Connect,
        };
        let request = self
            .upstream_request(session, ctx, account)
            .map_err(|e| retry(format!("building request: {e}"), ErrorKind::Connect, false))?;
        let (mut client, reused) = self.pool.session(&account.peer).await.map_err(|e| {
            retry(
                format!("connect: {}", e.etype().as_str()),
                kind_of(&e),
                true,
            )
        })?;
        client.set_read_timeout(Some(self.read_timeout));
        client.set_write_timeout(Some(self.read_timeout));

        // A pooled connection the upstream already closed fails on first use: not the account's fault.
        let send = async {
            // Header and (small) body leave in one write instead of two.
            hold_writes(&client, ctx.body.len() <= COALESCE_MAX_BODY);
            client.write_request_header(Box::new(request)).await?;
            if !ctx.body.is_empty() {
                client.write_request_body(ctx.body.clone(), true).await?;
            }
            hold_writes(&client, false);
            client.finish_request_body().await?;
            client.read_response_header().await
        };
        if let Err(e) = send.await {
            client.shutdown().await;
            return Err(retry(e.etype().as_str().to_string(), kind_of(&e), !reused));
        }
        let Some(upstream) = client.response_header() else {
            return Err(retry("no response header".into(), ErrorKind::Connect, true));
        };
        let status = upstream.status.as_u16();
        // What the provider says of its limits: none left marks the account out until its reset
        // (a 429 too: the account is at its limit, not failing, so no cooldown).
        accounts.report(
            account,
            account_limits::feedback(
                &upstream.headers,
                status,
                chrono::Utc::now().timestamp_millis(),
                accounts.default_cooldown(),
            ),
        );
        let failed = status >= 500 || status == 429;
        if failed && may_retry {
            let retry_after = parse_retry_after(upstream.headers.get(http::header::RETRY_AFTER));
            client.shutdown().await;
            return Err(AttemptFailure::Retry {
                reason: format!("status {status}"),
                kind: ErrorKind::Status,
                cooldown: status != 429,
                retry_after,
            });
        }
        let content_type = upstream
            .headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.as_bytes());
        let mut tap = ResponseTap::for_response(content_type, account.kind, self.json_cap);
        let strip = matches!(tap, ResponseTap::Sse(_)) && ctx.stripper.is_some();
        // `[spend] cut_streams`: a stream of a request without an output cap is measured as it
        // goes (one `bool` per chunk otherwise).
        let watch = ctx.spend.as_ref().is_some_and(|h| h.watches()) && tap.count_output();
        let response = self.client_response(upstream, ctx, strip);
        ctx.status = status;
        if session
            .write_response_header(Box::new(response), false)
            .await
            .is_err()
        {
            self.drain_after_abort(&mut client, &mut tap).await;
            ctx.tap = Some(tap);
            client.shutdown().await;
            return Err(AttemptFailure::Committed("client_aborted"));
        }
        let outcome = loop {
            match client.read_response_body().await {
                Ok(Some(chunk)) => {
                    tap.feed(&chunk);
                    // Past what the reservation covers and no extension fits, not even from
                    // a new lease: this chunk is not sent, and the stream ends as an upstream
                    // failure ends it.
                    if let Some(hold) = ctx.spend.as_mut().filter(|_| watch) {
                        let seen = tap.output_bound().unwrap_or(0);
                        if !hold.cover(seen) && !hold.extend(seen).await {
                            break Err("spend_cut");
                        }
                    }
                    let out = match ctx.stripper.as_mut().filter(|_| strip) {
                        Some(s) => {
                            let mut buf = Vec::with_capacity(chunk.len());
                            s.feed(&chunk, &mut buf);
                            Bytes::from(buf)
                        }
                        None => chunk,
                    };
                    if !out.is_empty()
                        && session.write_response_body(Some(out), false).await.is_err()
                    {
                        self.drain_after_abort(&mut client, &mut tap).await;
                        break Err("client_aborted");
                    }
                }
                Ok(None) => break Ok(()),
                Err(_) => break Err("upstream_aborted"),
            }
        };
        ctx.tap = Some(tap);
        if let Err(reason) = outcome {
            client.shutdown().await;
            // Close the client connection as it is: no terminating chunk, so the client can tell
            // the body is incomplete (pingora would otherwise finish it cleanly).
            session.set_keepalive(None);
            session.as_downstream_mut().shutdown().await;
            return Err(AttemptFailure::Committed(reason));
        }
        if let Some(s) = ctx.stripper.as_mut().filter(|_| strip) {
            let mut rest = Vec::new();
            s.finish(&mut rest);
            if !rest.is_empty()
                && session
                    .write_response_body(Some(rest.into()), false)
                    .await
                    .is_err()
            {
                client.shutdown().await;
                return Err(AttemptFailure::Committed("client_aborted"));
            }
        }
        if session.write_response_body(None, true).await.is_err() {
            client.shutdown().await;
            return Err(AttemptFailure::Committed("client_aborted"));
        }
        if client.response_done() {
            self.pool.release(client, &account.peer).await;
        }
        Ok(!failed)
    }

    /// The client left mid-response, but the upstream goes on generating (and billing) what was
    /// asked: keep reading it into the tap, without sending anything, so its usage report is
    /// seen; within `[metering] abort_drain_secs` and `abort_drain_bytes`. What the tap holds
    /// when the upstream ends or a bound is hit is what gets recorded (`meter.rs` marks it).
    async fn drain_after_abort(
        &self,
        client: &mut pingora::protocols::http::client::HttpSession,
        tap: &mut ResponseTap,
    ) {
        if matches!(tap, ResponseTap::Opaque) {
            return;
        }
        let deadline = tokio::time::Instant::now() + self.abort_drain.time;
        let mut read = 0u64;
        while read < self.abort_drain.bytes {
            match tokio::time::timeout_at(deadline, client.read_response_body()).await {
                Ok(Ok(Some(chunk))) => {
                    read += chunk.len() as u64;
                    tap.feed(&chunk);
                }
                _ => break,
            }
        }
    }

    /// The request as the upstream sees it: the client's, minus hop-by-hop headers and the client's
    /// key, plus the account's credential, `Host`, forwarding headers and the request id.
    fn upstream_request(
        &self,
        session: &Session,
        ctx: &RequestCtx,
        account: &Account,
    ) -> pingora::Result<RequestHeader> {
        let mut req = session.req_header().clone();
        for name in headers_to_drop(&req.headers, true) {
            req.remove_header(&name);
        }
        // What was checked is what the upstream gets: the normalised path, the client's query.
        let normalised = ctx.path.as_deref().map(|p| match req.uri.query() {
            Some(q) => format!("{p}?{q}"),
            None => p.to_string(),
        });
        if normalised.is_some() || !account.endpoint.base_path.is_empty() {
            let pq = match &normalised {
                Some(pq) => pq.as_str(),
                None => req.uri.path_and_query().map_or("/", |p| p.as_str()),
            };
            let joined = format!("{}{}", account.endpoint.base_path, pq);
            req.set_uri(http::Uri::try_from(joined).map_err(|e| {
                pingora::Error::because(
                    pingora::ErrorType::InvalidHTTPHeader,
                    "joining base path",
                    e,
                )
            })?);
        }
        // Usage is read from the response body, so it must arrive uncompressed.
        req.remove_header(&http::header::ACCEPT_ENCODING);
        req.insert_header(http::header::HOST, account.host_header.clone())?;
        req.insert_header(account.auth_header.clone(), account.auth_value.clone())?;
        if account.kind == AccountType::Anthropic && !req.headers.contains_key("anthropic-version")
        {
            req.insert_header("anthropic-version", self.anthropic_version.clone())?;
        }
        let client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_string());
        if let Some(ip) = client_ip {
            let xff = match req
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
            {
                Some(prev) => format!("{prev}, {ip}"),
                None => ip,
            };
            req.insert_header("x-forwarded-for", xff)?;
        }
        req.insert_header("x-forwarded-proto", "http")?;
        req.insert_header("x-request-id", ctx.request_id.as_str())?;
        if ctx.body.is_empty()
            && !matches!(
                req.method,
                http::Method::POST | http::Method::PUT | http::Method::PATCH
            )
        {
            req.remove_header(&http::header::CONTENT_LENGTH);
        } else {
            req.insert_header(http::header::CONTENT_LENGTH, ctx.body.len())?;
        }
        Ok(req)
    }

    /// The response as the client sees it: the upstream's, with connection-scoped headers replaced
    /// and `x-request-id` (and a limited key's `x-ratelimit-*`) added. Framing is kept (chunked stays chunked) so streams pass through.
    fn client_response(
        &self,
        upstream: &ResponseHeader,
        ctx: &RequestCtx,
        rewrites_body: bool,
    ) -> ResponseHeader {
        let mut resp = upstream.clone();
        let chunked = resp
            .headers
            .get(http::header::TRANSFER_ENCODING)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        for name in headers_to_drop(&resp.headers, false) {
            resp.remove_header(&name);
        }
        if rewrites_body {
            resp.remove_header(&http::header::CONTENT_LENGTH);
        }
        let no_body = matches!(resp.status.as_u16(), 100..=199 | 204 | 304);
        if chunked || (!no_body && !resp.headers.contains_key(http::header::CONTENT_LENGTH)) {
            let _ = resp.insert_header(http::header::TRANSFER_ENCODING, "chunked");
        }
        let _ = resp.insert_header("x-request-id", ctx.request_id.as_str());
        // A limited key's own limits, in place of any the upstream reported for the account.
        if let Some(h) = &ctx.rate_headers {
            h.each(|name, value| {
                let _ = resp.insert_header(name, value);
            });
        }
        resp
    }
}

/// The refusal answered when every account is at its limits: the one free soonest.
fn refusal(s: account_limits::Saturated, estimate: u64) -> Refusal {
    let (kind, per, requested) = match s.kind {
        account_limits::Kind::Requests => (limits::Kind::Requests, "per minute (RPM)", 1),
        account_limits::Kind::Tokens => (limits::Kind::Tokens, "per minute (TPM)", estimate),
        account_limits::Kind::Concurrency => (limits::Kind::Concurrency, "", 1),
    };
    Refusal {
        scope: limits::Scope::Account,
        kind,
        // The provider's own report: no declared limit to name.
        per: if s.limit == 0 && !per.is_empty() {
            "as reported by the provider"
        } else {
            per
        },
        limit: s.limit,
        requested,
        retry_after: s.retry_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(headers: &[(&str, &str)], request: bool, expected: &[&str]) {
        let mut map = http::HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let got: Vec<String> = headers_to_drop(&map, request)
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(got, expected, "{headers:?}");
    }

    #[test]
    fn hop_by_hop_and_credentials() {
        check(&[("content-type", "application/json")], true, &[]);
        check(
            &[
                ("connection", "keep-alive, x-secret"),
                ("x-secret", "1"),
                ("keep-alive", "timeout=5"),
                ("authorization", "Bearer tg_"),
            ],
            true,
            &["connection", "keep-alive", "authorization", "x-secret"],
        );
        check(
            &[("x-api-key", "k"), ("te", "trailers")],
            true,
            &["te", "x-api-key"],
        );
        // Responses keep any authorization-like header the upstream chose to send.
        check(
            &[("x-api-key", "k"), ("transfer-encoding", "chunked")],
            false,
            &["transfer-encoding"],
        );
    }
}
