//! Usage metering end to end: exact tokens and cost per format, the count invariants under load,
//! database outages, shutdown and crashes — on SQLite and PostgreSQL.

mod common;

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{fixture, Db, Gateway, MockUpstream, Reply};
use futures_util::StreamExt;
use rust_decimal::Decimal;

const PRICES: &str = r#"
[[routes]]
prefix = "/v1/messages"
type = "anthropic"

[[routes]]
prefix = "/v1beta/"
type = "generic"

[[routes]]
prefix = "/v1/"
type = "openai"

[prices."gpt-4o-mini"]
input = "0.15"
output = "0.60"
cached_input = "0.075"

[prices."claude-3-5-sonnet"]
input = "3"
output = "15"
cached_input = "0.30"
cache_write = "3.75"

[prices."gemini-1.5-flash"]
input = "0.075"
output = "0.30"
"#;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

fn sse(body: Bytes) -> Reply {
    Reply::Status(
        200,
        vec![("content-type", "text/event-stream".into())],
        body,
    )
}

/// The mock upstream of the format tests: the response depends on the path and request body.
async fn format_upstream() -> MockUpstream {
    MockUpstream::start(|req| {
        let body = String::from_utf8_lossy(&req.body);
        match req.path.as_str() {
            "/v1/messages" if body.contains("\"stream\":true") => {
                sse(fixture("anthropic_stream.sse"))
            }
            "/v1/messages" => Reply::Json(200, fixture("anthropic_message.json")),
            "/v1/responses" if body.contains("\"stream\":true") => {
                sse(fixture("responses_stream.sse"))
            }
            "/v1/responses" => Reply::Json(200, fixture("responses.json")),
            p if p.starts_with("/v1beta/") => Reply::Json(200, fixture("gemini.json")),
            _ if body.contains("\"stream\":true") => {
                let mut s = fixture("chat_stream_1.sse").to_vec();
                s.extend_from_slice(&fixture("chat_stream_2.sse"));
                sse(s.into())
            }
            _ if body.contains("unpriced") => Reply::Json(200, fixture("chat_unknown_model.json")),
            _ => Reply::Json(200, fixture("chat_completion_cached.json")),
        }
    })
    .await
}

struct Case {
    path: &'static str,
    body: &'static str,
    /// (model, prompt, completion, cached, cache_creation, total, cost)
    expected: (&'static str, i64, i64, i64, i64, i64, &'static str),
}

