//! Failed authentications per client address: each 401 takes one unit from its address's GCRA
//! bucket (`[auth] failures_per_minute_per_address`), and while the bucket is empty a request from
//! that address whose key is not in the key cache is refused (429, `Retry-After`) before the
//! negative cache or the database is asked.
//!
//! - **The address** is the TCP peer (`session.client_addr()`), an IPv6 one grouped by its /64
//!   (one host owns a /64), an IPv4-mapped IPv6 one read as IPv4. `X-Forwarded-For` is not
//!   trusted: behind a load balancer the balancer's address is what counts.
//! - **What counts**: every 401 (`AuthError::Missing`, `Malformed` — a bad checksum costs no
//!   query but still counts —, `Unknown`, `Revoked`, `Expired`, `UserInactive`); not a 403
//!   (a valid key), not a 503 (the database's fault).
//! - **Exact on the database side once an address has failed**: from its first failure on (while
//!   it has an entry), a key that needs a lookup takes its unit *before* the lookup, given back
//!   when the key turns out valid or the lookup fails, so the address causes at most the limit
//!   of lookups a period however many requests it has in flight. An address without failures
//!   pays nothing for its lookups: a client whose valid keys all miss the cache at once (a cold
//!   start, an invalidation) is not refused for its own concurrency. So the slack is one burst
//!   of concurrent lookups from an address before its first failure is counted.
//! - **A found key always passes**: the gate is asked only on a key-cache miss, so a client
//!   behind a shared NAT with one misbehaving neighbour keeps working with its cached key, and a
//!   cache hit costs nothing here (no table lookup, no time read).
//! - **State**: one [`Gcra`] per address that failed, in a moka cache bounded by `[auth]
//!   address_table_capacity` (memory bound against an attacker spraying from many addresses;
//!   TinyLFU admission keeps the frequent ones), each entry dropped after one period without
//!   use — by then its bucket is full again, so dropping it forgets nothing. Only a failure
//!   makes an entry; a key-cache miss from an address without one costs one table lookup.
//! - Per instance, as the other rate limits.

use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderMap;
use moka::sync::Cache;

use crate::auth::{AuthError, KeyCache, KeyInfo};
use crate::error::GatewayError;
use crate::gcra::{Gcra, Rate};
use crate::limits::{Kind, Refusal, Scope};

/// The limit's period: the setting is per minute.
const PERIOD: Duration = Duration::from_secs(60);

/// The part of an address one client is taken to own: an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Group(IpAddr);

impl Group {
    pub fn of(ip: IpAddr) -> Group {
        match ip {
            IpAddr::V4(v4) => Group(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Group(IpAddr::V4(v4)),
                None => Group(IpAddr::V6(Ipv6Addr::from(
                    u128::from(v6) & (u128::MAX << 64),
                ))),
            },
        }
    }
}

/// Whether an authentication error is a failure the address pays for (the 401s).
fn counts(e: &AuthError) -> bool {
    match e {
        AuthError::Missing
        | AuthError::Malformed(_)
        | AuthError::Unknown
        | AuthError::Revoked
        | AuthError::Expired
        | AuthError::UserInactive => true,
        AuthError::Forbidden(_) | AuthError::UserBanned | AuthError::StoreUnavailable => false,
    }
}

/// The failed-authentication buckets of this instance.
pub struct AddressLimiter {
    /// `None`: the limit is off (`failures_per_minute_per_address = 0`).
    rate: Option<Rate>,
    buckets: Cache<Group, Arc<Gcra>>,
    epoch: Instant,
}

impl AddressLimiter {
    /// `per_minute` failures (0 = off), at most `capacity` addresses tracked at once.
    pub fn new(per_minute: u64, capacity: u64) -> AddressLimiter {
        AddressLimiter {
            rate: NonZeroU64::new(per_minute).map(|n| Rate::new(n, PERIOD)),
            buckets: Cache::builder()
                .max_capacity(capacity)
                .time_to_idle(PERIOD)
                .build(),
            epoch: Instant::now(),
        }
    }

    /// Nanoseconds on this limiter's monotonic clock.
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The auth stage under this limit (see the module doc): `peer` is the client's TCP
    /// address (`None`: not an IP connection, not limited). A refusal here is
    /// `GatewayError::RateLimited` with [`Scope::Address`].
    pub async fn authenticate(
        &self,
        keys: &Arc<KeyCache>,
        headers: &HeaderMap,
        peer: Option<IpAddr>,
    ) -> Result<Arc<KeyInfo>, GatewayError> {
        let (Some(rate), Some(ip)) = (self.rate, peer) else {
            return Ok(keys.authenticate(headers).await?);
        };
        let group = Group::of(ip);
        let mut took = false;
        let result = keys
            .authenticate_gated(headers, || {
                took = self
                    .before_lookup(rate, group, self.now_ns())
                    .map_err(GatewayError::RateLimited)?;
                Ok(())
            })
            .await;
        let failed = matches!(&result, Err(GatewayError::Auth(e)) if counts(e));
        match (took, failed) {
            (false, true) => self.failed(rate, group, self.now_ns()),
            (true, false) => self.give_back(rate, group, self.now_ns()),
            // Paid at the gate; or nothing to pay: a found key, a valid key from an address
            // without failures, a refusal at the gate.
            (true, true) | (false, false) => {}
        }
        result
    }

    /// A key lookup about to happen for `group`: `Ok(true)` when it took a unit (the address has
    /// failed before), `Ok(false)` when it passes untaxed (it has not), `Err` when the bucket
    /// is empty.
    fn before_lookup(&self, rate: Rate, group: Group, now_ns: u64) -> Result<bool, Refusal> {
        let Some(bucket) = self.buckets.get(&group) else {
            return Ok(false);
        };
        let d = bucket.acquire(rate, now_ns, 1);
        if d.allowed {
            return Ok(true);
        }
        Err(Refusal {
            scope: Scope::Address,
            kind: Kind::Requests,
            per: "per minute",
            limit: rate.limit.get(),
            requested: 1,
            retry_after: d.retry_after,
        })
    }

