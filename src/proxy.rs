//! The pingora `ProxyHttp` implementation: the request path as a table of contents. Each phase
//! calls one stage; the stages live in their own modules.
//!
//! | phase            | stage                                                      |
//! |------------------|------------------------------------------------------------|
//! | (accept)         | [`conn`]: connection cap; header deadline and byte budget while it arrives |
//! | `new_ctx`        | [`RequestCtx::new`]: request id, start time, in-flight guard |
//! | `request_filter` | [`header`] (limits, bare line feeds, framing) → [`path`](crate::path) (normalise) → [`auth`](crate::auth) under [`address_limits`](crate::address_limits) (failed authentications per client address; refusal = 429 before the lookup) → path permission → [`route`](crate::route) → [`body`](crate::body) → model permission → [`request`](crate::request) (`include_usage`) → [`limits`] (rate limits; refusal = 429) → [`spend`](crate::spend) (budgets and credits reserved; refusal = 429 `insufficient_quota` / `budget_exceeded`) → [`forward`](crate::forward) (account selection skips accounts at their limits, `account_limits`; all at them = 429) |
//! | `logging`        | [`conn::request_done`]; [`RequestCtx::finished`] → [`meter::record`] → [`spend::SpendHold::settle`](crate::spend::SpendHold::settle) → [`limits::Admitted::settle`] and [`account_limits::Hold::settle`](crate::account_limits::Hold::settle) → [`UsageSink::submit`]; metrics; one structured log line |
//!
//! `request_filter` always answers the request itself (it returns `true`), so pingora's own
//! upstream phases never run; see `forward.rs` for why.

use std::borrow::Cow;
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::prelude::*;
use pingora::protocols::http::ServerSession;

use crate::accounts::OnDemand;
use crate::address_limits::AddressLimiter;
use crate::auth::{AuthError, KeyCache};
use crate::body;
use crate::conn;
use crate::ctx::RequestCtx;
use crate::error::{ErrorShape, GatewayError};
use crate::forward::Forwarder;
use crate::header;
use crate::lifecycle::Drain;
use crate::limits::{self, Denied, Limiter};
use crate::meter;
use crate::metrics::Metrics;
use crate::path;
use crate::pricing::Pricing;
use crate::request;
use crate::route::Router;
use crate::spend::Spend;
use crate::sse::UsageChunkStripper;
use crate::upstream::{AccountSet, AccountType};
use crate::writer::UsageSink;

