//! Metering benchmarks: rows/s into PostgreSQL and SQLite through `Store::insert_usage`, SSE
//! usage parsing and stripping throughput, and the cost of enqueueing a record.
//!
//! `cargo bench --bench writer`. PostgreSQL runs only when `TEST_DATABASE_URL` is set (e.g.
//! `postgres://postgres@127.0.0.1:5432/test`); a fresh database is created for the run and dropped
//! at the end. See benches/README.md for the numbers and how they were taken.

use std::hint::black_box;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use rust_decimal::Decimal;

use tollgate::record::UsageRecord;
use tollgate::settings::Settings;
use tollgate::spool::Spool;
use tollgate::sse::{SseUsage, UsageChunkStripper};
use tollgate::store::{NewAccount, Store};
use tollgate::upstream::AccountType;
use tollgate::usage::{Dialect, Usage};
use tollgate::writer::{self, BatchSink, WriterOptions};

#[path = "common/mod.rs"]
mod common;

// The gateway binary runs on mimalloc; allocation-heavy benches should see the same allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH_SIZES: [usize; 3] = [100, 1000, 5000];

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

// ---------------------------------------------------------------------------------------------
// Store::insert_usage

/// Ids the usage rows point at (foreign keys).
struct Fixture {
    user_id: i64,
    key_ids: Vec<i64>,
    account_ids: Vec<i64>,
}

/// One user, 10 keys and 3 upstream accounts, so a batch updates several key and account counters.
/// Fixtures, not admin actions: committed without audit rows.
async fn seed(store: &Store) -> Fixture {
    let mut tx = store.begin().await.expect("transaction");
    let user_id = tx
        .create_user("bench@example.com", "bench", "user")
        .await
        .expect("user");
    let mut key_ids = Vec::new();
    for i in 0..10 {
        let key = tollgate::keys::generate().expect("key");
        let id = tx
            .create_key(
                user_id,
                &format!("bench-{i}"),
                &tollgate::keys::hash_hex(&key),
                tollgate::keys::display_prefix(&key),
                &serde_json::json!([]),
                None,
                &Default::default(),
            )
            .await
            .expect("key");
        key_ids.push(id);
    }
    let mut account_ids = Vec::new();
    for i in 0..3 {
        let id = tx
            .create_account(&NewAccount {
                name: &format!("bench-account-{i}"),
                kind: AccountType::Openai,
                email: None,
                base_url: "https://api.openai.com/v1",
                credentials: serde_json::json!({"api_key": "sk-bench"}),
                priority: 0,
                weight: 1,
                is_active: true,
                limits: Default::default(),
            })
            .await
            .expect("account");
        account_ids.push(id);
    }
    tx.commit_unaudited().await.expect("commit");
    Fixture {
        user_id,
        key_ids,
        account_ids,
    }
}

/// `n` records with fresh UUIDv7 request ids (so `ON CONFLICT DO NOTHING` never skips one);
/// one in 50 is an upstream error.
fn batch(f: &Fixture, n: usize) -> Vec<UsageRecord> {
    let now = chrono::Utc::now();
    let cost = Decimal::from_str("0.00011835").expect("decimal");
    (0..n)
        .map(|i| {
            let failed = i % 50 == 49;
            UsageRecord {
                request_id: uuid::Uuid::now_v7().to_string(),
                user_id: f.user_id,
                api_key_id: f.key_ids[i % f.key_ids.len()],
                upstream_account_id: Some(f.account_ids[i % f.account_ids.len()]),
                method: "POST".into(),
                endpoint: "/v1/chat/completions".into(),
                model: Some("gpt-4o-mini-2024-07-18".into()),
                status_code: if failed { 502 } else { 200 },
                response_time: 842,
                prompt_tokens: 1117,
                completion_tokens: 46,
                cached_tokens: 1024,
                cache_creation_tokens: 0,
                tokens_used: 1163,
                cost,
                error_message: failed.then(|| "upstream_aborted".to_string()),
                created_at: now,
                requested_model: None,
                usage_source: None,
                upstream_error: None,
                charges: Vec::new(),
            }
        })
        .collect()
}

