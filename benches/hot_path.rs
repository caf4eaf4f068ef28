//! Request-path micro-benchmarks (the performance issue's list). Run with
//! `cargo bench --bench hot_path`; see benches/README.md for the numbers and how they were taken.
//!
//! Goals from the issue: key check on a cache hit ≤ 300 ns, upstream selection ≤ 100 ns,
//! enqueueing a usage record ≤ 100 ns.

use std::hint::black_box;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use futures_util::FutureExt;
use rust_decimal::Decimal;

use tollgate::account_limits::AccountLimits;
use tollgate::auth::{self, KeyCache};
use tollgate::cost::{self, Price, PriceTable};
use tollgate::keys::{self, KeyFormatError};
use tollgate::metrics::CostCounters;
use tollgate::pricing::Pricing;
use tollgate::record::UsageRecord;
use tollgate::settings::Settings;
use tollgate::spool::Spool;
use tollgate::store::Store;
use tollgate::upstream::{Account, AccountSet, AccountSpec, AccountType, PeerTimeouts};
use tollgate::usage::{self, Dialect, Usage};
use tollgate::writer::{self, BatchSink, WriterOptions};

#[path = "common/mod.rs"]
mod common;

// The gateway binary runs on mimalloc; allocation-heavy benches should see the same allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

// ---------------------------------------------------------------------------------------------
// Key check

fn key_check(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let key = keys::generate().expect("key");
    let hash = keys::hash(&key);
    let store = rt.block_on(async {
        let store = Store::connect(&url, 2).await.expect("sqlite store");
        // A fixture, not an admin action: committed without an audit row.
        let mut tx = store.begin().await.expect("transaction");
        let user = tx
            .create_user("bench@example.com", "bench", "user")
            .await
            .expect("user");
        tx.create_key(
            user,
            "bench",
            &keys::hash_hex(&key),
            keys::display_prefix(&key),
            &serde_json::json!([]),
            None,
            &Default::default(),
        )
        .await
        .expect("key");
        tx.commit_unaudited().await.expect("commit");
        store
    });
    let cache = std::sync::Arc::new(KeyCache::new(
        store.clone(),
        rt.handle().clone(),
        10_000,
        Duration::from_secs(3600),
        Duration::from_secs(86_400),
        Duration::from_secs(60),
    ));
    // Warm the cache: the one database lookup happens here.
    let info = rt
        .block_on(cache.lookup(hash))
        .expect("lookup")
        .expect("the key is in the store");
    assert!(info.check_usable(chrono::Utc::now()).is_ok());

    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {key}").parse().expect("header value"),
    );
    // A hit never awaits: one poll completes it, so no runtime is needed to drive it.
    assert!(matches!(
        cache.authenticate(&headers).now_or_never(),
        Some(Ok(_))
    ));

    // A one-character typo in the random part: caught by the checksum.
    let mut typo = key.clone().into_bytes();
    typo[10] = if typo[10] == b'a' { b'b' } else { b'a' };
    let typo = String::from_utf8(typo).expect("ascii");
    assert_eq!(keys::validate(&typo), Err(KeyFormatError::Checksum));

    let mut g = c.benchmark_group("key_check");
    g.bench_function("validate", |b| b.iter(|| keys::validate(black_box(&key))));
    g.bench_function("hash_sha256", |b| b.iter(|| keys::hash(black_box(&key))));
    g.bench_function("validate_and_hash", |b| {
        b.iter(|| {
            let k = black_box(key.as_str());
            keys::validate(k).expect("valid");
            keys::hash(k)
        })
    });
    g.bench_function("credential_from_headers", |b| {
        b.iter(|| auth::credential(black_box(&headers)).expect("bearer"))
    });
    g.bench_function("check_usable_now", |b| {
        b.iter(|| black_box(&info).check_usable(chrono::Utc::now()))
    });
    g.bench_function("cache_lookup_hit", |b| {
        b.iter(|| {
            cache
                .lookup(black_box(hash))
                .now_or_never()
                .expect("a hit completes on the first poll")
        })
    });
    // The whole check: credential from headers, validate, hash, cache hit, usability (Utc::now).
    g.bench_function("authenticate_hit", |b| {
        b.iter(|| {
            cache
                .authenticate(black_box(&headers))
                .now_or_never()
                .expect("a hit completes on the first poll")
        })
    });
    // The same driven by Runtime::block_on from a non-runtime thread (adds the runtime's own
    // enter/park cost, which the proxy does not pay: it awaits inside a task).
    g.bench_function("authenticate_hit_block_on", |b| {
        b.iter(|| rt.block_on(cache.authenticate(black_box(&headers))))
    });
    g.bench_function("reject_bad_checksum", |b| {
        b.iter(|| keys::validate(black_box(&typo)))
    });
    let typo_headers = headers_for(&typo);
    g.bench_function("authenticate_bad_checksum", |b| {
        b.iter(|| {
            cache
                .authenticate(black_box(&typo_headers))
                .now_or_never()
                .expect("refused before any await")
        })
    });
    // The same under the failed-authentications limit of the client address
    // (`address_limits.rs`): on a cache hit the limit is never consulted, so this should cost
    // what `authenticate_hit` costs.
    let address_limits = tollgate::address_limits::AddressLimiter::new(30, 100_000);
    let peer = Some(std::net::IpAddr::from([198, 51, 100, 7]));
    g.bench_function("authenticate_hit_address_limited", |b| {
        b.iter(|| {
            address_limits
                .authenticate(&cache, black_box(&headers), black_box(peer))
                .now_or_never()
                .expect("a hit completes on the first poll")
        })
    });
    // An address that spent its failures sending a key that is not cached: refused at the gate
    // (one table lookup and one GCRA check), before the negative cache or the database.
    let spent = tollgate::address_limits::AddressLimiter::new(1, 100_000);
    let unknown = headers_for(&keys::generate().expect("key"));
    assert!(rt
        .block_on(spent.authenticate(&cache, &unknown, peer))
        .is_err());
    g.bench_function("authenticate_address_refused", |b| {
        b.iter(|| {
            let r = spent
                .authenticate(&cache, black_box(&unknown), black_box(peer))
                .now_or_never()
                .expect("refused before any await");
            assert!(matches!(
                r,
                Err(tollgate::error::GatewayError::RateLimited(_))
            ));
        })
    });
    g.finish();

    drop(cache);
    rt.block_on(store.close());
}

