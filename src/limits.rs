//! The rate-limit stage: requests per minute and per day, tokens (input + output) per minute and
//! requests in flight, for a key and for its user (all of the user's keys together), decided on
//! this instance. Admission runs once per request in `request_filter` after the body is read and
//! before an account is picked (a refusal never reaches an upstream); the token buckets are
//! settled in `logging` with the usage record's actual tokens, as OpenAI does.
//!
//! - **Which limits apply**: a key's own (`api_keys.rpm` …) where set, else `[limits]`; a user's
//!   from the `users` row (none when unset); 0 = no limit.
//! - **Arithmetic**: GCRA (`gcra.rs`), one atomic per limit. A request takes one unit of each
//!   request limit and its token estimate — the body's bytes / 4 plus its `max_tokens`
//!   (`max_completion_tokens`, `max_output_tokens`), or `[limits] default_max_tokens` when it
//!   names none — capped at the limit itself (a request larger than the whole limit waits for a
//!   full bucket rather than never passing). When any limit refuses, what the request took from
//!   the others is given back and the refusal with the longest wait is answered.
//! - **Concurrency**: a counter per key/user; the slot is held by [`Admitted`] in the request's
//!   context and given back when it drops, whatever way the request ended.
//! - **State**: one [`Buckets`] per key and per user with a limit, made on first use (one
//!   allocation per key, none per request) in a sharded map whose shard lock is held only for the
//!   lookup; the cached key keeps what it found ([`Entries`]), so its later requests skip the map.
//!   Entries are not swept: they are bounded by the keys and users that exist (≈ 100 bytes
//!   each), and dropping one would forget its use. So they are never freed, and a request holds
//!   them by reference (no reference count).
//! - **Many instances**: with `[limits] redis_url`, the same limits are checked in Redis instead
//!   (`shared_limits.rs`: one atomic script per admission, all of a request's limits taken or
//!   none) and shared by every instance using that Redis and key prefix. While Redis cannot be
//!   reached `[limits] fail` applies: `local` checks here with each limit divided by the instances
//!   last seen, `closed` refuses (503). Without Redis, limits are per instance: exact on one.

use std::fmt;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::gcra::{Decision, Gcra, Rate};
use crate::shared_limits::{Redis, Slot, SlotReply};

/// Largest rate limit (requests or tokens per minute or day) that can be set, here or on a key or
/// user: far above any real use, far below where the arithmetic could overflow.
pub const MAX_RATE: u64 = 1_000_000_000;
/// Largest concurrency limit that can be set.
pub const MAX_CONCURRENT: u64 = 1_000_000;

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);
/// What a refusal for concurrency tells the client to wait: a slot comes back when a request
/// ends, which cannot be known in advance.
const CONCURRENCY_RETRY: Duration = Duration::from_secs(1);

/// One scope's limits; 0 = no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub rpm: u64,
    pub rpd: u64,
    pub tpm: u64,
    pub max_concurrent: u64,
}

impl Limits {
    pub fn is_none(&self) -> bool {
        *self == Limits::default()
    }

    /// This instance's share when `instances` enforce the limits apart: each limit divided by
    /// them (rounded down), at least 1.
    pub fn share(self, instances: u64) -> Limits {
        let part = |v: u64| {
            if v == 0 {
                0
            } else {
                (v / instances.max(1)).max(1)
            }
        };
        Limits {
            rpm: part(self.rpm),
            rpd: part(self.rpd),
            tpm: part(self.tpm),
            max_concurrent: part(self.max_concurrent),
        }
    }

    /// Each of `own` where set, else `default`'s.
    pub fn resolve(own: Overrides, default: Limits) -> Limits {
        Limits {
            rpm: own.rpm.unwrap_or(default.rpm),
            rpd: own.rpd.unwrap_or(default.rpd),
            tpm: own.tpm.unwrap_or(default.tpm),
            max_concurrent: own.max_concurrent.unwrap_or(default.max_concurrent),
        }
    }
}

/// Limits as stored on a key or a user: `None` = the default, `Some(0)` = no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Overrides {
    pub rpm: Option<u64>,
    pub rpd: Option<u64>,
    pub tpm: Option<u64>,
    pub max_concurrent: Option<u64>,
}

/// `[limits]`: what applies to a key without its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Defaults {
    pub key: Limits,
    /// The completion a request without `max_tokens` is assumed to ask for.
    pub default_max_tokens: NonZeroU64,
}

/// Whose limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Key,
    User,
    /// A client address's failed authentications (`address_limits.rs`).
    Address,
    /// Every upstream account of the route at its limits (`account_limits.rs`).
    Account,
}

/// What was counted: `Requests` covers per-minute and per-day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Requests,
    Tokens,
    Concurrency,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Key, Scope::User, Scope::Address, Scope::Account];

    pub fn label(self) -> &'static str {
        match self {
            Scope::Key => "key",
            Scope::User => "user",
            Scope::Address => "address",
            Scope::Account => "account",
        }
    }

    fn phrase(self) -> &'static str {
        match self {
            Scope::Key => "this API key",
            Scope::User => "this API key's user (all of their keys together)",
            Scope::Address => "failed authentications from this client address",
            Scope::Account => "every upstream account that serves this request",
        }
    }
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Requests, Kind::Tokens, Kind::Concurrency];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Requests => "requests",
            Kind::Tokens => "tokens",
            Kind::Concurrency => "concurrency",
        }
    }
}