fn bench_insert(c: &mut Criterion, group: &str, rt: &tokio::runtime::Runtime, store: &Store) {
    let fixture = rt.block_on(seed(store));
    let mut g = c.benchmark_group(group);
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        // Iterations take milliseconds: the same count in every sample keeps the run short.
        .sampling_mode(SamplingMode::Flat);
    for n in BATCH_SIZES {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut timed = Duration::ZERO;
                    for _ in 0..iters {
                        // Generating the batch is not timed.
                        let rows = batch(&fixture, n);
                        let started = Instant::now();
                        let inserted = store.insert_usage(&rows).await.expect("insert_usage");
                        timed += started.elapsed();
                        assert_eq!(inserted, n as u64, "every request id is fresh");
                    }
                    timed
                })
            })
        });
    }
    g.finish();
    let report = rt
        .block_on(store.usage_invariants())
        .expect("usage_invariants");
    println!(
        "{group}: {} rows in usage_records after the run; invariants hold: {}",
        report.rows,
        report.holds()
    );
    assert!(report.holds(), "{report:?}");
}

fn insert_sqlite(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let store = rt.block_on(Store::connect(&url, 2)).expect("sqlite store");
    bench_insert(c, "insert_usage_sqlite", &rt, &store);
    rt.block_on(store.close());
}

/// A database created for this run; dropped (even after a panic) when this goes out of scope.
struct PgBenchDb {
    admin_url: String,
    name: String,
    url: String,
}

impl PgBenchDb {
    async fn create(admin_url: &str) -> PgBenchDb {
        use sqlx::Connection;
        let name = format!("tollgate_bench_{}", uuid::Uuid::now_v7().simple());
        let mut conn = sqlx::PgConnection::connect(admin_url)
            .await
            .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at TEST_DATABASE_URL: {e}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("CREATE DATABASE");
        conn.close().await.ok();
        PgBenchDb {
            admin_url: admin_url.to_string(),
            url: with_database(admin_url, &name),
            name,
        }
    }
}

impl Drop for PgBenchDb {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let dropped = rt.block_on(async move {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&admin_url).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut conn)
            .await?;
            conn.close().await
        });
        if let Err(e) = dropped {
            eprintln!("could not drop the bench database {}: {e}", self.name);
        }
    }
}

/// `base` with its database name replaced by `name` (query string kept).
fn with_database(base: &str, name: &str) -> String {
    let (url, query) = match base.split_once('?') {
        Some((u, q)) => (u, Some(q)),
        None => (base, None),
    };
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let authority_end = url[scheme_end..]
        .find('/')
        .map_or(url.len(), |i| scheme_end + i);
    let mut out = format!("{}/{name}", &url[..authority_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

fn insert_postgres(c: &mut Criterion) {
    let Some(admin_url) = std::env::var("TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        println!(
            "insert_usage_postgres: skipped (TEST_DATABASE_URL is not set; e.g. \
             TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test)"
        );
        return;
    };
    let rt = runtime();
    let db = rt.block_on(PgBenchDb::create(&admin_url));
    let store = rt.block_on(Store::connect(&db.url, 2)).expect("pg store");
    bench_insert(c, "insert_usage_postgres", &rt, &store);
    rt.block_on(store.close());
    drop(db);
}

// ---------------------------------------------------------------------------------------------
// Store::insert_usage with spend control: the settlement in the usage write's transaction

/// Distinct prepaid users in a 1,000-row batch: the settlement's statements are per pool (a
/// budget period, a balance and its grants), so its cost grows with the users a batch touches.
const SPEND_USERS: [usize; 3] = [1, 10, 100];

/// `users` prepaid users (`common::prepaid_user`), each with a daily cost budget and one key;
/// the benched batches go round them.
async fn seed_spend(store: &Store, users: usize) -> (Fixture, Vec<(i64, i64)>) {
    use tollgate::record::{Metric, Period};
    use tollgate::store::{Actor, BudgetOwner};
    let fixture = seed(store).await;
    let actor = Actor::system("bench");
    let now = chrono::Utc::now();
    let mut owners = Vec::new();
    for u in 0..users {
        let (user, key) = common::prepaid_user(store, &format!("spend-{u}")).await;
        store
            .set_budget(
                &actor,
                BudgetOwner::User(user),
                Metric::Cost,
                Period::Day,
                Decimal::from(1_000_000_000),
                now,
            )
            .await
            .expect("budget");
        owners.push((user, key));
    }
    (fixture, owners)
}

fn settle_postgres(c: &mut Criterion) {
    let Some(admin_url) = std::env::var("TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        println!("settle_postgres: skipped (TEST_DATABASE_URL is not set)");
        return;
    };
    let rt = runtime();
    let mut g = c.benchmark_group("settle_postgres");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Elements(1000));
    for users in SPEND_USERS {
        let db = rt.block_on(PgBenchDb::create(&admin_url));
        let store = rt.block_on(Store::connect(&db.url, 2)).expect("pg store");
        let (fixture, owners) = rt.block_on(seed_spend(&store, users));
        g.bench_with_input(BenchmarkId::new("users", users), &users, |b, _| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut timed = Duration::ZERO;
                    for _ in 0..iters {
                        let mut rows = batch(&fixture, 1000);
                        for (i, r) in rows.iter_mut().enumerate() {
                            (r.user_id, r.api_key_id) = owners[i % owners.len()];
                        }
                        let started = Instant::now();
                        let inserted = store.insert_usage(&rows).await.expect("insert_usage");
                        timed += started.elapsed();
                        assert_eq!(inserted, 1000, "every request id is fresh");
                    }
                    timed
                })
            })
        });
        let report = rt.block_on(store.spend_invariants()).expect("invariants");
        assert!(report.holds(), "{report:?}");
        rt.block_on(store.close());
        drop(db);
    }
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// SSE parsing

