//! Keys through a database outage longer than the key cache's freshness: cached keys keep being
//! served at once (stale-if-error), a key never seen is refused at once (the breaker) instead of
//! waiting on the pool, and every served request's row arrives exactly once afterwards.

mod common;

use std::time::{Duration, Instant};

use common::{Db, Gateway, MockUpstream};

async fn status(c: &reqwest::Client, url: &str, key: &str) -> u16 {
    c.post(url)
        .bearer_auth(key)
        .body("{}")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_keys_outlive_their_freshness_while_the_database_is_down() {
    if common::postgres_base_url().is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "TEST_DATABASE_URL is not set in CI"
        );
        eprintln!("skipped: TEST_DATABASE_URL is not set");
        return;
    }
    let mock = MockUpstream::json_ok().await;
    let mut gw = Gateway::new(
        Db::Postgres,
        "",
        "[auth]\ncache_ttl_secs = 1\nmax_stale_secs = 3600\n",
    )
    .await
    .unwrap();
    gw.set_writer("flush_timeout_ms = 1000\nmax_backoff_ms = 500");
    gw.add_user("alice@example.com");
    gw.add_account("a", "openai", &mock.url(), "sk", 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    let never_seen = tollgate::keys::generate().unwrap();
    let cutter = gw.through_cutter().await;
    gw.start().await;
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let url = gw.url("/v1/chat/completions");
    let mut served = 0;
    for _ in 0..20 {
        assert_eq!(status(&c, &url, &key).await, 200);
        served += 1;
    }

    cutter.cut();
    // Three times the freshness: every request is served, none waits on the database.
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(3) {
        let t = Instant::now();
        assert_eq!(status(&c, &url, &key).await, 200, "{}", gw.log());
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "a cached key waited {:?} on the database",
            t.elapsed()
        );
        served += 1;
    }
    // A key never seen needs the database: refused, and at once once the breaker is open.
    assert_eq!(status(&c, &url, &never_seen).await, 503);
    let t = Instant::now();
    assert_eq!(status(&c, &url, &never_seen).await, 503);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "an unknown key waited {:?}",
        t.elapsed()
    );

    cutter.restore();
    assert_eq!(status(&c, &url, &key).await, 200);
    served += 1;
    assert!(gw.terminate().success(), "{}", gw.log());
    let rows = gw.db.rows().await;
    assert_eq!(rows.len(), served, "every served request once");
    assert!(gw.db.invariants().await.holds());
}
