//! The per-request context: all state one request carries between proxy phases. Each field says
//! which phase sets it and which phases read it.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::account_limits;
use crate::auth::KeyInfo;
use crate::body::Held;
use crate::lifecycle::InFlight;
use crate::limits;
use crate::meter::Finished;
use crate::spend;
use crate::tap::{ResponseTap, Stripper};
use crate::upstream::{Account, AccountType};

pub struct RequestCtx {
    /// UUIDv7, set in `new_ctx`; sent upstream and to the client as `x-request-id`, logged.
    pub request_id: String,
    /// Set in `new_ctx`; read by `logging` for the latency.
    pub started: Instant,
    /// The normalised request path (`path.rs`) when it differs from what the client sent; set
    /// first in `request_filter`; read by the permission check, routing, `forward` (the path sent
    /// upstream) and `logging`. `None` = the client's path was already normal.
    pub path: Option<String>,
    /// Set by the auth stage in `request_filter`; read by `forward` and `logging`.
    pub key: Option<Arc<KeyInfo>>,
    /// Account type chosen by route in `request_filter`; read by `forward`.
    pub kind: Option<AccountType>,
    /// The whole request body, read in `request_filter`; replayed by `forward` on every attempt.
    pub body: Bytes,
    /// `body`'s share of the gateway's body budget, taken by `body::read` in `request_filter`;
    /// given back when the context is dropped after `logging`.
    pub body_held: Held,
    /// The request's `model`, read from `body` in `request_filter`; checked against permissions.
    pub model: Option<String>,
    /// Ids of accounts tried so far; appended by `forward`, read by selection to skip them.
    pub tried: Vec<i64>,
    /// The account whose response reached the client; set by `forward`, read by `logging`.
    pub account: Option<Arc<Account>>,
    /// Status sent to the client (0 = none); set by whoever writes the response header.
    pub status: u16,
    /// Low-cardinality reason when the request did not end well; read by `logging`.
    pub error: Option<&'static str>,
    /// When the first upstream attempt started; set by `forward`, read by `logging` (upstream
    /// time vs tollgate's own overhead).
    pub upstream_started: Option<Instant>,
    /// Reads usage from the response body; set by `forward` when the response header is sent,
    /// fed each chunk by `forward`, taken by `logging` (through [`RequestCtx::finished`]).
    pub tap: Option<ResponseTap>,
    /// Set in `request_filter` when tollgate added `stream_options.include_usage`; `forward` runs
    /// SSE chunks through it to remove the usage-only chunk the client did not ask for.
    pub stripper: Stripper,
    /// The request's hold on its key's and user's rate limits: set by the limits stage in
    /// `request_filter` when a limit applies; its token estimate is settled by `logging`; its
    /// concurrency slots are given back when the context drops after `logging`, however the
    /// request ended (at once on this instance; through the `rate-limit-redis` task when limits
    /// are shared).
    pub limits: Option<limits::Admitted>,
    /// OpenAI's `x-ratelimit-*` headers for a limited key: set by the limits stage (admitted or
    /// refused); written into the client's response header by `forward` and by `error::respond`.
    pub rate_headers: Option<limits::Headers>,
    /// What the request took from the limits of the account it is on (`account_limits.rs`):
    /// set by `forward` when it picks an account that declares limits, dropped by `forward`
    /// before it picks another on a retry (so at most one account's slot is held), its token
    /// estimate settled by `logging`; its concurrency slot is given back when the context drops
    /// after `logging`, however the request ended. `None`: the account declares no limits.
    pub account_hold: Option<account_limits::Hold>,
    /// The request's reservations against its budgets and credit balance (`spend.rs`): set by
    /// the spend stage in `request_filter` when any apply; settled by `logging` with the usage
    /// record (the unused part goes back to this instance's leases, the record names the leases
    /// for the usage writer); dropped unsettled (no record), everything goes back. With
    /// `[spend] cut_streams`, `forward` has it cover a watched stream's output chunk by chunk
    /// (`SpendHold::cover`, then `SpendHold::extend` from a new lease); a stream it cannot
    /// cover is cut (`spend_cut`).
    pub spend: Option<spend::SpendHold>,
    /// Counts this request as in flight until the context is dropped after `logging`.
    _in_flight: InFlight,
}

impl RequestCtx {
    /// The path every stage checks and the upstream gets: normalised, else the client's.
    pub fn path<'a>(&'a self, client: &'a str) -> &'a str {
        self.path.as_deref().unwrap_or(client)
    }

    pub fn new(in_flight: InFlight) -> RequestCtx {
        let mut buf = uuid::Uuid::encode_buffer();
        let request_id = uuid::Uuid::now_v7()
            .hyphenated()
            .encode_lower(&mut buf)
            .to_string();
        RequestCtx {
            request_id,
            started: Instant::now(),
            path: None,
            key: None,
            kind: None,
            body: Bytes::new(),
            body_held: Held::default(),
            model: None,
            tried: Vec::new(),
            account: None,
            status: 0,
            error: None,
            upstream_started: None,
            tap: None,
            stripper: None,
            limits: None,
            rate_headers: None,
            spend: None,
            account_hold: None,
            _in_flight: in_flight,
        }
    }

    /// What `meter` needs to build the usage record, taking the tap; `None` when no key was
    /// authenticated (there is nobody to bill; such refusals are counted in metrics only).
    /// Called once, by `logging`.
    /// `path` is the client's; the normalised one is used when there is one.
    pub fn finished<'a>(&'a mut self, method: &'a str, path: &'a str) -> Option<Finished<'a>> {
        let key = self.key.as_ref()?;
        let tap = self.tap.take();
        Some(Finished {
            request_id: &self.request_id,
            user_id: key.user_id,
            api_key_id: key.id,
            account_id: self.account.as_ref().map(|a| a.id),
            kind: self.kind.unwrap_or(AccountType::Generic),
            method,
            path: self.path.as_deref().unwrap_or(path),
            requested_model: self.model.as_deref(),
            body: &self.body,
            status: self.status,
            error: self.error,
            elapsed: self.started.elapsed(),
            served: tap.is_some(),
            tap,
            spend_cut: self.spend.as_ref().and_then(spend::SpendHold::cut_output),
        })
    }
}
