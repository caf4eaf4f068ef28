//! Failed authentications per client address (`address_limits.rs`) end to end: a real
//! `tollgate serve` on SQLite and PostgreSQL. With a limit of N a minute, N unknown well-formed
//! keys are answered 401 and the rest 429 (with `Retry-After`, in the route's provider shape)
//! without asking the database, a key in the cache still passes from the same address, and the
//! address is admitted again once a unit has come back.

mod common;

use std::time::{Duration, Instant};

use common::{client, rows, Db, Gateway, MockUpstream};

/// A well-formed key (valid checksum) that no database holds.
fn unknown_key() -> String {
    tollgate::keys::generate().unwrap()
}

/// A key whose checksum is wrong: refused without a lookup.
fn bad_checksum_key() -> String {
    let mut k = unknown_key().into_bytes();
    k[10] = if k[10] == b'a' { b'b' } else { b'a' };
    String::from_utf8(k).unwrap()
}

async fn chat(gw: &Gateway, c: &reqwest::Client, key: &str) -> reqwest::Response {
    c.post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#)
        .send()
        .await
        .unwrap()
}

async fn metric(gw: &Gateway, series: &str) -> f64 {
    let (status, text) = gw.scrape("/metrics").await;
    assert_eq!(status, 200);
    Gateway::sample(&text, series)
}

const ADDRESS_REFUSALS: &str = r#"tollgate_rate_limited_total{scope="address",kind="requests"}"#;
const MISSES: &str = "tollgate_key_cache_misses_total";

both_dbs!(failures_are_limited_per_address, failures_per_address);
async fn failures_per_address(db: Db) {
    const N: usize = 5;
    const K: usize = 3;
    let mock = MockUpstream::json_ok().await;
    let mut gw = Gateway::new(
        db,
        "",
        &format!("[auth]\nfailures_per_minute_per_address = {N}\n"),
    )
    .await
    .unwrap();
    gw.add_user("alice@example.com");
    gw.add_account("main", "openai", &mock.url(), "sk-up", 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;
    let c = client();

    // The valid key is in the cache (warmed at start, or by this request).
    assert_eq!(chat(&gw, &c, &key).await.status().as_u16(), 200);
    let misses_before = metric(&gw, MISSES).await;

    // One unit per 60 s / N = 12 s: the burst below takes far less, so nothing comes back.
    let started = Instant::now();
    for i in 0..N {
        let r = chat(&gw, &c, &unknown_key()).await;
        assert_eq!(r.status().as_u16(), 401, "unknown key {i}");
    }
    for i in 0..K {
        let r = chat(&gw, &c, &unknown_key()).await;
        assert_eq!(
            r.status().as_u16(),
            429,
            "unknown key {} of {}",
            N + i,
            N + K
        );
        let retry: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=12).contains(&retry), "Retry-After {retry}");
        assert!(r.headers().get("x-ratelimit-limit-requests").is_none());
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        assert_eq!(v["error"]["type"], "requests");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!(
                "Rate limit reached for requests per minute on failed authentications from this client address: limit {N}."
            )),
            "{message}"
        );
    }
    // An Anthropic route answers in Anthropic's shape.
    let r = c
        .post(gw.url("/v1/messages"))
        .header("x-api-key", unknown_key())
        .header("anthropic-version", "2023-06-01")
        .body(r#"{"model":"claude-3-5-haiku-latest","max_tokens":8,"messages":[]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert!(r.headers().get("retry-after").is_some());
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "rate_limit_error");

    // The database was asked at most N times: the refused keys never reached the lookup
    // (misses count every lookup that left the cache, so they bound the queries).
    let misses = metric(&gw, MISSES).await - misses_before;
    assert!(misses <= N as f64, "{misses} key lookups left the cache");
    assert_eq!(misses, N as f64, "each unknown key admitted was looked up");
    assert_eq!(metric(&gw, ADDRESS_REFUSALS).await, (K + 1) as f64);
    assert_eq!(
        metric(&gw, r#"tollgate_auth_failures_total{reason="unknown"}"#).await,
        N as f64
    );

    // A bad checksum needs no lookup: still 401 (and counted, though the bucket is empty).
    assert_eq!(
        chat(&gw, &c, &bad_checksum_key()).await.status().as_u16(),
        401
    );
    // The cached key passes from the same address: a neighbour behind the same NAT keeps working.
    assert_eq!(chat(&gw, &c, &key).await.status().as_u16(), 200);
    // A valid key that is not cached yet needs a lookup, so it waits like the others.
    let fresh = gw.create_key("alice@example.com", &[]);
    let r = chat(&gw, &c, &fresh).await;
    assert_eq!(r.status().as_u16(), 429);
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "the test took longer than one unit's refill ({:?}): the counts above are not exact",
        started.elapsed()
    );
    assert_eq!(metric(&gw, ADDRESS_REFUSALS).await, (K + 2) as f64);

    // Refused before a key was identified: no usage rows, only the two served requests.
    let rows = rows(&gw, 2).await;
    assert!(rows.iter().all(|r| r.status_code == 200), "{rows:?}");
    assert_eq!(mock.count(), 2);
    let log = gw.log();
    assert!(log.contains("status=429"), "the refusals are logged");
    assert!(!log.contains(&fresh) && !log.contains(&key));
}

