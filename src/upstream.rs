//! Upstream accounts and which one serves a request: lowest `priority` first, then smooth
//! weighted round-robin by `weight` inside a tier, skipping accounts in cooldown and accounts at
//! their limits (`account_limits.rs`: the unit is taken as the account is picked).
//!
//! The selection core ([`swrr_pick`], [`swrr_take`]) is pure; [`AccountSet`] wraps it with the
//! shared state (round-robin weights under a short lock never held across an await, cooldowns
//! and limits in atomics).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::HeaderValue;
use pingora::upstreams::peer::HttpPeer;
use serde::{Deserialize, Serialize};

use crate::account_limits::{self, AccountLimits, Feedback, Hold, Saturated};

/// What API an account speaks; decides how its credential is injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountType {
    Openai,
    Anthropic,
    Generic,
}

impl AccountType {
    pub const ALL: [AccountType; 3] = [
        AccountType::Openai,
        AccountType::Anthropic,
        AccountType::Generic,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AccountType::Openai => "openai",
            AccountType::Anthropic => "anthropic",
            AccountType::Generic => "generic",
        }
    }

    /// Position in [`AccountType::ALL`]: an index into per-type arrays (metric handles).
    pub fn index(self) -> usize {
        self as usize
    }
}

impl FromStr for AccountType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "openai" => Ok(AccountType::Openai),
            "anthropic" => Ok(AccountType::Anthropic),
            "generic" => Ok(AccountType::Generic),
            other => Err(format!(
                "unknown account type {other:?} (want openai, anthropic or generic)"
            )),
        }
    }
}

/// A parsed `base_url`: where to connect and what to prefix paths with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash ("" for none).
    pub base_path: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err("base_url must start with http:// or https://".into());
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err("base_url needs a host (and no user info)".into());
        }
        let default_port = if tls { 443 } else { 80 };
        let port_of = |p: &str| {
            p.parse::<u16>()
                .map_err(|_| format!("base_url has a bad port {p:?}"))
        };
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            // An IPv6 literal: `[addr]` or `[addr]:port`.
            let (addr, after) = bracketed
                .split_once(']')
                .ok_or("base_url has an unclosed '[' in its host")?;
            let port = match after {
                "" => default_port,
                p => port_of(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("base_url has a bad port {p:?}"))?,
                )?,
            };
            if addr.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("base_url has a bad IPv6 address {addr:?}"));
            }
            (addr, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, port_of(p)?),
                None => (authority, default_port),
            }
        };
        if host.is_empty() {
            return Err("base_url needs a host".into());
        }
        Ok(Endpoint {
            tls,
            host: host.to_string(),
            port,
            base_path: path.trim_end_matches('/').to_string(),
        })
    }

    /// The `Host` header value (an IPv6 literal in brackets).
    pub fn authority(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// Why an account may not point at `host` resolved to `addr` unless `[upstream] allow_hosts`
/// names it: link-local addresses (where cloud metadata services answer: 169.254.169.254,
/// fe80::/10), AWS's IPv6 metadata address, and the metadata hosts by name. Loopback and private
/// networks (self-hosted models) stay allowed. Pure.
pub fn forbidden_destination(host: &str, addr: std::net::IpAddr) -> Option<&'static str> {
    use std::net::IpAddr;
    const AWS_METADATA_V6: std::net::Ipv6Addr =
        std::net::Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254);
    let host = host.trim_end_matches('.');
    if host.eq_ignore_ascii_case("metadata.google.internal")
        || host.eq_ignore_ascii_case("metadata")
    {
        return Some("a cloud metadata host");
    }
    let v4 = match addr {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => a.to_ipv4_mapped(),
    };
    if v4.is_some_and(|a| a.is_link_local()) {
        return Some("a link-local address (cloud metadata services answer there)");
    }
    if let IpAddr::V6(a) = addr {
        if a == AWS_METADATA_V6 {
            return Some("the AWS metadata address");
        }
        if a.segments()[0] & 0xffc0 == 0xfe80 {
            return Some("a link-local address");
        }
    }
    None
}

/// Whether `addr` is one of tollgate's own listeners (an account pointing there would loop, or
/// reach the admin API with the account's credential).
pub fn is_own_listener(addr: std::net::SocketAddr, own: &[std::net::SocketAddr]) -> bool {
    own.iter().any(|o| {
        o.port() == addr.port()
            && (o.ip() == addr.ip() || (o.ip().is_unspecified() && addr.ip().is_loopback()))
    })
}

