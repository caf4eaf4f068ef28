//! The spend admission stage: before a request is forwarded, its worst-case use (`budget.rs`)
//! is reserved against every budget that applies to it (its key's, its user's, its user's
//! plan's) and, for a prepaid user, against the credit balance; a request that does not fit is
//! refused at once and never reaches an upstream. Reservations come out of **leases**, slices
//! of a budget period or a balance this instance took from the database with one conditional
//! update (`store/spend.rs`), so the steady path touches no database and N instances together
//! can never lease more than the limit. When the request ends, `logging` settles its hold with
//! the usage record: the unused part of each reservation goes back to the local lease, and the
//! record names the leases, so the usage writer shrinks them by what was charged in the same
//! transaction as the row.
//!
//! - **State**: one [`LocalPool`] per pool this instance serves (budget period × subject, or a
//!   balance) in a sharded map: units it may still reserve (`free`, an atomic), the lease's id,
//!   and what the database last said was left when a lease was refused. A request takes its
//!   reservation with one compare-and-swap per pool; all of its pools or none.
//! - **Refills**: a pool without enough free units takes a lease on the database runtime
//!   (coalesced: one request per pool asks, the others wait for it, ≤ `[spend] lease_wait_ms`).
//!   A refill is started ahead of need when a pool falls below a quarter of its last slice.
//! - **Watched streams** (`[spend] cut_streams`, a request without an output cap): past what
//!   its reservation covers, [`SpendHold::cover`] extends it from the local pools as a request
//!   is admitted; when they cannot, [`SpendHold::extend`] leases more the same way, and only a
//!   pool that has no more (or `fail = "closed"` without a database) cuts the stream.
//! - **The `spend-leases` task** renews this instance's leases (they expire after
//!   `lease_ttl_secs` unless renewed: a dead instance's come back then), returns the unused part
//!   of idle pools' leases and of periods that ended, takes back other instances' expired
//!   leases, and returns everything at shutdown.
//! - **Database away**: admission goes on from the leases held; a pool that needs a new lease
//!   then follows `[spend] fail`: `closed` refuses (503 `spend_unavailable`), `open` admits
//!   without a reservation (the charge is still settled when the row is written).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use metrics::{counter, Counter};
use smallvec::SmallVec;
use tokio::sync::{watch, Notify};

use crate::budget::{
    self, from_units, period_bounds, to_units, Metric, Period, RequestShape, Sizing, UnitPrice,
    WorstCase,
};
use crate::pricing::Pricing;
use crate::record::{Charge, Pool, UsageRecord};
use crate::request;
use crate::store::{LeaseOutcome, Store};
use crate::upstream::AccountType;

/// What the stage does when a pool needs a lease and the database cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailPolicy {
    /// Refuse (503 `spend_unavailable`, `Retry-After: 1`).
    Closed,
    /// Admit without a reservation.
    Open,
}

impl FailPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            FailPolicy::Closed => "closed",
            FailPolicy::Open => "open",
        }
    }
}

/// `[spend]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendSettings {
    pub sizing: Sizing,
    /// A lease holds this many reservations like the one that asked for it (at most what is
    /// left in the pool).
    pub reservations_per_lease: i64,
    pub lease_ttl: Duration,
    pub lease_wait: Duration,
    pub idle_return: Duration,
    pub fail: FailPolicy,
    /// Cut a stream whose output passes what its reservation covers and no extension of it
    /// fits (a request that states no output cap; see [`SpendHold::cover`]).
    pub cut_streams: bool,
}

/// One budget that applies to a key, as its cached key carries it.
#[derive(Debug)]
pub struct BudgetRef {
    pub budget_id: i64,
    /// The key's id for a key's budget; the user's for a user's or a plan's.
    pub subject_id: i64,
    pub metric: Metric,
    pub period: Period,
    /// A plan's budget: the subscription's start (its periods run from it).
    pub anchor: Option<DateTime<Utc>>,
    /// Whose budget it is, for the refusal's message: `key`, `user` or `plan`.
    pub owner: &'static str,
    /// The local pool of its current period, once a request used it (so the next request of
    /// this key finds it without a map lookup); replaced when the period changes.
    pub cache: PoolCache,
}

/// A key's last-used local pool (see [`BudgetRef::cache`]). Holding it keeps the pool in the
/// stage's map (the sweep forgets only pools nobody holds) as long as the key is cached.
pub type PoolCache = arc_swap::ArcSwapOption<LocalPool>;

/// The budgets and balance a key's requests are reserved against; loaded with the key.
#[derive(Debug, Default)]
pub struct SpendPolicy {
    pub budgets: Vec<BudgetRef>,
    /// The user, when prepaid (granted credits at least once).
    pub credit_user: Option<i64>,
    /// The local pool of the user's balance, once used (as [`BudgetRef::cache`]).
    pub credit_cache: PoolCache,
}

impl SpendPolicy {
    pub fn is_empty(&self) -> bool {
        self.budgets.is_empty() && self.credit_user.is_none()
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A prepaid user's balance cannot cover the request.
    OutOfCredits,
    /// A budget cannot cover it; `resets_at` = the end of its period (`None` for `total`).
    Budget {
        metric: Metric,
        period: Period,
        owner: &'static str,
        resets_at: Option<DateTime<Utc>>,
    },
    /// A pool needed a lease, the database did not answer and `[spend] fail = "closed"`.
    Unavailable,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::OutOfCredits => f.write_str(
                "You exceeded your current quota: the credit balance cannot cover this request's \
                 maximum cost. Add credits, or lower max_tokens.",
            ),
            Refusal::Budget {
                metric,
                period,
                owner,
                resets_at,
            } => {
                let whose = match *owner {
                    "key" => "this API key",
                    "plan" => "your plan",
                    _ => "your user",
                };
                let per = match period {
                    Period::Day => "daily ",
                    Period::Week => "weekly ",
                    Period::Month => "monthly ",
                    Period::Total => "",
                };
                write!(
                    f,
                    "The {per}{} budget of {whose} cannot cover this request",
                    metric.as_str()
                )?;
                match resets_at {
                    Some(t) => write!(
                        f,
                        "; it resets at {}.",
                        t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                    ),
                    None => f.write_str("."),
                }
            }
            Refusal::Unavailable => {
                f.write_str("Budgets and credits cannot be checked right now; retry shortly.")
            }
        }
    }
}

