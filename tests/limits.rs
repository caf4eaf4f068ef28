//! Rate limits end to end (`limits.rs`): a real `tollgate serve` in front of a recording mock, on
//! SQLite and PostgreSQL. Requests per minute (exact on one instance, refusals never reach the
//! upstream and are metered as 429 rows), a user's limit shared by their keys, tokens admitted on
//! an estimate and settled on reported usage, concurrency slots coming back on every end path, a
//! limit changed with the CLI reaching the running gateway, and the official `openai` SDK
//! retrying a 429.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    client, fixture, header, num, post, rows, stream, Db, Gate, Gateway, MockUpstream, Reply, BODY,
};

both_dbs!(requests_per_minute_are_exact, requests_per_minute);
async fn requests_per_minute(db: Db) {
    let mock = MockUpstream::json_ok().await;
    let mut gw = Gateway::new(db, "", "").await.unwrap();
    gw.add_user("alice@example.com");
    gw.add_account("main", "openai", &mock.url(), "sk-up", 1, 1);
    let key = gw.create_key("alice@example.com", &["--rpm", "60"]);
    let listed = gw.cli_ok(&["keys", "list"]);
    assert!(listed.ends_with("limits=rpm:60"), "{listed}");
    gw.start().await;

    let c = client();
    let started = Instant::now();
    let responses =
        futures_util::future::join_all((0..100).map(|_| post(&gw, &c, &key, BODY))).await;
    let elapsed = started.elapsed();
    let (ok, refused): (Vec<_>, Vec<_>) = responses
        .into_iter()
        .partition(|r| r.status().as_u16() == 200);
    // GCRA refills one a second: exact when the burst took under a second (it does unless the
    // machine is very loaded), and never more than one extra per second it took.
    if elapsed < Duration::from_secs(1) {
        assert_eq!((ok.len(), refused.len()), (60, 40), "in {elapsed:?}");
    } else {
        assert!(
            (60..=60 + elapsed.as_secs() as usize + 1).contains(&ok.len()),
            "{} admitted in {elapsed:?}",
            ok.len()
        );
    }
    assert_eq!(mock.count(), ok.len(), "refusals never reach the upstream");
    let mut remaining: Vec<u64> = ok
        .iter()
        .map(|r| {
            assert_eq!(num(r, "x-ratelimit-limit-requests"), 60);
            assert!(header(r, "x-ratelimit-reset-requests").is_some());
            assert_eq!(header(r, "x-ratelimit-limit-tokens"), None);
            num(r, "x-ratelimit-remaining-requests")
        })
        .collect();
    remaining.sort_unstable();
    if elapsed < Duration::from_secs(1) {
        assert_eq!(remaining, (0..60).collect::<Vec<_>>());
    }
    for r in refused {
        assert_eq!(r.status().as_u16(), 429);
        assert!(num(&r, "retry-after") >= 1);
        assert_eq!(num(&r, "x-ratelimit-limit-requests"), 60);
        assert_eq!(num(&r, "x-ratelimit-remaining-requests"), 0);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        assert_eq!(v["error"]["type"], "requests");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(
                "Rate limit reached for requests per minute (RPM) on this API key: limit 60."
            ),
            "{message}"
        );
    }

    let rows = rows(&gw, 100).await;
    let refused_rows: Vec<_> = rows.iter().filter(|r| r.status_code == 429).collect();
    assert_eq!(refused_rows.len(), 100 - mock.count());
    for r in &refused_rows {
        assert_eq!(r.cost, rust_decimal::Decimal::ZERO);
        assert_eq!(r.upstream_account_id, None);
        assert_eq!(r.error_message.as_deref(), Some("rate_limit_exceeded"));
    }
    assert_eq!(
        rows.iter().filter(|r| r.status_code == 200).count(),
        mock.count()
    );
    assert!(gw.db.invariants().await.holds());
    let (_, metrics) = gw.scrape("/metrics").await;
    assert_eq!(
        Gateway::sample(
            &metrics,
            r#"tollgate_rate_limited_total{scope="key",kind="requests"}"#
        ),
        refused_rows.len() as f64
    );
}

