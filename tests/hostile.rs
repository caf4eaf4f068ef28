//! Hostile clients against a real `tollgate serve` (issue 11 #2): slow and oversized header
//! sections, more connections than the cap, more request bodies than the memory budget, bare
//! line feeds. Each limit's refusal, that it never reaches the upstream, and that legitimate
//! requests keep being served while it happens. Transport-level: SQLite only.

mod common;

use std::time::{Duration, Instant};

use common::{Db, Gateway, MockUpstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A failure guard, never a synchronisation: every wait below ends on an event long before it.
const GUARD: Duration = Duration::from_secs(30);

async fn started(server_extra: &str) -> (Gateway, MockUpstream, String) {
    let mock = MockUpstream::json_ok().await;
    let mut gw = Gateway::new(Db::Sqlite, server_extra, "")
        .await
        .expect("SQLite is always available");
    gw.add_user("alice@example.com");
    gw.add_account("main", "openai", &mock.url(), "sk-upstream", 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;
    (gw, mock, key)
}

fn request(key: &str, extra: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {key}\r\n{extra}content-length: 2\r\n\r\n{{}}"
    )
}

/// Everything the gateway sends until it closes the connection.
async fn read_all(conn: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(GUARD, conn.read_to_end(&mut out))
        .await
        .expect("the gateway closes the connection");
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one response with a `content-length` body (the connection stays open).
async fn read_response(conn: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            if out.len() >= end + 4 + len {
                return text;
            }
        }
        let n = tokio::time::timeout(GUARD, conn.read(&mut buf))
            .await
            .expect("a response")
            .unwrap();
        assert!(n > 0, "closed mid-response: {text}");
        out.extend_from_slice(&buf[..n]);
    }
}

async fn metric(gw: &Gateway, series: &str) -> f64 {
    Gateway::sample(&gw.scrape("/metrics").await.1, series)
}

