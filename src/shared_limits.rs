//! The Redis side of the rate-limit stage: limits shared by every instance that names the same
//! `[limits] redis_url` and key prefix. Each admission is one round trip running one server-side
//! script ([`ADMIT`]) that checks every limit of the request and takes from all of them or from
//! none, atomically, on Redis's own clock (instances with skewed clocks agree). What a request
//! gives back when it ends — its token estimate settled on actual usage, its concurrency slots —
//! goes to a background task ([`Worker`], `rate-limit-redis`) that sends it in batches (one
//! [`UPDATE`] script per batch), so a request's end never waits on Redis.
//!
//! - **Rate limits** are kept as a bucket *level* (units in use, decaying at `limit / period`)
//!   and the time it was last written, in microseconds: the GCRA of `gcra.rs` in the form Lua's
//!   doubles hold exactly (a nanosecond TAT since the epoch does not fit 53 bits). A key expires
//!   once its bucket would be empty.
//! - **Concurrency** is a sorted set of leases (request id → expiry on Redis's clock). A running
//!   request's lease is renewed every [`LEASE`] / 3 while it runs; one whose instance died
//!   expires within [`LEASE`], so a crash never leaks a slot for longer.
//! - **Up or down**: a failed or slow (> `[limits] redis_timeout_ms`) call marks Redis down,
//!   logged once and counted; while down the stage applies `[limits] fail` (the local share of
//!   each limit, or refuse) and nothing waits on Redis; the worker probes it every second and
//!   marks it up again by itself.
//! - **Instances**: the worker writes a heartbeat every second; the number of instances seen in
//!   the last [`INSTANCE_WINDOW`] is what the `local` policy divides each limit by.
//!
//! This module knows Redis and nothing of keys, users or headers: `limits.rs` turns a request's
//! limits into [`Slot`]s and the script's answers into decisions.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use redis::aio::ConnectionManager;
use redis::Script;
use tokio::sync::{mpsc, watch};

/// How long a concurrency lease lasts without renewal: the longest a crashed instance's slots
/// stay taken.
pub const LEASE: Duration = Duration::from_secs(30);
/// Instances whose heartbeat is older than this are no longer counted.
pub const INSTANCE_WINDOW: Duration = Duration::from_secs(10);
/// How often the worker writes its heartbeat (or, while Redis is down, probes it).
const TICK: Duration = Duration::from_secs(1);
/// Settlements and releases waiting for the worker; past it they are dropped and counted (a
/// dropped release holds its slot until the lease expires).
const QUEUE: usize = 65_536;
/// Most operations sent in one script call.
const BATCH: usize = 512;

/// What the stage does while Redis cannot be reached (`[limits] fail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailPolicy {
    /// Each instance enforces its share: every limit divided by the instances last seen.
    Local,
    /// Limited requests are refused (503, Retry-After 1) until Redis answers again.
    Closed,
}

impl FailPolicy {
    pub fn label(self) -> &'static str {
        match self {
            FailPolicy::Local => "local",
            FailPolicy::Closed => "closed",
        }
    }
}

/// `[limits] redis_*`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// Prepended to every key this gateway writes; instances sharing limits share it.
    pub key_prefix: String,
    /// Longest an admission waits on Redis before the fail policy applies.
    pub timeout: Duration,
    pub fail: FailPolicy,
}

/// One limit a request is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    /// `limit` units per `period_us`; the request takes `cost`.
    Rate {
        key: String,
        limit: u64,
        period_us: u64,
        cost: u64,
    },
    /// At most `limit` leases at once; the request takes one.
    Concurrency { key: String, limit: u64 },
}

impl Slot {
    pub fn key(&self) -> &str {
        match self {
            Slot::Rate { key, .. } | Slot::Concurrency { key, .. } => key,
        }
    }
}

/// The script's answer for one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotReply {
    pub allowed: bool,
    /// Units left after this request (rate) or slots left (concurrency).
    pub remaining: u64,
    /// Until the bucket is empty again (rate), in microseconds.
    pub reset_us: u64,
    /// When refused: until the same cost would fit, in microseconds.
    pub retry_us: u64,
}

