//! `[spend] cut_streams` end to end: a prepaid user with a small balance streams a long answer
//! to a request without `max_tokens`. With the option on, the stream is cut once its output
//! passes what the reservation and the local lease can cover: the client sees an incomplete
//! stream, the charge stays within the balance (no `uncollected`), and `usage --check` passes.
//! With it off, the same stream completes and is charged what the upstream reported, the part
//! over the balance recorded as `uncollected`. With a balance that covers it, a stream whose
//! instance runs short of leased credit mid-stream leases more instead of being cut.

mod common;

use bytes::Bytes;
use chrono::Utc;
use common::{client, dec, post, rows, Db, Gate, Gateway, MockUpstream, Reply};
use rust_decimal::Decimal;
use tollgate::store::Store;

/// $0.001 a token, in and out.
const PRICES: &str = "[prices.\"gpt-4o-mini\"]\ninput = \"1000\"\noutput = \"1000\"\n";
/// A stream without `max_tokens`: its output is reserved at `default_max_output_tokens` (20).
const BODY: &str = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#;
/// Chunks of generated text the upstream streams, 6 bytes each: far past what $0.30 covers.
const CHUNKS: usize = 200;
const TEXT: &str = "hello ";

fn event(choices: &str, usage: &str) -> Bytes {
    Bytes::from(format!(
        "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{choices}]{usage}}}\n\n"
    ))
}

/// An OpenAI chat stream of `CHUNKS` text chunks, then its end and its usage (10 + 400 tokens:
/// $0.41, more than the balance).
async fn long_stream() -> MockUpstream {
    let gate = Gate::new();
    gate.open();
    MockUpstream::start(move |_| {
        let mut rest: Vec<Bytes> = (0..CHUNKS)
            .map(|_| {
                event(
                    &format!("{{\"index\":0,\"delta\":{{\"content\":\"{TEXT}\"}}}}"),
                    "",
                )
            })
            .collect();
        rest.push(event(
            "{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}",
            "",
        ));
        rest.push(event(
            "",
            ",\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":400,\"total_tokens\":410}",
        ));
        rest.push(Bytes::from_static(b"data: [DONE]\n\n"));
        Reply::Sse {
            first: event(
                "{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}",
                "",
            ),
            rest,
            gate: gate.clone(),
        }
    })
    .await
}

/// What the client read, and whether the response ended properly (a terminating chunk).
async fn read_all(mut r: reqwest::Response) -> (String, bool) {
    let mut body = Vec::new();
    loop {
        match r.chunk().await {
            Ok(Some(b)) => body.extend_from_slice(&b),
            Ok(None) => return (String::from_utf8_lossy(&body).into_owned(), true),
            Err(_) => return (String::from_utf8_lossy(&body).into_owned(), false),
        }
    }
}

/// The one charge of the ledger: (amount charged, its metadata), and the balance after it.
async fn charge(gw: &Gateway) -> (Decimal, serde_json::Value, Decimal) {
    let store = Store::connect(&gw.db.url, 1).await.unwrap();
    let user = store.user_id_by_email("alice@example.com").await.unwrap();
    let history = store.credit_history(user, 100).await.unwrap();
    let balance = store.credit_balance(user, Utc::now()).await.unwrap();
    store.close().await;
    let charges: Vec<_> = history.iter().filter(|t| t.action == "charge").collect();
    assert_eq!(charges.len(), 1, "{history:?}");
    assert!(balance.balance >= Decimal::ZERO, "{balance:?}");
    for t in &history {
        assert!(t.balance_after >= Decimal::ZERO, "{t:?}");
    }
    (
        -charges[0].amount,
        charges[0].metadata.clone(),
        balance.balance,
    )
}