both_dbs!(tokens_and_cost_are_exact_for_every_format, formats);
async fn formats(db: Db) {
    let mock = format_upstream().await;
    let mut gw = Gateway::new(db, "", PRICES).await.unwrap();
    gw.add_user("alice@example.com");
    gw.add_account("openai", "openai", &mock.url(), "sk-o", 1, 1);
    gw.add_account("anthropic", "anthropic", &mock.url(), "sk-a", 1, 1);
    gw.add_account("gemini", "generic", &mock.url(), "sk-g", 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;

    let cases = [
        // OpenAI chat with cached prompt tokens: (200×0.15 + 1000×0.075 + 300×0.60) / 1e6
        Case {
            path: "/v1/chat/completions",
            body: r#"{"model":"gpt-4o-mini","messages":[]}"#,
            expected: (
                "gpt-4o-mini-2024-07-18",
                1200,
                300,
                1000,
                0,
                1500,
                "0.000285",
            ),
        },
        // OpenAI stream; tollgate adds include_usage: (9×0.15 + 1×0.60) / 1e6
        Case {
            path: "/v1/chat/completions",
            body: r#"{"model":"gpt-4o-mini","stream":true}"#,
            expected: ("gpt-4o-mini", 9, 1, 0, 0, 10, "0.00000195"),
        },
        // OpenAI responses API: (40×0.15 + 10×0.075 + 20×0.60) / 1e6
        Case {
            path: "/v1/responses",
            body: r#"{"model":"gpt-4o-mini","input":"hi"}"#,
            expected: ("gpt-4o-mini-2024-07-18", 50, 20, 10, 0, 70, "0.00001875"),
        },
        // A Responses API stream: usage from `response.completed`; nothing is injected (the
        // Responses API has no `stream_options`), so the body reaches the upstream as sent.
        Case {
            path: "/v1/responses",
            body: r#"{"model":"gpt-4o-mini","input":"hi","stream":true}"#,
            expected: ("gpt-4o-mini-2024-07-18", 50, 20, 10, 0, 70, "0.00001875"),
        },
        // Anthropic messages with cache reads and writes: (100×3 + 1000×0.30 + 200×3.75 + 50×15) / 1e6
        Case {
            path: "/v1/messages",
            body: r#"{"model":"claude-3-5-sonnet-20241022","max_tokens":10}"#,
            expected: (
                "claude-3-5-sonnet-20241022",
                1300,
                50,
                1000,
                200,
                1350,
                "0.0021",
            ),
        },
        // Anthropic stream: message_start + message_delta: (25×3 + 40×15) / 1e6
        Case {
            path: "/v1/messages",
            body: r#"{"model":"claude-3-5-sonnet-20241022","stream":true}"#,
            expected: ("claude-3-5-sonnet-20241022", 25, 40, 0, 0, 65, "0.000675"),
        },
        // Gemini through a generic account: (100×0.075 + 50×0.30) / 1e6
        Case {
            path: "/v1beta/models/gemini-1.5-flash:generateContent",
            body: r#"{"contents":[]}"#,
            expected: ("gemini-1.5-flash-002", 100, 50, 0, 0, 150, "0.0000225"),
        },
        // A model missing from the price table: tokens kept, cost 0, never a guess.
        Case {
            path: "/v1/chat/completions",
            body: r#"{"model":"unpriced"}"#,
            expected: ("some-unpriced-model", 7, 5, 0, 0, 12, "0"),
        },
    ];
    let mut ids = Vec::new();
    for case in &cases {
        let resp = client()
            .post(gw.url(case.path))
            .bearer_auth(&key)
            .body(case.body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{}", case.path);
        ids.push(resp.headers()["x-request-id"].to_str().unwrap().to_string());
        let body = resp.bytes().await.unwrap();
        if case.body.contains("gpt-4o-mini\",\"stream\"") {
            // The client did not ask for usage: the usage-only chunk tollgate requested is removed.
            assert_eq!(body, fixture("chat_stream_1.sse").slice(..).to_vec().into_iter().chain(b"data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: [DONE]\n\n".iter().copied()).collect::<Vec<u8>>());
        }
    }
    let streamed = mock
        .recorded()
        .into_iter()
        .find(|r| String::from_utf8_lossy(&r.body).contains("gpt-4o-mini\",\"stream\""))
        .unwrap();
    assert!(
        String::from_utf8_lossy(&streamed.body)
            .contains(r#""stream_options":{"include_usage":true}"#),
        "{:?}",
        streamed.body
    );

    let responses_stream = mock
        .recorded()
        .into_iter()
        .find(|r| r.path == "/v1/responses" && String::from_utf8_lossy(&r.body).contains("stream"))
        .unwrap();
    assert_eq!(
        responses_stream.body,
        r#"{"model":"gpt-4o-mini","input":"hi","stream":true}"#.as_bytes(),
        "a Responses stream request reaches the upstream byte-identical"
    );

    assert!(gw.terminate().success());
    let rows = gw.db.rows().await;
    assert_eq!(rows.len(), cases.len());
    for (case, id) in cases.iter().zip(&ids) {
        let row = rows
            .iter()
            .find(|r| &r.request_id == id)
            .unwrap_or_else(|| panic!("no row for {}", case.path));
        let (model, prompt, completion, cached, creation, total, cost) = case.expected;
        assert_eq!(
            (
                row.model.as_deref(),
                row.prompt_tokens,
                row.completion_tokens,
                row.cached_tokens,
                row.cache_creation_tokens,
                row.tokens_used
            ),
            (Some(model), prompt, completion, cached, creation, total),
            "{} {}",
            case.path,
            case.body
        );
        assert_eq!(
            row.cost,
            Decimal::from_str(cost).unwrap(),
            "cost of {} {}",
            case.path,
            case.body
        );
        assert_eq!(row.status_code, 200);
        assert_eq!(row.error_message, None);
    }
    assert!(gw.db.invariants().await.holds());
}

both_dbs!(ten_thousand_requests_over_fifty_keys, load_invariants);
async fn load_invariants(db: Db) {
    let mock = MockUpstream::json_ok().await;
    let mut gw = Gateway::new(db, "", "").await.unwrap();
    gw.add_user("alice@example.com");
    gw.add_account("a", "openai", &mock.url(), "sk-a", 1, 2);
    gw.add_account("b", "openai", &mock.url(), "sk-b", 1, 1);
    let keys: Vec<String> = (0..50)
        .map(|_| gw.create_key("alice@example.com", &[]))
        .collect();
    gw.start().await;
    let c = client();
    let url = gw.url("/v1/chat/completions");
    let statuses: Vec<u16> = futures_util::stream::iter((0..10_000).map(|i| {
        let (c, url, key) = (c.clone(), url.clone(), keys[i % 50].clone());
        async move {
            c.post(url)
                .bearer_auth(key)
                .body("{}")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    }))
    .buffer_unordered(32)
    .collect()
    .await;
    assert!(statuses.iter().all(|&s| s == 200));
    assert!(gw.terminate().success(), "{}", gw.log());
    let report = gw.db.invariants().await;
    assert_eq!(report.rows, 10_000);
    assert!(report.holds(), "{report:?}");
    for key_id in [1, 25, 50] {
        assert_eq!(
            gw.db
                .scalar(&format!(
                    "SELECT request_count FROM api_keys WHERE id = {key_id}"
                ))
                .await,
            200
        );
    }
    let ok = gw
        .db
        .scalar("SELECT CAST(SUM(success_count) AS BIGINT) FROM upstream_accounts")
        .await;
    assert_eq!(ok, 10_000);
}

both_dbs!(a_replayed_batch_changes_nothing, replay_is_idempotent);
async fn replay_is_idempotent(db: Db) {
    let gw = Gateway::new(db, "", "").await.unwrap();
    gw.add_user("alice@example.com");
    gw.create_key("alice@example.com", &[]);
    let account = gw.add_account("a", "openai", "http://127.0.0.1:9", "sk", 1, 1);
    let store = tollgate::store::Store::connect(&gw.db.url, 2)
        .await
        .unwrap();
    let record = |i: u32, status: i32| tollgate::record::UsageRecord {
        request_id: format!("00000000-0000-7000-8000-{i:012}"),
        user_id: 1,
        api_key_id: 1,
        upstream_account_id: Some(account),
        method: "POST".into(),
        endpoint: "/v1/chat/completions".into(),
        model: Some("gpt-4o-mini".into()),
        status_code: status,
        response_time: 12,
        prompt_tokens: 10,
        completion_tokens: 5,
        cached_tokens: 0,
        cache_creation_tokens: 0,
        tokens_used: 15,
        cost: Decimal::from_str("0.0000045").unwrap(),
        error_message: None,
        created_at: chrono::Utc::now(),
        requested_model: None,
        usage_source: None,
        upstream_error: None,
        charges: Vec::new(),
    };
    let batch: Vec<_> = (0..100)
        .map(|i| record(i, if i % 10 == 0 { 502 } else { 200 }))
        .collect();
    assert_eq!(store.insert_usage(&batch).await.unwrap(), 100);
    let counters = "SELECT request_count * 1000000 + success_count * 1000 + error_count FROM upstream_accounts";
    let before = (
        gw.db.scalar(counters).await,
        gw.db.scalar("SELECT request_count FROM api_keys").await,
    );
    assert_eq!(before, (100_090_010, 100));
    assert_eq!(
        store.insert_usage(&batch).await.unwrap(),
        0,
        "a replayed batch inserts nothing"
    );
    assert_eq!(
        (
            gw.db.scalar(counters).await,
            gw.db.scalar("SELECT request_count FROM api_keys").await
        ),
        before
    );
    // A batch overlapping the committed one counts only its new rows.
    let overlap: Vec<_> = (50..150).map(|i| record(i, 200)).collect();
    assert_eq!(store.insert_usage(&overlap).await.unwrap(), 50);
    assert_eq!(
        gw.db.scalar("SELECT request_count FROM api_keys").await,
        150
    );
    let report = store.usage_invariants().await.unwrap();
    assert!(report.holds() && report.rows == 150, "{report:?}");
    // Costs survive exactly.
    let total = store
        .usage_totals(
            chrono::Utc::now() - chrono::Duration::hours(1),
            chrono::Utc::now() + chrono::Duration::hours(1),
            tollgate::store::GroupBy::Model,
        )
        .await
        .unwrap();
    assert_eq!(total[0].cost, Decimal::from_str("0.000675").unwrap());
    store.close().await;
}

both_dbs!(
    sigterm_during_fifty_open_streams_records_fifty_rows,
    shutdown_with_streams
);
async fn shutdown_with_streams(db: Db) {
    let gate = common::Gate::new();
    let g = gate.clone();
    let mock = MockUpstream::start(move |_| Reply::Sse {
        first: fixture("chat_stream_1.sse"),
        rest: vec![fixture("chat_stream_2.sse")],
        gate: g.clone(),
    })
    .await;
    let mut gw = Gateway::new(db, "", PRICES).await.unwrap();
    gw.add_user("alice@example.com");
    gw.add_account("a", "openai", &mock.url(), "sk", 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;
    let mut streams = Vec::new();
    for _ in 0..50 {
        let resp = client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .body(r#"{"model":"gpt-4o-mini","stream":true}"#)
            .send()
            .await
            .unwrap();
        let mut s = resp.bytes_stream();
        s.next().await.unwrap().unwrap(); // the stream is open and flowing
        streams.push(s);
    }
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(gw.pid().to_string())
        .status()
        .unwrap();
    // Let every stream finish, then the process exits on its own.
    gate.open();
    for s in streams {
        let rest: Vec<_> = s.collect().await;
        assert!(rest.iter().all(|c| c.is_ok()));
    }
    assert!(gw.terminate().success(), "{}", gw.log());
    let rows = gw.db.rows().await;
    assert_eq!(rows.len(), 50);
    assert!(
        rows.iter()
            .all(|r| r.tokens_used == 10 && r.error_message.is_none()),
        "{rows:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_loses_and_duplicates_nothing() {
    if common::postgres_base_url().is_none() {
        eprintln!("skipped: TEST_DATABASE_URL is not set");
        return;
    }
    let mock = MockUpstream::json_ok().await;
    let mut gw = Gateway::new(Db::Postgres, "", "").await.unwrap();
    gw.set_writer("flush_timeout_ms = 1000\nmax_backoff_ms = 500");
    gw.add_user("alice@example.com");
    gw.add_account("a", "openai", &mock.url(), "sk", 1, 1);
    let keys: Vec<String> = (0..5)
        .map(|_| gw.create_key("alice@example.com", &[]))
        .collect();
    let cutter = gw.through_cutter().await;
    gw.start().await;

    let send = |n: usize| {
        let (c, url, keys) = (client(), gw.url("/v1/chat/completions"), keys.clone());
        async move {
            let mut ids = Vec::new();
            for i in 0..n {
                let r = c
                    .post(url.clone())
                    .bearer_auth(&keys[i % keys.len()])
                    .body("{}")
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                ids.push(r.headers()["x-request-id"].to_str().unwrap().to_string());
            }
            ids
        }
    };
    let mut ids = send(100).await; // keys now cached
    cutter.cut();
    ids.extend(send(300).await); // served from cache while the database is gone
                                 // Wait (on the durable state, not a clock) until the outage rows sit in the spool.
    for _ in 0..1000 {
        if common::spooled_records(&gw.spool_dir()) >= 300 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        common::spooled_records(&gw.spool_dir()) >= 300,
        "outage rows spooled: {}",
        gw.log()
    );
    cutter.restore();
    ids.extend(send(100).await);
    assert!(gw.terminate().success(), "{}", gw.log());
    let rows = gw.db.rows().await;
    let seen: HashSet<&str> = rows.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(rows.len(), 500, "every request exactly once");
    assert!(ids.iter().all(|id| seen.contains(id.as_str())));
    assert!(gw.db.invariants().await.holds());
    assert_eq!(
        common::spooled_records(&gw.spool_dir()),
        0,
        "the spool is empty after replay"
    );
}

both_dbs!(
    kill_9_then_restart_replays_the_spool_without_duplicates,
    crash_recovery
);
async fn crash_recovery(db: Db) {
    let mock = MockUpstream::json_ok().await;
    // high_water = 1: every batch that finds anything else queued goes to the spool, so a crash
    // leaves spooled rows behind on both databases.
    let mut gw = Gateway::new(db, "", "").await.unwrap();
    gw.set_writer("high_water = 1\nbatch_size = 10");
    gw.add_user("alice@example.com");
    gw.add_account("a", "openai", &mock.url(), "sk", 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;
    let c = client();
    let url = gw.url("/v1/chat/completions");
    // Load until the spool holds rows, then kill at once: the crash must leave a spool behind
    // (replay empties it while the database is up, so "after N requests" would be a race).
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        tokio::spawn(
            futures_util::stream::iter((0..20_000).map(move |_| {
                let (c, url, key, stop) = (c.clone(), url.clone(), key.clone(), stop.clone());
                async move {
                    if stop.load(Ordering::Relaxed) {
                        return None;
                    }
                    let r = c.post(url).bearer_auth(key).body("{}").send().await.ok()?;
                    Some(r.headers()["x-request-id"].to_str().unwrap().to_string())
                }
            }))
            .buffer_unordered(32)
            .filter_map(|id| async move { id })
            .collect::<Vec<String>>(),
        )
    };
    // The gateway is frozen (SIGSTOP) before the spool is looked at, so that what is seen there
    // is what the kill leaves: a replay cannot empty it in between.
    let signal = |sig: &str| {
        let pid = gw.pid().to_string();
        let ok = std::process::Command::new("kill")
            .args([sig, pid.as_str()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing was ever spooled"
        );
        if !common::spooled_ids(&gw.spool_dir()).is_empty() {
            signal("-STOP");
            if !common::spooled_ids(&gw.spool_dir()).is_empty() {
                break;
            }
            signal("-CONT");
        }
        tokio::task::yield_now().await;
    }
    gw.kill9();
    stop.store(true, Ordering::Relaxed);
    let answered = load.await.unwrap();
    let spooled = common::spooled_ids(&gw.spool_dir());
    let in_db_before: Vec<String> = gw
        .db
        .rows()
        .await
        .into_iter()
        .map(|r| r.request_id)
        .collect();
    eprintln!(
        "before restart: {} rows in the database, {} in the spool",
        in_db_before.len(),
        spooled.len()
    );
    assert!(!spooled.is_empty(), "the crash left rows in the spool");
    gw.start().await; // start-up replays the spool
    assert!(gw.terminate().success(), "{}", gw.log());
    let rows = gw.db.rows().await;
    let unique: HashSet<&str> = rows.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(unique.len(), rows.len(), "no duplicates");
    // A segment replayed just before the kill can still be on disk: its rows are in the database
    // already, and replaying them again must change nothing.
    for id in spooled.iter().chain(&in_db_before) {
        assert!(
            unique.contains(id.as_str()),
            "request {id} lost across the crash"
        );
    }
    // Every answered request before the kill that reached the database or the spool is there
    // once; requests cut by the kill may have rows without an answer, never more rows than sent.
    assert!(rows.len() <= 20_000);
    // The load was answered before the kill (what was spooled or written came from it).
    assert!(!answered.is_empty());
    assert!(gw.db.invariants().await.holds());
    assert_eq!(common::spooled_records(&gw.spool_dir()), 0);
}

both_dbs!(streams_ending_early_still_leave_one_row, early_end);
async fn early_end(db: Db) {
    let anthropic_start = Bytes::from_static(
        b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-3-5-sonnet-20241022\",\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
    );
    let gate = common::Gate::new();
    let mock = common::RawSseUpstream::start(
        anthropic_start.clone(),
        Bytes::from_static(b"event: ping\ndata: {\"type\":\"ping\"}\n\n"),
        gate.clone(),
    )
    .await;
    // The upstream pings forever after the client leaves: the drain stops at its time bound.
    let extra = format!("{PRICES}\n[metering]\nabort_drain_secs = 1\n");
    let mut gw = Gateway::new(db, "", &extra).await.unwrap();
    gw.add_user("alice@example.com");
    gw.add_account("a", "anthropic", &mock.url(), "sk", 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;

    // The upstream dies mid-stream: the client sees an incomplete body.
    let resp = client()
        .post(gw.url("/v1/messages"))
        .bearer_auth(&key)
        .body(r#"{"stream":true,"x":"cut"}"#)
        .send()
        .await
        .unwrap();
    let cut_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let mut s = resp.bytes_stream();
    assert_eq!(s.next().await.unwrap().unwrap(), anthropic_start);
    gate.open();
    let rest: Vec<_> = s.collect().await;
    assert!(
        rest.iter().any(|c| c.is_err()),
        "the client must see the stream was cut"
    );

    // The client goes away mid-stream.
    let resp = client()
        .post(gw.url("/v1/messages"))
        .bearer_auth(&key)
        .body(r#"{"stream":true}"#)
        .send()
        .await
        .unwrap();
    let gone_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let mut s = resp.bytes_stream();
    s.next().await.unwrap().unwrap();
    drop(s);
    gate.open();

    assert!(gw.terminate().success(), "{}", gw.log());
    let rows = gw.db.rows().await;
    assert_eq!(rows.len(), 2);
    for (id, error) in [(cut_id, "upstream_aborted"), (gone_id, "client_aborted")] {
        let row = rows.iter().find(|r| r.request_id == id).unwrap();
        assert_eq!(row.status_code, 200, "status as sent");
        assert_eq!(row.error_message.as_deref(), Some(error));
        assert_eq!(
            (row.prompt_tokens, row.completion_tokens),
            (25, 1),
            "usage seen so far"
        );
        assert_eq!(
            row.usage_source.as_deref(),
            Some("partial"),
            "marked as such"
        );
        assert_eq!(row.cost, Decimal::from_str("0.00009").unwrap());
    }
}

/// An OpenAI stream whose usage comes in its last chunk: the first chunk at once; once the gate
/// opens, 32 content chunks of 4 KiB (more than one write, so a client that left is noticed for
/// sure), then the usage chunk and `[DONE]`.
async fn openai_stream_upstream(gate: common::Gate) -> MockUpstream {
    let filler = format!(
        "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
        "x".repeat(4096)
    );
    let mut rest: Vec<Bytes> = (0..32).map(|_| Bytes::from(filler.clone())).collect();
    rest.push(fixture("chat_stream_2.sse"));
    MockUpstream::start(move |_| Reply::Sse {
        first: fixture("chat_stream_1.sse"),
        rest: rest.clone(),
        gate: gate.clone(),
    })
    .await
}

both_dbs!(
    a_client_that_aborts_an_openai_stream_is_billed_what_the_upstream_reports,
    aborted_openai_stream
);
async fn aborted_openai_stream(db: Db) {
    let gate = common::Gate::new();
    let mock = openai_stream_upstream(gate.clone()).await;
    let mut gw = Gateway::new(db, "", PRICES).await.unwrap();
    gw.add_user("alice@example.com");
    gw.add_account("a", "openai", &mock.url(), "sk", 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    // Prepaid: the charge follows what the upstream reported, not what reached the client.
    gw.grant("alice@example.com", "1");
    gw.start().await;
    // A raw connection, so that leaving is certain: closed with unread bytes, it resets, and
    // the gateway's next write fails.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body =
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: tollgate\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("chat.completion.chunk") {
        let n = conn.read(&mut buf).await.unwrap();
        assert!(n > 0, "the stream ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    let id = String::from_utf8_lossy(&seen)
        .to_ascii_lowercase()
        .lines()
        .find_map(|l| {
            l.strip_prefix("x-request-id:")
                .map(|v| v.trim().to_string())
        })
        .unwrap();
    drop(conn); // the client leaves after the first chunk, before the usage chunk
    gate.open(); // the upstream goes on and reports usage at the end
    assert!(gw.terminate().success(), "{}", gw.log());
    let rows = gw.db.rows().await;
    let row = rows.iter().find(|r| r.request_id == id).unwrap();
    assert_eq!(row.error_message.as_deref(), Some("client_aborted"));
    // (9×0.15 + 1×0.60) / 1e6: what the upstream reported in its last chunk.
    assert_eq!(
        (
            row.prompt_tokens,
            row.completion_tokens,
            row.usage_source.as_deref()
        ),
        (9, 1, Some("provider"))
    );
    assert_eq!(row.cost, Decimal::from_str("0.00000195").unwrap());
    assert_eq!(row.requested_model.as_deref(), Some("gpt-4o-mini"));
    let out = gw.cli(&[
        "credits",
        "history",
        "--user",
        "alice@example.com",
        "--json",
    ]);
    let ledger: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let charge = ledger
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["action"] == "charge")
        .unwrap();
    assert_eq!(charge["request_id"].as_str(), Some(id.as_str()));
    assert_eq!(
        Decimal::from_str(charge["amount"].as_str().unwrap()).unwrap(),
        Decimal::from_str("-0.00000195").unwrap()
    );
}

both_dbs!(
    a_stream_cut_before_its_usage_is_billed_an_estimated_prompt,
    cut_before_usage
);
async fn cut_before_usage(db: Db) {
    let gate = common::Gate::new();
    let mock = common::RawSseUpstream::start(
        fixture("chat_stream_1.sse"),
        Bytes::from_static(b"data: {\"choices\":[]}\n\n"),
        gate.clone(),
    )
    .await;
    let mut gw = Gateway::new(db, "", PRICES).await.unwrap();
    gw.add_user("alice@example.com");
    gw.add_account("a", "openai", &mock.url(), "sk", 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .body(r#"{"model":"gpt-4o-mini","stream":true,"x":"cut","messages":[{"role":"user","content":"Tell me a long story about a cat"}]}"#)
        .send()
        .await
        .unwrap();
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let mut s = resp.bytes_stream();
    s.next().await.unwrap().unwrap();
    gate.open(); // the upstream drops the connection mid-stream, before any usage
    let rest: Vec<_> = s.collect().await;
    assert!(rest.iter().any(|c| c.is_err()), "the client sees the cut");
    assert!(gw.terminate().success(), "{}", gw.log());
    let rows = gw.db.rows().await;
    let row = rows.iter().find(|r| r.request_id == id).unwrap();
    assert_eq!(row.error_message.as_deref(), Some("upstream_aborted"));
    assert_eq!(row.usage_source.as_deref(), Some("estimated"));
    assert!(
        row.prompt_tokens > 0 && row.completion_tokens == 0,
        "{row:?}"
    );
    assert!(row.cost > Decimal::ZERO, "never billed 0 in silence");
}

both_dbs!(
    an_upstream_error_keeps_its_status_label_and_the_providers_type,
    upstream_error_recorded
);
async fn upstream_error_recorded(db: Db) {
    let mock = MockUpstream::start(|_| {
        Reply::Json(
            500,
            Bytes::from_static(
                br#"{"error":{"message":"boom","type":"server_error","code":"internal"}}"#,
            ),
        )
    })
    .await;
    let mut gw = Gateway::new(db, "", PRICES).await.unwrap();
    gw.add_user("alice@example.com");
    gw.add_account("a", "openai", &mock.url(), "sk", 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .body(r#"{"model":"gpt-4o-mini"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 500, "passed through: no other account");
    assert!(gw.terminate().success(), "{}", gw.log());
    let rows = gw.db.rows().await;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.error_message.as_deref(), Some("upstream_status"));
    assert_eq!(row.upstream_error.as_deref(), Some("server_error/internal"));
    assert_eq!((row.tokens_used, row.cost), (0, Decimal::ZERO));
    assert_eq!(row.usage_source.as_deref(), Some("none"));
}
