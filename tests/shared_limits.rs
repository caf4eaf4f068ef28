//! Rate limits shared through Redis (`shared_limits.rs`): the admission script's arithmetic on an
//! injected clock against the local Redis, two `tollgate serve` instances sharing one limit under
//! 64-way concurrency (SQLite and PostgreSQL), concurrency slots given back through Redis, and a
//! test-owned `redis-server` stopped mid-run under each fail policy (`local`: each instance its
//! share; `closed`: 503) and restarted (recovery by itself). Every test writes under its own key
//! prefix.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{client, fixture, Db, Gate, Gateway, MockUpstream, Reply, BODY};
use tollgate::shared_limits::{FailPolicy, Redis, Settings, Slot, LEASE};

/// The Redis the tests share (`TEST_REDIS_URL`, else the machine's), or `None` (skip) when it
/// does not answer — except under `CI=true`, where a missing Redis fails, as PostgreSQL does.
fn redis_url() -> Option<String> {
    let url = std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let addr = url
        .trim_start_matches("redis://")
        .split(['/', '?'])
        .next()
        .and_then(|a| a.rsplit('@').next())
        .unwrap_or("127.0.0.1:6379")
        .to_string();
    if std::net::TcpStream::connect(&addr).is_ok() {
        return Some(url);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "CI=true but no Redis answers at {addr} (TEST_REDIS_URL): Redis tests must run in CI"
        );
    }
    eprintln!("skipped: no Redis at {addr} (set TEST_REDIS_URL)");
    None
}

/// Whether `redis-server` can be started (tests that stop their own); required under `CI=true`.
fn have_redis_server() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "CI=true but redis-server is not installed"
        );
        eprintln!("skipped: redis-server is not installed");
    }
    found
}

fn prefix() -> String {
    format!("tollgate-test:{}:", uuid::Uuid::now_v7())
}

async fn post(gw: &Gateway, c: &reqwest::Client, key: &str) -> reqwest::Response {
    common::post(gw, c, key, BODY).await
}

fn limits_section(url: &str, prefix: &str, fail: &str) -> String {
    format!(
        "[limits]\nredis_url = \"{url}\"\nredis_key_prefix = \"{prefix}\"\nredis_timeout_ms = 2000\nfail = \"{fail}\"\n"
    )
}

/// Polls the gateway's metrics until `series` has `value` (an explicit signal: the worker's
/// heartbeat or probe), failing after 20 s.
async fn until_metric(gw: &Gateway, series: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, text) = gw.scrape("/metrics").await;
        let got = Gateway::sample(&text, series);
        if got == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} = {got}, waited for {value}: {}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the gateway's log (written by a buffered log thread) holds `text`.