/// At 600 a minute (one unit per 100 ms), once the address has spent its burst it is admitted
/// again as soon as a unit comes back: polled until then, never a fixed sleep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_recovers_when_units_come_back() {
    let mut gw = Gateway::new(
        Db::Sqlite,
        "",
        "[auth]\nfailures_per_minute_per_address = 600\n",
    )
    .await
    .unwrap();
    gw.start().await;
    let c = client();

    // Spend the burst with bad checksums (a unit each, no lookup) until a lookup is refused.
    let deadline = Instant::now() + Duration::from_secs(30);
    let refused = loop {
        let burst = futures_util::future::join_all((0..100).map(|_| {
            let key = bad_checksum_key();
            let (gw, c) = (&gw, &c);
            async move { chat(gw, c, &key).await }
        }))
        .await;
        assert!(burst.iter().all(|r| r.status().as_u16() == 401));
        let probe = chat(&gw, &c, &unknown_key()).await;
        if probe.status().as_u16() == 429 {
            break probe;
        }
        assert_eq!(probe.status().as_u16(), 401);
        assert!(Instant::now() < deadline, "the burst was never spent");
    };
    // 100 ms to the next unit, rounded up to whole seconds.
    assert_eq!(refused.headers()["retry-after"], "1");

    // Admitted again (401: the key is unknown, but it was looked up) within a few units.
    let since = Instant::now();
    let deadline = since + Duration::from_secs(10);
    loop {
        match chat(&gw, &c, &unknown_key()).await.status().as_u16() {
            401 => break,
            429 => {
                assert!(Instant::now() < deadline, "not admitted again within 10 s");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => panic!("status {other}"),
        }
    }
    assert!(metric(&gw, ADDRESS_REFUSALS).await >= 1.0);
}

/// `failures_per_minute_per_address = 0`: no limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_is_no_limit() {
    let mut gw = Gateway::new(
        Db::Sqlite,
        "",
        "[auth]\nfailures_per_minute_per_address = 0\n",
    )
    .await
    .unwrap();
    gw.start().await;
    let c = client();
    for _ in 0..40 {
        assert_eq!(chat(&gw, &c, &unknown_key()).await.status().as_u16(), 401);
    }
    assert_eq!(metric(&gw, ADDRESS_REFUSALS).await, 0.0);
}

/// Valid keys that all miss the key cache at once (a cold start, an invalidation) from an address
/// without failures are never refused, however many are in flight: only failures are paid for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_of_valid_keys_are_not_refused() {
    let mock = MockUpstream::json_ok().await;
    let mut gw = Gateway::new(
        Db::Sqlite,
        "",
        "[auth]\nfailures_per_minute_per_address = 2\n",
    )
    .await
    .unwrap();
    gw.add_user("alice@example.com");
    gw.add_account("main", "openai", &mock.url(), "sk-up", 1, 1);
    gw.start().await;
    // Created after the start: not warmed into the cache, each needs a lookup.
    let keys: Vec<String> = (0..20)
        .map(|_| gw.create_key("alice@example.com", &[]))
        .collect();
    let c = client();
    let statuses: Vec<u16> = futures_util::future::join_all(keys.iter().map(|k| {
        let (gw, c) = (&gw, &c);
        async move { chat(gw, c, k).await.status().as_u16() }
    }))
    .await;
    assert_eq!(statuses, vec![200; 20]);
    assert_eq!(metric(&gw, ADDRESS_REFUSALS).await, 0.0);
}