fn headers_for(key: &str) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert("x-api-key", key.parse().expect("header value"));
    h
}

// ---------------------------------------------------------------------------------------------
// Upstream selection

fn account(id: i64, priority: i32, weight: u32) -> Account {
    limited_account(id, priority, weight, AccountLimits::default())
}

fn limited_account(id: i64, priority: i32, weight: u32, limits: AccountLimits) -> Account {
    let spec = AccountSpec {
        id,
        name: format!("acct-{id}"),
        kind: AccountType::Openai,
        priority,
        weight,
        base_url: "https://api.openai.com/v1".into(),
        api_key: format!("sk-bench-{id}"),
        header: None,
        limits,
    };
    let timeouts = PeerTimeouts {
        connect: Duration::from_secs(5),
        read: Duration::from_secs(300),
    };
    let addr: SocketAddr = "203.0.113.10:443".parse().expect("addr");
    Account::build(&spec, addr, timeouts, Arc::default()).expect("account")
}

/// 3 priority tiers × 10 accounts, weights 1..=10 within each tier.
fn account_set() -> AccountSet {
    let mut accounts = Vec::new();
    for tier in 0..3 {
        for i in 0..10 {
            let id = i64::from(tier * 10 + i + 1);
            accounts.push(account(id, tier, (i + 1) as u32));
        }
    }
    AccountSet::new(
        accounts,
        Duration::from_secs(30),
        Duration::from_secs(24 * 3600),
        Instant::now(),
    )
}