    /// A failure that took no unit at the gate (no lookup: a bad format or a cached key refused;
    /// or a lookup from an address without failures).
    fn failed(&self, rate: Rate, group: Group, now_ns: u64) {
        let bucket = self.buckets.get_with(group, || Arc::new(Gcra::new()));
        // An empty bucket stays empty: a refused take changes nothing, which is what is wanted.
        let _ = bucket.acquire(rate, now_ns, 1);
    }

    /// The unit taken at the gate, back: the key was valid, or the lookup failed (not the
    /// client's doing).
    fn give_back(&self, rate: Rate, group: Group, now_ns: u64) {
        if let Some(b) = self.buckets.get(&group) {
            b.settle(rate, now_ns, 1, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups() {
        for (ip, group) in [
            ("192.0.2.7", "192.0.2.7"),
            ("::ffff:192.0.2.7", "192.0.2.7"),
            ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::"),
            ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::"),
            ("2001:db8:1:3::1", "2001:db8:1:3::"),
            ("::1", "::"),
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let group: IpAddr = group.parse().unwrap();
            assert_eq!(Group::of(ip), Group(group), "{ip}");
        }
        assert_ne!(
            Group::of("2001:db8::1".parse().unwrap()),
            Group::of("2001:db8:0:1::1".parse().unwrap())
        );
    }

    #[test]
    fn what_counts() {
        for (e, expected) in [
            (AuthError::Missing, true),
            (
                AuthError::Malformed(crate::keys::KeyFormatError::Checksum),
                true,
            ),
            (AuthError::Unknown, true),
            (AuthError::Revoked, true),
            (AuthError::Expired, true),
            (AuthError::UserInactive, true),
            (AuthError::Forbidden("path /x".into()), false),
            (AuthError::StoreUnavailable, false),
        ] {
            assert_eq!(counts(&e), expected, "{e:?}");
        }
    }

    #[derive(Debug, Clone, Copy)]
    enum Step {
        /// A failure that took no unit at the gate.
        Fail,
        /// A lookup asked for: (admitted?, took a unit?).
        Gate(bool, bool),
        /// The looked-up key was valid.
        GiveBack,
    }

    /// (ms, step) on one address at 6 failures a minute (one unit per 10 s).
    fn run(steps: &[(u64, Step)]) {
        let l = AddressLimiter::new(6, 100);
        let rate = l.rate.unwrap();
        let a = Group::of("198.51.100.1".parse().unwrap());
        const S: u64 = 1_000_000_000;
        for (i, &(ms, step)) in steps.iter().enumerate() {
            let now = 1_000 * S + ms * 1_000_000;
            match step {
                Step::Fail => l.failed(rate, a, now),
                Step::GiveBack => l.give_back(rate, a, now),
                Step::Gate(admitted, took) => {
                    let got = l.before_lookup(rate, a, now);
                    match got {
                        Ok(t) => assert!(admitted && t == took, "step {i} at {ms} ms: took {t}"),
                        Err(r) => {
                            assert!(!admitted, "step {i} at {ms} ms: {r:?}");
                            assert_eq!(
                                (r.scope, r.kind, r.limit),
                                (Scope::Address, Kind::Requests, 6)
                            );
                            assert!(
                                r.retry_after > Duration::ZERO
                                    && r.retry_after <= Duration::from_secs(10)
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn arithmetic() {
        use Step::*;
        const PASS: Step = Gate(true, false);
        const TAKE: Step = Gate(true, true);
        const REFUSE: Step = Gate(false, false);
        // Six failures empty the bucket: the first lookup (no failure yet) is untaxed and fails,
        // later lookups take their unit first; then lookups are refused until a unit comes back
        // (10 s), one per unit.
        run(&[
            (0, PASS),
            (0, Fail),
            (0, Fail),
            (0, TAKE),
            (0, TAKE),
            (0, Fail),
            (0, TAKE),
            (0, REFUSE),
            (0, Fail),
            (0, REFUSE),
            (9_999, REFUSE),
            (10_000, TAKE),
            (10_000, REFUSE),
            (20_000, TAKE),
        ]);
        // An address without failures looks up as many keys as it likes, at once or not.
        run(&[(0, PASS); 100]);
        // Once it has failed, valid keys looked up give their unit back: they never use the
        // bucket up.
        let mut steps = vec![(0, Fail)];
        for _ in 0..100 {
            steps.push((0, TAKE));
            steps.push((0, GiveBack));
        }
        steps.push((0, TAKE));
        run(&steps);
        // After one failure, five lookups at once pass the gate and the sixth does not: at most
        // the limit reach the database however many are in flight.
        run(&[
            (0, Fail),
            (0, TAKE),
            (0, TAKE),
            (0, TAKE),
            (0, TAKE),
            (0, TAKE),
            (0, REFUSE),
            (0, GiveBack),
            (0, TAKE),
        ]);
    }

    #[test]
    fn addresses_are_separate_and_off_is_off() {
        let l = AddressLimiter::new(1, 100);
        let rate = l.rate.unwrap();
        let a = Group::of("198.51.100.1".parse().unwrap());
        let b = Group::of("198.51.100.2".parse().unwrap());
        l.failed(rate, a, 5);
        assert!(l.before_lookup(rate, a, 5).is_err());
        assert!(l.before_lookup(rate, b, 5).is_ok());
        assert!(AddressLimiter::new(0, 100).rate.is_none());
    }
}