/// Which limit refused a request, and how long to wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub scope: Scope,
    pub kind: Kind,
    /// `per minute`, `per day` or (concurrency) empty.
    pub per: &'static str,
    pub limit: u64,
    /// Units asked for (1 request, the token estimate).
    pub requested: u64,
    pub retry_after: Duration,
}

impl Refusal {
    /// `Retry-After`: whole seconds, rounded up, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        let d = self.retry_after;
        (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on = self.scope.phrase();
        let wait = format_reset(self.retry_after);
        match self.kind {
            // No limit of tollgate's refused: the upstream said it has none left.
            Kind::Requests | Kind::Tokens if self.limit == 0 => write!(
                f,
                "Rate limit reached for {} on {on}, {}. Please try again in {wait}.",
                self.kind.label(),
                self.per
            ),
            Kind::Concurrency => write!(
                f,
                "Too many concurrent requests on {on}: limit {}. Please try again in {wait}.",
                self.limit
            ),
            Kind::Requests => write!(
                f,
                "Rate limit reached for requests {} on {on}: limit {}. Please try again in {wait}.",
                self.per, self.limit
            ),
            Kind::Tokens => write!(
                f,
                "Rate limit reached for tokens {} on {on}: limit {}, requested {}. Please try again in {wait}.",
                self.per, self.limit, self.requested
            ),
        }
    }
}

/// One `x-ratelimit-*-{requests,tokens}` trio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub limit: u64,
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
}

/// OpenAI's rate-limit headers: the most constrained request limit and token limit that apply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Headers {
    pub requests: Option<Report>,
    pub tokens: Option<Report>,
}

impl Headers {
    /// Each header as (name, value), for the response being built.
    pub fn each(&self, mut put: impl FnMut(&'static str, String)) {
        let trios = [
            (
                self.requests,
                [
                    "x-ratelimit-limit-requests",
                    "x-ratelimit-remaining-requests",
                    "x-ratelimit-reset-requests",
                ],
            ),
            (
                self.tokens,
                [
                    "x-ratelimit-limit-tokens",
                    "x-ratelimit-remaining-tokens",
                    "x-ratelimit-reset-tokens",
                ],
            ),
        ];
        for (report, [limit, remaining, reset]) in trios {
            if let Some(r) = report {
                put(limit, r.limit.to_string());
                put(remaining, r.remaining.to_string());
                put(reset, format_reset(r.reset));
            }
        }
    }

    /// Keeps the more constrained report (fewer remaining; then the later reset).
    fn keep(slot: &mut Option<Report>, new: Report) {
        let tighter = match slot {
            None => true,
            Some(old) => {
                (new.remaining, std::cmp::Reverse(new.reset))
                    < (old.remaining, std::cmp::Reverse(old.reset))
            }
        };
        if tighter {
            *slot = Some(new);
        }
    }
}

/// A duration as OpenAI writes `x-ratelimit-reset-*` (Go's format, to the millisecond, rounded
/// up): `20ms`, `1s`, `1.5s`, `6m0s`, `1h0m0s`.
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_nanos().div_ceil(1_000_000);
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m, s_ms) = (ms / 3_600_000, ms / 60_000 % 60, ms % 60_000);
    let secs = if s_ms % 1000 == 0 {
        format!("{}s", s_ms / 1000)
    } else {
        let frac = format!("{:03}", s_ms % 1000);
        format!("{}.{}s", s_ms / 1000, frac.trim_end_matches('0'))
    };
    match (h, m) {
        (0, 0) => secs,
        (0, m) => format!("{m}m{secs}"),
        (h, m) => format!("{h}h{m}m{secs}"),
    }
}

/// The tokens a request is admitted on: its body's bytes / 4 (rounded up) for the prompt, plus
/// the completion it asks for at most (`default_max_tokens` when it does not say).
pub fn estimate_tokens(body: &[u8], default_max_tokens: NonZeroU64) -> u64 {
    let prompt = (body.len() as u64).div_ceil(4);
    let completion = crate::request::max_tokens(body).unwrap_or(default_max_tokens.get());
    prompt.saturating_add(completion)
}

/// One key's or user's limit state. Made once per key or user and never freed (entries are not
/// swept, so each lives as long as the process's limiter anyway): a request's hold is a plain
/// reference, not a reference count to raise and drop.
#[derive(Debug, Default)]
pub struct Buckets {
    rpm: Gcra,
    rpd: Gcra,
    tpm: Gcra,
    in_flight: AtomicU32,
}

fn rate(limit: u64, period: Duration) -> Option<Rate> {
    NonZeroU64::new(limit).map(|l| Rate::new(l, period))
}

/// What one scope took for an admitted request; gives back its concurrency slot when dropped.
#[derive(Debug)]
struct Held {
    buckets: &'static Buckets,
    /// The token limit the estimate was taken on.
    tpm: u64,
    /// Tokens taken on the estimate (0 = none).
    tokens: u64,
    rpm: bool,
    rpd: bool,
    slot: bool,
}

impl Held {
    /// Gives back what was taken on `limits` (the request is refused by another limit).
    fn undo(&mut self, limits: &Limits, now_ns: u64) {
        if let (true, Some(r)) = (self.rpm, rate(limits.rpm, MINUTE)) {
            self.buckets.rpm.settle(r, now_ns, 1, 0);
        }
        if let (true, Some(r)) = (self.rpd, rate(limits.rpd, DAY)) {
            self.buckets.rpd.settle(r, now_ns, 1, 0);
        }
        self.settle(now_ns, 0);
        self.release();
    }