fn upstream_selection(c: &mut Criterion) {
    let set = account_set();
    assert_eq!(set.len(), 30);

    // Tiers 0 and 1 all in cooldown: every pick walks to the last tier.
    let fallback = account_set();
    for a in fallback.accounts().filter(|a| a.priority < 2) {
        fallback.cool_down(a, Some(Duration::from_secs(24 * 3600)));
    }
    assert_eq!(
        fallback
            .pick(AccountType::Openai, &[])
            .expect("tier 2")
            .priority,
        2
    );
    let tried: Vec<i64> = (1..=3).collect();

    let mut g = c.benchmark_group("upstream_pick_3x10");
    g.bench_function("first_tier", |b| {
        b.iter(|| set.pick(black_box(AccountType::Openai), black_box(&[])))
    });
    g.bench_function("first_tier_3_tried", |b| {
        b.iter(|| set.pick(black_box(AccountType::Openai), black_box(&tried)))
    });
    g.bench_function("fallback_to_third_tier", |b| {
        b.iter(|| fallback.pick(black_box(AccountType::Openai), black_box(&[])))
    });
    g.finish();

    // Selection with account limits (`account_limits.rs`): every account declares rpm, tpm and
    // concurrency (limits far above the bench's rate), the unit taken and the hold dropped each
    // time; then the first two tiers at their concurrency limit of 1 (held), so every pick is
    // refused by 20 accounts before the third tier serves.
    let big = AccountLimits {
        rpm: 1_000_000_000,
        tpm: 1_000_000_000,
        max_concurrent: 1_000_000,
    };
    let limited = |max_concurrent: u64| {
        let mut accounts = Vec::new();
        for tier in 0..3 {
            for i in 0..10 {
                let id = i64::from(tier * 10 + i + 1);
                let l = AccountLimits {
                    max_concurrent: if tier < 2 {
                        max_concurrent
                    } else {
                        big.max_concurrent
                    },
                    ..big
                };
                accounts.push(limited_account(id, tier, (i + 1) as u32, l));
            }
        }
        AccountSet::new(
            accounts,
            Duration::from_secs(30),
            Duration::from_secs(24 * 3600),
            Instant::now(),
        )
    };
    // One request's selection as the proxy does it: take (estimate 100 tokens), settle on 0
    // used, drop the hold.
    fn pick_and_settle(set: &AccountSet) -> bool {
        let now = set.now_ns();
        match set.take(black_box(AccountType::Openai), black_box(&[]), now, 100) {
            Ok((_, hold)) => {
                if let Some(mut h) = hold {
                    h.settle(now, 0);
                }
                true
            }
            Err(_) => false,
        }
    }
    let open = limited(big.max_concurrent);
    let full = limited(1);
    let held: Vec<_> = (0..20)
        .map(|_| {
            full.take(AccountType::Openai, &[], full.now_ns(), 100)
                .expect("a free account")
                .1
        })
        .collect();
    assert!(held.iter().all(Option::is_some));
    let (a, _) = full
        .take(AccountType::Openai, &[], full.now_ns(), 100)
        .expect("the third tier");
    assert_eq!(a.priority, 2);
    let mut g = c.benchmark_group("upstream_pick_limits_3x10");
    g.bench_function("unlimited_first_tier", |b| b.iter(|| pick_and_settle(&set)));
    g.bench_function("limited_first_tier", |b| b.iter(|| pick_and_settle(&open)));
    g.bench_function("limited_fallback_past_20_full", |b| {
        b.iter(|| pick_and_settle(&full))
    });
    g.finish();
    drop(held);
}

// ---------------------------------------------------------------------------------------------
// JSON usage extraction

/// An OpenAI chat completion whose assistant content is about `content_len` bytes.
fn chat_completion(content_len: usize) -> String {
    let sentence = "The quick brown fox jumps over the lazy dog. \\\"Quoted\\\" text,\\nnew line. ";
    let mut content = String::with_capacity(content_len + sentence.len());
    while content.len() < content_len {
        content.push_str(sentence);
    }
    format!(
        r#"{{"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion","created":1741570283,"model":"gpt-4o-2024-08-06","choices":[{{"index":0,"message":{{"role":"assistant","content":"{content}","refusal":null,"annotations":[]}},"logprobs":null,"finish_reason":"stop"}}],"usage":{{"prompt_tokens":1117,"completion_tokens":46,"total_tokens":1163,"prompt_tokens_details":{{"cached_tokens":1024,"audio_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}},"service_tier":"default","system_fingerprint":"fp_fc9f1d7035"}}"#
    )
}

fn json_usage(c: &mut Criterion) {
    let mut g = c.benchmark_group("usage_from_json");
    for (name, body) in [
        ("openai_chat_1KB", chat_completion(500)),
        ("openai_chat_64KB", chat_completion(64 * 1024 - 600)),
    ] {
        let got = usage::from_json(body.as_bytes(), Dialect::OpenAi);
        assert_eq!(
            got.usage,
            Some(Usage {
                input_tokens: 93,
                cached_input_tokens: 1024,
                cache_creation_tokens: 0,
                output_tokens: 46,
            }),
            "{name}"
        );
        assert_eq!(got.model.as_deref(), Some("gpt-4o-2024-08-06"));
        g.throughput(Throughput::Bytes(body.len() as u64));
        println!("usage_from_json/{name}: body is {} bytes", body.len());
        g.bench_function(name, |b| {
            b.iter(|| usage::from_json(black_box(body.as_bytes()), Dialect::OpenAi))
        });
    }
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// Cost

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).expect("decimal")
}