/// Polls `/metrics` until `series` satisfies `ok` (the gateway's own account of its state).
async fn until_metric(gw: &Gateway, series: &str, ok: impl Fn(f64) -> bool) {
    let deadline = Instant::now() + GUARD;
    loop {
        let v = metric(gw, series).await;
        if ok(v) {
            return;
        }
        assert!(Instant::now() < deadline, "{series} stayed at {v}");
        tokio::task::yield_now().await;
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_sections_are_cut_at_the_deadline() {
    let (gw, mock, key) = started("header_timeout_secs = 1").await;
    let started_at = Instant::now();
    // 20 clients that send part of a header and stop, 20 that trickle a byte every 100 ms (each
    // read arrives well within any per-read timeout; only a deadline on the whole section cuts
    // them).
    let mut slow = Vec::new();
    for i in 0..40 {
        let addr = gw.addr;
        let key = key.clone();
        slow.push(tokio::spawn(async move {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            let head =
                format!("POST /v1/chat/completions HTTP/1.1\r\nauthorization: Bearer {key}\r\n");
            conn.write_all(head.as_bytes()).await.unwrap();
            if i % 2 == 1 {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                for _ in 0..100 {
                    tick.tick().await;
                    if conn.write_all(b"x").await.is_err() {
                        break;
                    }
                }
            }
            let answer = read_all(&mut conn).await;
            (answer, started_at.elapsed())
        }));
    }
    // Meanwhile a legitimate client is served at once, never waiting on the deadline.
    let t = Instant::now();
    let answer = gw
        .raw_exchange(&request(&key, "connection: close\r\n"))
        .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );

    for task in slow {
        let (answer, after) = task.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(
            after >= Duration::from_secs(1),
            "cut before the deadline: {after:?}"
        );
        assert!(
            after < Duration::from_secs(5),
            "cut long after the deadline: {after:?}"
        );
    }
    assert_eq!(mock.count(), 1, "only the complete request was forwarded");
    until_metric(
        &gw,
        "tollgate_header_refusals_total{reason=\"timeout\"}",
        |v| v == 40.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_restarts_with_each_request_and_spares_slow_bodies() {
    let (gw, mock, key) = started("header_timeout_secs = 1").await;
    let mut conn = TcpStream::connect(gw.addr).await.unwrap();
    // A body slower than the header deadline is the client timeout's business, not the deadline's.
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {key}\r\ncontent-length: 2\r\n\r\n{{"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await; // the scenario: a pause past the deadline
    conn.write_all(b"}").await.unwrap();
    let first = read_response(&mut conn).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    // Idle between requests is the keep-alive timeout's business too.
    tokio::time::sleep(Duration::from_millis(1500)).await; // the scenario: idle past the deadline
    conn.write_all(request(&key, "").as_bytes()).await.unwrap();
    let second = read_response(&mut conn).await;
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    // The third request's header starts and never ends: its own deadline cuts it.
    let t = Instant::now();
    conn.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\n")
        .await
        .unwrap();
    let third = read_all(&mut conn).await;
    assert!(third.starts_with("HTTP/1.1 408"), "{third}");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(mock.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_sections_are_refused_while_arriving_and_memory_stays_bounded() {
    let (gw, mock, key) = started("").await;
    let before = rss_kib(gw.pid());
    // 200 clients each try to send a 900 KiB header section (pingora alone buffers up to 1 MiB
    // of it: ~230 MiB between them). Each is refused once it passes the header budget
    // (max_header_bytes + 16 KiB = 76 KiB).
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let addr = gw.addr;
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            let head =
                format!("POST /v1/chat/completions HTTP/1.1\r\nauthorization: Bearer {key}\r\n");
            let _ = conn.write_all(head.as_bytes()).await;
            let line = format!("x-filler: {}\r\n", "a".repeat(1000));
            for _ in 0..900 {
                if conn.write_all(line.as_bytes()).await.is_err() {
                    break;
                }
            }
            read_all(&mut conn).await
        }));
    }
    let mut peak = 0;
    for task in tasks {
        let answer = task.await.unwrap();
        peak = peak.max(rss_kib(gw.pid()));
        // The refusal may be lost to a reset when the client is still writing as the gateway
        // closes; then nothing else was sent either.
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
            "{answer}"
        );
    }
    until_metric(
        &gw,
        "tollgate_header_refusals_total{reason=\"too_large\"}",
        |v| v == 200.0,
    )
    .await;
    assert_eq!(mock.count(), 0);
    let grown_mib = peak.saturating_sub(before) / 1024;
    assert!(grown_mib < 64, "RSS grew {grown_mib} MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_get_503_and_slots_come_back() {
    let (gw, mock, key) = started("max_connections = 8").await;
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut conn = TcpStream::connect(gw.addr).await.unwrap();
        conn.write_all(request(&key, "").as_bytes()).await.unwrap();
        let answer = read_response(&mut conn).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        held.push(conn);
    }
    until_metric(&gw, "tollgate_client_connections", |v| v == 8.0).await;
    let answer = gw.raw_exchange(&request(&key, "")).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("too_many_connections"), "{answer}");
    assert!(answer.contains("retry-after: 1"), "{answer}");
    assert_eq!(
        metric(&gw, "tollgate_client_connections_refused_total").await,
        1.0
    );
    // A client leaves: its slot serves the next connection.
    drop(held.pop());
    until_metric(&gw, "tollgate_client_connections", |v| v == 7.0).await;
    let answer = gw
        .raw_exchange(&request(&key, "connection: close\r\n"))
        .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(mock.count(), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_share_one_memory_budget() {
    let mib = 1024 * 1024;
    let (gw, mock, key) = started(&format!(
        "max_body_bytes = {mib}\nmax_buffered_body_bytes = {}",
        mib + mib / 2
    ))
    .await;
    // A holds 1 MiB of the 1.5 MiB budget while its body is still arriving.
    let mut a = TcpStream::connect(gw.addr).await.unwrap();
    let head = |len: usize| {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {key}\r\ncontent-length: {len}\r\n\r\n"
        )
    };
    a.write_all(head(mib).as_bytes()).await.unwrap();
    a.write_all(b"{\"pad\":\"").await.unwrap();
    until_metric(&gw, "tollgate_buffered_body_bytes", |v| v >= mib as f64).await;
    // B's 1 MiB does not fit: 503 with Retry-After, not forwarded.
    let mut b = TcpStream::connect(gw.addr).await.unwrap();
    b.write_all(head(mib).as_bytes()).await.unwrap();
    let answer = read_all(&mut b).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 1"), "{answer}");
    assert!(answer.contains("body_budget"), "{answer}");
    // A small body still fits beside A's.
    let small = gw
        .raw_exchange(&request(&key, "connection: close\r\n"))
        .await;
    assert!(small.starts_with("HTTP/1.1 200"), "{small}");
    // A completes; its share comes back and B's size fits again.
    let rest = format!("{}\"}}", "a".repeat(mib - 10));
    a.write_all(rest.as_bytes()).await.unwrap();
    let answer = read_response(&mut a).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(a);
    until_metric(&gw, "tollgate_buffered_body_bytes", |v| v == 0.0).await;
    let body = format!("{{\"pad\":\"{}\"}}", "b".repeat(mib - 11));
    let resp = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(mock.count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_chunked_upload_costs_at_most_its_limit() {
    let mib = 1024 * 1024;
    let (gw, mock, key) = started(&format!("max_body_bytes = {}", 8 * mib)).await;
    let before = rss_kib(gw.pid());
    let mut conn = TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {key}\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, "c".repeat(64 * 1024));
    let mut sent = 0;
    let mut peak = 0;
    // Up to 200 MiB, until the gateway answers and closes.
    while sent < 200 * mib {
        if conn.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
        sent += 64 * 1024;
        if sent % (4 * mib) == 0 {
            peak = peak.max(rss_kib(gw.pid()));
        }
    }
    let answer = read_all(&mut conn).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 413"),
        "{answer}"
    );
    assert!(sent < 200 * mib, "the gateway read the whole 200 MiB");
    let grown_mib = peak.saturating_sub(before) / 1024;
    // The body held (≤ 8 MiB) and the allocator's slack; doubling reallocations cost 26 MiB here.
    assert!(
        grown_mib < 16,
        "RSS grew {grown_mib} MiB for an 8 MiB limit"
    );
    assert_eq!(mock.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_line_feeds_are_refused_and_closed() {
    let (gw, mock, key) = started("").await;
    for raw in [
        format!("POST /v1/chat/completions HTTP/1.1\nhost: t\nauthorization: Bearer {key}\ncontent-length: 2\n\n{{}}"),
        format!("POST /v1/chat/completions HTTP/1.1\r\nhost: t\nauthorization: Bearer {key}\r\ncontent-length: 2\r\n\r\n{{}}"),
    ] {
        let answer = gw.raw_exchange(&raw).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{raw:?}: {answer}");
        assert!(answer.contains("bare line feed"), "{answer}");
        assert!(answer.to_lowercase().contains("connection: close"), "{answer}");
    }
    assert_eq!(mock.count(), 0);
}