/// Redis could not be asked (down, slow, or answered something unexpected).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(String);

/// Checks every slot and takes from all of them or none. `ARGV[1]`: now in µs ('' = Redis's
/// `TIME`); `ARGV[2]`: the lease member (request id); `ARGV[3]`: lease µs. Then four per key:
/// kind (`r` rate | `c` concurrency), limit, period µs, cost. Returns four integers per key:
/// allowed (1/0), remaining, reset µs, retry µs.
pub const ADMIT: &str = r#"
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local member, lease = ARGV[2], tonumber(ARGV[3])
local out, level, ok = {}, {}, true
for i, key in ipairs(KEYS) do
  local a, o = 3 + (i - 1) * 4, (i - 1) * 4
  local kind, limit = ARGV[a + 1], tonumber(ARGV[a + 2])
  local period, cost = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  if kind == 'r' then
    local s = redis.call('HMGET', key, 'l', 't')
    local l, t = tonumber(s[1]) or 0, tonumber(s[2]) or now
    if now > t then l = math.max(0, l - (now - t) * limit / period) end
    level[i] = l
    local after = l + cost
    if after <= limit then
      out[o + 1], out[o + 2] = 1, math.floor(limit - after)
      out[o + 3], out[o + 4] = math.ceil(after * period / limit), 0
    else
      ok = false
      out[o + 1], out[o + 2] = 0, math.floor(math.max(0, limit - l))
      out[o + 3], out[o + 4] = math.ceil(l * period / limit), math.ceil((after - limit) * period / limit)
    end
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local n = redis.call('ZCARD', key)
    if n < limit then
      out[o + 1], out[o + 2], out[o + 3], out[o + 4] = 1, limit - n - 1, 0, 0
    else
      ok = false
      out[o + 1], out[o + 2], out[o + 3], out[o + 4] = 0, 0, 0, 1000000
    end
  end
end
if ok then
  for i, key in ipairs(KEYS) do
    local a = 3 + (i - 1) * 4
    local limit, period, cost = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
    if ARGV[a + 1] == 'r' then
      local l = level[i] + cost
      redis.call('HSET', key, 'l', string.format('%.17g', l), 't', string.format('%.0f', now))
      redis.call('PEXPIRE', key, math.ceil(l * period / limit / 1000) + 1000)
    else
      redis.call('ZADD', key, string.format('%.0f', now + lease), member)
      redis.call('PEXPIRE', key, math.ceil(lease / 1000) + 1000)
    end
  end
end
return out
"#;

/// Applies a batch of operations, four arguments per key after `ARGV[1]` (now in µs, '' = `TIME`):
/// `s` settle (limit, period µs, used − estimated), `x` release (member), `n` renew (member,
/// lease µs; only a lease still held), `h` heartbeat (member, window µs). Returns the instances
/// counted by the last heartbeat (0 without one).
pub const UPDATE: &str = r#"
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local instances = 0
for i, key in ipairs(KEYS) do
  local a = 1 + (i - 1) * 4
  local op = ARGV[a + 1]
  if op == 's' then
    local limit, period, delta = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
    local s = redis.call('HMGET', key, 'l', 't')
    local l, t = tonumber(s[1]) or 0, tonumber(s[2]) or now
    if now > t then l = math.max(0, l - (now - t) * limit / period) end
    l = math.max(0, l + delta)
    redis.call('HSET', key, 'l', string.format('%.17g', l), 't', string.format('%.0f', now))
    redis.call('PEXPIRE', key, math.ceil(l * period / limit / 1000) + 1000)
  elseif op == 'x' then
    redis.call('ZREM', key, ARGV[a + 2])
  elseif op == 'n' then
    redis.call('ZADD', key, 'XX', string.format('%.0f', now + tonumber(ARGV[a + 3])), ARGV[a + 2])
  elseif op == 'h' then
    local window = tonumber(ARGV[a + 3])
    redis.call('ZADD', key, string.format('%.0f', now), ARGV[a + 2])
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
    redis.call('PEXPIRE', key, math.ceil(window / 1000) * 2)
    instances = redis.call('ZCARD', key)
  end
end
return instances
"#;