impl Refusal {
    /// Seconds until the refusal can change (`Retry-After`), where that is known.
    pub fn retry_after(&self, now: DateTime<Utc>) -> Option<u64> {
        match self {
            Refusal::Budget {
                resets_at: Some(t), ..
            } => Some(u64::try_from((*t - now).num_seconds().max(0) + 1).unwrap_or(1)),
            Refusal::Unavailable => Some(1),
            _ => None,
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            Refusal::OutOfCredits => "insufficient_quota",
            Refusal::Budget { .. } => "budget_exceeded",
            Refusal::Unavailable => "spend_unavailable",
        }
    }
}

/// This instance's share of one pool.
#[derive(Debug)]
pub struct LocalPool {
    pool: Pool,
    /// The end of the pool's period (`None`: a balance, or a `total` budget): a key's cached
    /// pool serves requests until then without the period being worked out again.
    period_end: Option<DateTime<Utc>>,
    /// Units this instance may still reserve from its lease (may go below 0 when a request
    /// spent more than its reservation).
    free: AtomicI64,
    /// `spend_leases.id`, 0 before the first lease.
    lease_id: AtomicI64,
    /// The size of the last lease granted, for the refill-ahead mark.
    last_slice: AtomicI64,
    /// When a lease was last refused for want of room (ms since the stage's epoch; 0 = never)
    /// and how many units the database said were left then.
    exhausted_at_ms: AtomicU64,
    exhausted_left: AtomicI64,
    /// Last reservation (ms), for returning idle leases.
    used_at_ms: AtomicU64,
    refilling: AtomicBool,
    refilled: Notify,
}

impl LocalPool {
    fn new(pool: Pool, period_end: Option<DateTime<Utc>>) -> LocalPool {
        LocalPool {
            pool,
            period_end,
            free: AtomicI64::new(0),
            lease_id: AtomicI64::new(0),
            last_slice: AtomicI64::new(0),
            exhausted_at_ms: AtomicU64::new(0),
            exhausted_left: AtomicI64::new(0),
            used_at_ms: AtomicU64::new(0),
            refilling: AtomicBool::new(false),
            refilled: Notify::new(),
        }
    }

    /// Whether requests at `now` still belong to this pool's period.
    fn covers(&self, now: DateTime<Utc>) -> bool {
        let started = match self.pool {
            Pool::Budget { period_start, .. } => period_start <= now,
            Pool::Credit { .. } => true,
        };
        started && self.period_end.is_none_or(|end| now < end)
    }

    /// Takes `units` if free holds them (a reservation of nothing always fits).
    fn try_take(&self, units: i64) -> bool {
        if units == 0 {
            return true;
        }
        self.free
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| {
                (f >= units).then(|| f - units)
            })
            .is_ok()
    }
}

/// What asking for room in a pool came to ([`Spend::wait_for_room`]).
enum Room {
    /// A lease was granted (or another request's refill ended): try the pool again.
    Retry,
    /// The pool does not have it.
    Refused,
    /// The budget was deleted or the user is no longer prepaid: nothing to hold against.
    Gone,
    /// The database did not answer within `lease_wait`.
    Unavailable,
}

/// One reservation held by a request.
struct Held {
    pool: Arc<LocalPool>,
    units: i64,
    /// 0: admitted without a lease (`fail = "open"`).
    lease_id: i64,
}

/// A request's reservations, inline up to three pools (a key's budget, its user's and the
/// balance: no allocation per request on the common path).
type Helds = SmallVec<[Held; 3]>;

/// A request's reservations: settled by `logging` with its usage record; dropped unsettled (the
/// request never became a record) they all go back.
pub struct SpendHold {
    held: Helds,
    /// `[spend] cut_streams` and a request without an output cap: its stream is watched.
    watch: Option<Box<Watch>>,
}

/// What a watched stream's reservation covers of its output, and how it grows.
struct Watch {
    /// Output tokens the reservation covers: the default cap × `n`, plus the extensions.
    covered: u64,
    /// Output tokens one extension adds (`[spend] default_max_output_tokens`).
    chunk: u64,
    /// What one extension takes from each held pool (in `held`'s order), priced at admission.
    chunk_units: Vec<i64>,
    /// The running bound when the last chunk was let through: what the client was sent.
    relayed: u64,
    /// An extension did not fit: the stream was cut.
    cut: bool,
    /// The stage, to lease more when this instance's share runs out mid-stream (`None` in unit
    /// tests of the local arithmetic).
    stage: Option<Spend>,
    streams_cut: Counter,
}

/// How many extensions of `chunk` tokens a stream whose output is bounded by `seen` tokens
/// needs beyond the `covered` ones (0: covered).
pub fn extensions_needed(seen: u64, covered: u64, chunk: u64) -> u64 {
    if seen <= covered {
        return 0;
    }
    (seen - covered).div_ceil(chunk.max(1))
}

/// What one extension of `chunk` output tokens takes from a pool of `metric`: its cost at the
/// output price (rounded up, as a reservation is), its tokens, and no request.
fn extension_units(metric: Metric, chunk: u64, price: Option<UnitPrice>) -> i64 {
    match metric {
        Metric::Requests => 0,
        Metric::Cost | Metric::Tokens => WorstCase {
            input_tokens: 0,
            output_tokens: chunk,
            bounded: false,
        }
        .units(metric, price),
    }
}