/// Longest a request waits for an on-demand account reload.
const ON_DEMAND_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Everything the request path shares; built once at start.
pub struct Gateway {
    pub keys: Arc<KeyCache>,
    /// Swapped whole by the account refresher; requests hold the set they started with.
    pub accounts: Arc<ArcSwap<AccountSet>>,
    pub router: Arc<ArcSwap<Router>>,
    pub forwarder: Forwarder,
    pub max_body_bytes: usize,
    /// Request bodies in memory across all requests (`[server] max_buffered_body_bytes`).
    pub body_budget: Arc<body::Budget>,
    /// `[server] max_header_bytes` / `max_headers`: above either, 431 and close.
    pub header_limits: header::Limits,
    pub idle_timeout_secs: u64,
    /// Longest wait on one read from or write to the client.
    pub client_timeout: std::time::Duration,
    pub drain: Arc<Drain>,
    /// Where each request's usage record goes (never blocks).
    pub usage: UsageSink,
    /// Swapped whole by a config reload, as is `router`.
    pub pricing: Arc<ArcSwap<Pricing>>,
    pub metrics: Arc<Metrics>,
    /// Reloads accounts at once when a request finds none of its type (see `accounts::OnDemand`).
    pub accounts_on_demand: Arc<OnDemand>,
    /// Add `stream_options.include_usage` to OpenAI streams that lack it, on the endpoints that
    /// define it (`request::defines_include_usage`).
    pub inject_stream_usage: bool,
    /// Rate limits of keys and users on this instance (`[limits]` and the database's).
    pub limiter: Limiter,
    /// Failed authentications per client address (`[auth] failures_per_minute_per_address`).
    pub address_limits: AddressLimiter,
    /// Budgets and credits: reservations from this instance's leases (`[spend]`).
    pub spend: Arc<Spend>,
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new(self.drain.enter())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // pingora turns keep-alive off where the client asked (`Connection: close`) or framing is
        // not to be trusted (RFC 9112 §6.1: both Content-Length and Transfer-Encoding; it drops the
        // Content-Length): it stays off, so such a connection closes after its response.
        if session.as_downstream().get_keepalive().is_some() {
            session.set_keepalive(Some(self.idle_timeout_secs));
        }
        // Pipelined requests (RFC 9112 §9.3.2) are served one after the other, in order; without
        // this pingora closes the connection after the first and drops the rest unanswered.
        if let ServerSession::H1(h1) = session.as_downstream_mut() {
            h1.set_pipelining_enabled(true);
        }
        conn::header_received(session.as_downstream().stream());
        // A client that stalls mid-request or stops reading is cut off rather than held forever.
        session.set_read_timeout(Some(self.client_timeout));
        session.set_write_timeout(Some(self.client_timeout));
        if let Err((error, close)) = self.serve(session, ctx).await {
            let close = close || !body::drain(session, self.max_body_bytes).await;
            ctx.status = error.status();
            ctx.error = Some(error.label());
            // Refusals before routing still answer in the shape of the path's route family.
            let family = ctx
                .kind
                .or_else(|| self.router.load().route(session.req_header().uri.path()));
            let shape = ErrorShape::of(family);
            error
                .respond(
                    session,
                    &ctx.request_id,
                    close,
                    shape,
                    ctx.rate_headers.as_ref(),
                )
                .await?;
            if close
                && matches!(
                    error,
                    GatewayError::BodyTooLarge { .. } | GatewayError::BodyBudget
                )
            {
                body::linger(session).await;
            }
        }
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        // Unreachable: request_filter answers every request.
        Err(Error::explain(
            InternalError,
            "tollgate forwards in request_filter",
        ))
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        conn::request_done(session.as_downstream().stream());
        let req = session.req_header();
        if let Some(done) = ctx.finished(req.method.as_str(), req.uri.path()) {
            let kind = done.kind;
            let pricing = self.pricing.load();
            let (mut record, priced) = meter::record(done, &pricing, chrono::Utc::now());
            if let Some(hold) = ctx.spend.as_mut() {
                hold.settle(&mut record);
            }
            if let Some(held) = ctx.limits.as_mut() {
                let used = record
                    .prompt_tokens
                    .saturating_add(record.completion_tokens);
                held.settle(self.limiter.now_ns(), u64::try_from(used).unwrap_or(0));
            }
            if let Some(hold) = ctx.account_hold.as_mut() {
                let used = record
                    .prompt_tokens
                    .saturating_add(record.completion_tokens);
                hold.settle(
                    self.accounts.load().now_ns(),
                    u64::try_from(used).unwrap_or(0),
                );
            }
            if record.tokens_used > 0 {
                self.metrics.usage(kind, &record, priced.counter);
            }
            self.usage.submit(record);
        }
        if matches!(ctx.status, 401 | 403) {
            if let Some(reason) = ctx.error {
                self.metrics.auth_failure(reason);
            }
        }
        let total = ctx.started.elapsed().as_secs_f64();
        let upstream = ctx.upstream_started.map(|t| t.elapsed().as_secs_f64());
        let served_by = ctx.account.as_ref().map(|a| a.kind);
        self.metrics.request(ctx.status, served_by, total, upstream);
        let latency_ms = total * 1e3;
        tracing::info!(
            request_id = %ctx.request_id,
            method = %session.req_header().method,
            key_id = ctx.key.as_ref().map_or(0, |k| k.id),
            account = ctx.account.as_ref().map_or("-", |a| &a.name),
            attempts = ctx.tried.len(),
            status = ctx.status,
            error = ctx.error.unwrap_or("-"),
            latency_ms,
            "request"
        );
    }
}