/// One operation for the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Settle {
        key: String,
        limit: u64,
        period_us: u64,
        delta: i64,
    },
    Release {
        key: String,
        member: String,
    },
    Renew {
        key: String,
        member: String,
    },
    Heartbeat {
        key: String,
        member: String,
    },
}

/// The handles of this module's metrics, registered when Redis is configured.
struct Metrics {
    up: Gauge,
    instances: Gauge,
    round_trip: Histogram,
    admit_errors: Counter,
    update_errors: Counter,
    ops_dropped: Counter,
    fallback: Counter,
}

/// The shared limits' client: the admission call on the request path, and the state the worker
/// keeps current.
pub struct Redis {
    conn: ConnectionManager,
    admit: Script,
    prefix: String,
    timeout: Duration,
    pub fail: FailPolicy,
    up: AtomicBool,
    /// Instances seen by the last heartbeat (at least 1).
    instances: AtomicU64,
    /// This process's heartbeat member.
    instance_id: String,
    ops: mpsc::Sender<Op>,
    /// Concurrency leases held by running requests (member → keys), renewed by the worker.
    leases: Mutex<HashMap<String, Vec<String>>>,
    metrics: Metrics,
}

/// The background half: run it once (it returns when `stop` changes, after sending what is
/// left).
pub struct Worker {
    redis: Arc<Redis>,
    ops: mpsc::Receiver<Op>,
    update: Script,
}