/// Why an attempt on an account failed (the `kind` label of `tollgate_upstream_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Could not connect, or the connection broke before a response header.
    Connect,
    /// No answer within the connect or read timeout.
    Timeout,
    /// Answered with a 5xx or 429.
    Status,
    /// The response body broke off mid-way.
    Aborted,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 4] = [
        ErrorKind::Connect,
        ErrorKind::Timeout,
        ErrorKind::Status,
        ErrorKind::Aborted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Status => "status",
            ErrorKind::Aborted => "aborted",
        }
    }
}

/// Per-account runtime state that survives reloads of the account list.
#[derive(Debug, Default)]
pub struct AccountStats {
    /// Milliseconds since [`AccountSet`]'s epoch until which the account is skipped.
    cooldown_until_ms: AtomicU64,
    pub attempts: AtomicU64,
    pub successes: AtomicU64,
    errors: [AtomicU64; 4],
    /// The account's limit state (declared limits and what its provider reported).
    pub limits: Arc<account_limits::State>,
}

impl AccountStats {
    pub fn record_error(&self, kind: ErrorKind) {
        self.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn errors_of(&self, kind: ErrorKind) -> u64 {
        self.errors[kind as usize].load(Ordering::Relaxed)
    }

    pub fn errors(&self) -> u64 {
        ErrorKind::ALL.iter().map(|k| self.errors_of(*k)).sum()
    }
}

/// One usable upstream account, built once per load; the request path only reads it.
#[derive(Debug)]
pub struct Account {
    pub id: i64,
    pub name: Arc<str>,
    pub kind: AccountType,
    pub priority: i32,
    pub weight: u32,
    pub endpoint: Endpoint,
    pub host_header: HeaderValue,
    /// The peer to connect to, resolved when the account was loaded.
    pub peer: HttpPeer,
    /// Header carrying the credential and its value (sensitive: never logged).
    pub auth_header: http::HeaderName,
    pub auth_value: HeaderValue,
    /// Declared provider limits (0 = none); their state is in `stats.limits`.
    pub limits: AccountLimits,
    pub stats: Arc<AccountStats>,
}

/// An account as loaded from the database, before DNS resolution.
#[derive(Debug, Clone)]
pub struct AccountSpec {
    pub id: i64,
    pub name: String,
    pub kind: AccountType,
    pub priority: i32,
    pub weight: u32,
    pub base_url: String,
    pub api_key: String,
    /// Generic accounts: header carrying the key (default `authorization`, as a bearer token).
    pub header: Option<String>,
    /// Declared provider limits (0 = none).
    pub limits: AccountLimits,
}

/// Timeouts applied to every upstream connection.
#[derive(Debug, Clone, Copy)]
pub struct PeerTimeouts {
    pub connect: Duration,
    pub read: Duration,
}

impl Account {
    pub fn build(
        spec: &AccountSpec,
        addr: SocketAddr,
        t: PeerTimeouts,
        stats: Arc<AccountStats>,
    ) -> Result<Account, String> {
        let endpoint = Endpoint::parse(&spec.base_url)?;
        let (auth_header, auth_value) = match spec.kind {
            AccountType::Openai => (
                http::header::AUTHORIZATION,
                format!("Bearer {}", spec.api_key),
            ),
            AccountType::Anthropic => (
                http::HeaderName::from_static("x-api-key"),
                spec.api_key.clone(),
            ),
            AccountType::Generic => match spec.header.as_deref().map(str::to_ascii_lowercase) {
                None => (
                    http::header::AUTHORIZATION,
                    format!("Bearer {}", spec.api_key),
                ),
                Some(h) if h == "authorization" => (
                    http::header::AUTHORIZATION,
                    format!("Bearer {}", spec.api_key),
                ),
                Some(h) => (
                    http::HeaderName::from_str(&h)
                        .map_err(|_| format!("account {}: bad header name {h:?}", spec.name))?,
                    spec.api_key.clone(),
                ),
            },
        };
        let mut auth_value = HeaderValue::from_str(&auth_value).map_err(|_| {
            format!(
                "account {}: the credential is not a valid header value",
                spec.name
            )
        })?;
        auth_value.set_sensitive(true);
        let host_header = HeaderValue::from_str(&endpoint.authority())
            .map_err(|_| format!("account {}: bad host", spec.name))?;
        let mut peer = HttpPeer::new(addr, endpoint.tls, endpoint.host.clone());
        peer.options.connection_timeout = Some(t.connect);
        peer.options.total_connection_timeout = Some(t.connect * 2);
        peer.options.read_timeout = Some(t.read);
        peer.options.write_timeout = Some(t.read);
        Ok(Account {
            id: spec.id,
            name: Arc::from(spec.name.as_str()),
            kind: spec.kind,
            priority: spec.priority,
            weight: spec.weight.max(1),
            endpoint,
            host_header,
            peer,
            auth_header,
            auth_value,
            limits: spec.limits,
            stats,
        })
    }
}

/// Accounts of one type and priority, with their smooth-weighted-round-robin state.
#[derive(Debug)]
struct Tier {
    accounts: Vec<Arc<Account>>,
    weights: Vec<i64>,
    current: Mutex<Vec<i64>>,
}

/// Every active account, grouped by type and ordered into priority tiers. Immutable once built
/// except for the round-robin counters and account stats; a reload builds a new set.
#[derive(Debug)]
pub struct AccountSet {
    by_type: [Vec<Tier>; 3],
    /// Per type: whether an account declares a token limit (only then is a request's token
    /// estimate computed).
    tpm_declared: [bool; 3],
    epoch: Instant,
    default_cooldown: Duration,
    max_cooldown: Duration,
}

impl AccountSet {
    pub fn new(
        mut accounts: Vec<Account>,
        default_cooldown: Duration,
        max_cooldown: Duration,
        epoch: Instant,
    ) -> AccountSet {
        accounts.sort_by_key(|a| (a.kind.index(), a.priority, a.id));
        let mut by_type: [Vec<Tier>; 3] = Default::default();
        let mut tpm_declared = [false; 3];
        for a in accounts {
            tpm_declared[a.kind.index()] |= a.limits.tpm > 0;
            let tiers = &mut by_type[a.kind.index()];
            let same_tier = tiers
                .last()
                .is_some_and(|t: &Tier| t.accounts[0].priority == a.priority);
            if !same_tier {
                tiers.push(Tier {
                    accounts: Vec::new(),
                    weights: Vec::new(),
                    current: Mutex::new(Vec::new()),
                });
            }
            if let Some(t) = tiers.last_mut() {
                t.weights.push(i64::from(a.weight));
                t.accounts.push(Arc::new(a));
                if let Ok(mut c) = t.current.lock() {
                    c.push(0);
                }
            }
        }
        AccountSet {
            by_type,
            tpm_declared,
            epoch,
            default_cooldown,
            max_cooldown,
        }
    }

