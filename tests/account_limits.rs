//! Upstream accounts as limits, not surprises (`account_limits.rs`), end to end: a real
//! `tollgate serve` in front of recording mocks, on SQLite and PostgreSQL. An account at its
//! declared rpm sends the request to the next account (its tier, then the next tier) and the
//! client sees 200; every account at its limits answers 429 with the earliest `Retry-After`,
//! metered as a 429 row costing 0, reaching no upstream; a provider's "no requests left" moves
//! traffic to the other account; a concurrency limit holds across slow streams and its slots
//! come back after a client abort.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    client, fixture, header, post, rows, stream, Db, Gate, Gateway, MockUpstream, Reply, BODY,
};

both_dbs!(
    an_account_at_its_rpm_sends_the_next_request_to_the_next_tier,
    rpm_spills_over
);
async fn rpm_spills_over(db: Db) {
    let a = MockUpstream::json_ok().await;
    let b = MockUpstream::json_ok().await;
    let anthropic =
        MockUpstream::start(|_| Reply::Json(200, fixture("anthropic_message.json"))).await;
    let mut gw = Gateway::new(db, "", "").await.unwrap();
    gw.add_user("alice@example.com");
    gw.add_account_with("a", "openai", &a.url(), "sk-up", 1, &["--rpm", "10"]);
    gw.add_account_with("b", "openai", &b.url(), "sk-up", 2, &[]);
    gw.add_account_with(
        "claude",
        "anthropic",
        &anthropic.url(),
        "sk-up",
        1,
        &["--rpm", "1"],
    );
    // B gets its limit afterwards, by name; bad values change nothing and say why.
    let bad = gw.cli(&["accounts", "update", "b", "--rpm", "-1"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("--rpm: -1 is negative"), "{err}");
    gw.cli_ok(&["accounts", "update", "b", "--rpm", "1"]);
    let listed = gw.cli_ok(&["accounts", "list"]);
    assert!(listed.ends_with("limits=rpm:1"), "{listed}");
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;

    let c = client();
    let started = Instant::now();
    let burst = futures_util::future::join_all((0..11).map(|_| post(&gw, &c, &key, BODY))).await;
    let statuses: Vec<u16> = burst.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(statuses, [200; 11]);
    // GCRA refills A one request every 6 s: exact while the burst took less.
    if started.elapsed() < Duration::from_secs(5) {
        assert_eq!((a.count(), b.count()), (10, 1));
    }
    // A client of a key without limits sees no x-ratelimit headers of tollgate's.
    assert_eq!(header(&burst[0], "x-ratelimit-limit-requests"), None);

    // Both at their limits: 429 with the earliest wait, and no upstream sees it.
    let before = (a.count(), b.count());
    let refused = post(&gw, &c, &key, BODY).await;
    if started.elapsed() < Duration::from_secs(5) {
        assert_eq!(refused.status().as_u16(), 429);
        let wait: u64 = header(&refused, "retry-after").unwrap().parse().unwrap();
        assert!(
            (1..=6).contains(&wait),
            "A's next unit is at most 6 s away: {wait}"
        );
        assert_eq!(header(&refused, "x-ratelimit-limit-requests"), None);
        let v: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        assert_eq!(v["error"]["type"], "requests");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(
                "Rate limit reached for requests per minute (RPM) on every upstream account that serves this request: limit 10."
            ),
            "{message}"
        );
        assert_eq!((a.count(), b.count()), before, "refusals reach no upstream");

        let rows = rows(&gw, 12).await;
        let refused_rows: Vec<_> = rows.iter().filter(|r| r.status_code == 429).collect();
        assert_eq!(refused_rows.len(), 1);
        assert_eq!(refused_rows[0].cost, rust_decimal::Decimal::ZERO);
        assert_eq!(refused_rows[0].upstream_account_id, None);
        assert_eq!(
            refused_rows[0].error_message.as_deref(),
            Some("rate_limit_exceeded")
        );
        let (_, metrics) = gw.scrape("/metrics").await;
        assert_eq!(
            Gateway::sample(
                &metrics,
                r#"tollgate_rate_limited_total{scope="account",kind="requests"}"#
            ),
            1.0
        );
    }

    // On an Anthropic route the refusal speaks Anthropic.
    let messages = |c: &reqwest::Client| {
        c.post(gw.url("/v1/messages"))
            .header("x-api-key", &key)
            .body(r#"{"model":"claude-3-5-haiku","max_tokens":10,"messages":[]}"#)
            .send()
    };
    assert_eq!(messages(&c).await.unwrap().status().as_u16(), 200);
    let r = messages(&c).await.unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert!(header(&r, "retry-after").is_some());
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert_eq!(anthropic.count(), 1);
    assert!(gw.db.invariants().await.holds());
}

both_dbs!(
    a_provider_out_of_requests_moves_traffic_to_the_other_account,
    provider_feedback
);
async fn provider_feedback(db: Db) {
    let body = fixture("chat_completion.json");
    let a = MockUpstream::start(move |_| {
        Reply::Status(
            200,
            vec![
                ("content-type", "application/json".into()),
                ("x-ratelimit-remaining-requests", "0".into()),
                ("x-ratelimit-reset-requests", "30s".into()),
            ],
            body.clone(),
        )
    })
    .await;
    let b = MockUpstream::json_ok().await;
    let mut gw = Gateway::new(db, "", "").await.unwrap();
    gw.add_user("alice@example.com");
    gw.add_account_with("a", "openai", &a.url(), "sk-up", 1, &[]);
    gw.add_account_with("b", "openai", &b.url(), "sk-up", 2, &[]);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;
    let c = client();
    for _ in 0..4 {
        assert_eq!(post(&gw, &c, &key, BODY).await.status().as_u16(), 200);
    }
    assert_eq!((a.count(), b.count()), (1, 3), "A is out for 30 s");
    // Not an error: A is not in cooldown, and its error count is untouched.
    let (_, metrics) = gw.scrape("/metrics").await;
    assert_eq!(
        Gateway::sample(&metrics, r#"tollgate_upstream_cooldown{account="a"}"#),
        0.0,
        "{metrics}"
    );
    assert_eq!(
        Gateway::sample(&metrics, r#"tollgate_upstream_saturated{account="a"}"#),
        1.0,
        "{metrics}"
    );
}

both_dbs!(an_account_never_sees_more_than_its_concurrency, concurrency);
async fn concurrency(db: Db) {
    // A's streams wait on the gate named in their prompt (g0, g1, …); B answers at once.
    let gates: Vec<Gate> = (0..10).map(|_| Gate::new()).collect();
    let a = MockUpstream::gated_sse(gates.clone()).await;
    let b = MockUpstream::json_ok().await;
    let mut gw = Gateway::new(db, "", "[metering]\nabort_drain_secs = 1\n")
        .await
        .unwrap();
    gw.add_user("alice@example.com");
    gw.add_account_with(
        "a",
        "openai",
        &a.url(),
        "sk-up",
        1,
        &["--max-concurrent", "2"],
    );
    gw.add_account_with("b", "openai", &b.url(), "sk-up", 2, &[]);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;
    let c = client();

    // Six at once: two held on A, four served by B.
    let responses = futures_util::future::join_all((0..6).map(|i| {
        let (gw, c, key) = (&gw, &c, &key);
        async move { stream(gw, c, key, &format!("g{i}")).await }
    }))
    .await;
    assert!(responses.iter().all(|r| r.status().as_u16() == 200));
    assert_eq!((a.count(), b.count()), (2, 4), "A never sees more than 2");
    let on_a: Vec<reqwest::Response> = responses
        .into_iter()
        .filter(|r| header(r, "content-type").as_deref() == Some("text/event-stream"))
        .collect();
    assert_eq!(on_a.len(), 2);
    let tag = |r: &common::Recorded| -> usize {
        let b = String::from_utf8_lossy(&r.body).to_string();
        b.split("\"content\":\"g")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let held: Vec<usize> = a.recorded().iter().map(tag).collect();
    assert_eq!(post(&gw, &c, &key, BODY).await.status().as_u16(), 200);
    assert_eq!((a.count(), b.count()), (2, 5));

    // Client abort: drop both of A's streams, then let the upstream go on (the gateway's write
    // fails, or the stream just ends): both slots come back, and A serves again — two at once.
    drop(on_a);
    for i in &held {
        gates[*i].open();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut again = Vec::new();
    let mut n = 6;
    while a.count() < 4 {
        assert!(Instant::now() < deadline, "A's slots did not come back");
        let r = stream(&gw, &c, &key, &format!("g{n}")).await;
        assert_eq!(r.status().as_u16(), 200);
        if header(&r, "content-type").as_deref() == Some("text/event-stream") {
            again.push(r);
            n += 1;
        } else {
            let _ = r.bytes().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Both held again: the next goes to B, and A has seen no more than two at once.
    let before = b.count();
    let r = stream(&gw, &c, &key, "g9").await;
    assert_eq!(
        header(&r, "content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!((a.count(), b.count()), (4, before + 1));
    for g in &gates {
        g.open();
    }
    for r in again {
        let _ = r.bytes().await;
    }
}

/// A provider answering 429 with `retry-after` is at its limit, not failing: the other account
/// serves, and once both are out the client gets a 429 with the provider's wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_429s_mark_accounts_out_until_their_retry_after() {
    let limited = |secs: &'static str| {
        MockUpstream::start(move |_| {
            Reply::Status(
                429,
                vec![("retry-after", secs.into())],
                Bytes::from_static(br#"{"error":{"message":"slow down"}}"#),
            )
        })
    };
    let (a, b) = (limited("120").await, limited("40").await);
    let mut gw = Gateway::new(Db::Sqlite, "", "").await.unwrap();
    gw.add_user("alice@example.com");
    gw.add_account_with("a", "openai", &a.url(), "sk-up", 1, &[]);
    gw.add_account_with("b", "openai", &b.url(), "sk-up", 2, &[]);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;
    let c = client();
    // Both tried; the last answer (B's 429) is passed through.
    assert_eq!(post(&gw, &c, &key, BODY).await.status().as_u16(), 429);
    assert_eq!((a.count(), b.count()), (1, 1));
    let r = post(&gw, &c, &key, BODY).await;
    assert_eq!(r.status().as_u16(), 429);
    let wait: u64 = header(&r, "retry-after").unwrap().parse().unwrap();
    assert!(
        (39..=40).contains(&wait),
        "B's 40 s is the earliest: {wait}"
    );
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert_eq!((a.count(), b.count()), (1, 1), "no upstream sees it");
}