    fn settle(&mut self, now_ns: u64, actual: u64) {
        if let (true, Some(r)) = (self.tokens > 0, rate(self.tpm, MINUTE)) {
            self.buckets.tpm.settle(r, now_ns, self.tokens, actual);
            self.tokens = 0;
        }
    }

    fn release(&mut self) {
        if std::mem::take(&mut self.slot) {
            self.buckets.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.release();
    }
}

/// An admitted request's hold on its key's and user's limits: concurrency slots until it is
/// dropped, token estimates until [`Admitted::settle`].
#[derive(Debug)]
pub struct Admitted {
    hold: Hold,
    pub headers: Headers,
}

#[derive(Debug)]
enum Hold {
    /// Taken from this instance's buckets.
    Local {
        key: Option<Held>,
        user: Option<Held>,
    },
    /// Taken in Redis.
    Shared(SharedHold),
}

/// What a request took in Redis; gives its concurrency slots back (through the worker) when
/// dropped.
struct SharedHold {
    redis: Arc<Redis>,
    /// The request id: the member of its concurrency leases.
    member: String,
    /// Token slots taken on the estimate, settled once.
    tokens: Vec<TokenSlot>,
}

#[derive(Debug)]
struct TokenSlot {
    key: String,
    limit: u64,
    period_us: u64,
    cost: u64,
}

impl fmt::Debug for SharedHold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedHold")
            .field("member", &self.member)
            .field("tokens", &self.tokens)
            .finish()
    }
}

impl Drop for SharedHold {
    fn drop(&mut self) {
        self.redis.release(&self.member);
    }
}

impl Admitted {
    /// Settles the token limits on what the request actually used (prompt + completion).
    /// Called once, by `logging`; a second call changes nothing.
    pub fn settle(&mut self, now_ns: u64, actual_tokens: u64) {
        match &mut self.hold {
            Hold::Local { key, user } => {
                for held in [key, user].into_iter().flatten() {
                    held.settle(now_ns, actual_tokens);
                }
            }
            Hold::Shared(shared) => {
                for t in shared.tokens.drain(..) {
                    let delta = i64::try_from(actual_tokens)
                        .unwrap_or(i64::MAX)
                        .saturating_sub(i64::try_from(t.cost).unwrap_or(i64::MAX));
                    shared.redis.settle(t.key, t.limit, t.period_us, delta);
                }
            }
        }
    }
}

/// A refused request: the refusal answered and the headers sent with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub refusal: Refusal,
    pub headers: Headers,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// A limit refused it (429).
    Limited(Refused),
    /// Limits are shared through Redis, Redis cannot be reached and `[limits] fail = "closed"`.
    Unavailable,
}

/// Who is asking, as the stage needs it (from the cached key).
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub key_id: i64,
    pub user_id: i64,
    pub key: Overrides,
    pub user: Overrides,
    /// The key's and its user's entries, kept with the cached key.
    pub entries: &'a Entries,
}

/// A cached key's hold on its own and its user's [`Buckets`] (kept in `auth::KeyInfo`), so only
/// the first limited request of each cached copy looks them up in the [`Limiter`]'s maps; the
/// others read them here with one atomic load. Entries are never removed from the maps, so what
/// is held here is what the map holds.
#[derive(Debug, Default)]
pub struct Entries {
    key: OnceLock<Entry>,
    user: OnceLock<Entry>,
}

#[derive(Debug)]
struct Entry {
    /// Which limiter's map, and whose id in it: held entries of another are not used.
    limiter: u64,
    id: i64,
    buckets: &'static Buckets,
}

/// Hashes the map's keys, database ids: one multiplication (Fibonacci hashing). The ids are
/// assigned by the database, not chosen by clients, so there is no collision attack to resist.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_i64(&mut self, n: i64) {
        self.0 = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type Map = DashMap<i64, &'static Buckets, std::hash::BuildHasherDefault<IdHasher>>;

/// The limit state of this instance, and the shared limits' client when there is one.
pub struct Limiter {
    /// Tells this limiter's entries held in [`Entries`] from another's (tests run several).
    id: u64,
    defaults: Defaults,
    keys: Map,
    users: Map,
    epoch: Instant,
    /// `[limits] redis_url`: limits are checked there while it answers; the maps above then only
    /// serve the `local` fail policy.
    shared: Option<Arc<Redis>>,
}

const MINUTE_US: u64 = 60_000_000;
const DAY_US: u64 = 86_400_000_000;

impl Limiter {
    pub fn new(defaults: Defaults, shared: Option<Arc<Redis>>) -> Limiter {
        static IDS: AtomicU64 = AtomicU64::new(0);
        Limiter {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            defaults,
            keys: Map::default(),
            users: Map::default(),
            epoch: Instant::now(),
            shared,
        }
    }

    /// The clock the buckets run on (monotonic, nanoseconds since this limiter was made).
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The limits of a caller: its key's and its user's.
    fn limits_of(&self, caller: &Caller<'_>) -> (Limits, Limits) {
        (
            Limits::resolve(caller.key, self.defaults.key),
            Limits::resolve(caller.user, Limits::default()),
        )
    }

    fn estimate(&self, key: Limits, user: Limits, body: &[u8]) -> u64 {
        if key.tpm > 0 || user.tpm > 0 {
            estimate_tokens(body, self.defaults.default_max_tokens)
        } else {
            0
        }
    }