impl SpendHold {
    /// An empty hold with room for each pool of `policy`.
    fn for_policy(policy: &SpendPolicy) -> SpendHold {
        SpendHold {
            held: Helds::with_capacity(policy.budgets.len() + 1),
            watch: None,
        }
    }

    /// Whether its response is to be watched as it streams ([`SpendHold::cover`]).
    pub fn watches(&self) -> bool {
        self.watch.is_some()
    }

    /// A watched stream's output is bounded by `seen` tokens: extends the reservation from each
    /// pool's local `free` (one compare-and-swap per pool, whole extensions of the default cap)
    /// when `seen` passes what it covers, all pools or none. `false`: an extension does not fit
    /// what this instance holds; [`SpendHold::extend`] asks the database, and cuts. A pool held
    /// without a lease (`fail = "open"`) is not limited: its extension is counted, never
    /// refused. Not watched: always `true`.
    pub fn cover(&mut self, seen: u64) -> bool {
        let Some(w) = self.watch.as_deref_mut() else {
            return true;
        };
        if w.cut {
            return false;
        }
        let k = extensions_needed(seen, w.covered, w.chunk);
        if k > 0 {
            let times = i64::try_from(k).unwrap_or(i64::MAX);
            for (i, (h, per)) in self.held.iter().zip(&w.chunk_units).enumerate() {
                let units = per.saturating_mul(times);
                if h.lease_id != 0 && !h.pool.try_take(units) {
                    // Give back what this extension took from the pools before.
                    for (h, per) in self.held.iter().zip(&w.chunk_units).take(i) {
                        if h.lease_id != 0 {
                            h.pool
                                .free
                                .fetch_add(per.saturating_mul(times), Ordering::AcqRel);
                        }
                    }
                    return false;
                }
            }
            for (h, per) in self.held.iter_mut().zip(&w.chunk_units) {
                let units = per.saturating_mul(times);
                if h.lease_id == 0 {
                    h.pool.free.fetch_sub(units, Ordering::AcqRel);
                }
                h.units = h.units.saturating_add(units);
                if let Some(stage) = &w.stage {
                    stage.refill_if_low(&h.pool, units);
                }
            }
            w.covered = w.covered.saturating_add(k.saturating_mul(w.chunk));
        }
        w.relayed = seen;
        true
    }

    /// [`SpendHold::cover`] when this instance's share ran out: pool by pool, takes the
    /// extension from a new lease (waiting for the database as admission does, at most
    /// `lease_wait_ms` a lease). `false`: a pool cannot give it (or the database cannot answer
    /// under `fail = "closed"`): the stream is cut; what was taken stays held and goes back at
    /// settlement like the rest.
    pub async fn extend(&mut self, seen: u64) -> bool {
        let Some(w) = self.watch.as_deref_mut() else {
            return true;
        };
        if w.cut {
            return false;
        }
        let k = extensions_needed(seen, w.covered, w.chunk);
        let times = i64::try_from(k).unwrap_or(i64::MAX);
        if let Some(stage) = w.stage.clone() {
            let now_ms = stage.ms(stage.now());
            for (h, per) in self.held.iter_mut().zip(&w.chunk_units) {
                if !stage
                    .extend_held(h, per.saturating_mul(times), now_ms)
                    .await
                {
                    w.cut = true;
                    break;
                }
            }
        } else {
            w.cut = true;
        }
        if w.cut {
            w.streams_cut.increment(1);
            return false;
        }
        w.covered = w.covered.saturating_add(k.saturating_mul(w.chunk));
        w.relayed = seen;
        true
    }

    /// The output tokens to charge a stream that was cut: the bound of what it relayed (within
    /// what its reservation covered). `None`: not cut.
    pub fn cut_output(&self) -> Option<u64> {
        self.watch.as_deref().filter(|w| w.cut).map(|w| w.relayed)
    }

    /// Gives back what the request did not use and names its leases on the record, for the
    /// usage writer to settle in the row's transaction.
    pub fn settle(&mut self, record: &mut UsageRecord) {
        for h in self.held.drain(..) {
            let metric = h.pool.pool.metric();
            let used = to_units(metric, record.amount(metric));
            h.pool.free.fetch_add(h.units - used, Ordering::AcqRel);
            if h.lease_id != 0 {
                record.charges.push(Charge {
                    pool: h.pool.pool,
                    lease_id: h.lease_id,
                });
            }
        }
    }
}

impl Drop for SpendHold {
    fn drop(&mut self) {
        for h in self.held.drain(..) {
            h.pool.free.fetch_add(h.units, Ordering::AcqRel);
        }
    }
}

/// The clock the stage reads (injected by tests).
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

struct Handles {
    refused_credits: Counter,
    refused_budget: Counter,
    refused_unavailable: Counter,
    fail_open: Counter,
    leases_granted: Counter,
    leases_exhausted: Counter,
    lease_errors: Counter,
    streams_cut: Counter,
}

/// The stage: this instance's pools and the way to the database.
#[derive(Clone)]
pub struct Spend {
    inner: Arc<Inner>,
}

struct Inner {
    pools: DashMap<Pool, Arc<LocalPool>>,
    settings: SpendSettings,
    store: Store,
    /// The database runtime, where leases are taken.
    db: tokio::runtime::Handle,
    /// This process's name on its leases.
    instance: String,
    clock: Clock,
    /// The clock when the stage was made: pools' times are milliseconds since then.
    started: DateTime<Utc>,
    metrics: Handles,
}