async fn until_logged(gw: &Gateway, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !gw.log().contains(text) {
        assert!(
            Instant::now() < deadline,
            "never logged {text:?}: {}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn settings(url: &str, prefix: &str) -> Settings {
    Settings {
        url: url.into(),
        key_prefix: prefix.into(),
        timeout: Duration::from_secs(2),
        fail: FailPolicy::Local,
    }
}

fn rate(key: &str, limit: u64, period_us: u64, cost: u64) -> Slot {
    Slot::Rate {
        key: key.into(),
        limit,
        period_us,
        cost,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admission_script_is_exact_on_an_injected_clock() {
    let Some(url) = redis_url() else { return };
    let p = prefix();
    let (redis, worker) = Redis::new(&settings(&url, &p)).unwrap();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(worker.run(stop));
    let t0: u64 = 1_000_000_000_000; // µs
    let minute = 60_000_000;
    let rpm = rate(&format!("{p}rpm"), 100, minute, 1);

    // 100 per minute: a full bucket at once, remaining counting down, then one per 600 ms.
    for i in 0..100 {
        let r = redis
            .admit(std::slice::from_ref(&rpm), "m", Some(t0))
            .await
            .unwrap();
        assert!(r[0].allowed, "request {i}");
        assert_eq!(r[0].remaining, 99 - i);
    }
    let r = redis
        .admit(std::slice::from_ref(&rpm), "m", Some(t0))
        .await
        .unwrap();
    assert!(!r[0].allowed);
    assert_eq!((r[0].remaining, r[0].retry_us), (0, 600_000));
    assert_eq!(r[0].reset_us, minute);
    let r = redis
        .admit(std::slice::from_ref(&rpm), "m", Some(t0 + 599_999))
        .await
        .unwrap();
    assert!(!r[0].allowed);
    assert_eq!(r[0].retry_us, 1);
    let r = redis
        .admit(std::slice::from_ref(&rpm), "m", Some(t0 + 600_000))
        .await
        .unwrap();
    assert!(r[0].allowed);
    assert_eq!(r[0].remaining, 0);

    // All or nothing: a refusal by one slot takes nothing from the others.
    let tpm = rate(&format!("{p}tpm"), 1000, minute, 600);
    let r = redis
        .admit(std::slice::from_ref(&tpm), "m", Some(t0))
        .await
        .unwrap();
    assert_eq!((r[0].allowed, r[0].remaining), (true, 400));
    let r = redis
        .admit(std::slice::from_ref(&tpm), "m", Some(t0))
        .await
        .unwrap();
    // 200 tokens short, at 1000 a minute: 12 s.
    assert_eq!((r[0].allowed, r[0].retry_us), (false, 12_000_000));
    let small = rate(&format!("{p}tpm"), 1000, minute, 100);
    let other = rate(&format!("{p}other"), 1, minute, 1);
    let r = redis
        .admit(std::slice::from_ref(&other), "m", Some(t0))
        .await
        .unwrap();
    assert!(r[0].allowed);
    let r = redis
        .admit(&[small.clone(), other.clone()], "m", Some(t0))
        .await
        .unwrap();
    assert!(r[0].allowed && !r[1].allowed);
    let r = redis
        .admit(std::slice::from_ref(&small), "m", Some(t0))
        .await
        .unwrap();
    assert_eq!(
        (r[0].allowed, r[0].remaining),
        (true, 300),
        "the refused request took nothing"
    );

    // Settlement (on Redis's clock, as the gateway runs): 100 estimated, 700 used → the worker
    // takes 600 more.
    let tokens = |cost| rate(&format!("{p}settled"), 1000, minute, cost);
    let r = redis.admit(&[tokens(100)], "m", None).await.unwrap();
    assert_eq!((r[0].allowed, r[0].remaining), (true, 900));
    redis.settle(format!("{p}settled"), 1000, minute, 600);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = redis.admit(&[tokens(0)], "m", None).await.unwrap();
        if r[0].remaining < 800 {
            // 700 in use, less what refilled since (1000 a minute: one per 60 ms).
            assert!((300..=320).contains(&r[0].remaining), "{r:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the settlement never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Concurrency: two leases, the third refused; a release (through the worker) frees one; a
    // lease nobody renews expires after LEASE (an instance that died).
    let conc = Slot::Concurrency {
        key: format!("{p}concurrent"),
        limit: 2,
    };
    for m in ["a", "b"] {
        let r = redis
            .admit(std::slice::from_ref(&conc), m, Some(t0))
            .await
            .unwrap();
        assert!(r[0].allowed, "{m}");
    }
    let r = redis
        .admit(std::slice::from_ref(&conc), "c", Some(t0))
        .await
        .unwrap();
    assert_eq!((r[0].allowed, r[0].retry_us), (false, 1_000_000));
    redis.release("a");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !redis
        .admit(std::slice::from_ref(&conc), "c", Some(t0))
        .await
        .unwrap()[0]
        .allowed
    {
        assert!(Instant::now() < deadline, "the release never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let later = t0 + LEASE.as_micros() as u64 + 1;
    let r = redis
        .admit(std::slice::from_ref(&conc), "d", Some(later))
        .await
        .unwrap();
    assert!(r[0].allowed, "expired leases are swept");
    assert_eq!(r[0].remaining, 1);

    stop_tx.send(true).unwrap();
    worker.await.unwrap();
    let mut c = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{p}*"))
        .query_async(&mut c)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut c)
        .await
        .unwrap_or(());
}

both_dbs!(
    two_instances_sharing_redis_admit_the_limit_once,
    two_instances
);
async fn two_instances(db: Db) {
    let Some(url) = redis_url() else { return };
    let mock = MockUpstream::json_ok().await;
    let p = prefix();
    let mut a = Gateway::new(db, "", &limits_section(&url, &p, "local"))
        .await
        .unwrap();
    a.add_user("alice@example.com");
    a.add_account("main", "openai", &mock.url(), "sk-up", 1, 1);
    let key = a.create_key("alice@example.com", &["--rpm", "100"]);
    let mut b = a.sibling().await;
    a.start().await;
    b.start().await;
    for gw in [&a, &b] {
        until_metric(gw, "tollgate_rate_limit_redis_up", 1.0).await;
        until_metric(gw, "tollgate_rate_limit_redis_instances", 2.0).await;
    }

    // 200 requests, 64 at a time, alternating between the instances.
    let c = client();
    let gws = [Arc::new(a), Arc::new(b)];
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (gws, c, key, next) = (gws.clone(), c.clone(), key.clone(), next.clone());
            tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if i >= 200 {
                        return got;
                    }
                    let r = post(&gws[i % 2], &c, &key).await;
                    got.push((i % 2, r.status().as_u16()));
                }
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed();
    let ok: Vec<usize> = results
        .iter()
        .filter(|(_, s)| *s == 200)
        .map(|(i, _)| *i)
        .collect();
    assert!(
        results.iter().all(|(_, s)| *s == 200 || *s == 429),
        "{results:?}"
    );
    // 100 at once, then one more per 600 ms the burst took (the bucket refills smoothly).
    let refill = (elapsed.as_millis() / 600) as usize;
    assert!(
        (99..=101 + refill).contains(&ok.len()),
        "{} admitted across both instances in {elapsed:?}",
        ok.len()
    );
    assert!(
        ok.contains(&0) && ok.contains(&1),
        "both instances admitted"
    );
    assert_eq!(mock.count(), ok.len(), "refusals never reach the upstream");
    let (_, text) = gws[0].scrape("/metrics").await;
    assert_eq!(
        Gateway::sample(
            &text,
            r#"tollgate_rate_limit_fallback_total{policy="local"}"#
        ),
        0.0
    );
}

both_dbs!(
    concurrency_slots_are_shared_and_come_back,
    shared_concurrency
);
async fn shared_concurrency(db: Db) {
    let Some(url) = redis_url() else { return };
    let gate = Gate::new();
    let g = gate.clone();
    let mock = MockUpstream::start(move |_| Reply::Sse {
        first: fixture("chat_stream_1.sse"),
        rest: vec![fixture("chat_stream_2.sse")],
        gate: g.clone(),
    })
    .await;
    let p = prefix();
    let mut a = Gateway::new(db, "", &limits_section(&url, &p, "local"))
        .await
        .unwrap();
    a.add_user("alice@example.com");
    a.add_account("main", "openai", &mock.url(), "sk-up", 1, 1);
    let key = a.create_key("alice@example.com", &["--max-concurrent", "2"]);
    let mut b = a.sibling().await;
    a.start().await;
    b.start().await;
    for gw in [&a, &b] {
        until_metric(gw, "tollgate_rate_limit_redis_up", 1.0).await;
    }
    let c = client();
    // One stream on each instance holds both slots; a third anywhere is refused.
    let s1 = post(&a, &c, &key).await;
    let s2 = post(&b, &c, &key).await;
    assert_eq!((s1.status().as_u16(), s2.status().as_u16()), (200, 200));
    for gw in [&a, &b] {
        let r = post(gw, &c, &key).await;
        assert_eq!(r.status().as_u16(), 429);
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("Too many concurrent requests on this API key: limit 2."),
            "{v}"
        );
    }
    // The streams end: their slots come back (released through each instance's worker).
    gate.open();
    let (t1, t2) = (s1.text().await.unwrap(), s2.text().await.unwrap());
    assert!(t1.contains("[DONE]") && t2.contains("[DONE]"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = post(&b, &c, &key).await;
        if r.status().as_u16() == 200 {
            r.text().await.unwrap();
            break;
        }
        assert!(Instant::now() < deadline, "the slots never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `redis-server` of the test's own on a free port, stopped and started at will.
struct OwnRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl OwnRedis {
    async fn start() -> OwnRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = OwnRedis {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        r.restart().await;
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server and waits until it answers PING.
    async fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (.ci/run installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(client) = redis::Client::open(self.url()) {
                if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                    let pong: redis::RedisResult<String> =
                        redis::cmd("PING").query_async(&mut c).await;
                    if pong.is_ok() {
                        return;
                    }
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends `n` requests one after another; returns how many got 200.
async fn admitted(gw: &Gateway, c: &reqwest::Client, key: &str, n: usize) -> Vec<u16> {
    let mut statuses = Vec::new();
    for _ in 0..n {
        statuses.push(post(gw, c, key).await.status().as_u16());
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_each_instance_enforces_its_share_then_sharing_resumes() {
    if !have_redis_server() {
        return;
    }
    let mut redis = OwnRedis::start().await;
    let mock = MockUpstream::json_ok().await;
    let mut a = Gateway::new(
        Db::Sqlite,
        "",
        &limits_section(&redis.url(), &prefix(), "local"),
    )
    .await
    .unwrap();
    a.add_user("alice@example.com");
    a.add_account("main", "openai", &mock.url(), "sk-up", 1, 1);
    let key = a.create_key("alice@example.com", &["--rpm", "10"]);
    let mut b = a.sibling().await;
    a.start().await;
    b.start().await;
    for gw in [&a, &b] {
        until_metric(gw, "tollgate_rate_limit_redis_up", 1.0).await;
        until_metric(gw, "tollgate_rate_limit_redis_instances", 2.0).await;
    }
    let c = client();
    assert_eq!(admitted(&a, &c, &key, 1).await, [200]);

    // Redis goes away: the first limited request finds out; each instance now admits its half
    // of the limit (10 / 2 instances), on its own.
    redis.kill();
    let statuses = admitted(&a, &c, &key, 8).await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        5,
        "{statuses:?}"
    );
    let (_, text) = a.scrape("/metrics").await;
    assert_eq!(Gateway::sample(&text, "tollgate_rate_limit_redis_up"), 0.0);
    assert_eq!(
        Gateway::sample(
            &text,
            r#"tollgate_rate_limit_fallback_total{policy="local"}"#
        ),
        8.0
    );
    until_logged(&a, "rate-limit Redis unreachable").await;
    // B sent nothing: its heartbeat finds Redis gone (else its first request after the restart
    // would find the dead connection and fall back once).
    until_metric(&b, "tollgate_rate_limit_redis_up", 0.0).await;

    // Redis is back (empty): each instance finds it by itself and the limit is shared again.
    redis.restart().await;
    for gw in [&a, &b] {
        until_metric(gw, "tollgate_rate_limit_redis_up", 1.0).await;
    }
    let statuses = admitted(&b, &c, &key, 12).await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        10,
        "{statuses:?}"
    );
    until_logged(&a, "rate-limit Redis reachable").await;
    assert_eq!(
        a.log().matches("rate-limit Redis unreachable").count(),
        1,
        "logged once: {}",
        a.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_fail_closed_refuses_limited_keys_only() {
    if !have_redis_server() {
        return;
    }
    let mut redis = OwnRedis::start().await;
    let mock = MockUpstream::json_ok().await;
    let mut gw = Gateway::new(
        Db::Sqlite,
        "",
        &limits_section(&redis.url(), &prefix(), "closed"),
    )
    .await
    .unwrap();
    gw.add_user("alice@example.com");
    gw.add_account("main", "openai", &mock.url(), "sk-up", 1, 1);
    let limited = gw.create_key("alice@example.com", &["--rpm", "1000"]);
    let free = gw.create_key("alice@example.com", &[]);
    gw.start().await;
    until_metric(&gw, "tollgate_rate_limit_redis_up", 1.0).await;
    let c = client();
    assert_eq!(admitted(&gw, &c, &limited, 1).await, [200]);

    redis.kill();
    let r = post(&gw, &c, &limited).await;
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limits_unavailable");
    // A key without limits never asks Redis.
    assert_eq!(admitted(&gw, &c, &free, 2).await, [200, 200]);
    let (_, text) = gw.scrape("/metrics").await;
    assert_eq!(
        Gateway::sample(
            &text,
            r#"tollgate_rate_limit_fallback_total{policy="closed"}"#
        ),
        1.0
    );

    redis.restart().await;
    until_metric(&gw, "tollgate_rate_limit_redis_up", 1.0).await;
    assert_eq!(admitted(&gw, &c, &limited, 1).await, [200]);
}