impl Redis {
    /// Makes the client without waiting for Redis: a gateway starts while Redis is down (its
    /// fail policy applies until the worker reaches it).
    pub fn new(settings: &Settings) -> Result<(Arc<Redis>, Worker), String> {
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| format!("[limits] redis_url: {e}"))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout.max(Duration::from_millis(100))))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(TICK);
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("[limits] redis_url: {e}"))?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let policy = settings.fail.label();
        let redis = Arc::new(Redis {
            conn,
            admit: Script::new(ADMIT),
            prefix: settings.key_prefix.clone(),
            timeout: settings.timeout,
            fail: settings.fail,
            up: AtomicBool::new(false),
            instances: AtomicU64::new(1),
            instance_id: uuid::Uuid::now_v7().to_string(),
            ops: tx,
            leases: Mutex::new(HashMap::new()),
            metrics: Metrics {
                up: gauge!("tollgate_rate_limit_redis_up"),
                instances: gauge!("tollgate_rate_limit_redis_instances"),
                round_trip: histogram!("tollgate_rate_limit_redis_seconds"),
                admit_errors: counter!("tollgate_rate_limit_redis_errors_total", "op" => "admit"),
                update_errors: counter!("tollgate_rate_limit_redis_errors_total", "op" => "update"),
                ops_dropped: counter!("tollgate_rate_limit_redis_dropped_total"),
                fallback: counter!("tollgate_rate_limit_fallback_total", "policy" => policy),
            },
        });
        redis.metrics.instances.set(1.0);
        let worker = Worker {
            redis: redis.clone(),
            ops: rx,
            update: Script::new(UPDATE),
        };
        Ok((redis, worker))
    }

    /// Every key this gateway writes starts with this.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether admissions go to Redis now (false while it is considered down).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Instances seen sharing these limits (at least 1; the last count while Redis is down).
    pub fn instances(&self) -> u64 {
        self.instances.load(Ordering::Relaxed).max(1)
    }

    /// Counts a request decided by the fail policy.
    pub fn fell_back(&self) {
        self.metrics.fallback.increment(1);
    }

    /// Checks `slots` and takes from all of them or none, holding concurrency slots under
    /// `member` (the request id). `now_us`: Redis's clock when `None` (tests inject one).
    /// An error marks Redis down (logged once); the caller applies the fail policy.
    pub async fn admit(
        &self,
        slots: &[Slot],
        member: &str,
        now_us: Option<u64>,
    ) -> Result<Vec<SlotReply>, Unreachable> {
        let mut call = self.admit.prepare_invoke();
        call.arg(now_us.map_or(String::new(), |n| n.to_string()))
            .arg(member)
            .arg(LEASE.as_micros() as u64);
        for slot in slots {
            call.key(slot.key());
            match slot {
                Slot::Rate {
                    limit,
                    period_us,
                    cost,
                    ..
                } => call.arg("r").arg(*limit).arg(*period_us).arg(*cost),
                Slot::Concurrency { limit, .. } => call.arg("c").arg(*limit).arg(0).arg(1),
            };
        }
        let started = Instant::now();
        let mut conn = self.conn.clone();
        let answer = tokio::time::timeout(self.timeout, call.invoke_async::<Vec<i64>>(&mut conn))
            .await
            .map_err(|_| format!("no answer within {:?}", self.timeout))
            .and_then(|r| r.map_err(|e| e.to_string()))
            .and_then(|v| replies(&v, slots.len()));
        match answer {
            Ok(replies) => {
                self.metrics
                    .round_trip
                    .record(started.elapsed().as_secs_f64());
                let leases: Vec<String> = slots
                    .iter()
                    .filter(|s| matches!(s, Slot::Concurrency { .. }))
                    .map(|s| s.key().to_string())
                    .collect();
                if !leases.is_empty() && replies.iter().all(|r| r.allowed) {
                    self.lock_leases().insert(member.to_string(), leases);
                }
                Ok(replies)
            }
            Err(e) => {
                self.metrics.admit_errors.increment(1);
                self.mark_down(&e);
                Err(Unreachable(e))
            }
        }
    }

    /// Settles a token slot taken on an estimate: `delta` = used − estimated (sent by the worker).
    pub fn settle(&self, key: String, limit: u64, period_us: u64, delta: i64) {
        if delta != 0 {
            self.send(Op::Settle {
                key,
                limit,
                period_us,
                delta,
            });
        }
    }

    /// Gives back the concurrency slots `member` holds (sent by the worker).
    pub fn release(&self, member: &str) {
        let Some(keys) = self.lock_leases().remove(member) else {
            return;
        };
        for key in keys {
            self.send(Op::Release {
                key,
                member: member.to_string(),
            });
        }
    }

    fn send(&self, op: Op) {
        if self.ops.try_send(op).is_err() {
            self.metrics.ops_dropped.increment(1);
        }
    }

    fn lock_leases(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<String>>> {
        // A panic while holding this lock leaves a map that is still whole: keep using it.
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mark_down(&self, why: &str) {
        if self.up.swap(false, Ordering::AcqRel) {
            self.metrics.up.set(0.0);
            tracing::warn!(
                error = why,
                policy = self.fail.label(),
                "rate-limit Redis unreachable: limits fall back to the fail policy until it answers"
            );
        }
    }

    fn mark_up(&self) {
        if !self.up.swap(true, Ordering::AcqRel) {
            self.metrics.up.set(1.0);
            tracing::info!("rate-limit Redis reachable: limits are shared");
        }
    }

    fn heartbeat_key(&self) -> String {
        format!("{}instances", self.prefix)
    }
}

/// The script's flat integers as one reply per slot.
fn replies(v: &[i64], slots: usize) -> Result<Vec<SlotReply>, String> {
    if v.len() != slots * 4 {
        return Err(format!(
            "the admission script answered {} numbers for {slots} limits",
            v.len()
        ));
    }
    let n = |x: i64| u64::try_from(x).unwrap_or(0);
    Ok(v.chunks_exact(4)
        .map(|c| SlotReply {
            allowed: c[0] == 1,
            remaining: n(c[1]),
            reset_us: n(c[2]),
            retry_us: n(c[3]),
        })
        .collect())
}

impl Worker {
    /// Sends settlements and releases as they come, writes the heartbeat (or probes a down
    /// Redis) every second and renews running requests' leases every [`LEASE`] / 3. On `stop`,
    /// gives back every lease still held and sends what is queued, then returns.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renew = tokio::time::interval(LEASE / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                n = self.ops.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        break;
                    }
                    self.apply(&mut batch).await;
                }
                _ = tick.tick() => self.beat().await,
                _ = renew.tick() => {
                    let ops: Vec<Op> = {
                        let leases = self.redis.lock_leases();
                        leases
                            .iter()
                            .flat_map(|(member, keys)| {
                                keys.iter().map(|key| Op::Renew {
                                    key: key.clone(),
                                    member: member.clone(),
                                })
                            })
                            .collect()
                    };
                    for chunk in ops.chunks(BATCH) {
                        self.apply(&mut chunk.to_vec()).await;
                    }
                }
            }
        }
        // Shutdown: requests still holding slots are being cut; give their slots back.
        let members: Vec<String> = self.redis.lock_leases().keys().cloned().collect();
        for m in members {
            self.redis.release(&m);
        }
        while let Ok(op) = self.ops.try_recv() {
            batch.push(op);
            if batch.len() == BATCH {
                self.apply(&mut batch).await;
            }
        }
        self.apply(&mut batch).await;
    }

    /// Heartbeat while up (keeps the instance count); a probe while down.
    async fn beat(&self) {
        let mut ops = vec![Op::Heartbeat {
            key: self.redis.heartbeat_key(),
            member: self.redis.instance_id.clone(),
        }];
        match self.call(&mut ops).await {
            Ok(n) => {
                let n = u64::try_from(n).unwrap_or(1).max(1);
                self.redis.instances.store(n, Ordering::Relaxed);
                self.redis.metrics.instances.set(n as f64);
                self.redis.mark_up();
            }
            Err(e) => {
                self.redis.metrics.update_errors.increment(1);
                self.redis.mark_down(&e);
            }
        }
    }

    /// Sends `ops` (emptied) in one call; while Redis is down they are dropped and counted (a
    /// release then waits for its lease to expire).
    async fn apply(&self, ops: &mut Vec<Op>) {
        if ops.is_empty() {
            return;
        }
        if !self.redis.is_up() {
            self.redis.metrics.ops_dropped.increment(ops.len() as u64);
            ops.clear();
            return;
        }
        if let Err(e) = self.call(ops).await {
            self.redis.metrics.update_errors.increment(1);
            self.redis.metrics.ops_dropped.increment(ops.len() as u64);
            self.redis.mark_down(&e);
        }
        ops.clear();
    }

    async fn call(&self, ops: &mut [Op]) -> Result<i64, String> {
        let mut call = self.update.prepare_invoke();
        call.arg("");
        let lease = LEASE.as_micros() as u64;
        let window = INSTANCE_WINDOW.as_micros() as u64;
        for op in ops.iter() {
            match op {
                Op::Settle {
                    key,
                    limit,
                    period_us,
                    delta,
                } => call
                    .key(key)
                    .arg("s")
                    .arg(*limit)
                    .arg(*period_us)
                    .arg(*delta),
                Op::Release { key, member } => call.key(key).arg("x").arg(member).arg(0).arg(0),
                Op::Renew { key, member } => call.key(key).arg("n").arg(member).arg(lease).arg(0),
                Op::Heartbeat { key, member } => {
                    call.key(key).arg("h").arg(member).arg(window).arg(0)
                }
            };
        }
        let mut conn = self.redis.conn.clone();
        tokio::time::timeout(
            self.redis.timeout.max(Duration::from_secs(1)),
            call.invoke_async::<i64>(&mut conn),
        )
        .await
        .map_err(|_| "no answer in time".to_string())?
        .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_read_four_by_four() {
        fn check(v: &[i64], slots: usize, expected: Result<Vec<SlotReply>, ()>) {
            assert_eq!(replies(v, slots).map_err(|_| ()), expected, "{v:?}");
        }
        let r = |allowed, remaining, reset_us, retry_us| SlotReply {
            allowed,
            remaining,
            reset_us,
            retry_us,
        };
        check(&[], 0, Ok(vec![]));
        check(
            &[1, 59, 1_000_000, 0],
            1,
            Ok(vec![r(true, 59, 1_000_000, 0)]),
        );
        check(
            &[1, 0, 5, 0, 0, 0, 0, 1_000_000],
            2,
            Ok(vec![r(true, 0, 5, 0), r(false, 0, 0, 1_000_000)]),
        );
        check(&[1, -3, -1, 0], 1, Ok(vec![r(true, 0, 0, 0)]));
        check(&[1, 2, 3], 1, Err(()));
        check(&[1, 2, 3, 4], 2, Err(()));
    }
}