impl Spend {
    pub fn new(
        settings: SpendSettings,
        store: Store,
        db: tokio::runtime::Handle,
        instance: String,
        clock: Clock,
    ) -> Spend {
        let refused =
            |reason: &'static str| counter!("tollgate_spend_refused_total", "reason" => reason);
        let leases =
            |outcome: &'static str| counter!("tollgate_spend_leases_total", "outcome" => outcome);
        Spend {
            inner: Arc::new(Inner {
                pools: DashMap::new(),
                store,
                db,
                instance,
                started: clock(),
                clock,
                metrics: Handles {
                    refused_credits: refused("insufficient_quota"),
                    refused_budget: refused("budget_exceeded"),
                    refused_unavailable: refused("spend_unavailable"),
                    fail_open: counter!("tollgate_spend_fail_open_total"),
                    leases_granted: leases("granted"),
                    leases_exhausted: leases("exhausted"),
                    lease_errors: leases("error"),
                    streams_cut: counter!("tollgate_spend_streams_cut_total"),
                },
                settings,
            }),
        }
    }

    /// A name for this process's leases: host, pid and a random suffix (a restarted process
    /// never takes over its predecessor's leases; those expire).
    pub fn instance_name() -> String {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "tollgate".into());
        let id = uuid::Uuid::now_v7().simple().to_string();
        format!("{host}-{}-{}", std::process::id(), &id[id.len() - 8..])
    }

    pub fn now(&self) -> DateTime<Utc> {
        (self.inner.clock)()
    }

    /// The stage as `request_filter` calls it: the body read once (model, output cap, choices,
    /// media parts), the model priced as its response will be (at the dearest price when the
    /// body names none that can be read), then [`Spend::admit`].
    pub async fn admit_request(
        &self,
        policy: &SpendPolicy,
        body: &[u8],
        kind: Option<AccountType>,
        pricing: &Pricing,
    ) -> Result<SpendHold, Refusal> {
        let fields = request::spend_fields(body);
        let price = match (&fields.model, kind) {
            (Some(m), Some(k)) => pricing.unit_price_of(k, Some(m)),
            _ => pricing.dearest(),
        };
        let shape = RequestShape {
            body_bytes: body.len() as u64,
            media_parts: fields.media_parts,
            max_tokens: fields.max_tokens,
            choices: fields.choices,
        };
        self.admit(policy, shape, price).await
    }

    /// Reserves the worst case of a request of `shape` against every pool of `policy`: all or
    /// none. `price`: the requested model's (`None`: unpriced, reserved at 0 cost). The steady
    /// path (every pool's lease holds the reservation) awaits nothing; a pool short of units
    /// takes the path that waits for a lease.
    pub async fn admit(
        &self,
        policy: &SpendPolicy,
        shape: RequestShape,
        price: Option<UnitPrice>,
    ) -> Result<SpendHold, Refusal> {
        let now = self.now();
        let worst = WorstCase::of(shape, self.inner.settings.sizing);
        let hold = match self.admit_now(policy, &worst, price, now) {
            Some(hold) => hold,
            // Boxed: the steady path's future stays small.
            None => Box::pin(self.admit_waiting(policy, &worst, price, now)).await?,
        };
        Ok(self.watched(hold, &worst, price))
    }

    /// Every pool's reservation from what this instance holds, or `None` (what was taken goes
    /// back when the partial hold drops).
    fn admit_now(
        &self,
        policy: &SpendPolicy,
        worst: &WorstCase,
        price: Option<UnitPrice>,
        now: DateTime<Utc>,
    ) -> Option<SpendHold> {
        let now_ms = self.ms(now);
        let mut hold = SpendHold::for_policy(policy);
        for b in &policy.budgets {
            let lp = self.budget_pool(b, now);
            if !self.take_now(&mut hold, lp, worst.units(b.metric, price), now_ms) {
                return None;
            }
        }
        if let Some(user_id) = policy.credit_user {
            let lp = self.credit_pool(user_id, &policy.credit_cache);
            if !self.take_now(&mut hold, lp, worst.units(Metric::Cost, price), now_ms) {
                return None;
            }
        }
        Some(hold)
    }

    /// [`Spend::admit`] when a pool needs a lease: pool by pool, waiting for refills.
    async fn admit_waiting(
        &self,
        policy: &SpendPolicy,
        worst: &WorstCase,
        price: Option<UnitPrice>,
        now: DateTime<Utc>,
    ) -> Result<SpendHold, Refusal> {
        let now_ms = self.ms(now);
        let mut hold = SpendHold::for_policy(policy);
        for b in &policy.budgets {
            let lp = self.budget_pool(b, now);
            let resets_at = lp.period_end;
            self.reserve(&mut hold, lp, worst.units(b.metric, price), now_ms)
                .await
                .map_err(|r| match r {
                    Refusal::OutOfCredits => Refusal::Budget {
                        metric: b.metric,
                        period: b.period,
                        owner: b.owner,
                        resets_at,
                    },
                    r => r,
                })?;
        }
        if let Some(user_id) = policy.credit_user {
            let lp = self.credit_pool(user_id, &policy.credit_cache);
            self.reserve(&mut hold, lp, worst.units(Metric::Cost, price), now_ms)
                .await?;
        }
        Ok(hold)
    }

    /// The key's pool of a budget's current period, worked out again only when it ends.
    fn budget_pool(&self, b: &BudgetRef, now: DateTime<Utc>) -> Arc<LocalPool> {
        match b.cache.load().as_ref() {
            Some(lp) if lp.covers(now) => lp.clone(),
            _ => {
                let (start, end) = period_bounds(b.period, b.anchor, now);
                let pool = Pool::Budget {
                    budget_id: b.budget_id,
                    subject_id: b.subject_id,
                    metric: b.metric,
                    period_start: start,
                };
                self.local(pool, end, &b.cache)
            }
        }
    }

    /// The pool of a prepaid user's balance.
    fn credit_pool(&self, user_id: i64, cache: &PoolCache) -> Arc<LocalPool> {
        match cache.load().as_ref() {
            Some(lp) => lp.clone(),
            None => self.local(Pool::Credit { user_id }, None, cache),
        }
    }

    /// `[spend] cut_streams` and a request without an output cap: its stream is watched.
    fn watched(
        &self,
        mut hold: SpendHold,
        worst: &WorstCase,
        price: Option<UnitPrice>,
    ) -> SpendHold {
        if self.inner.settings.cut_streams && !worst.bounded {
            hold.watch = Some(self.watch(&hold, worst, price));
        }
        hold
    }

    /// Takes `units` from `lp` into `hold` if its free units hold them, starting a refill
    /// ahead of need when they fall below a quarter of the last lease.
    fn take_now(&self, hold: &mut SpendHold, lp: Arc<LocalPool>, units: i64, now_ms: u64) -> bool {
        lp.used_at_ms.store(now_ms, Ordering::Relaxed);
        if !lp.try_take(units) {
            return false;
        }
        let lease_id = lp.lease_id.load(Ordering::Acquire);
        self.refill_if_low(&lp, units);
        hold.held.push(Held {
            pool: lp,
            units,
            lease_id,
        });
        true
    }

    /// The watch of a request without an output cap (`[spend] cut_streams`): its reservation
    /// covers `worst.output_tokens`; each extension adds a default cap, priced now.
    fn watch(&self, hold: &SpendHold, worst: &WorstCase, price: Option<UnitPrice>) -> Box<Watch> {
        let chunk = self.inner.settings.sizing.default_max_output_tokens;
        Box::new(Watch {
            covered: worst.output_tokens,
            chunk,
            chunk_units: hold
                .held
                .iter()
                .map(|h| extension_units(h.pool.pool.metric(), chunk, price))
                .collect(),
            relayed: 0,
            cut: false,
            stage: Some(self.clone()),
            streams_cut: self.inner.metrics.streams_cut.clone(),
        })
    }

    /// The stage's pool of `pool` (made on first use), cached in the key's policy so that its
    /// next requests reach it without a map lookup.
    fn local(
        &self,
        pool: Pool,
        period_end: Option<DateTime<Utc>>,
        cache: &PoolCache,
    ) -> Arc<LocalPool> {
        let lp = self
            .inner
            .pools
            .entry(pool)
            .or_insert_with(|| Arc::new(LocalPool::new(pool, period_end)))
            .clone();
        cache.store(Some(lp.clone()));
        lp
    }

    /// One pool's reservation into `hold` (`Err(OutOfCredits)` stands for "does not fit").
    async fn reserve(
        &self,
        hold: &mut SpendHold,
        lp: Arc<LocalPool>,
        units: i64,
        now_ms: u64,
    ) -> Result<(), Refusal> {
        let mut waits = 0;
        loop {
            if self.take_now(hold, lp.clone(), units, now_ms) {
                return Ok(());
            }
            match self.wait_for_room(&lp, units, now_ms, &mut waits).await {
                Room::Retry => continue,
                Room::Refused => return Err(self.refused(Refusal::OutOfCredits)),
                Room::Gone => return Ok(()), // nothing to hold against any more
                Room::Unavailable => return self.unavailable(hold, &lp, units),
            }
        }
    }

    /// A watched stream's extension of `units` from the pool `h` holds, leasing more when this
    /// instance's share does not hold it. `false`: it does not fit (the stream is cut).
    async fn extend_held(&self, h: &mut Held, units: i64, now_ms: u64) -> bool {
        let mut waits = 0;
        loop {
            if h.lease_id == 0 {
                h.pool.free.fetch_sub(units, Ordering::AcqRel); // held without a lease
            } else if !h.pool.try_take(units) {
                match self.wait_for_room(&h.pool, units, now_ms, &mut waits).await {
                    Room::Retry => continue,
                    Room::Refused => return false,
                    Room::Gone => return true,
                    Room::Unavailable => match self.inner.settings.fail {
                        FailPolicy::Closed => return false,
                        FailPolicy::Open => {
                            self.inner.metrics.fail_open.increment(1);
                            h.pool.free.fetch_sub(units, Ordering::AcqRel);
                        }
                    },
                }
            }
            h.units = h.units.saturating_add(units);
            self.refill_if_low(&h.pool, units);
            return true;
        }
    }

    /// `lp` did not hold `units`: asks the database for a lease (one request at a time per
    /// pool; the others wait for its answer), unless it said a moment ago that this does not fit.
    async fn wait_for_room(
        &self,
        lp: &Arc<LocalPool>,
        units: i64,
        now_ms: u64,
        waits: &mut u32,
    ) -> Room {
        let inner = &self.inner;
        // The database said a moment ago that this does not fit: do not ask again yet.
        let at = lp.exhausted_at_ms.load(Ordering::Acquire);
        if at != 0
            && now_ms.saturating_sub(at) < 1000
            && units > lp.exhausted_left.load(Ordering::Acquire) + lp.free.load(Ordering::Acquire)
        {
            return Room::Refused;
        }
        if *waits > 3 {
            return Room::Refused;
        }
        *waits += 1;
        if lp
            .refilling
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let outcome = self.refill(lp, units).await;
            lp.refilling.store(false, Ordering::Release);
            lp.refilled.notify_waiters();
            match outcome {
                Ok(LeaseOutcome::Granted { .. }) => Room::Retry,
                // A request may have settled meanwhile.
                Ok(LeaseOutcome::Exhausted { .. }) if lp.free.load(Ordering::Acquire) >= units => {
                    Room::Retry
                }
                Ok(LeaseOutcome::Exhausted { .. }) => Room::Refused,
                Ok(LeaseOutcome::Gone) => Room::Gone,
                Err(()) => Room::Unavailable,
            }
        } else {
            let notified = lp.refilled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if lp.refilling.load(Ordering::Acquire)
                && tokio::time::timeout(inner.settings.lease_wait, notified)
                    .await
                    .is_err()
            {
                return Room::Unavailable;
            }
            Room::Retry
        }
    }

    /// The fail policy for a pool that needed a lease the database could not give.
    fn unavailable(
        &self,
        hold: &mut SpendHold,
        lp: &Arc<LocalPool>,
        units: i64,
    ) -> Result<(), Refusal> {
        match self.inner.settings.fail {
            FailPolicy::Closed => Err(self.refused(Refusal::Unavailable)),
            FailPolicy::Open => {
                self.inner.metrics.fail_open.increment(1);
                // Held without a lease: settled by the writer all the same, counted locally.
                lp.free.fetch_sub(units, Ordering::AcqRel);
                hold.held.push(Held {
                    pool: lp.clone(),
                    units,
                    lease_id: 0,
                });
                Ok(())
            }
        }
    }

    fn refused(&self, r: Refusal) -> Refusal {
        let m = &self.inner.metrics;
        match r {
            Refusal::OutOfCredits => m.refused_credits.increment(1),
            Refusal::Budget { .. } => m.refused_budget.increment(1),
            Refusal::Unavailable => m.refused_unavailable.increment(1),
        }
        r
    }

    fn ms(&self, now: DateTime<Utc>) -> u64 {
        self.inner.ms(now)
    }

    /// Takes a lease for `lp` on the database runtime and adds it to `free`. `Err` = the
    /// database did not answer within `lease_wait`.
    async fn refill(&self, lp: &Arc<LocalPool>, units: i64) -> Result<LeaseOutcome, ()> {
        let inner = self.inner.clone();
        let lp2 = lp.clone();
        let task = self
            .inner
            .db
            .spawn(async move { take(&inner, &lp2, units).await });
        match tokio::time::timeout(self.inner.settings.lease_wait, task).await {
            Ok(Ok(Ok(outcome))) => Ok(outcome),
            _ => Err(()),
        }
    }

    /// Starts a refill ahead of need when `lp`'s free units fall below a quarter of its last
    /// lease (or below what was just taken).
    fn refill_if_low(&self, lp: &Arc<LocalPool>, units: i64) {
        let low = lp.last_slice.load(Ordering::Relaxed) / 4;
        if lp.free.load(Ordering::Relaxed) < low.max(units) {
            self.refill_in_background(lp, units);
        }
    }

    fn refill_in_background(&self, lp: &Arc<LocalPool>, units: i64) {
        if lp
            .refilling
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let inner = self.inner.clone();
        let lp = lp.clone();
        self.inner.db.spawn(async move {
            let _ = take(&inner, &lp, units).await;
            lp.refilling.store(false, Ordering::Release);
            lp.refilled.notify_waiters();
        });
    }

    /// The `spend-leases` task: renews this instance's leases, returns idle ones, takes back
    /// expired ones of dead instances, and returns everything when stopped.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let inner = &self.inner;
        let tick = Duration::from_secs(1);
        let renew_every = inner.settings.lease_ttl / 3;
        let mut last_renew = std::time::Instant::now();
        let mut last_reclaim = std::time::Instant::now();
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = tokio::time::sleep(tick) => {}
            }
            let now = self.now();
            if last_renew.elapsed() >= renew_every {
                last_renew = std::time::Instant::now();
                let until =
                    now + chrono::Duration::from_std(inner.settings.lease_ttl).unwrap_or_default();
                if let Err(e) = inner.store.renew_leases(&inner.instance, until).await {
                    tracing::warn!(error = %e, "spend: renewing leases failed; retrying");
                }
            }
            self.return_idle(now, false).await;
            if last_reclaim.elapsed() >= inner.settings.lease_ttl {
                last_reclaim = std::time::Instant::now();
                match inner.store.reclaim_expired_leases(now).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(leases = n, "spend: took back expired leases"),
                    Err(e) => {
                        tracing::warn!(error = %e, "spend: taking back expired leases failed")
                    }
                }
            }
        }
        self.return_idle(self.now(), true).await;
    }

    /// Returns the free part of leases idle for `idle_return` (or of periods that ended), or of
    /// all (`all`, at shutdown); forgets pools nobody holds.
    async fn return_idle(&self, now: DateTime<Utc>, all: bool) {
        let inner = &self.inner;
        let idle_ms = u64::try_from(inner.settings.idle_return.as_millis()).unwrap_or(u64::MAX);
        let now_ms = self.ms(now);
        let candidates: Vec<Arc<LocalPool>> = inner
            .pools
            .iter()
            // A period that ended is idle from then on (no request maps to it any more).
            .filter(|e| {
                all || now_ms.saturating_sub(e.value().used_at_ms.load(Ordering::Relaxed))
                    >= idle_ms
            })
            .map(|e| e.value().clone())
            .collect();
        for lp in candidates {
            if lp.refilling.load(Ordering::Acquire) {
                continue;
            }
            let lease_id = lp.lease_id.load(Ordering::Acquire);
            let free = lp.free.swap(0, Ordering::AcqRel);
            if free > 0 && lease_id != 0 {
                let metric = lp.pool.metric();
                if let Err(e) = inner
                    .store
                    .return_lease(&lp.pool, lease_id, from_units(metric, free), now)
                    .await
                {
                    // Kept: it expires with the lease if the database stays away.
                    lp.free.fetch_add(free, Ordering::AcqRel);
                    tracing::warn!(error = %e, "spend: returning a lease failed; it will expire");
                    continue;
                }
            } else if free != 0 {
                lp.free.fetch_add(free, Ordering::AcqRel);
            }
            // Held by nobody but the map and this loop: no key caches it, and no request
            // holds a reservation from it (each `Held` owns a reference).
            inner.pools.remove_if(&lp.pool, |_, v| {
                Arc::strong_count(v) <= 2 && v.free.load(Ordering::Acquire) == 0
            });
        }
    }
}