    /// Admits or refuses one request (`request_id` holds its concurrency slots in Redis).
    /// `Ok(None)`: no limit applies to the caller. Only a caller with a limit pays Redis's round
    /// trip.
    pub async fn admit(
        &self,
        caller: &Caller<'_>,
        body: &[u8],
        request_id: &str,
    ) -> Result<Option<Admitted>, Denied> {
        let (key, user) = self.limits_of(caller);
        if key.is_none() && user.is_none() {
            return Ok(None);
        }
        let estimate = self.estimate(key, user, body);
        let Some(redis) = &self.shared else {
            return self
                .take_local(caller, key, user, estimate, self.now_ns())
                .map_err(Denied::Limited);
        };
        if redis.is_up() {
            let (slots, meta) = plan(redis.prefix(), caller, key, user, estimate);
            if let Ok(replies) = redis.admit(&slots, request_id, None).await {
                return shared_decision(redis, request_id, slots, &meta, &replies);
            }
        }
        redis.fell_back();
        match redis.fail {
            crate::shared_limits::FailPolicy::Closed => Err(Denied::Unavailable),
            crate::shared_limits::FailPolicy::Local => {
                let n = redis.instances();
                self.take_local(caller, key.share(n), user.share(n), estimate, self.now_ns())
                    .map_err(Denied::Limited)
            }
        }
    }

    /// Admits or refuses one request at `now_ns` on this instance's buckets alone.
    /// `Ok(None)`: no limit applies to the caller.
    pub fn admit_at(
        &self,
        caller: &Caller<'_>,
        body: &[u8],
        now_ns: u64,
    ) -> Result<Option<Admitted>, Refused> {
        let (key, user) = self.limits_of(caller);
        if key.is_none() && user.is_none() {
            return Ok(None);
        }
        let estimate = self.estimate(key, user, body);
        self.take_local(caller, key, user, estimate, now_ns)
    }

    fn take_local(
        &self,
        caller: &Caller<'_>,
        key: Limits,
        user: Limits,
        estimate: u64,
        now_ns: u64,
    ) -> Result<Option<Admitted>, Refused> {
        let mut headers = Headers::default();
        // The longest wait of any limit that refuses.
        let mut refusal: Option<Refusal> = None;
        let entries = caller.entries;
        let mut key_held = (!key.is_none()).then(|| {
            take(
                self.buckets(&self.keys, caller.key_id, &entries.key),
                &key,
                Scope::Key,
                estimate,
                now_ns,
                &mut headers,
                &mut refusal,
            )
        });
        let mut user_held = (!user.is_none()).then(|| {
            take(
                self.buckets(&self.users, caller.user_id, &entries.user),
                &user,
                Scope::User,
                estimate,
                now_ns,
                &mut headers,
                &mut refusal,
            )
        });
        match refusal {
            None => Ok(Some(Admitted {
                hold: Hold::Local {
                    key: key_held,
                    user: user_held,
                },
                headers,
            })),
            Some(refusal) => {
                for (held, limits) in [(&mut key_held, &key), (&mut user_held, &user)] {
                    if let Some(held) = held {
                        held.undo(limits, now_ns);
                    }
                }
                Err(Refused { refusal, headers })
            }
        }
    }
}

/// What one shared slot counts, to read its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    scope: Scope,
    kind: Kind,
    per: &'static str,
    limit: u64,
    /// Units asked for (before the cap at the limit).
    requested: u64,
}

/// A request's limits as Redis slots (keys under `prefix`), with what each counts.
fn plan(
    prefix: &str,
    caller: &Caller<'_>,
    key: Limits,
    user: Limits,
    estimate: u64,
) -> (Vec<Slot>, Vec<Meta>) {
    let mut slots = Vec::new();
    let mut meta = Vec::new();
    for (scope, id, limits) in [
        (Scope::Key, caller.key_id, key),
        (Scope::User, caller.user_id, user),
    ] {
        let name = |what: &str| format!("{prefix}{}:{id}:{what}", scope.label());
        for (limit, period_us, what, per) in [
            (limits.rpm, MINUTE_US, "rpm", "per minute (RPM)"),
            (limits.rpd, DAY_US, "rpd", "per day (RPD)"),
        ] {
            if limit > 0 {
                slots.push(Slot::Rate {
                    key: name(what),
                    limit,
                    period_us,
                    cost: 1,
                });
                meta.push(Meta {
                    scope,
                    kind: Kind::Requests,
                    per,
                    limit,
                    requested: 1,
                });
            }
        }
        if limits.tpm > 0 {
            slots.push(Slot::Rate {
                key: name("tpm"),
                limit: limits.tpm,
                period_us: MINUTE_US,
                cost: estimate.min(limits.tpm),
            });
            meta.push(Meta {
                scope,
                kind: Kind::Tokens,
                per: "per minute (TPM)",
                limit: limits.tpm,
                requested: estimate,
            });
        }
        if limits.max_concurrent > 0 {
            slots.push(Slot::Concurrency {
                key: name("concurrent"),
                limit: limits.max_concurrent,
            });
            meta.push(Meta {
                scope,
                kind: Kind::Concurrency,
                per: "",
                limit: limits.max_concurrent,
                requested: 1,
            });
        }
    }
    (slots, meta)
}