async fn run(db: Db, cut_streams: bool) {
    let mock = long_stream().await;
    let spend =
        format!("{PRICES}\n[spend]\ndefault_max_output_tokens = 20\ncut_streams = {cut_streams}\n");
    let mut gw = Gateway::new(db, "", &spend).await.unwrap();
    gw.add_user("alice@example.com");
    gw.add_account("main", "openai", &mock.url(), "sk-up", 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.grant("alice@example.com", "0.30");
    gw.start().await;

    let r = post(&gw, &client(), &key, BODY).await;
    assert_eq!(r.status(), 200);
    let (body, complete) = read_all(r).await;
    let row = rows(&gw, 1).await.remove(0);
    let (charged, meta, balance) = charge(&gw).await;
    let (_, metrics) = gw.scrape("/metrics").await;
    let cut = Gateway::sample(&metrics, "tollgate_spend_streams_cut_total");
    assert_eq!(mock.count(), 1);

    if cut_streams {
        // Cut: no terminating chunk, no end of the stream.
        assert!(!complete, "the stream ended cleanly: {body}");
        assert!(!body.contains("[DONE]"), "{body}");
        assert_eq!(row.error_message.as_deref(), Some("spend_cut"));
        assert_eq!(row.usage_source.as_deref(), Some("estimated"));
        // Charged the output it relayed: at least the text of every whole event the client
        // read (its bound in bytes), never past the balance.
        let read = body.split("\n\n").filter(|e| e.contains(TEXT)).count() as i64;
        assert!(
            row.completion_tokens >= read * TEXT.len() as i64,
            "{} tokens charged, {read} events read",
            row.completion_tokens
        );
        assert!(read < CHUNKS as i64, "cut before its end");
        assert_eq!(charged, row.cost);
        assert!(
            charged > Decimal::ZERO && charged <= dec("0.30"),
            "{charged}"
        );
        assert!(meta.get("uncollected").is_none(), "{meta}");
        assert_eq!(balance, dec("0.30") - charged);
        assert_eq!(cut, 1.0);
    } else {
        // Off: the whole stream, charged what the upstream reported; the balance is taken to
        // 0 and the rest recorded as uncollected.
        assert!(complete, "{body}");
        assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
        assert_eq!(body.matches(TEXT).count(), CHUNKS);
        assert_eq!(row.error_message, None);
        assert_eq!(row.usage_source.as_deref(), Some("provider"));
        assert_eq!((row.prompt_tokens, row.completion_tokens), (10, 400));
        assert_eq!(row.cost, dec("0.41"));
        assert_eq!(charged, dec("0.30"));
        let uncollected = meta["uncollected"].as_str().map(dec);
        assert_eq!(uncollected, Some(dec("0.11")), "{meta}");
        assert_eq!(balance, Decimal::ZERO);
        assert_eq!(cut, 0.0);
    }
    gw.assert_invariants();
}

async fn cut_on(db: Db) {
    run(db, true).await
}

async fn cut_off(db: Db) {
    run(db, false).await
}

both_dbs!(a_stream_past_its_reservation_is_cut, cut_on);
both_dbs!(without_cut_streams_the_stream_completes, cut_off);
both_dbs!(
    a_stream_leases_more_when_the_instance_runs_short,
    leases_more
);

/// `cut_streams` on, a balance far above what the stream costs, and leases of one reservation
/// each: the instance's share runs out again and again mid-stream, and each time the extension
/// comes from a new lease instead of cutting the stream.
async fn leases_more(db: Db) {
    let mock = long_stream().await;
    let spend = format!(
        "{PRICES}\n[spend]\ndefault_max_output_tokens = 20\ncut_streams = true\nreservations_per_lease = 1\n"
    );
    let mut gw = Gateway::new(db, "", &spend).await.unwrap();
    gw.add_user("alice@example.com");
    gw.add_account("main", "openai", &mock.url(), "sk-up", 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.grant("alice@example.com", "10");
    gw.start().await;

    let r = post(&gw, &client(), &key, BODY).await;
    assert_eq!(r.status(), 200);
    let (body, complete) = read_all(r).await;
    assert!(complete, "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    assert_eq!(body.matches(TEXT).count(), CHUNKS);
    let row = rows(&gw, 1).await.remove(0);
    assert_eq!(row.error_message, None);
    assert_eq!(row.cost, dec("0.41"));
    let (charged, meta, balance) = charge(&gw).await;
    assert_eq!(charged, dec("0.41"));
    assert!(meta.get("uncollected").is_none(), "{meta}");
    assert_eq!(balance, dec("9.59"));
    let (_, metrics) = gw.scrape("/metrics").await;
    assert_eq!(
        Gateway::sample(&metrics, "tollgate_spend_streams_cut_total"),
        0.0
    );
    // The reservation (150 tokens' worth) covered 20 output tokens; the stream's 1,200 needed
    // dozens of extensions of 20, each lease holding one of them.
    let leases = Gateway::sample(&metrics, "tollgate_spend_leases_total{outcome=\"granted\"}");
    assert!(leases >= 5.0, "leases granted: {leases}");
    gw.assert_invariants();
}