impl Inner {
    /// Milliseconds since the stage was made, at `now` (at least 1: 0 means "never").
    fn ms(&self, now: DateTime<Utc>) -> u64 {
        u64::try_from((now - self.started).num_milliseconds())
            .unwrap_or(0)
            .max(1)
    }
}

/// Takes a lease for `lp` (on the database runtime).
async fn take(inner: &Inner, lp: &LocalPool, units: i64) -> Result<LeaseOutcome, ()> {
    let metric = lp.pool.metric();
    let slice = budget::lease_slice(units, inner.settings.reservations_per_lease);
    let ttl = chrono::Duration::from_std(inner.settings.lease_ttl).unwrap_or_default();
    match inner
        .store
        .take_lease(
            &inner.instance,
            &lp.pool,
            from_units(metric, units),
            from_units(metric, slice),
            ttl,
            (inner.clock)(),
        )
        .await
    {
        Ok(LeaseOutcome::Granted { lease_id, amount }) => {
            let got = to_units(metric, amount);
            lp.lease_id.store(lease_id, Ordering::Release);
            lp.last_slice.store(got, Ordering::Relaxed);
            lp.exhausted_at_ms.store(0, Ordering::Release);
            lp.free.fetch_add(got, Ordering::AcqRel);
            inner.metrics.leases_granted.increment(1);
            Ok(LeaseOutcome::Granted { lease_id, amount })
        }
        Ok(LeaseOutcome::Exhausted { available }) => {
            lp.exhausted_left
                .store(to_units(metric, available), Ordering::Release);
            lp.exhausted_at_ms
                .store(inner.ms((inner.clock)()), Ordering::Release);
            inner.metrics.leases_exhausted.increment(1);
            Ok(LeaseOutcome::Exhausted { available })
        }
        Ok(LeaseOutcome::Gone) => Ok(LeaseOutcome::Gone),
        Err(e) => {
            inner.metrics.lease_errors.increment(1);
            tracing::warn!(error = %e, "spend: taking a lease failed");
            Err(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::UsageSource;
    use rust_decimal::Decimal;
    use smallvec::smallvec;
    use std::str::FromStr;

    fn record(status: i32, cost: &str, tokens: i64) -> UsageRecord {
        UsageRecord {
            status_code: status,
            prompt_tokens: tokens,
            tokens_used: tokens,
            cost: Decimal::from_str(cost).unwrap(),
            usage_source: Some(UsageSource::Provider),
            ..UsageRecord::sample("r")
        }
    }

    #[test]
    fn settling_gives_back_what_was_not_used() {
        // (free before, reserved units, the row, lease id) → (free after, charges named)
        let check =
            |free: i64, units: i64, row: UsageRecord, lease: i64, after: i64, named: usize| {
                let lp = Arc::new(LocalPool::new(Pool::Credit { user_id: 1 }, None));
                lp.free.store(free, Ordering::Relaxed);
                assert!(lp.try_take(units));
                let mut hold = SpendHold {
                    held: smallvec![Held {
                        pool: lp.clone(),
                        units,
                        lease_id: lease,
                    }],
                    watch: None,
                };
                let mut row = row;
                hold.settle(&mut row);
                drop(hold);
                assert_eq!(lp.free.load(Ordering::Relaxed), after);
                assert_eq!(row.charges.len(), named);
                assert_eq!(Arc::strong_count(&lp), 1, "the hold let the pool go");
            };
        // $0.01 reserved (10⁸ units), $0.0015 used: $0.0085 back.
        check(
            500_000_000,
            100_000_000,
            record(200, "0.0015", 15),
            7,
            485_000_000,
            1,
        );
        // An upstream error costs nothing: all of it back.
        check(
            500_000_000,
            100_000_000,
            record(500, "0", 0),
            7,
            500_000_000,
            1,
        );
        // More used than reserved (no max_tokens): free goes down by the difference.
        check(
            100_000_000,
            100_000_000,
            record(200, "0.02", 15),
            7,
            -100_000_000,
            1,
        );
        // Admitted without a lease (fail = open): counted here, no lease named.
        check(0, 0, record(200, "0", 0), 0, 0, 0);
    }

    #[test]
    fn extensions_needed_are_whole_chunks() {
        // (seen, covered, chunk) → extensions
        for (seen, covered, chunk, expected) in [
            (0, 4096, 4096, 0),
            (4096, 4096, 4096, 0),
            (4097, 4096, 4096, 1),
            (8192, 4096, 4096, 1),
            (8193, 4096, 4096, 2),
            // A chunk of text far past the cover: as many extensions at once.
            (100_000, 4096, 4096, 24),
            (5, 0, 0, 5), // a chunk of 0 counts as 1 (never a division by 0)
            (u64::MAX, 0, 1, u64::MAX),
        ] {
            assert_eq!(
                extensions_needed(seen, covered, chunk),
                expected,
                "{seen} {covered} {chunk}"
            );
        }
    }

    #[test]
    fn a_watched_stream_extends_its_reservation_from_what_is_held() {
        // Two pools held (free after admission, units held, what one extension takes, lease);
        // the stream's bound reaches each of `seens` in turn. Covered: 100 tokens, extensions
        // of 50. → (what `cover` answered each time, free after, held after). `false` = the
        // extension does not fit what this instance holds (`extend` asks the database); it
        // takes from no pool.
        type Pools = [(i64, i64, i64, i64); 2];
        let check = |pools: Pools,
                     seens: &[u64],
                     answers: &[bool],
                     free_after: [i64; 2],
                     held_after: [i64; 2]| {
            let lps: Vec<_> = pools
                .iter()
                .map(|&(free, ..)| {
                    let lp = Arc::new(LocalPool::new(Pool::Credit { user_id: 1 }, None));
                    lp.free.store(free, Ordering::Relaxed);
                    lp
                })
                .collect();
            let mut hold = SpendHold {
                held: pools
                    .iter()
                    .zip(&lps)
                    .map(|(&(_, units, _, lease_id), lp)| Held {
                        pool: lp.clone(),
                        units,
                        lease_id,
                    })
                    .collect(),
                watch: Some(Box::new(Watch {
                    covered: 100,
                    chunk: 50,
                    chunk_units: pools.iter().map(|p| p.2).collect(),
                    relayed: 0,
                    cut: false,
                    stage: None,
                    streams_cut: Counter::noop(),
                })),
            };
            let got: Vec<bool> = seens.iter().map(|&s| hold.cover(s)).collect();
            assert_eq!(got, answers, "{pools:?} {seens:?}");
            let free: Vec<i64> = lps.iter().map(|l| l.free.load(Ordering::Relaxed)).collect();
            assert_eq!(free, free_after, "free after {pools:?} {seens:?}");
            let held: Vec<i64> = hold.held.iter().map(|h| h.units).collect();
            assert_eq!(held, held_after, "held after {pools:?} {seens:?}");
            assert_eq!(hold.cut_output(), None, "cover alone never cuts");
            // Whatever happened, dropping the hold gives back all it held.
            drop(hold);
            for (lp, p) in lps.iter().zip(&pools) {
                assert_eq!(lp.free.load(Ordering::Relaxed), p.0 + p.1);
            }
        };
        // Within the cover: nothing taken.
        check(
            [(1000, 10, 5, 1), (1000, 10, 7, 2)],
            &[10, 100],
            &[true, true],
            [1000, 1000],
            [10, 10],
        );
        // Past it: one extension from each pool, then two at once (150 → 250).
        check(
            [(1000, 10, 5, 1), (1000, 10, 7, 2)],
            &[101, 150, 250],
            &[true, true, true],
            [985, 979],
            [25, 31],
        );
        // The second pool cannot give the second extension: none is taken from either (the
        // first pool's share given back), and asking again answers the same.
        check(
            [(1000, 10, 5, 1), (10, 10, 7, 2)],
            &[120, 150, 151, 152],
            &[true, true, false, false],
            [995, 3],
            [15, 17],
        );
        // Nothing left locally at the first extension.
        check(
            [(4, 10, 5, 1), (1000, 10, 0, 2)],
            &[60, 101],
            &[true, false],
            [4, 1000],
            [10, 10],
        );
        // A pool held without a lease (fail = "open") is counted, never refused; a requests
        // budget's extension is 0.
        check(
            [(0, 10, 5, 0), (0, 1, 0, 2)],
            &[101],
            &[true],
            [-5, 0],
            [15, 1],
        );
    }

    #[tokio::test]
    async fn without_the_stage_an_extension_that_does_not_fit_cuts() {
        let lp = Arc::new(LocalPool::new(Pool::Credit { user_id: 1 }, None));
        lp.free.store(4, Ordering::Relaxed);
        let mut hold = SpendHold {
            held: smallvec![Held {
                pool: lp.clone(),
                units: 10,
                lease_id: 1,
            }],
            watch: Some(Box::new(Watch {
                covered: 100,
                chunk: 50,
                chunk_units: vec![5],
                relayed: 0,
                cut: false,
                stage: None,
                streams_cut: Counter::noop(),
            })),
        };
        assert!(hold.cover(60));
        assert!(!hold.cover(101));
        assert!(!hold.extend(101).await);
        assert_eq!(hold.cut_output(), Some(60), "charged what was relayed");
        assert!(!hold.cover(101), "cut stays cut");
        assert_eq!(lp.free.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn extensions_are_priced_as_output() {
        let price = UnitPrice::of(&crate::cost::Price {
            input: Decimal::from_str("1").unwrap(),
            output: Decimal::from_str("3").unwrap(),
            cached_input: None,
            cache_write: None,
        });
        // (metric, chunk, price) → units: $3 per million output tokens = 30,000 units a token.
        for (metric, chunk, price, expected) in [
            (Metric::Cost, 4096, Some(price), 4096 * 30_000),
            (Metric::Cost, 4096, None, 0),
            (Metric::Tokens, 4096, Some(price), 4096),
            (Metric::Requests, 4096, Some(price), 0),
        ] {
            assert_eq!(
                extension_units(metric, chunk, price),
                expected,
                "{metric:?}"
            );
        }
    }

    #[test]
    fn dropped_unsettled_everything_goes_back() {
        let lp = Arc::new(LocalPool::new(Pool::Credit { user_id: 1 }, None));
        lp.free.store(10, Ordering::Relaxed);
        assert!(lp.try_take(7));
        assert!(!lp.try_take(7), "3 left");
        drop(SpendHold {
            held: smallvec![Held {
                pool: lp.clone(),
                units: 7,
                lease_id: 1,
            }],
            watch: None,
        });
        assert_eq!(lp.free.load(Ordering::Relaxed), 10);
        assert!(lp.try_take(0), "nothing always fits");
    }

    #[test]
    fn refusals() {
        let now = DateTime::parse_from_rfc3339("2026-12-02T23:59:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let check = |r: Refusal, retry: Option<u64>, label: &str, message: &str| {
            assert_eq!(r.retry_after(now), retry, "{r:?}");
            assert_eq!(r.label(), label);
            assert_eq!(r.to_string(), message);
        };
        check(
            Refusal::OutOfCredits,
            None,
            "insufficient_quota",
            "You exceeded your current quota: the credit balance cannot cover this request's maximum cost. Add credits, or lower max_tokens.",
        );
        check(
            Refusal::Budget {
                metric: Metric::Cost,
                period: Period::Day,
                owner: "key",
                resets_at: Some(now + chrono::Duration::seconds(60)),
            },
            Some(61),
            "budget_exceeded",
            "The daily cost budget of this API key cannot cover this request; it resets at 2026-12-03T00:00:00Z.",
        );
        check(
            Refusal::Budget {
                metric: Metric::Requests,
                period: Period::Total,
                owner: "user",
                resets_at: None,
            },
            None,
            "budget_exceeded",
            "The requests budget of your user cannot cover this request.",
        );
        check(
            Refusal::Unavailable,
            Some(1),
            "spend_unavailable",
            "Budgets and credits cannot be checked right now; retry shortly.",
        );
    }
}