both_dbs!(a_user_limit_counts_all_their_keys, user_limit);
async fn user_limit(db: Db) {
    let mock = MockUpstream::json_ok().await;
    let mut gw = Gateway::new(db, "", "").await.unwrap();
    gw.add_user("alice@example.com");
    gw.add_account("main", "openai", &mock.url(), "sk-up", 1, 1);
    let k1 = gw.create_key("alice@example.com", &[]);
    let k2 = gw.create_key("alice@example.com", &[]);
    gw.cli_ok(&["users", "update", "alice@example.com", "--rpm", "3"]);
    // Bad values change nothing and say what is wrong in one line.
    let bad = gw.cli(&["users", "update", "alice@example.com", "--rpm", "-5"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("--rpm: -5 is negative (0 = no limit)"),
        "{err}"
    );
    let listed = gw.cli_ok(&["users", "list"]);
    assert!(listed.ends_with("limits=rpm:3"), "{listed}");
    gw.start().await;

    let c = client();
    for key in [&k1, &k2, &k1] {
        let r = post(&gw, &c, key, BODY).await;
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(num(&r, "x-ratelimit-limit-requests"), 3);
    }
    let r = post(&gw, &c, &k2, BODY).await;
    assert_eq!(r.status().as_u16(), 429);
    let v: serde_json::Value = r.json().await.unwrap();
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("this API key's user"), "{message}");
    assert_eq!(mock.count(), 3);
}

/// A provider whose every answer reports 300 prompt + 200 completion tokens.
async fn reports_500_tokens() -> MockUpstream {
    MockUpstream::start(|_| {
        Reply::Json(
            200,
            Bytes::from_static(
                br#"{"id":"c","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"x"},"finish_reason":"stop"}],"usage":{"prompt_tokens":300,"completion_tokens":200,"total_tokens":500}}"#,
            ),
        )
    })
    .await
}

both_dbs!(
    tokens_are_admitted_on_an_estimate_and_settled_on_usage,
    tokens
);
async fn tokens(db: Db) {
    let mock = reports_500_tokens().await;
    let mut gw = Gateway::new(db, "", "").await.unwrap();
    gw.add_user("alice@example.com");
    gw.add_account("main", "openai", &mock.url(), "sk-up", 1, 1);
    let key = gw.create_key("alice@example.com", &["--tpm", "1000"]);
    gw.start().await;
    // 53 bytes (14 tokens) + max_tokens 12 = an estimate of 26; each request then reports 500.
    let body = r#"{"model":"gpt-4o-mini","max_tokens":12,"messages":[]}"#;
    assert_eq!(body.len(), 53);
    let c = client();
    let first = post(&gw, &c, &key, body).await;
    assert_eq!(first.status().as_u16(), 200);
    assert_eq!(num(&first, "x-ratelimit-limit-tokens"), 1000);
    assert_eq!(num(&first, "x-ratelimit-remaining-tokens"), 974);
    assert_eq!(header(&first, "x-ratelimit-limit-requests"), None);
    rows(&gw, 1).await; // settled: logging ran
    let second = post(&gw, &c, &key, body).await;
    assert_eq!(second.status().as_u16(), 200);
    // 500 settled + 26 taken, give or take the refill (1000 a minute: 1 per 60 ms).
    let left = num(&second, "x-ratelimit-remaining-tokens");
    assert!((474..=480).contains(&left), "{left}");
    rows(&gw, 2).await;
    // The bucket is full (1000 used): 26 more fit after 26 × 60 ms = 1.56 s.
    let third = post(&gw, &c, &key, body).await;
    assert_eq!(third.status().as_u16(), 429);
    assert_eq!(num(&third, "retry-after"), 2);
    // Fewer than the estimate fit (what refilled since the second request).
    assert!(num(&third, "x-ratelimit-remaining-tokens") < 26);
    let v: serde_json::Value = third.json().await.unwrap();
    assert_eq!(v["error"]["type"], "tokens");
    assert_eq!(mock.count(), 2);
    // On Anthropic routes the refusal speaks Anthropic.
    let r = c
        .post(gw.url("/v1/messages"))
        .header("x-api-key", &key)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let v: serde_json::Value = r.json().await.unwrap();
    if status == 429 {
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "rate_limit_error");
    }
}