fn cost_computation(c: &mut Criterion) {
    let mini = Price {
        input: d("0.15"),
        output: d("0.60"),
        cached_input: Some(d("0.075")),
        cache_write: None,
    };
    let usage = Usage {
        input_tokens: 93,
        cached_input_tokens: 1024,
        cache_creation_tokens: 0,
        output_tokens: 46,
    };
    assert_eq!(cost::cost(&usage, &mini), d("0.00011835"));
    let pricing = Pricing::new(
        PriceTable::from_iter([
            ("gpt-4o".to_string(), mini.clone()),
            ("gpt-4o-mini".to_string(), mini.clone()),
            ("gpt-4.1".to_string(), mini.clone()),
            ("claude-sonnet-4-5".to_string(), mini.clone()),
            ("o3".to_string(), mini.clone()),
        ]),
        Default::default(),
        &CostCounters::default(),
    );

    let mut g = c.benchmark_group("cost");
    g.bench_function("cost", |b| {
        b.iter(|| cost::cost(black_box(&usage), black_box(&mini)))
    });
    // What `meter::record` does: resolve a dated model name by prefix, then cost; then what
    // the logging phase does with the price's counter.
    g.bench_function("pricing_lookup_dated_model_and_cost", |b| {
        b.iter(|| {
            let priced = pricing.price(
                AccountType::Openai,
                black_box(Some("gpt-4o-mini-2024-07-18")),
                black_box(&usage),
            );
            if let Some(counter) = priced.counter {
                counter.add(priced.cost);
            }
            priced.cost
        })
    });
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

fn sample_record() -> UsageRecord {
    UsageRecord {
        request_id: uuid::Uuid::now_v7().to_string(),
        user_id: 1,
        api_key_id: 1,
        upstream_account_id: Some(1),
        method: "POST".into(),
        endpoint: "/v1/chat/completions".into(),
        model: Some("gpt-4o-mini-2024-07-18".into()),
        status_code: 200,
        response_time: 842,
        prompt_tokens: 1117,
        completion_tokens: 46,
        cached_tokens: 1024,
        cache_creation_tokens: 0,
        tokens_used: 1163,
        cost: d("0.00011835"),
        error_message: None,
        created_at: chrono::Utc::now(),
        requested_model: None,
        usage_source: None,
        upstream_error: None,
        charges: Vec::new(),
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
    let record = sample_record();

    let mut g = c.benchmark_group("usage_enqueue");
    // The clone (four heap strings) is made in setup and not timed.
    g.bench_function("submit", |b| {
        b.iter_batched(|| record.clone(), |r| sink.submit(r), BatchSize::SmallInput)
    });
    g.finish();

    rt.block_on(handle.shutdown());
    let lost = sink.stats().rows_lost.load(Ordering::Relaxed);
    let written = sink.stats().rows_written.load(Ordering::Relaxed);
    println!("usage_enqueue: {written} records drained by the writer, {lost} lost (queue full)");
    assert_eq!(
        lost, 0,
        "the queue overflowed: the numbers include the loss path"
    );
}

// ---------------------------------------------------------------------------------------------
// Path normalisation (every request)

fn path_normalisation(c: &mut Criterion) {
    use tollgate::path;
    assert!(matches!(
        path::normalize("/v1/chat/completions"),
        Ok(std::borrow::Cow::Borrowed(_))
    ));
    assert_eq!(
        path::normalize("/v1/chat/%2e%2e/embeddings").unwrap(),
        "/v1/embeddings"
    );
    let mut g = c.benchmark_group("path");
    // The common case: already normal, checked without allocating.
    g.bench_function("normalize_normal", |b| {
        b.iter(|| path::normalize(black_box("/v1/chat/completions")).is_ok())
    });
    g.bench_function("normalize_dotted", |b| {
        b.iter(|| path::normalize(black_box("/v1/chat/%2e%2e/embeddings")).is_ok())
    });
    g.bench_function("has_prefix", |b| {
        b.iter(|| path::has_prefix(black_box("/v1/chat/completions"), black_box("/v1/chat")))
    });
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// Rate-limit arithmetic (the rate-limit stage's local check; budget: ≤ 150 ns)

fn rate_limit_check(c: &mut Criterion) {
    use tollgate::gcra::{Gcra, Rate};
    let rate = Rate::new(
        std::num::NonZeroU64::new(u64::MAX / 4).expect("non-zero"),
        Duration::from_secs(60),
    );
    let g = Gcra::new();
    let start = std::time::Instant::now();
    assert!(g.acquire(rate, 1, 1).allowed);
    let mut g2 = c.benchmark_group("rate_limit");
    g2.bench_function("gcra_acquire", |b| {
        b.iter(|| {
            let now = start.elapsed().as_nanos() as u64;
            g.acquire(black_box(rate), black_box(now), black_box(1))
                .allowed
        })
    });
    // The whole local admission of one request: the key's entry (held by the cached key after
    // its first request), its rpm, tpm (on the body's estimate) and concurrency slot taken, the
    // slot given back when the hold drops.
    use tollgate::limits::{Caller, Defaults, Entries, Limiter, Limits, Overrides};
    let limiter = Limiter::new(
        Defaults {
            key: Limits {
                rpm: 1_000_000_000,
                rpd: 0,
                tpm: 1_000_000_000,
                max_concurrent: 1_000_000,
            },
            default_max_tokens: std::num::NonZeroU64::new(4096).expect("non-zero"),
        },
        None,
    );
    // One cached key's entries, as `auth::KeyInfo` keeps them across its requests.
    let entries = Entries::default();
    let caller = Caller {
        key_id: 7,
        user_id: 3,
        key: Overrides::default(),
        user: Overrides::default(),
        entries: &entries,
    };
    let body: &[u8] =
        br#"{"model":"gpt-4o-mini","max_tokens":64,"messages":[{"role":"user","content":"Say hello."}]}"#;
    assert!(matches!(limiter.admit_at(&caller, body, 1), Ok(Some(_))));
    g2.bench_function("check", |b| {
        b.iter(|| {
            let held = limiter.admit_at(black_box(&caller), black_box(body), limiter.now_ns());
            held.is_ok()
        })
    });
    g2.finish();
}

// ---------------------------------------------------------------------------------------------
// Spend admission with leases held (the spend stage's steady path; budget: ≤ 300 ns)

fn spend_admission(c: &mut Criterion) {
    use tollgate::record::{Metric, Period};
    use tollgate::spend::{BudgetRef, FailPolicy, Spend, SpendPolicy, SpendSettings};
    use tollgate::store::{Actor, BudgetOwner};
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("spend.db").display());
    let store = rt.block_on(Store::connect(&url, 2)).expect("store");
    let actor = Actor::system("bench");
    let (user, key) = rt.block_on(common::prepaid_user(&store, "b"));
    let now = chrono::Utc::now();
    let budget = rt
        .block_on(store.set_budget(
            &actor,
            BudgetOwner::Key(key),
            Metric::Cost,
            Period::Day,
            Decimal::from(1_000_000_000),
            now,
        ))
        .expect("budget");
    let settings = SpendSettings {
        sizing: tollgate::budget::Sizing {
            default_max_output_tokens: 4096,
            tokens_per_media_part: 3000,
        },
        reservations_per_lease: 100_000,
        lease_ttl: Duration::from_secs(30),
        lease_wait: Duration::from_secs(2),
        idle_return: Duration::from_secs(3600),
        fail: FailPolicy::Closed,
        cut_streams: false,
    };
    let spend = Spend::new(
        settings,
        store,
        rt.handle().clone(),
        "bench".into(),
        Arc::new(chrono::Utc::now),
    );
    let policy = SpendPolicy {
        budgets: vec![BudgetRef {
            budget_id: budget.id,
            subject_id: key,
            metric: Metric::Cost,
            period: Period::Day,
            anchor: None,
            owner: "key",
            cache: Default::default(),
        }],
        credit_user: Some(user),
        credit_cache: Default::default(),
    };
    let price = |i: &str, o: &str| Price {
        input: Decimal::from_str(i).expect("price"),
        output: Decimal::from_str(o).expect("price"),
        cached_input: None,
        cache_write: None,
    };
    let pricing = Pricing::new(
        [("gpt-4o-mini".to_string(), price("0.15", "0.60"))]
            .into_iter()
            .collect(),
        std::collections::HashMap::new(),
        &CostCounters::default(),
    );
    let body: &[u8] =
        br#"{"model":"gpt-4o-mini","max_tokens":64,"messages":[{"role":"user","content":"Say hello."}]}"#;
    // The first admission takes the leases (the database); every later one is served from them.
    rt.block_on(spend.admit_request(&policy, body, Some(AccountType::Openai), &pricing))
        .expect("first admission");
    let mut g = c.benchmark_group("spend");
    // The whole stage of one request: the model read and priced, the worst case, both pools'
    // reservations (a key's daily cost budget and the user's credit), the hold given back.
    g.bench_function("admit", |b| {
        b.iter(|| {
            let hold = spend
                .admit_request(
                    black_box(&policy),
                    black_box(body),
                    Some(AccountType::Openai),
                    &pricing,
                )
                .now_or_never()
                .expect("served from the leases held, without waiting");
            hold.is_ok()
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = key_check, upstream_selection, json_usage, cost_computation, enqueue, path_normalisation, rate_limit_check, spend_admission
}
criterion_main!(benches);
