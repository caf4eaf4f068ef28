//! The rate-limit arithmetic: GCRA (the generic cell rate algorithm, a token bucket kept as one
//! number), so a limit is smooth — no clumping at window edges — and costs one atomic
//! compare-and-swap per check, no lock and no allocation. Pure: time comes in as an argument
//! (nanoseconds on any monotonic clock the caller chooses), so it is tested on an injected clock.
//!
//! A limit of `limit` units per `period` (requests, or tokens) lets a full bucket of `limit` units
//! through at once and refills at `limit / period`. The state is the *theoretical arrival time*
//! (TAT): the time at which the bucket would be full again. A cost of `n` units is admitted when,
//! after adding `n` emission intervals to the TAT, it lies no more than one `period` ahead of now.
//!
//! Used by the rate-limit stage (`limits.rs`: keys and users), the per-address limit on failed
//! authentications (`address_limits.rs`) and, in its bucket-level form in Lua, by the limits
//! shared through Redis (`shared_limits.rs`).

use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// `limit` units per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub limit: NonZeroU64,
    pub period: Duration,
}

impl Rate {
    pub fn new(limit: NonZeroU64, period: Duration) -> Rate {
        Rate { limit, period }
    }

    /// The period in nanoseconds, at least 1.
    fn period_ns(&self) -> u64 {
        u64::try_from(self.period.as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Nanoseconds one unit adds to the TAT (rounded up, so the limit is never exceeded).
    fn interval_ns(&self) -> u64 {
        self.period_ns().div_ceil(self.limit.get())
    }

    /// Whether `interval` is [`Rate::interval_ns`] of this rate — the smallest whole number of
    /// nanoseconds that `limit` times covers the period — checked with two multiplications
    /// instead of the division.
    fn is_interval(&self, interval: u64) -> bool {
        let (i, limit, period) = (
            u128::from(interval),
            u128::from(self.limit.get()),
            u128::from(self.period_ns()),
        );
        i > 0 && i * limit >= period && (i - 1) * limit < period
    }
}

/// What a check answered, with what the OpenAI `x-ratelimit-*` headers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Units that could still be taken at once after this check.
    pub remaining: u64,
    /// When refused: how long until the same cost would be admitted (`Retry-After`).
    pub retry_after: Duration,
    /// How long until the bucket is full again (`x-ratelimit-reset-*`).
    pub reset_after: Duration,
}

/// One limit's state: the TAT in nanoseconds. Shared by every request of its key/user/account.
#[derive(Debug, Default)]
pub struct Gcra {
    tat_ns: AtomicU64,
    /// The emission interval of the rate last used here, kept so a check needs no division; any
    /// value read is verified against the rate before use (a racing store or a changed limit
    /// only costs the division again).
    interval_ns: AtomicU64,
}

impl Gcra {
    pub fn new() -> Gcra {
        Gcra::default()
    }

    /// Takes `cost` units at `now_ns` if they fit; otherwise changes nothing.
    pub fn acquire(&self, rate: Rate, now_ns: u64, cost: u64) -> Decision {
        let interval = self.interval(rate);
        let period = rate.period_ns();
        let mut tat = self.tat_ns.load(Ordering::Acquire);
        loop {
            let base = tat.max(now_ns);
            let new_tat = base.saturating_add(interval.saturating_mul(cost));
            // Admitted while the bucket, after this cost, is no more than one period "full".
            let ahead = new_tat - now_ns;
            if ahead > period {
                let retry = ahead - period;
                return Decision {
                    allowed: false,
                    remaining: remaining(period, base - now_ns, interval),
                    retry_after: Duration::from_nanos(retry),
                    reset_after: Duration::from_nanos(base - now_ns),
                };
            }
            match self.tat_ns.compare_exchange_weak(
                tat,
                new_tat,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Decision {
                        allowed: true,
                        remaining: remaining(period, ahead, interval),
                        retry_after: Duration::ZERO,
                        reset_after: Duration::from_nanos(ahead),
                    }
                }
                Err(current) => tat = current,
            }
        }
    }

    /// Settles a cost taken on an estimate: `actual` units were used where `estimated` were
    /// taken (a token limit admits on the request's estimate and settles on the usage record).
    /// A refund moves the TAT back, never before `now_ns`.
    pub fn settle(&self, rate: Rate, now_ns: u64, estimated: u64, actual: u64) {
        let interval = self.interval(rate);
        let _ = self
            .tat_ns
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some(if actual >= estimated {
                    tat.max(now_ns)
                        .saturating_add(interval.saturating_mul(actual - estimated))
                } else {
                    tat.saturating_sub(interval.saturating_mul(estimated - actual))
                        .max(now_ns)
                })
            });
    }
}

