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
//! - **Exact on the database side**: a key that needs a lookup takes its unit *before* the
//!   lookup (given back when the key turns out valid, or the lookup fails), so an address
//!   causes at most `limit` lookups per period however many requests it sends at once.
//! - **A found key always passes**: the gate is asked only on a key-cache miss, so a client
//!   behind a shared NAT with one misbehaving neighbour keeps working with its cached key, and a
//!   cache hit costs nothing here (no table lookup, no time read).
//! - **State**: one [`Gcra`] per address in a moka cache bounded by `[auth]
//!   address_table_capacity` (memory bound against an attacker spraying from many addresses;
//!   TinyLFU admission keeps the frequent ones), each entry dropped after one period without
//!   use — by then its bucket is full again, so dropping it forgets nothing. Only addresses that
//!   failed or missed the key cache get an entry.
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
        AuthError::Forbidden(_) | AuthError::StoreUnavailable => false,
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
                self.before_lookup(rate, group, self.now_ns())
                    .map_err(GatewayError::RateLimited)?;
                took = true;
                Ok(())
            })
            .await;
        let failed = matches!(&result, Err(GatewayError::Auth(e)) if counts(e));
        match (took, failed) {
            (false, true) => self.failed(rate, group, self.now_ns()),
            (true, false) => self.give_back(rate, group, self.now_ns()),
            // Paid at the gate; or a found key, or refused at the gate.
            (true, true) | (false, false) => {}
        }
        result
    }

    /// A key lookup about to happen for `group`: takes its unit, or refuses when there is none.
    fn before_lookup(&self, rate: Rate, group: Group, now_ns: u64) -> Result<(), Refusal> {
        let d = self.bucket(group).acquire(rate, now_ns, 1);
        if d.allowed {
            return Ok(());
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

    /// A failure that did not pass the gate (no lookup: bad format, or a cached key refused).
    fn failed(&self, rate: Rate, group: Group, now_ns: u64) {
        // An empty bucket stays empty: a refused take changes nothing, which is what is wanted.
        let _ = self.bucket(group).acquire(rate, now_ns, 1);
    }

    /// The unit taken at the gate, back: the key was valid, or the lookup failed (not the
    /// client's doing).
    fn give_back(&self, rate: Rate, group: Group, now_ns: u64) {
        if let Some(b) = self.buckets.get(&group) {
            b.settle(rate, now_ns, 1, 0);
        }
    }

    fn bucket(&self, group: Group) -> Arc<Gcra> {
        self.buckets.get_with(group, || Arc::new(Gcra::new()))
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
        /// A failure without a lookup.
        Fail,
        /// A lookup asked for: admitted?
        Gate(bool),
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
                Step::Gate(expected) => {
                    let got = l.before_lookup(rate, a, now);
                    assert_eq!(got.is_ok(), expected, "step {i} at {ms} ms: {got:?}");
                    if let Err(r) = got {
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

    #[test]
    fn arithmetic() {
        use Step::*;
        // Six failures of any kind empty the bucket; then lookups are refused until a unit
        // comes back (10 s), one per unit.
        run(&[
            (0, Fail),
            (0, Fail),
            (0, Gate(true)),
            (0, Gate(true)),
            (0, Fail),
            (0, Gate(true)),
            (0, Gate(false)),
            (0, Fail),
            (0, Gate(false)),
            (9_999, Gate(false)),
            (10_000, Gate(true)),
            (10_000, Gate(false)),
            (20_000, Gate(true)),
        ]);
        // Valid keys looked up give their unit back: they never use the bucket up.
        let mut steps = Vec::new();
        for _ in 0..100 {
            steps.push((0, Gate(true)));
            steps.push((0, GiveBack));
        }
        steps.push((0, Fail));
        run(&steps);
        // Six lookups at once all pass the gate, the seventh does not: at most the limit reach
        // the database however many are in flight.
        run(&[
            (0, Gate(true)),
            (0, Gate(true)),
            (0, Gate(true)),
            (0, Gate(true)),
            (0, Gate(true)),
            (0, Gate(true)),
            (0, Gate(false)),
            (0, GiveBack),
            (0, Gate(true)),
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