/// Polls until the key admits a request again (a slot came back); returns that response.
async fn until_admitted(
    gw: &Gateway,
    c: &reqwest::Client,
    key: &str,
    tag: &str,
) -> reqwest::Response {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = stream(gw, c, key, tag).await;
        if r.status().as_u16() == 200 {
            return r;
        }
        assert_eq!(r.status().as_u16(), 429);
        assert!(Instant::now() < deadline, "no slot came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

both_dbs!(
    concurrent_streams_hold_their_slots_until_they_end,
    concurrency
);
async fn concurrency(db: Db) {
    // Each stream waits on the gate named in its prompt (g0…g19, then more); it ends when opened.
    let gates: Vec<Gate> = (0..40).map(|_| Gate::new()).collect();
    let mock = MockUpstream::gated_sse(gates.clone()).await;
    let mut gw = Gateway::new(db, "", "[metering]\nabort_drain_secs = 1\n")
        .await
        .unwrap();
    gw.add_user("alice@example.com");
    gw.add_account("main", "openai", &mock.url(), "sk-up", 1, 1);
    let key = gw.create_key("alice@example.com", &["--max-concurrent", "4"]);
    gw.start().await;
    let c = client();

    let responses = futures_util::future::join_all((0..20).map(|i| {
        let (gw, c, key) = (&gw, &c, &key);
        async move { stream(gw, c, key, &format!("g{i}")).await }
    }))
    .await;
    let (held, refused): (Vec<_>, Vec<_>) = responses
        .into_iter()
        .partition(|r| r.status().as_u16() == 200);
    assert_eq!((held.len(), refused.len()), (4, 16));
    assert_eq!(
        mock.count(),
        4,
        "the upstream never sees more than 4 at once"
    );
    for r in refused {
        assert_eq!(num(&r, "retry-after"), 1);
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Too many concurrent requests on this API key: limit 4."));
    }
    // Which gates the held streams wait on.
    let tags: Vec<usize> = mock
        .recorded()
        .iter()
        .map(|r| {
            let b = String::from_utf8_lossy(&r.body).to_string();
            b.split("\"content\":\"g")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();

    // Success: one stream ends (its small rest fits the socket buffers); its slot comes back.
    gates[tags[0]].open();
    let fifth = until_admitted(&gw, &c, &key, "g20").await;
    // Four held again: the next is refused.
    assert_eq!(stream(&gw, &c, &key, "g21").await.status().as_u16(), 429);

    // Client abort: drop the fifth stream's response, then let the upstream go on: the gateway's
    // write fails (or, if the reset is late, the stream just ends) and the slot comes back.
    drop(fifth);
    gates[20].open();
    let sixth = until_admitted(&gw, &c, &key, "g22").await;
    assert_eq!(stream(&gw, &c, &key, "g23").await.status().as_u16(), 429);
    drop(sixth);

    // Everything ends: all four slots come back.
    for g in &gates {
        g.open();
    }
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let batch = futures_util::future::join_all((30..34).map(|i| {
            let (gw, c, key) = (&gw, &c, &key);
            async move { stream(gw, c, key, &format!("g{i}")).await }
        }))
        .await;
        let ok = batch.iter().filter(|r| r.status().as_u16() == 200).count();
        for r in batch {
            let _ = r.bytes().await;
        }
        if ok == 4 {
            break;
        }
        assert!(Instant::now() < deadline, "slots did not all come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

both_dbs!(
    a_stream_cut_by_the_upstream_gives_its_slot_back,
    upstream_cut
);
async fn upstream_cut(db: Db) {
    let gate = Gate::new();
    let mock = common::RawSseUpstream::start(
        fixture("chat_stream_1.sse"),
        Bytes::from_static(b"data: {\"choices\":[]}\n\n"),
        gate.clone(),
    )
    .await;
    let mut gw = Gateway::new(db, "", "").await.unwrap();
    gw.add_user("alice@example.com");
    gw.add_account("main", "openai", &mock.url(), "sk-up", 1, 1);
    let key = gw.create_key("alice@example.com", &["--max-concurrent", "1"]);
    gw.start().await;
    let c = client();
    let cut = stream(&gw, &c, &key, "cut").await;
    assert_eq!(cut.status().as_u16(), 200);
    assert_eq!(stream(&gw, &c, &key, "x").await.status().as_u16(), 429);
    gate.open(); // the upstream drops the connection mid-body
    assert!(cut.bytes().await.is_err(), "the client sees the cut");
    let again = until_admitted(&gw, &c, &key, "cut").await;
    assert!(again.bytes().await.is_err());
}

both_dbs!(a_changed_limit_reaches_the_running_gateway, changed_limit);
async fn changed_limit(db: Db) {
    let mock = MockUpstream::json_ok().await;
    let mut gw = Gateway::new(db, "", "").await.unwrap();
    gw.add_user("alice@example.com");
    gw.add_account("main", "openai", &mock.url(), "sk-up", 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;
    let c = client();
    let r = post(&gw, &c, &key, BODY).await;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), None);

    gw.cli_ok(&["keys", "update", "1", "--rpm", "2"]);
    let changed = Instant::now();
    loop {
        let r = post(&gw, &c, &key, BODY).await;
        if header(&r, "x-ratelimit-limit-requests").as_deref() == Some("2") {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(5),
            "the new limit did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("limit arrived after {:?}", changed.elapsed());
    assert_eq!(post(&gw, &c, &key, BODY).await.status().as_u16(), 200);
    assert_eq!(post(&gw, &c, &key, BODY).await.status().as_u16(), 429);

    // Back to the default ([limits]: none): the key is unlimited again.
    gw.cli_ok(&["keys", "update", "1", "--rpm", "default"]);
    let changed = Instant::now();
    loop {
        let r = post(&gw, &c, &key, BODY).await;
        if r.status().as_u16() == 200 && header(&r, "x-ratelimit-limit-requests").is_none() {
            break;
        }
        assert!(changed.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bad = gw.cli(&["keys", "update", "1", "--tpm", "99999999999"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--tpm: 99999999999 is above"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_retries_a_429_and_succeeds() {
    let python = std::env::var("TOLLGATE_PYTHON").unwrap_or_else(|_| "python3".into());
    let installed = std::process::Command::new(&python)
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the openai Python SDK is not installed in CI"
        );
        eprintln!("skipped: pip install -r tests/sdk/requirements.txt");
        return;
    }
    let mock = MockUpstream::json_ok().await;
    let mut gw = Gateway::new(Db::Sqlite, "", "").await.unwrap();
    gw.add_user("alice@example.com");
    gw.add_account("main", "openai", &mock.url(), "sk-up", 1, 1);
    // 20 a minute: one more every 3 s once the burst is spent.
    let key = gw.create_key("alice@example.com", &["--rpm", "20"]);
    gw.start().await;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    // The SDK is started first and waits (imports done) for a line on stdin, so its request goes
    // out within milliseconds of the bucket running dry, not a Python start-up later.
    let script = r#"
import os, sys, time, openai
client = openai.OpenAI(base_url=os.environ["BASE"], api_key=os.environ["KEY"], max_retries=3)
print("ready", flush=True)
sys.stdin.readline()
start = time.monotonic()
raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
took = time.monotonic() - start
print(raw.retries_taken, round(took, 2), raw.headers.get("x-ratelimit-limit-requests"))
"#;
    let mut sdk = tokio::process::Command::new(&python)
        .args(["-c", script])
        .env("BASE", gw.url("/v1"))
        .env("KEY", &key)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout_lines = tokio::io::BufReader::new(sdk.stdout.take().unwrap()).lines();
    assert_eq!(
        stdout_lines.next_line().await.unwrap().as_deref(),
        Some("ready")
    );
    // Spend the bucket: requests until the first 429.
    let c = client();
    let mut sent = 0;
    loop {
        sent += 1;
        assert!(sent <= 100, "never refused");
        if post(&gw, &c, &key, BODY).await.status().as_u16() == 429 {
            break;
        }
    }
    let mut stdin = sdk.stdin.take().unwrap();
    stdin.write_all(b"go\n").await.unwrap();
    drop(stdin);
    let result = stdout_lines.next_line().await.unwrap().unwrap_or_default();
    let out = sdk.wait_with_output().await.unwrap();
    let stdout = format!("{result}\n");
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fields: Vec<&str> = stdout.split_whitespace().collect();
    assert!(fields[0].parse::<u32>().unwrap() >= 1, "no retry: {stdout}");
    assert!(fields[1].parse::<f64>().unwrap() < 10.0, "{stdout}");
    assert_eq!(fields[2], "20");
    let rows = rows(&gw, sent + fields[0].parse::<usize>().unwrap() + 1).await;
    assert!(rows.iter().any(|r| r.status_code == 429));
}