impl Gcra {
    /// `rate`'s emission interval, from the cache when it is the right one.
    fn interval(&self, rate: Rate) -> u64 {
        let cached = self.interval_ns.load(Ordering::Relaxed);
        if rate.is_interval(cached) {
            return cached;
        }
        let interval = rate.interval_ns();
        self.interval_ns.store(interval, Ordering::Relaxed);
        interval
    }
}

/// Whole units that still fit when the bucket is `ahead_ns` from full.
fn remaining(period_ns: u64, ahead_ns: u64, interval_ns: u64) -> u64 {
    period_ns.saturating_sub(ahead_ns) / interval_ns
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn rate(limit: u64, secs: u64) -> Rate {
        Rate::new(NonZeroU64::new(limit).unwrap(), Duration::from_secs(secs))
    }

    /// Runs (time in ms, cost) → allowed? on one limit.
    fn check(r: Rate, steps: &[(u64, u64, bool)]) {
        let g = Gcra::new();
        for &(ms, cost, expected) in steps {
            let d = g.acquire(r, 1_000 * S + ms * 1_000_000, cost);
            assert_eq!(d.allowed, expected, "at {ms} ms cost {cost}: {d:?}");
        }
    }

    #[test]
    fn intervals_are_checked_without_dividing() {
        fn check(r: Rate) {
            let i = r.interval_ns();
            assert!(r.is_interval(i), "{r:?}: {i}");
            for wrong in [0, i.saturating_sub(1), i + 1, i * 2] {
                assert_eq!(r.is_interval(wrong), wrong == i, "{r:?}: {wrong} vs {i}");
            }
        }
        for (limit, secs) in [
            (1, 60),
            (7, 60),
            (60, 60),
            (1_000_000_000, 60),
            (1_000_000_000, 86_400),
            (3, 86_400),
            (u64::MAX / 4, 60),
        ] {
            check(rate(limit, secs));
        }
        // One limit's cache follows a changed rate.
        let g = Gcra::new();
        assert!(g.acquire(rate(1, 60), 100 * S, 1).allowed);
        assert!(!g.acquire(rate(1, 60), 100 * S, 1).allowed);
        assert!(g.acquire(rate(2, 60), 130 * S, 1).allowed);
    }

    #[test]
    fn a_burst_of_the_limit_then_the_refill_rate() {
        // 60 per minute: 60 at once, the 61st refused, one more each second after.
        let mut steps: Vec<(u64, u64, bool)> = (0..60).map(|_| (0, 1, true)).collect();
        steps.push((0, 1, false));
        steps.push((999, 1, false));
        steps.push((1_000, 1, true));
        steps.push((1_000, 1, false));
        steps.push((2_000, 1, true));
        check(rate(60, 60), &steps);
    }

    #[test]
    fn no_clumping_at_window_edges() {
        // A fixed window would let 2×limit through around its edge; GCRA does not.
        let g = Gcra::new();
        let r = rate(10, 10);
        let t0 = 5 * S;
        let admitted_before = (0..20)
            .filter(|_| g.acquire(r, t0 + 9 * S, 1).allowed)
            .count();
        let admitted_after = (0..20)
            .filter(|_| g.acquire(r, t0 + 10 * S, 1).allowed)
            .count();
        assert_eq!((admitted_before, admitted_after), (10, 1));
    }

    #[test]
    fn costs_and_settlement() {
        // 1000 tokens a minute: an estimate of 800 fits, another 800 does not.
        let g = Gcra::new();
        let r = rate(1000, 60);
        let now = 100 * S;
        assert!(g.acquire(r, now, 800).allowed);
        let refused = g.acquire(r, now, 800);
        assert!(!refused.allowed);
        assert_eq!(refused.remaining, 200);
        // The request used 100 tokens: 700 come back, and 800 fit again.
        g.settle(r, now, 800, 100);
        assert!(g.acquire(r, now, 800).allowed);
        // Using more than estimated pushes the next request back.
        g.settle(r, now, 0, 500);
        assert!(!g.acquire(r, now, 200).allowed);
    }

    #[test]
    fn headers_say_what_is_left_and_when() {
        let g = Gcra::new();
        let r = rate(3, 3); // one per second, burst 3
        let now = 10 * S;
        let first = g.acquire(r, now, 1);
        assert_eq!(
            (first.remaining, first.reset_after),
            (2, Duration::from_secs(1))
        );
        g.acquire(r, now, 1);
        let third = g.acquire(r, now, 1);
        assert_eq!(
            (third.remaining, third.reset_after),
            (0, Duration::from_secs(3))
        );
        let refused = g.acquire(r, now, 1);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, Duration::from_secs(1));
    }

    #[test]
    fn concurrent_acquires_never_exceed_the_limit() {
        let g = std::sync::Arc::new(Gcra::new());
        let r = rate(1000, 60);
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let g = g.clone();
                std::thread::spawn(move || {
                    (0..500).filter(|_| g.acquire(r, 50 * S, 1).allowed).count()
                })
            })
            .collect();
        let admitted: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(admitted, 1000);
    }
}