const TARGET_STREAM_BYTES: usize = 1 << 20;

/// A ~1 MB OpenAI chat stream: content deltas, the usage-only chunk, `[DONE]`.
fn openai_stream() -> (Vec<u8>, usize) {
    let delta = "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hello \"}}],\"usage\":null}\n\n";
    let mut s = String::with_capacity(TARGET_STREAM_BYTES + 1024);
    let mut n = 0;
    while s.len() < TARGET_STREAM_BYTES {
        s.push_str(delta);
        n += 1;
    }
    let usage_chunk = format!(
        "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{{\"prompt_tokens\":2006,\"completion_tokens\":{n},\"total_tokens\":{},\"prompt_tokens_details\":{{\"cached_tokens\":1920,\"audio_tokens\":0}},\"completion_tokens_details\":{{\"reasoning_tokens\":0,\"audio_tokens\":0,\"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}}}}}}\n\n",
        2006 + n
    );
    s.push_str(&usage_chunk);
    s.push_str("data: [DONE]\n\n");
    (s.into_bytes(), n)
}

/// A ~1 MB Anthropic messages stream.
fn anthropic_stream() -> (Vec<u8>, usize) {
    let mut s = String::with_capacity(TARGET_STREAM_BYTES + 1024);
    s.push_str("event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5-20250929\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":100,\"output_tokens\":1}}}\n\n");
    s.push_str("event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n");
    let delta = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hello \"}}\n\n";
    let mut n = 0;
    while s.len() < TARGET_STREAM_BYTES {
        s.push_str(delta);
        n += 1;
        if n % 200 == 0 {
            s.push_str("event: ping\ndata: {\"type\": \"ping\"}\n\n");
        }
    }
    s.push_str(
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    );
    s.push_str(&format!("event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\",\"stop_sequence\":null}},\"usage\":{{\"output_tokens\":{n}}}}}\n\n"));
    s.push_str("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
    (s.into_bytes(), n)
}

fn parse_all(stream: &[u8], dialect: Dialect, chunk: usize) -> SseUsage {
    let mut p = SseUsage::new(dialect);
    for c in stream.chunks(chunk) {
        p.feed(c);
    }
    p.finish();
    p
}

/// What the proxy does per upstream chunk: a fresh output buffer, then forward it.
fn strip_all(stream: &[u8], chunk: usize) -> usize {
    let mut s = UsageChunkStripper::new();
    let mut forwarded = 0;
    for c in stream.chunks(chunk) {
        let mut buf = Vec::with_capacity(c.len());
        s.feed(c, &mut buf);
        forwarded += black_box(buf).len();
    }
    let mut buf = Vec::new();
    s.finish(&mut buf);
    forwarded + buf.len()
}

fn sse(c: &mut Criterion) {
    let (openai, openai_n) = openai_stream();
    let (anthropic, anthropic_n) = anthropic_stream();
    let usage_chunk_len = openai.len()
        - memchr::memmem::rfind(&openai, b"data: {").expect("usage chunk")
        - "data: [DONE]\n\n".len();
    println!(
        "sse: OpenAI stream {} bytes ({openai_n} deltas), Anthropic stream {} bytes ({anthropic_n} deltas)",
        openai.len(),
        anthropic.len()
    );

    let mut g = c.benchmark_group("sse");
    // One iteration parses a whole ~1 MB stream (~0.5-1 ms): 50 samples fit in 3 s.
    g.sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for chunk in [1024, 16 * 1024] {
        let label = format!("{}KiB", chunk / 1024);

        let p = parse_all(&openai, Dialect::OpenAi, chunk);
        assert_eq!(
            p.usage(),
            Some(Usage {
                input_tokens: 86,
                cached_input_tokens: 1920,
                cache_creation_tokens: 0,
                output_tokens: openai_n as u64,
            })
        );
        assert!(p.saw_done());
        assert_eq!(p.model(), Some("gpt-4o-mini"));
        g.throughput(Throughput::Bytes(openai.len() as u64));
        g.bench_with_input(
            BenchmarkId::new("usage_openai_1MB", &label),
            &chunk,
            |b, &chunk| b.iter(|| parse_all(black_box(&openai), Dialect::OpenAi, chunk)),
        );

        let p = parse_all(&anthropic, Dialect::Anthropic, chunk);
        assert_eq!(
            p.usage(),
            Some(Usage {
                input_tokens: 25,
                cached_input_tokens: 100,
                cache_creation_tokens: 0,
                output_tokens: anthropic_n as u64,
            })
        );
        assert!(p.saw_done());
        g.throughput(Throughput::Bytes(anthropic.len() as u64));
        g.bench_with_input(
            BenchmarkId::new("usage_anthropic_1MB", &label),
            &chunk,
            |b, &chunk| b.iter(|| parse_all(black_box(&anthropic), Dialect::Anthropic, chunk)),
        );

        assert_eq!(
            strip_all(&openai, chunk),
            openai.len() - usage_chunk_len,
            "exactly the usage-only chunk is removed"
        );
        g.throughput(Throughput::Bytes(openai.len() as u64));
        g.bench_with_input(
            BenchmarkId::new("strip_openai_1MB", &label),
            &chunk,
            |b, &chunk| b.iter(|| strip_all(black_box(&openai), chunk)),
        );
    }
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// Enqueueing a usage record

struct NoopSink;

#[async_trait::async_trait]
impl BatchSink for NoopSink {
    async fn write(&self, batch: &[UsageRecord]) -> Result<u64, String> {
        Ok(batch.len() as u64)
    }
}

fn enqueue(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = Spool::open(dir.path().join("spool"), 64 << 20).expect("spool");
    // `WriterOptions` has no Default; start from the configured defaults.
    let mut opts = WriterOptions::new(&Settings::default().writer);
    opts.flush_interval = Duration::from_millis(50);
    opts.queue_capacity = std::num::NonZeroUsize::new(1 << 20).expect("non-zero");
    // Never spool: this measures the queue, not the disk.
    opts.high_water = 1 << 20;
    let (sink, handle) = {
        let _guard = rt.enter();
        writer::start(Arc::new(NoopSink), spool, opts)
    };
    let fixture = Fixture {
        user_id: 1,
        key_ids: vec![1],
        account_ids: vec![1],
    };
    let record = batch(&fixture, 1).remove(0);

    // Not "usage_enqueue": hot_path.rs has the same benchmark under that name, and criterion
    // would compare the two runs as if one were the other's baseline.
    let mut g = c.benchmark_group("writer_enqueue");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    // The clone (four heap strings) is made in setup and not timed.
    g.bench_function("submit", |b| {
        b.iter_batched(|| record.clone(), |r| sink.submit(r), BatchSize::SmallInput)
    });
    g.finish();

    rt.block_on(handle.shutdown());
    let lost = sink.stats().rows_lost.load(Ordering::Relaxed);
    let written = sink.stats().rows_written.load(Ordering::Relaxed);
    println!("writer_enqueue: {written} records drained by the writer, {lost} lost (queue full)");
    assert_eq!(
        lost, 0,
        "the queue overflowed: the numbers include the loss path"
    );
}

criterion_group!(
    benches,
    insert_postgres,
    settle_postgres,
    insert_sqlite,
    sse,
    enqueue
);
criterion_main!(benches);