/// The headers and the refusal (the longest wait) the script's replies make.
fn decide(meta: &[Meta], replies: &[SlotReply]) -> (Headers, Option<Refusal>) {
    let mut headers = Headers::default();
    let mut refusal: Option<Refusal> = None;
    for (m, r) in meta.iter().zip(replies) {
        let report = Report {
            limit: m.limit,
            remaining: r.remaining,
            reset: Duration::from_micros(r.reset_us),
        };
        match m.kind {
            Kind::Requests => Headers::keep(&mut headers.requests, report),
            Kind::Tokens => Headers::keep(&mut headers.tokens, report),
            Kind::Concurrency => {}
        }
        if !r.allowed {
            let retry_after = match m.kind {
                Kind::Concurrency => CONCURRENCY_RETRY,
                _ => Duration::from_micros(r.retry_us),
            };
            if refusal.is_none_or(|old| retry_after > old.retry_after) {
                refusal = Some(Refusal {
                    scope: m.scope,
                    kind: m.kind,
                    per: m.per,
                    limit: m.limit,
                    requested: m.requested,
                    retry_after,
                });
            }
        }
    }
    (headers, refusal)
}

/// Turns the replies of an admission in Redis into the stage's answer.
fn shared_decision(
    redis: &Arc<Redis>,
    request_id: &str,
    slots: Vec<Slot>,
    meta: &[Meta],
    replies: &[SlotReply],
) -> Result<Option<Admitted>, Denied> {
    let (headers, refusal) = decide(meta, replies);
    if let Some(refusal) = refusal {
        return Err(Denied::Limited(Refused { refusal, headers }));
    }
    let tokens = slots
        .into_iter()
        .zip(meta)
        .filter_map(|(slot, m)| match (slot, m.kind) {
            (
                Slot::Rate {
                    key,
                    limit,
                    period_us,
                    cost,
                },
                Kind::Tokens,
            ) => Some(TokenSlot {
                key,
                limit,
                period_us,
                cost,
            }),
            _ => None,
        })
        .collect();
    Ok(Some(Admitted {
        hold: Hold::Shared(SharedHold {
            redis: redis.clone(),
            member: request_id.to_string(),
            tokens,
        }),
        headers,
    }))
}

/// The entry for `id`, made on first use (under the shard's write lock: once).
fn buckets(map: &Map, id: i64) -> &'static Buckets {
    if let Some(b) = map.get(&id) {
        return *b;
    }
    *map.entry(id).or_insert_with(|| Box::leak(Box::default()))
}

impl Limiter {
    /// The entry for `id` in `map`: the one `held` keeps when it is this limiter's, else from
    /// the map (and kept in `held` when it is empty).
    fn buckets(&self, map: &Map, id: i64, held: &OnceLock<Entry>) -> &'static Buckets {
        if let Some(e) = held.get() {
            if e.limiter == self.id && e.id == id {
                return e.buckets;
            }
            return buckets(map, id);
        }
        let b = buckets(map, id);
        let _ = held.set(Entry {
            limiter: self.id,
            id,
            buckets: b,
        });
        b
    }
}