    pub fn len(&self) -> usize {
        self.by_type
            .iter()
            .flatten()
            .map(|t| t.accounts.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether any account of `kind` is loaded (in cooldown or not).
    pub fn serves(&self, kind: AccountType) -> bool {
        !self.by_type[kind.index()].is_empty()
    }

    pub fn accounts(&self) -> impl Iterator<Item = &Arc<Account>> {
        self.by_type
            .iter()
            .flatten()
            .flat_map(|t| t.accounts.iter())
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The clock account limits run on: nanoseconds since the loader's epoch (the same for every
    /// set it builds, so limit state carries over reloads).
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether a request for `kind` needs its token estimate (an account declares a tpm).
    pub fn wants_estimate(&self, kind: AccountType) -> bool {
        self.tpm_declared[kind.index()]
    }

    /// The next account for `kind` (see [`AccountSet::take`]), its hold dropped at once.
    pub fn pick(&self, kind: AccountType, tried: &[i64]) -> Option<Arc<Account>> {
        self.take(kind, tried, self.now_ns(), 0)
            .ok()
            .map(|(a, _)| a)
    }

    /// The next account for `kind` at `now_ns` ([`AccountSet::now_ns`]), with what it took from
    /// the account's limits: the first tier with an eligible account (not in cooldown, not
    /// already `tried` by this request, and not at a limit — the unit is taken in the same step
    /// that decides), then smooth weighted round-robin within it. `estimate`: the request's
    /// tokens, for accounts that declare a tpm.
    ///
    /// `Err(Some(s))`: every account not yet tried was skipped for its limits (none for a
    /// cooldown); `s` is the one free soonest. `Err(None)`: no account, for any other reason.
    pub fn take(
        &self,
        kind: AccountType,
        tried: &[i64],
        now_ns: u64,
        estimate: u64,
    ) -> Result<(Arc<Account>, Option<Hold>), Option<Saturated>> {
        let now_ms = now_ns / 1_000_000;
        let mut saturated: Option<Saturated> = None;
        let mut cooling = false;
        for tier in &self.by_type[kind.index()] {
            let eligible = |i: usize| {
                let a = &tier.accounts[i];
                a.stats.cooldown_until_ms.load(Ordering::Relaxed) <= now_ms
                    && !tried.contains(&a.id)
            };
            let take = |i: usize| {
                let a = &tier.accounts[i];
                match a.stats.limits.try_take(&a.limits, now_ns, || estimate) {
                    Ok(hold) => Some(hold),
                    Err(s) => {
                        saturated = Some(Saturated::earliest(saturated, s));
                        None
                    }
                }
            };
            let picked = match tier.current.lock() {
                Ok(mut current) => swrr_take(&mut current, &tier.weights, eligible, take),
                Err(_) => {
                    let mut take = take;
                    (0..tier.accounts.len())
                        .filter(|&i| eligible(i))
                        .find_map(|i| take(i).map(|h| (i, h)))
                }
            };
            if let Some((i, hold)) = picked {
                return Ok((tier.accounts[i].clone(), hold));
            }
            cooling = cooling
                || tier.accounts.iter().any(|a| {
                    a.stats.cooldown_until_ms.load(Ordering::Relaxed) > now_ms
                        && !tried.contains(&a.id)
                });
        }
        Err(if cooling { None } else { saturated })
    }

    /// Whether `take` may find an account (without advancing the round-robin or taking
    /// anything; rate limits are known only by taking, so an account at one counts as eligible).
    pub fn has_eligible(&self, kind: AccountType, tried: &[i64]) -> bool {
        let now_ns = self.now_ns();
        let now = now_ns / 1_000_000;
        self.by_type[kind.index()]
            .iter()
            .flat_map(|t| t.accounts.iter())
            .any(|a| {
                a.stats.cooldown_until_ms.load(Ordering::Relaxed) <= now
                    && !tried.contains(&a.id)
                    && a.stats.limits.may_take(&a.limits, now_ns)
            })
    }

    /// What a response said about the account's limits (`account_limits::feedback`): skip it
    /// until the provider's reset, at most the configured maximum cooldown. Not an error.
    pub fn report(&self, account: &Account, fb: Feedback) {
        if !fb.is_empty() {
            account
                .stats
                .limits
                .report(self.now_ns(), fb, self.max_cooldown);
        }
    }

    /// The configured cooldown, also what a 429 that says nothing else marks an account out for.
    pub fn default_cooldown(&self) -> Duration {
        self.default_cooldown
    }

    /// Skips `account` until `retry_after` (bounded by the configured maximum) or the default cooldown.
    pub fn cool_down(&self, account: &Account, retry_after: Option<Duration>) {
        let d = retry_after
            .unwrap_or(self.default_cooldown)
            .min(self.max_cooldown);
        let until = self.now_ms() + d.as_millis() as u64;
        account
            .stats
            .cooldown_until_ms
            .fetch_max(until, Ordering::Relaxed);
    }

    /// Whether the account's provider said it is out of requests or tokens for now.
    pub fn provider_out(&self, account: &Account) -> bool {
        account.stats.limits.provider_out(self.now_ns())
    }

    pub fn in_cooldown(&self, account: &Account) -> bool {
        account.stats.cooldown_until_ms.load(Ordering::Relaxed) > self.now_ms()
    }
}

/// Smooth weighted round-robin (as in nginx) over the eligible entries: each gains its weight,
/// the largest wins and pays back the eligible total. Over any run of picks with a fixed eligible
/// set, picks are proportional to weight and evenly interleaved.
pub fn swrr_pick(
    current: &mut [i64],
    weights: &[i64],
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    let mut total = 0;
    let mut best: Option<usize> = None;
    for i in 0..weights.len() {
        if !eligible(i) {
            continue;
        }
        current[i] += weights[i];
        total += weights[i];
        if best.is_none_or(|b| current[i] > current[b]) {
            best = Some(i);
        }
    }
    if let Some(b) = best {
        current[b] -= total;
    }
    best
}

/// [`swrr_pick`] where the winner must also be taken (`take`: the account's limits, `None` =
/// at a limit): candidates are tried in the order plain SWRR would pick them; those refused are
/// treated as ineligible for this pick. With every `take` succeeding it is exactly
/// [`swrr_pick`]. No allocation; a refused candidate costs one more scan.
pub fn swrr_take<T>(
    current: &mut [i64],
    weights: &[i64],
    eligible: impl Fn(usize) -> bool,
    mut take: impl FnMut(usize) -> Option<T>,
) -> Option<(usize, T)> {
    // Candidates in order of (current + weight) descending, ties to the lower index; `bound` is
    // the last refused one.
    let mut bound: Option<(i64, usize)> = None;
    loop {
        let mut best: Option<(i64, usize)> = None;
        for i in 0..weights.len() {
            if !eligible(i) {
                continue;
            }
            let score = current[i] + weights[i];
            let after_bound = bound.is_none_or(|(bs, bi)| score < bs || (score == bs && i > bi));
            if after_bound && best.is_none_or(|(s, _)| score > s) {
                best = Some((score, i));
            }
        }
        let (score_b, b) = best?;
        if let Some(t) = take(b) {
            let mut total = 0;
            for i in 0..weights.len() {
                if !eligible(i) {
                    continue;
                }
                let score = current[i] + weights[i];
                let refused = score > score_b || (score == score_b && i < b);
                if !refused {
                    current[i] += weights[i];
                    total += weights[i];
                }
            }
            current[b] -= total;
            return Some((b, t));
        }
        bound = Some((score_b, b));
    }
}

/// Keeps each account's stats (cooldown, counters) across reloads, keyed by account id.
#[derive(Debug, Default)]
pub struct StatsRegistry {
    by_id: Mutex<HashMap<i64, Arc<AccountStats>>>,
}

impl StatsRegistry {
    pub fn get(&self, id: i64) -> Arc<AccountStats> {
        match self.by_id.lock() {
            Ok(mut m) => m.entry(id).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }
}

/// Parses `Retry-After` given in seconds (the form API providers use).
pub fn parse_retry_after(value: Option<&HeaderValue>) -> Option<Duration> {
    let v = value?.to_str().ok()?.trim();
    v.parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_swrr(weights: &[i64], picks: usize, expected: &[usize]) {
        let mut current = vec![0; weights.len()];
        let mut counts = vec![0; weights.len()];
        for _ in 0..picks {
            let i = swrr_pick(&mut current, weights, |_| true).unwrap();
            counts[i] += 1;
        }
        assert_eq!(counts, expected, "weights {weights:?}");
    }

    #[test]
    fn swrr_is_proportional() {
        check_swrr(&[3, 1], 1000, &[750, 250]);
        check_swrr(&[1, 1, 1], 999, &[333, 333, 333]);
        check_swrr(&[5, 1, 1], 700, &[500, 100, 100]);
        check_swrr(&[1], 10, &[10]);
    }

    #[test]
    fn swrr_interleaves() {
        let mut current = vec![0; 2];
        let seq: Vec<usize> = (0..4)
            .map(|_| swrr_pick(&mut current, &[3, 1], |_| true).unwrap())
            .collect();
        assert_eq!(seq, vec![0, 0, 1, 0]);
    }

    #[test]
    fn swrr_skips_ineligible() {
        let mut current = vec![0; 3];
        for _ in 0..10 {
            assert_eq!(swrr_pick(&mut current, &[5, 1, 1], |i| i == 2), Some(2));
        }
        assert_eq!(swrr_pick(&mut current, &[5, 1, 1], |_| false), None);
    }

    #[test]
    fn swrr_take_is_swrr_when_everything_is_taken() {
        let (mut a, mut b) = (vec![0; 3], vec![0; 3]);
        for _ in 0..700 {
            let plain = swrr_pick(&mut a, &[5, 1, 1], |_| true);
            let taken = swrr_take(&mut b, &[5, 1, 1], |_| true, Some).map(|(i, _)| i);
            assert_eq!(plain, taken);
            assert_eq!(a, b);
        }
    }

    #[test]
    fn swrr_take_skips_refusals() {
        // Index 0 (the heaviest) always refuses: the others share the picks by weight.
        let mut current = vec![0; 3];
        let mut counts = [0; 3];
        let mut asked = [0; 3];
        for _ in 0..300 {
            let (i, ()) = swrr_take(
                &mut current,
                &[5, 2, 1],
                |_| true,
                |i| {
                    asked[i] += 1;
                    (i != 0).then_some(())
                },
            )
            .unwrap();
            counts[i] += 1;
        }
        assert_eq!(counts, [0, 200, 100]);
        assert_eq!(asked[0], 300, "the refusing one is asked each time");
        // Nothing takes: none, after asking each eligible once.
        let mut asked = 0;
        assert!(swrr_take(
            &mut current,
            &[1, 1, 1],
            |i| i != 1,
            |_| {
                asked += 1;
                None::<()>
            }
        )
        .is_none());
        assert_eq!(asked, 2);
    }

    #[test]
    fn limits_move_requests_to_the_next_account_then_refuse() {
        let rpm = |n| AccountLimits {
            rpm: n,
            ..AccountLimits::default()
        };
        let set = AccountSet::new(
            vec![limited(1, 1, 1, rpm(2)), limited(2, 2, 1, rpm(1))],
            Duration::from_secs(30),
            Duration::from_secs(60),
            Instant::now(),
        );
        let now = 5_000_000_000;
        let ids: Vec<i64> = (0..3)
            .map(|_| set.take(AccountType::Openai, &[], now, 0).unwrap().0.id)
            .collect();
        assert_eq!(ids, [1, 1, 2]);
        // Both at their limit: the earliest wait is answered (account 1: 30 s; account 2: 60 s).
        let s = set
            .take(AccountType::Openai, &[], now, 0)
            .unwrap_err()
            .unwrap();
        assert_eq!(s.kind, account_limits::Kind::Requests);
        assert_eq!(s.retry_after, Duration::from_secs(30));
        assert!(!set.has_eligible(AccountType::Anthropic, &[]));
        // A cooldown among the reasons: not a rate limit.
        let a2 = set.accounts().find(|a| a.id == 2).unwrap().clone();
        set.cool_down(&a2, Some(Duration::from_secs(60)));
        assert_eq!(
            set.take(AccountType::Openai, &[], now, 0).unwrap_err(),
            None
        );
    }

    #[test]
    fn a_concurrency_slot_moves_with_its_hold() {
        let one = AccountLimits {
            max_concurrent: 1,
            ..AccountLimits::default()
        };
        let set = AccountSet::new(
            vec![limited(1, 1, 1, one), limited(2, 1, 1, one)],
            Duration::from_secs(30),
            Duration::from_secs(60),
            Instant::now(),
        );
        let (a, h1) = set.take(AccountType::Openai, &[], 0, 0).unwrap();
        let (b, h2) = set.take(AccountType::Openai, &[], 0, 0).unwrap();
        assert_ne!(a.id, b.id);
        assert!(set.take(AccountType::Openai, &[], 0, 0).is_err());
        assert!(!set.has_eligible(AccountType::Openai, &[]));
        drop(h1);
        assert_eq!(set.take(AccountType::Openai, &[], 0, 0).unwrap().0.id, a.id);
        drop(h2);
        assert_eq!(b.stats.limits.in_flight(), 0);
    }

    fn check_endpoint(url: &str, expected: Result<(bool, &str, u16, &str), &str>) {
        let got = Endpoint::parse(url);
        match expected {
            Ok((tls, host, port, path)) => {
                let e = got.unwrap();
                assert_eq!(
                    (e.tls, e.host.as_str(), e.port, e.base_path.as_str()),
                    (tls, host, port, path),
                    "{url}"
                );
            }
            Err(msg) => assert_eq!(got.unwrap_err(), msg, "{url}"),
        }
    }

    #[test]
    fn endpoints() {
        check_endpoint(
            "https://api.openai.com",
            Ok((true, "api.openai.com", 443, "")),
        );
        check_endpoint("http://127.0.0.1:9000/", Ok((false, "127.0.0.1", 9000, "")));
        check_endpoint(
            "https://gw.example/openai/v1/",
            Ok((true, "gw.example", 443, "/openai/v1")),
        );
        check_endpoint("http://[::1]:8080", Ok((false, "::1", 8080, "")));
        check_endpoint("http://[fd00::1]", Ok((false, "fd00::1", 80, "")));
        check_endpoint("https://[fd00::1]/v1/", Ok((true, "fd00::1", 443, "/v1")));
        check_endpoint(
            "http://[fd00::1",
            Err("base_url has an unclosed '[' in its host"),
        );
        check_endpoint(
            "http://[nope]:80",
            Err("base_url has a bad IPv6 address \"nope\""),
        );
        check_endpoint("http://[::1]x", Err("base_url has a bad port \"x\""));
        check_endpoint(
            "ftp://x",
            Err("base_url must start with http:// or https://"),
        );
        check_endpoint("http://", Err("base_url needs a host (and no user info)"));
        check_endpoint(
            "http://h:notaport",
            Err("base_url has a bad port \"notaport\""),
        );
    }

    fn account(id: i64, priority: i32, weight: u32) -> Account {
        limited(id, priority, weight, AccountLimits::default())
    }

    fn limited(id: i64, priority: i32, weight: u32, limits: AccountLimits) -> Account {
        let spec = AccountSpec {
            id,
            name: format!("a{id}"),
            kind: AccountType::Openai,
            priority,
            weight,
            base_url: "http://127.0.0.1:1".into(),
            api_key: "k".into(),
            header: None,
            limits,
        };
        let t = PeerTimeouts {
            connect: Duration::from_secs(1),
            read: Duration::from_secs(1),
        };
        Account::build(&spec, "127.0.0.1:1".parse().unwrap(), t, Arc::default()).unwrap()
    }

    #[test]
    fn lower_priority_value_wins_then_falls_back() {
        let set = AccountSet::new(
            vec![account(1, 2, 1), account(2, 1, 1), account(3, 1, 1)],
            Duration::from_secs(30),
            Duration::from_secs(60),
            Instant::now(),
        );
        let first = set.pick(AccountType::Openai, &[]).unwrap();
        assert_eq!(first.priority, 1);
        // Both tier-1 accounts tried: tier 2 serves.
        assert_eq!(set.pick(AccountType::Openai, &[2, 3]).unwrap().id, 1);
        // Cooldown removes an account from the rotation.
        let a2 = set.pick(AccountType::Openai, &[3]).unwrap();
        set.cool_down(&a2, None);
        for _ in 0..5 {
            assert_eq!(set.pick(AccountType::Openai, &[]).unwrap().id, 3);
        }
        assert!(set.pick(AccountType::Anthropic, &[]).is_none());
        assert!(set.pick(AccountType::Openai, &[1, 2, 3]).is_none());
    }

    #[test]
    fn forbidden_destinations() {
        for (host, addr, expected) in [
            ("169.254.169.254", "169.254.169.254", true),
            ("example", "169.254.1.1", true),
            ("metadata.google.internal", "10.0.0.1", true),
            ("METADATA.google.internal.", "10.0.0.1", true),
            ("x", "fd00:ec2::254", true),
            ("x", "fe80::1", true),
            ("x", "::ffff:169.254.169.254", true),
            ("localhost", "127.0.0.1", false),
            ("llm.lan", "192.168.1.20", false),
            ("llm", "10.1.2.3", false),
            ("x", "fd00::1", false),
            ("api.openai.com", "162.159.140.245", false),
        ] {
            let ip: std::net::IpAddr = addr.parse().unwrap();
            assert_eq!(
                forbidden_destination(host, ip).is_some(),
                expected,
                "{host} {addr}"
            );
        }
    }

    #[test]
    fn own_listeners() {
        let own: Vec<std::net::SocketAddr> = vec![
            "127.0.0.1:9090".parse().unwrap(),
            "0.0.0.0:9091".parse().unwrap(),
        ];
        for (addr, expected) in [
            ("127.0.0.1:9090", true),
            ("127.0.0.1:9091", true),
            ("127.0.0.2:9090", false),
            ("127.0.0.1:8000", false),
        ] {
            assert_eq!(
                is_own_listener(addr.parse().unwrap(), &own),
                expected,
                "{addr}"
            );
        }
    }

    #[test]
    fn retry_after_seconds() {
        let v = HeaderValue::from_static("7");
        assert_eq!(parse_retry_after(Some(&v)), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after(Some(&HeaderValue::from_static("soon"))),
            None
        );
        assert_eq!(parse_retry_after(None), None);
    }
}