impl Gateway {
    /// The stages in order. `Err` carries what to answer and whether to close the connection.
    async fn serve(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> std::result::Result<(), (GatewayError, bool)> {
        let raw = match session.as_downstream() {
            ServerSession::H1(h1) => Some(h1.get_headers_raw_bytes()),
            _ => None,
        };
        header::check(
            &session.req_header().headers,
            raw.as_deref(),
            self.header_limits,
        )
        .map_err(|e| (e, true))?;
        if let Cow::Owned(normal) =
            path::normalize(session.req_header().uri.path()).map_err(|e| (e.into(), false))?
        {
            ctx.path = Some(normal);
        }
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let key = self
            .address_limits
            .authenticate(&self.keys, &session.req_header().headers, peer)
            .await
            .map_err(|e| {
                if let GatewayError::RateLimited(r) = &e {
                    self.metrics.rate_limited(r.scope, r.kind);
                }
                (e, false)
            })?;
        ctx.key = Some(key.clone());

        let path = ctx.path(session.req_header().uri.path());
        if !key.permissions.allows_path(path) {
            return Err((AuthError::Forbidden(format!("path {path}")).into(), false));
        }
        ctx.kind = Some(
            self.router
                .load()
                .route(path)
                .ok_or((GatewayError::NoRoute, false))?,
        );

        (ctx.body, ctx.body_held) = body::read(session, self.max_body_bytes, &self.body_budget)
            .await
            .map_err(|e| (e.error, e.close))?;
        if key.permissions.restricts_models() {
            ctx.model = request::model(&ctx.body);
            if !key.permissions.allows_model(ctx.model.as_deref()) {
                let what = ctx
                    .model
                    .as_deref()
                    .map_or("a request without a model".to_string(), |m| {
                        format!("model {m}")
                    });
                return Err((AuthError::Forbidden(what).into(), false));
            }
        }

        if self.inject_stream_usage
            && ctx.kind == Some(AccountType::Openai)
            && request::defines_include_usage(ctx.path(session.req_header().uri.path()))
        {
            if let Some(body) = request::inject_include_usage(&ctx.body) {
                ctx.body = body.into();
                ctx.stripper = Some(UsageChunkStripper::new());
            }
        }

        let caller = limits::Caller {
            key_id: key.id,
            user_id: key.user_id,
            key: key.key_limits,
            user: key.user_limits,
            entries: &key.limit_entries,
        };
        match self
            .limiter
            .admit(&caller, &ctx.body, &ctx.request_id)
            .await
        {
            Ok(None) => {}
            Ok(Some(admitted)) => {
                ctx.rate_headers = Some(admitted.headers);
                ctx.limits = Some(admitted);
            }
            Err(Denied::Limited(refused)) => {
                ctx.rate_headers = Some(refused.headers);
                let r = refused.refusal;
                self.metrics.rate_limited(r.scope, r.kind);
                return Err((GatewayError::RateLimited(r), false));
            }
            Err(Denied::Unavailable) => return Err((GatewayError::LimitsUnavailable, false)),
        }

        if let Some(policy) = key.spend.as_deref() {
            let pricing = self.pricing.load();
            let admitted = self
                .spend
                .admit_request(policy, &ctx.body, ctx.kind, &pricing)
                .await;
            match admitted {
                Ok(hold) => ctx.spend = Some(hold),
                Err(refusal) => {
                    let retry_after = refusal.retry_after(self.spend.now());
                    return Err((
                        GatewayError::Spend {
                            refusal,
                            retry_after,
                        },
                        false,
                    ));
                }
            }
        }

        let mut accounts = self.accounts.load_full();
        // No account of this type at all: maybe one was added a moment ago.
        if ctx.kind.is_some_and(|k| !accounts.serves(k))
            && self.accounts_on_demand.reload(ON_DEMAND_WAIT).await
        {
            accounts = self.accounts.load_full();
        }
        self.forwarder
            .forward(session, ctx, &accounts)
            .await
            .map_err(|e| {
                // Every account of the route at its limits (`account_limits.rs`).
                if let GatewayError::RateLimited(r) = &e {
                    self.metrics.rate_limited(r.scope, r.kind);
                }
                (e, false)
            })
    }
}