/// Takes one request (and `estimate` tokens) from one scope's limits at `now_ns`; reports into
/// `headers`, and into `refusal` when a limit refuses with a longer wait than it holds.
/// Returns what was taken.
fn take(
    buckets: &'static Buckets,
    limits: &Limits,
    scope: Scope,
    estimate: u64,
    now_ns: u64,
    headers: &mut Headers,
    refusal: &mut Option<Refusal>,
) -> Held {
    let mut held = Held {
        buckets,
        tpm: limits.tpm,
        tokens: 0,
        rpm: false,
        rpd: false,
        slot: false,
    };
    let mut refuse = |r: Refusal| {
        if refusal.is_none_or(|old| r.retry_after > old.retry_after) {
            *refusal = Some(r);
        }
    };
    if limits.max_concurrent > 0 {
        let max = u32::try_from(limits.max_concurrent).unwrap_or(u32::MAX);
        if held.buckets.in_flight.fetch_add(1, Ordering::AcqRel) >= max {
            held.buckets.in_flight.fetch_sub(1, Ordering::AcqRel);
            refuse(Refusal {
                scope,
                kind: Kind::Concurrency,
                per: "",
                limit: limits.max_concurrent,
                requested: 1,
                retry_after: CONCURRENCY_RETRY,
            });
        } else {
            held.slot = true;
        }
    }
    let report = |limit: u64, d: &Decision| Report {
        limit,
        remaining: d.remaining,
        reset: d.reset_after,
    };
    for (limit, period, gcra, per, taken) in [
        (
            limits.rpm,
            MINUTE,
            &held.buckets.rpm,
            "per minute (RPM)",
            &mut held.rpm,
        ),
        (
            limits.rpd,
            DAY,
            &held.buckets.rpd,
            "per day (RPD)",
            &mut held.rpd,
        ),
    ] {
        if let Some(r) = rate(limit, period) {
            let d = gcra.acquire(r, now_ns, 1);
            Headers::keep(&mut headers.requests, report(limit, &d));
            *taken = d.allowed;
            if !d.allowed {
                refuse(Refusal {
                    scope,
                    kind: Kind::Requests,
                    per,
                    limit,
                    requested: 1,
                    retry_after: d.retry_after,
                });
            }
        }
    }
    if let Some(r) = rate(limits.tpm, MINUTE) {
        let cost = estimate.min(limits.tpm);
        let d = held.buckets.tpm.acquire(r, now_ns, cost);
        Headers::keep(&mut headers.tokens, report(limits.tpm, &d));
        if d.allowed {
            held.tokens = cost;
        } else {
            refuse(Refusal {
                scope,
                kind: Kind::Tokens,
                per: "per minute (TPM)",
                limit: limits.tpm,
                requested: estimate,
                retry_after: d.retry_after,
            });
        }
    }
    held
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn limits(rpm: u64, rpd: u64, tpm: u64, max_concurrent: u64) -> Limits {
        Limits {
            rpm,
            rpd,
            tpm,
            max_concurrent,
        }
    }

    fn own(rpm: Option<u64>, tpm: Option<u64>, max_concurrent: Option<u64>) -> Overrides {
        Overrides {
            rpm,
            rpd: None,
            tpm,
            max_concurrent,
        }
    }

    #[test]
    fn which_limits_apply() {
        fn check(o: Overrides, default: Limits, expected: Limits) {
            assert_eq!(
                Limits::resolve(o, default),
                expected,
                "{o:?} over {default:?}"
            );
        }
        let d = limits(60, 1000, 10_000, 4);
        for (o, expected) in [
            (Overrides::default(), d),
            (own(Some(5), None, None), limits(5, 1000, 10_000, 4)),
            (own(Some(0), Some(0), Some(0)), limits(0, 1000, 0, 0)),
        ] {
            check(o, d, expected);
        }
        check(
            own(Some(7), None, None),
            Limits::default(),
            limits(7, 0, 0, 0),
        );
    }

    #[test]
    fn reset_formats() {
        fn check(ns: u64, expected: &str) {
            assert_eq!(format_reset(Duration::from_nanos(ns)), expected, "{ns}");
        }
        for (ns, expected) in [
            (0, "0s"),
            (1, "1ms"),
            (20_000_000, "20ms"),
            (999_000_001, "1s"),
            (S, "1s"),
            (1_500 * 1_000_000, "1.5s"),
            (1_250 * 1_000_000, "1.25s"),
            (360 * S, "6m0s"),
            (61 * S + 5_000_000, "1m1.005s"),
            (3_600 * S, "1h0m0s"),
            (86_400 * S, "24h0m0s"),
        ] {
            check(ns, expected);
        }
    }

    #[test]
    fn token_estimates() {
        fn check(body: &str, expected: u64) {
            let d = NonZeroU64::new(4096).unwrap();
            assert_eq!(estimate_tokens(body.as_bytes(), d), expected, "{body}");
        }
        for (body, expected) in [
            ("", 4096),
            (r#"{"model":"m"}"#, 4 + 4096),
            (r#"{"model":"m","max_tokens":100}"#, 8 + 100),
            (r#"{"max_completion_tokens":50,"m":1}"#, 9 + 50),
            (r#"{"max_output_tokens":7}"#, 6 + 7),
            (r#"{"max_tokens":"x"}"#, 5 + 4096),
            (r#"{"inner":{"max_tokens":1}}"#, 7 + 4096),
        ] {
            check(body, expected);
        }
    }

    fn caller(key: Overrides, user: Overrides) -> Caller<'static> {
        Caller {
            key_id: 1,
            user_id: 10,
            key,
            user,
            entries: Box::leak(Box::default()),
        }
    }

    #[test]
    fn entries_held_with_the_key_are_the_maps() {
        let new = || {
            Limiter::new(
                Defaults {
                    key: limits(2, 0, 0, 0),
                    default_max_tokens: NonZeroU64::new(100).unwrap(),
                },
                None,
            )
        };
        let (l, other) = (new(), new());
        let c = caller(Overrides::default(), own(Some(3), None, None));
        // The first request keeps the entries; later ones (and another copy of the key, which
        // reads the map) count on the same buckets.
        assert!(l.admit_at(&c, b"", 0).is_ok());
        let held = c.entries.key.get().map(|e| e.buckets).unwrap();
        assert!(std::ptr::eq(held, *l.keys.get(&1).unwrap()));
        let copy = caller(Overrides::default(), own(Some(3), None, None));
        assert!(l.admit_at(&copy, b"", 0).is_ok());
        assert!(l.admit_at(&c, b"", 0).is_err());
        // Another limiter does not use them: its own buckets are full.
        assert!(other.admit_at(&c, b"", 0).is_ok());
        assert!(other.admit_at(&c, b"", 0).is_ok());
        assert!(other.admit_at(&c, b"", 0).is_err());
        // Nor does a caller with another id.
        let mut moved = c;
        moved.key_id = 2;
        assert!(l.admit_at(&moved, b"", 0).is_ok());
        assert!(std::ptr::eq(
            c.entries.key.get().unwrap().buckets,
            *l.keys.get(&1).unwrap()
        ));
        assert_eq!(l.keys.len(), 2);
    }

    /// Runs (time in ms, body) steps against one limiter; each expects admitted, or refused by
    /// (scope, kind) with Retry-After in seconds.
    type Expect = Result<(), (Scope, Kind, u64)>;

    fn check(defaults: Limits, c: Caller<'_>, steps: &[(u64, &str, Expect)]) -> Vec<Headers> {
        let l = Limiter::new(
            Defaults {
                key: defaults,
                default_max_tokens: NonZeroU64::new(100).unwrap(),
            },
            None,
        );
        let mut held = Vec::new();
        let mut headers = Vec::new();
        for (i, &(ms, body, expected)) in steps.iter().enumerate() {
            let got = l.admit_at(&c, body.as_bytes(), 1_000 * S + ms * 1_000_000);
            match (got, expected) {
                (Ok(a), Ok(())) => {
                    headers.push(a.as_ref().map(|a| a.headers).unwrap_or_default());
                    held.push(a);
                }
                (Err(r), Err((scope, kind, secs))) => {
                    assert_eq!(
                        (
                            r.refusal.scope,
                            r.refusal.kind,
                            r.refusal.retry_after_secs()
                        ),
                        (scope, kind, secs),
                        "step {i}: {r:?}"
                    );
                    headers.push(r.headers);
                }
                (got, expected) => panic!("step {i}: got {got:?}, expected {expected:?}"),
            }
        }
        headers
    }

    #[test]
    fn request_limits() {
        use Kind::*;
        use Scope::*;
        // 2 per minute by default: two, then a wait of 30 s.
        let h = check(
            limits(2, 0, 0, 0),
            caller(Overrides::default(), Overrides::default()),
            &[
                (0, "", Ok(())),
                (0, "", Ok(())),
                (0, "", Err((Key, Requests, 30))),
                (29_999, "", Err((Key, Requests, 1))),
                (30_000, "", Ok(())),
            ],
        );
        assert_eq!(
            h[0].requests,
            Some(Report {
                limit: 2,
                remaining: 1,
                reset: Duration::from_secs(30)
            })
        );
        assert_eq!(h[1].requests.map(|r| r.remaining), Some(0));
        assert_eq!(h[0].tokens, None);
        // The key's own 0 lifts the default: no limit at all.
        let h = check(
            limits(1, 0, 0, 0),
            caller(own(Some(0), None, None), Overrides::default()),
            &[(0, "", Ok(())), (0, "", Ok(()))],
        );
        assert_eq!(h[1], Headers::default());
        // The user's limit binds although the key has none; the key's own is reported when
        // tighter.
        check(
            Limits::default(),
            caller(own(Some(5), None, None), own(Some(1), None, None)),
            &[(0, "", Ok(())), (0, "", Err((User, Requests, 60)))],
        );
        // Per day: the refusal with the longest wait is answered.
        check(
            Limits::default(),
            caller(
                Overrides {
                    rpm: Some(1),
                    rpd: Some(1),
                    ..Overrides::default()
                },
                Overrides::default(),
            ),
            &[(0, "", Ok(())), (1_000, "", Err((Key, Requests, 86_399)))],
        );
    }

    #[test]
    fn refused_requests_take_nothing() {
        use Kind::*;
        use Scope::*;
        // Key allows 2/min, user 1/min: the user's refusal gives the key's unit back, so after
        // the user's minute the key still has its second unit.
        check(
            Limits::default(),
            caller(own(Some(2), None, None), own(Some(1), None, None)),
            &[
                (0, "", Ok(())),
                (0, "", Err((User, Requests, 60))),
                (0, "", Err((User, Requests, 60))),
                (60_000, "", Ok(())),
            ],
        );
    }

    #[test]
    fn token_limits_admit_on_the_estimate() {
        use Kind::*;
        use Scope::*;
        // 1000 tokens a minute, default completion 100: a 4-byte body costs 1 + 100.
        let h = check(
            limits(0, 0, 1000, 0),
            caller(Overrides::default(), Overrides::default()),
            &[
                (0, r#"{"max_tokens":496}"#, Ok(())), // 5 + 496 = 501
                (0, r#"{"max_tokens":496}"#, Err((Key, Tokens, 1))),
                (0, r#"{"max_tokens":395}"#, Ok(())), // 5 + 395 = 400
                // larger than the whole limit: capped at it, admitted once the bucket is full
                (60_000, r#"{"max_tokens":5000}"#, Ok(())),
            ],
        );
        assert_eq!(
            h[0].tokens.map(|r| (r.limit, r.remaining)),
            Some((1000, 499))
        );
        assert_eq!(h[0].requests, None);
    }

    #[test]
    fn settlement_gives_back_or_takes_more() {
        let l = Limiter::new(
            Defaults {
                key: limits(0, 0, 1000, 0),
                default_max_tokens: NonZeroU64::new(100).unwrap(),
            },
            None,
        );
        let c = caller(Overrides::default(), Overrides::default());
        let now = 1_000 * S;
        let body = br#"{"max_tokens":896}"#; // 5 + 896 = 901
        let mut a = l.admit_at(&c, body, now).unwrap().unwrap();
        assert!(l.admit_at(&c, body, now).is_err());
        a.settle(now, 1); // used 1 token: 900 come back
        a.settle(now, 1); // a second settlement changes nothing
        let b = l.admit_at(&c, body, now).unwrap().unwrap();
        assert_eq!(b.headers.tokens.map(|r| r.remaining), Some(98));
    }

    #[test]
    fn concurrency_slots_come_back_on_drop() {
        let l = Limiter::new(
            Defaults {
                key: limits(0, 0, 0, 2),
                default_max_tokens: NonZeroU64::new(100).unwrap(),
            },
            None,
        );
        let c = caller(Overrides::default(), Overrides::default());
        let a = l.admit_at(&c, b"", 0).unwrap();
        let b = l.admit_at(&c, b"", 0).unwrap();
        let refused = l.admit_at(&c, b"", 0).unwrap_err();
        assert_eq!(
            (refused.refusal.kind, refused.refusal.retry_after_secs()),
            (Kind::Concurrency, 1)
        );
        drop(a);
        let c2 = l.admit_at(&c, b"", 0).unwrap();
        assert!(l.admit_at(&c, b"", 0).is_err());
        drop((b, c2));
        assert_eq!(l.keys.get(&1).unwrap().in_flight.load(Ordering::Relaxed), 0);
        // A request refused by another limit gives its slot back.
        let l = Limiter::new(
            Defaults {
                key: limits(1, 0, 0, 5),
                default_max_tokens: NonZeroU64::new(100).unwrap(),
            },
            None,
        );
        let _a = l.admit_at(&c, b"", 0).unwrap();
        assert!(l.admit_at(&c, b"", 0).is_err());
        assert_eq!(l.keys.get(&1).unwrap().in_flight.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn shares_per_instance() {
        fn check(l: Limits, n: u64, expected: Limits) {
            assert_eq!(l.share(n), expected, "{l:?} / {n}");
        }
        for (l, n, expected) in [
            (limits(100, 1000, 0, 4), 1, limits(100, 1000, 0, 4)),
            (limits(100, 1000, 0, 4), 2, limits(50, 500, 0, 2)),
            (limits(100, 1000, 0, 4), 3, limits(33, 333, 0, 1)),
            (limits(1, 0, 5, 1), 8, limits(1, 0, 1, 1)),
            (limits(10, 0, 0, 0), 0, limits(10, 0, 0, 0)),
        ] {
            check(l, n, expected);
        }
    }

    #[test]
    fn shared_plans_name_each_limit() {
        let c = caller(Overrides::default(), Overrides::default());
        let (slots, meta) = plan("p:", &c, limits(60, 0, 1000, 2), limits(0, 5, 0, 0), 4100);
        let keys: Vec<&str> = slots.iter().map(|s| s.key()).collect();
        assert_eq!(
            keys,
            [
                "p:key:1:rpm",
                "p:key:1:tpm",
                "p:key:1:concurrent",
                "p:user:10:rpd"
            ]
        );
        assert_eq!(
            slots[1],
            Slot::Rate {
                key: "p:key:1:tpm".into(),
                limit: 1000,
                period_us: 60_000_000,
                cost: 1000, // the estimate capped at the limit
            }
        );
        assert_eq!(
            slots[2],
            Slot::Concurrency {
                key: "p:key:1:concurrent".into(),
                limit: 2
            }
        );
        assert_eq!(
            meta.iter()
                .map(|m| (m.scope, m.kind, m.requested))
                .collect::<Vec<_>>(),
            [
                (Scope::Key, Kind::Requests, 1),
                (Scope::Key, Kind::Tokens, 4100),
                (Scope::Key, Kind::Concurrency, 1),
                (Scope::User, Kind::Requests, 1),
            ]
        );
        assert_eq!(
            plan("p:", &c, Limits::default(), Limits::default(), 0).0,
            []
        );
    }

    #[test]
    fn shared_replies_decide() {
        let c = caller(Overrides::default(), Overrides::default());
        let (_, meta) = plan("p:", &c, limits(60, 0, 1000, 2), limits(10, 0, 0, 0), 100);
        let r = |allowed, remaining, reset_us, retry_us| SlotReply {
            allowed,
            remaining,
            reset_us,
            retry_us,
        };
        // All allowed: the tighter request report (the user's 10) and the token report.
        let (h, refusal) = decide(
            &meta,
            &[
                r(true, 59, 1_000_000, 0),
                r(true, 900, 6_000_000, 0),
                r(true, 1, 0, 0),
                r(true, 2, 48_000_000, 0),
            ],
        );
        assert_eq!(refusal, None);
        assert_eq!(
            h.requests,
            Some(Report {
                limit: 10,
                remaining: 2,
                reset: Duration::from_secs(48)
            })
        );
        assert_eq!(h.tokens.map(|t| (t.limit, t.remaining)), Some((1000, 900)));
        // Two refusals: the longest wait is answered; concurrency waits a second.
        let (_, refusal) = decide(
            &meta,
            &[
                r(true, 59, 1_000_000, 0),
                r(false, 10, 60_000_000, 5_400_000),
                r(false, 0, 0, 1_000_000),
                r(true, 2, 48_000_000, 0),
            ],
        );
        let refusal = refusal.unwrap();
        assert_eq!(
            (
                refusal.scope,
                refusal.kind,
                refusal.requested,
                refusal.retry_after_secs()
            ),
            (Scope::Key, Kind::Tokens, 100, 6)
        );
        let (_, refusal) = decide(&meta[2..3], &[r(false, 0, 0, 77)]);
        assert_eq!(refusal.unwrap().retry_after, CONCURRENCY_RETRY);
    }

    #[test]
    fn messages() {
        let r = Refusal {
            scope: Scope::Key,
            kind: Kind::Requests,
            per: "per minute (RPM)",
            limit: 60,
            requested: 1,
            retry_after: Duration::from_millis(1500),
        };
        assert_eq!(r.retry_after_secs(), 2);
        let provider = Refusal {
            scope: Scope::Account,
            kind: Kind::Tokens,
            per: "as reported by the provider",
            limit: 0,
            requested: 100,
            retry_after: Duration::from_secs(30),
        };
        assert_eq!(
            provider.to_string(),
            "Rate limit reached for tokens on every upstream account that serves this request, as reported by the provider. Please try again in 30s."
        );
        assert_eq!(
            r.to_string(),
            "Rate limit reached for requests per minute (RPM) on this API key: limit 60. Please try again in 1.5s."
        );
        let mut pairs = Vec::new();
        Headers {
            requests: Some(Report {
                limit: 60,
                remaining: 59,
                reset: Duration::from_secs(1),
            }),
            tokens: None,
        }
        .each(|n, v| pairs.push(format!("{n}: {v}")));
        assert_eq!(
            pairs,
            [
                "x-ratelimit-limit-requests: 60",
                "x-ratelimit-remaining-requests: 59",
                "x-ratelimit-reset-requests: 1s"
            ]
        );
    }
}
