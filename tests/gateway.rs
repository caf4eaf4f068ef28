//! The request path end to end: a real `tollgate serve` against a recording mock upstream, on
//! SQLite and on PostgreSQL.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Db, Gate, Gateway, MockUpstream, Reply};
use futures_util::StreamExt;

async fn gateway(db: Db, server_extra: &str) -> Gateway {
    Gateway::new(db, server_extra, "")
        .await
        .expect("database available")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

async fn post(
    gw: &Gateway,
    key: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    let mut req = client().post(gw.url("/v1/chat/completions")).body(body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    req.send().await.unwrap()
}

async fn error_code(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let v: serde_json::Value = resp.json().await.unwrap();
    (
        status,
        v["error"]["code"].as_str().unwrap_or("").to_string(),
    )
}

both_dbs!(refusals_never_reach_the_upstream, refusals);
async fn refusals(db: Db) {
    let mock = MockUpstream::json_ok().await;
    let mut gw = gateway(db, "").await;
    gw.add_user("alice@example.com");
    gw.add_user("bob@example.com");
    gw.add_account("main", "openai", &mock.url(), "sk-upstream", 1, 1);
    let revoked = gw.create_key("alice@example.com", &[]);
    let expired = gw.create_key("alice@example.com", &[]);
    let of_inactive_user = gw.create_key("bob@example.com", &[]);
    let path_limited = gw.create_key(
        "alice@example.com",
        &["--permissions", r#"["/v1/embeddings"]"#],
    );
    let model_limited = gw.create_key(
        "alice@example.com",
        &["--permissions", r#"["model:gpt-4o-mini*"]"#],
    );
    gw.cli_ok(&["keys", "revoke", "1"]);
    gw.cli_ok(&["users", "deactivate", "2"]);
    gw.db
        .exec("UPDATE api_keys SET expires_at = '2001-01-01T00:00:00Z' WHERE id = 2")
        .await;
    gw.start().await;

    let mut typo = expired.clone().into_bytes();
    typo[10] = if typo[10] == b'a' { b'b' } else { b'a' };
    let typo = String::from_utf8(typo).unwrap();
    let unknown = tollgate::keys::generate().unwrap();
    let body = r#"{"model":"gpt-4o","messages":[]}"#;

    let cases: Vec<(Option<&str>, u16, &str)> = vec![
        (None, 401, "missing"),
        (Some("sk-not-ours"), 401, "malformed"),
        (Some(&typo), 401, "malformed"),
        (Some(&unknown), 401, "unknown"),
        (Some(&revoked), 401, "revoked"),
        (Some(&expired), 401, "expired"),
        (Some(&of_inactive_user), 401, "revoked"),
        (Some(&path_limited), 403, "forbidden"),
        (Some(&model_limited), 403, "forbidden"),
    ];
    for (key, status, code) in &cases {
        let resp = post(&gw, *key, body).await;
        assert_ne!(
            resp.headers().get("connection").map(|v| v.as_bytes()),
            Some(&b"close"[..]),
            "{code}: kept alive"
        );
        assert!(resp.headers().contains_key("x-request-id"));
        assert_eq!(
            error_code(resp).await,
            (*status, code.to_string()),
            "key {key:?}"
        );
    }
    // x-api-key works as well as Authorization, and a permitted model passes.
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .header("x-api-key", &model_limited)
        .body(r#"{"model":"gpt-4o-mini-2024-07-18"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        mock.count(),
        1,
        "only the permitted request reached the upstream"
    );
}

both_dbs!(upstream_sees_the_account_credential_only, credential_swap);
async fn credential_swap(db: Db) {
    let mock = MockUpstream::json_ok().await;
    let mut gw = gateway(db, "").await;
    gw.add_user("alice@example.com");
    gw.add_account("main", "openai", &mock.url(), "sk-upstream-secret", 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;

    let resp = client()
        .post(gw.url("/v1/chat/completions?x=1"))
        .bearer_auth(&key)
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "drop me")
        .header("x-custom", "kept")
        .body(common::fixture("chat_completion.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(
        resp.bytes().await.unwrap(),
        common::fixture("chat_completion.json")
    );

    let seen = &mock.recorded()[0];
    assert_eq!(seen.path, "/v1/chat/completions?x=1");
    assert_eq!(seen.headers["authorization"], "Bearer sk-upstream-secret");
    assert_eq!(seen.headers["x-request-id"], request_id.as_str());
    assert_eq!(seen.headers["x-custom"], "kept");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert!(!seen.headers.contains_key("proxy-authorization"));
    assert!(!seen.headers.contains_key("x-hop"));
    for (name, value) in &seen.headers {
        assert!(
            !value.to_str().unwrap_or("").contains(&key),
            "client key leaked in {name}"
        );
    }
    assert_eq!(seen.body, common::fixture("chat_completion.json"));
    assert!(!gw.log().contains(&key), "the key must never be logged");
    assert!(
        !gw.log().contains("sk-upstream-secret"),
        "the upstream credential must never be logged"
    );
}

both_dbs!(upstream_connections_are_kept_and_reused, connection_reuse);
async fn connection_reuse(db: Db) {
    let mock = MockUpstream::json_ok().await;
    let mut gw = gateway(db, "").await;
    gw.add_user("alice@example.com");
    gw.add_account("main", "openai", &mock.url(), "sk-upstream", 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;

    // One client connection (raw, so no client pool can open a second one), requests one after
    // another: one pingora thread serves them all, and its pool holds the one upstream
    // connection they all use.
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let body = common::fixture("chat_completion.json");
    let stream = tokio::net::TcpStream::connect(
        gw.url("")
            .trim_start_matches("http://")
            .trim_end_matches('/'),
    )
    .await
    .unwrap();
    let mut conn = tokio::io::BufReader::new(stream);
    for _ in 0..50 {
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: tollgate\r\nauthorization: Bearer {key}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        conn.get_mut().write_all(head.as_bytes()).await.unwrap();
        conn.get_mut().write_all(&body).await.unwrap();
        let (mut status, mut length) = (String::new(), 0usize);
        conn.read_line(&mut status).await.unwrap();
        loop {
            let mut line = String::new();
            conn.read_line(&mut line).await.unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
        }
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        let mut got = vec![0u8; length];
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(got, body);
    }
    assert_eq!(mock.count(), 50);
    assert_eq!(
        mock.connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "every request after the first reuses the pooled upstream connection"
    );
    // Header and body arrive intact through the write coalescing.
    assert!(mock
        .recorded()
        .iter()
        .all(|r| r.body == common::fixture("chat_completion.json")));
}

both_dbs!(anthropic_accounts_get_x_api_key, anthropic_credential);
async fn anthropic_credential(db: Db) {
    let mock = MockUpstream::json_ok().await;
    let mut gw = gateway(db, "").await;
    gw.add_user("alice@example.com");
    gw.add_account("claude", "anthropic", &mock.url(), "sk-ant-secret", 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;
    let resp = client()
        .post(gw.url("/v1/messages"))
        .header("x-api-key", &key)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = &mock.recorded()[0];
    assert_eq!(seen.headers["x-api-key"], "sk-ant-secret");
    assert_eq!(seen.headers["anthropic-version"], "2023-06-01");
    assert!(!seen.headers.contains_key("authorization"));
}

both_dbs!(priority_failover_to_the_next_tier, failover);
async fn failover(db: Db) {
    let mock = MockUpstream::json_ok().await;
    let closed = format!("http://127.0.0.1:{}", {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    });
    let mut gw = gateway(db, "").await;
    gw.add_user("alice@example.com");
    gw.add_account("tier1", "openai", &closed, "sk-1", 1, 1);
    gw.add_account("tier2", "openai", &mock.url(), "sk-2", 2, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;
    let resp = post(&gw, Some(&key), "{}").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(mock.count(), 1);
    assert_eq!(mock.recorded()[0].headers["authorization"], "Bearer sk-2");
}

both_dbs!(weights_split_traffic_within_a_tier, weight_split);
async fn weight_split(db: Db) {
    let mock = MockUpstream::json_ok().await;
    let mut gw = gateway(db, "").await;
    gw.add_user("alice@example.com");
    gw.add_account("heavy", "openai", &mock.url(), "sk-heavy", 1, 3);
    gw.add_account("light", "openai", &mock.url(), "sk-light", 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;
    let c = client();
    let futs = (0..1000).map(|_| {
        let c = c.clone();
        let url = gw.url("/v1/chat/completions");
        let key = key.clone();
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
    });
    let statuses: Vec<u16> = futures_util::stream::iter(futs)
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(statuses.iter().all(|&s| s == 200));
    let heavy = mock
        .recorded()
        .iter()
        .filter(|r| r.headers["authorization"] == "Bearer sk-heavy")
        .count();
    let light = mock.count() - heavy;
    assert_eq!(heavy + light, 1000);
    assert!(
        (740..=760).contains(&heavy),
        "3:1 split within 1%: heavy={heavy} light={light}"
    );
}

both_dbs!(a_failing_account_cools_down, cooldown);
async fn cooldown(db: Db) {
    let failing = MockUpstream::status(500).await;
    let healthy = MockUpstream::json_ok().await;
    let mut gw = gateway(db, "").await;
    gw.add_user("alice@example.com");
    gw.add_account("failing", "openai", &failing.url(), "sk-f", 1, 1);
    gw.add_account("healthy", "openai", &healthy.url(), "sk-h", 2, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;
    for _ in 0..10 {
        assert_eq!(post(&gw, Some(&key), "{}").await.status(), 200);
    }
    assert_eq!(
        failing.count(),
        1,
        "after one failure the account is skipped"
    );
    assert_eq!(healthy.count(), 10);
}

both_dbs!(rate_limited_account_honours_retry_after, retry_after);
async fn retry_after(db: Db) {
    let limited = MockUpstream::start(|_| {
        Reply::Status(
            429,
            vec![("retry-after", "120".into())],
            Bytes::from_static(b"{}"),
        )
    })
    .await;
    let healthy = MockUpstream::json_ok().await;
    let mut gw = gateway(db, "").await;
    gw.add_user("alice@example.com");
    gw.add_account("limited", "openai", &limited.url(), "sk-l", 1, 1);
    gw.add_account("healthy", "openai", &healthy.url(), "sk-h", 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;
    for _ in 0..6 {
        assert_eq!(post(&gw, Some(&key), "{}").await.status(), 200);
    }
    assert_eq!(limited.count(), 1);
}

both_dbs!(all_accounts_failing_gives_503, all_fail);
async fn all_fail(db: Db) {
    let closed = |_: ()| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let mut gw = gateway(db, "").await;
    gw.add_user("alice@example.com");
    gw.add_account("a", "openai", &closed(()), "sk-a", 1, 1);
    gw.add_account("b", "openai", &closed(()), "sk-b", 2, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;
    let (status, code) = error_code(post(&gw, Some(&key), "{}").await).await;
    assert_eq!((status, code.as_str()), (503, "upstream_failed"));
    // Both are cooling down now: the next request finds no account at all.
    let (status, code) = error_code(post(&gw, Some(&key), "{}").await).await;
    assert_eq!((status, code.as_str()), (503, "no_account"));
}

both_dbs!(sse_streams_through_chunk_by_chunk, sse_streaming);
async fn sse_streaming(db: Db) {
    let gate = Gate::new();
    let g = gate.clone();
    let mock = MockUpstream::start(move |_| Reply::Sse {
        first: common::fixture("chat_stream_1.sse"),
        rest: vec![common::fixture("chat_stream_2.sse")],
        gate: g.clone(),
    })
    .await;
    let mut gw = gateway(db, "").await;
    gw.add_user("alice@example.com");
    gw.add_account("main", "openai", &mock.url(), "sk", 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;
    let resp = post(
        &gw,
        Some(&key),
        r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut stream = resp.bytes_stream();
    // The upstream holds the rest of the stream until we have seen the first chunk.
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("first chunk before upstream finished");
    assert_eq!(
        first.unwrap().unwrap(),
        common::fixture("chat_stream_1.sse")
    );
    gate.open();
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(rest, common::fixture("chat_stream_2.sse"));
}

both_dbs!(large_bodies_replay_on_retry, body_replay);
async fn body_replay(db: Db) {
    let failing = MockUpstream::status(503).await;
    let healthy = MockUpstream::json_ok().await;
    let mut gw = gateway(db, "max_body_bytes = 2097152").await;
    gw.add_user("alice@example.com");
    gw.add_account("failing", "openai", &failing.url(), "sk-f", 1, 1);
    gw.add_account("healthy", "openai", &healthy.url(), "sk-h", 2, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;
    let body: Bytes = (0..2_097_152u32)
        .map(|i| b'a' + (i % 26) as u8)
        .collect::<Vec<u8>>()
        .into();
    let resp = post(&gw, Some(&key), body.clone()).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(failing.recorded()[0].body, body);
    assert_eq!(healthy.recorded()[0].body, body);

    let too_big: Vec<u8> = vec![b'x'; 2_097_153];
    let (status, code) = error_code(post(&gw, Some(&key), too_big).await).await;
    assert_eq!((status, code.as_str()), (413, "body_too_large"));
    assert_eq!(
        failing.count() + healthy.count(),
        2,
        "the oversized request reached no upstream"
    );
}

both_dbs!(sigterm_lets_in_flight_streams_finish, graceful_shutdown);
async fn graceful_shutdown(db: Db) {
    let gate = Gate::new();
    let g = gate.clone();
    let mock = MockUpstream::start(move |_| Reply::Sse {
        first: common::fixture("chat_stream_1.sse"),
        rest: vec![common::fixture("chat_stream_2.sse")],
        gate: g.clone(),
    })
    .await;
    let mut gw = gateway(db, "").await;
    gw.add_user("alice@example.com");
    gw.add_account("main", "openai", &mock.url(), "sk", 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;
    let resp = post(
        &gw,
        Some(&key),
        r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
    )
    .await;
    let mut stream = resp.bytes_stream();
    stream.next().await.unwrap().unwrap();
    let pid = gw.pid();
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    // New connections are refused once the listener closes; the open stream still completes.
    let closed = 'poll: {
        for _ in 0..500 {
            if tokio::net::TcpStream::connect(gw.addr).await.is_err() {
                break 'poll true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    };
    assert!(
        closed,
        "the proxy listener still accepts connections 5 s after SIGTERM"
    );
    gate.open();
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(rest, common::fixture("chat_stream_2.sse"));
    let status = gw.terminate();
    assert!(status.success(), "exit status {status}: {}", gw.log());
}

#[tokio::test]
async fn a_bad_config_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        "[server]\nthreads = 2\nlisten = \"not an address\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(common::BIN)
        .arg("--config")
        .arg(&path)
        .arg("serve")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:3: invalid socket address syntax",
            path.display()
        )),
        "{stderr}"
    );
}

#[tokio::test]
async fn cli_rejects_bad_input_with_one_line() {
    let gw = Gateway::new(Db::Sqlite, "", "").await.unwrap();
    // The first command on a new SQLite file says it creates it (a line of its own).
    let created = gw.cli(&["migrate"]);
    assert!(created.status.success());
    assert!(String::from_utf8_lossy(&created.stderr).contains("creating an empty one"));
    for (args, expected) in [
        (
            vec![
                "keys",
                "create",
                "--user",
                "nobody@example.com",
                "--name",
                "x",
            ],
            "user nobody@example.com not found",
        ),
        (
            vec![
                "accounts",
                "add",
                "--name",
                "x",
                "--type",
                "nope",
                "--base-url",
                "http://h",
                "--api-key",
                "k",
            ],
            "unknown account type",
        ),
        (
            vec![
                "accounts",
                "add",
                "--name",
                "x",
                "--type",
                "openai",
                "--base-url",
                "h",
                "--api-key",
                "k",
            ],
            "--base-url",
        ),
        (
            vec!["users", "add", "--email", "not-an-email", "--username", "u"],
            "not an email",
        ),
    ] {
        let out = gw.cli(&args);
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
    gw.add_user("a@example.com");
    let out = gw.cli(&[
        "keys",
        "create",
        "--user",
        "a@example.com",
        "--name",
        "x",
        "--permissions",
        "[1]",
    ]);
    assert!(!out.status.success());
    let out = gw.cli(&[
        "keys",
        "create",
        "--user",
        "a@example.com",
        "--name",
        "x",
        "--expires-in",
        "soon",
    ]);
    assert!(!out.status.success());
    let key = gw.create_key("a@example.com", &["--expires-in", "30d"]);
    assert!(tollgate::keys::validate(&key).is_ok());
    let listing = gw.cli_ok(&["keys", "list", "--json"]);
    assert!(!listing.contains(&key));
}

/// One request over a raw connection (clients normalise dot segments themselves, so the bypass
/// corpus must be sent as is); returns the status line's code.
async fn raw_status(gw: &Gateway, path: &str, key: &str) -> u16 {
    let text = gw
        .raw_exchange(&format!(
            "POST {path} HTTP/1.1\r\nhost: tollgate\r\nauthorization: Bearer {key}\r\n\
             content-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
        ))
        .await;
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"))
}

both_dbs!(path_permissions_cannot_be_walked_around, path_permissions);
async fn path_permissions(db: Db) {
    let mock = MockUpstream::json_ok().await;
    let mut gw = gateway(db, "").await;
    gw.add_user("alice@example.com");
    gw.add_account("main", "openai", &mock.url(), "sk", 1, 1);
    let key = gw.create_key("alice@example.com", &["--permissions", r#"["/v1/chat"]"#]);
    gw.start().await;
    for (path, status) in [
        ("/v1/chat/../embeddings", 403),
        ("/v1/chat/%2e%2e/embeddings", 403),
        ("/v1/chat/.%2E/embeddings", 403),
        ("/v1/chatXYZ", 403),
        ("/v1/chat%2f..%2fembeddings", 400),
        ("/v1/chat\\..\\embeddings", 400),
        ("/v1/chat/%zz", 400),
        ("/v1/../../etc/passwd", 400),
        ("/v1//chat/./completions", 200),
        ("/v1/%63hat/completions?x=1", 200),
    ] {
        assert_eq!(raw_status(&gw, path, &key).await, status, "{path}");
    }
    // Only the two allowed requests reached the upstream, with the path that was checked.
    let paths: Vec<String> = mock.recorded().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/v1/chat/completions", "/v1/chat/completions?x=1"]);
}

both_dbs!(no_secret_is_logged_even_at_trace_level, secrets_at_trace);
async fn secrets_at_trace(db: Db) {
    let mock = MockUpstream::json_ok().await;
    let mut gw = gateway(db, "").await;
    gw.rust_log = "trace".into();
    gw.add_user("alice@example.com");
    let credential = "sk-upstream-credential-that-must-never-be-logged";
    gw.add_account("main", "openai", &mock.url(), credential, 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;
    assert_eq!(post(&gw, Some(&key), "{}").await.status(), 200);
    // A malformed request carrying the key: pingora refuses it, and at debug would log it raw.
    let response = gw
        .raw_exchange(&format!(
            "POST /v1/chat/completions HTTP/1.1\r\nauthorization: Bearer {key}\r\nthis is not a header\r\n\r\n"
        ))
        .await;
    assert!(response.starts_with("HTTP/1.1 400"));
    assert!(gw.terminate().success());
    let log = gw.log();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "trace level is on"
    );
    assert!(!log.contains(&key), "the client's key is in the log");
    assert!(
        !log.contains(credential),
        "the upstream credential is in the log"
    );
    assert!(
        !log.contains(&key[3..25]),
        "part of the client's key is in the log"
    );
}

both_dbs!(
    ambiguous_body_framing_is_refused_and_closed,
    ambiguous_framing
);
async fn ambiguous_framing(db: Db) {
    let mock = MockUpstream::json_ok().await;
    let mut gw = gateway(db, "").await;
    gw.add_user("alice@example.com");
    gw.add_account("main", "openai", &mock.url(), "sk", 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;
    // Both lengths: pingora drops Content-Length (RFC 9112 §6.3), so it is served, and then the
    // connection closes (§6.1). The others are refused.
    for (framing, status) in [
        ("content-length: 5\r\ntransfer-encoding: chunked\r\n", "200"),
        ("transfer-encoding: identity, chunked\r\n", "400"),
        ("content-length: 5\r\ncontent-length: 6\r\n", "400"),
    ] {
        // A smuggled second request follows; it must never be served. The exchange ends only
        // when tollgate closes the connection.
        let text = gw
            .raw_exchange(&format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {key}\r\n{framing}\r\n\
                 0\r\n\r\nGET /v1/models HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {key}\r\n\r\n"
            ))
            .await;
        assert!(
            text.starts_with(&format!("HTTP/1.1 {status}")),
            "{framing:?}: {text}"
        );
        assert_eq!(
            text.matches("HTTP/1.1").count(),
            1,
            "one answer, then close: {text}"
        );
    }
    assert_eq!(mock.count(), 1, "only the request served; no smuggled one");
}

both_dbs!(
    accounts_cannot_point_at_cloud_metadata,
    metadata_destinations
);
async fn metadata_destinations(db: Db) {
    let mut gw = gateway(db, "").await;
    gw.add_user("alice@example.com");
    gw.add_account("imds", "openai", "http://169.254.169.254", "sk", 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;
    let (status, code) = error_code(post(&gw, Some(&key), "{}").await).await;
    assert_eq!((status, code.as_str()), (503, "no_account"));
    assert!(
        gw.log().contains("is a link-local address"),
        "the skip is logged with its reason: {}",
        gw.log()
    );
}

both_dbs!(
    oversized_headers_get_431_and_never_reach_the_upstream,
    header_limits
);
async fn header_limits(db: Db) {
    let mock = MockUpstream::json_ok().await;
    let mut gw = gateway(db, "").await;
    gw.add_user("alice@example.com");
    gw.add_account("main", "openai", &mock.url(), "sk", 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;
    let big = format!("x-big: {}\r\n", "a".repeat(70 * 1024));
    let many: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    for (extra, status) in [(big.as_str(), "431"), (many.as_str(), "431"), ("", "200")] {
        let text = gw
            .raw_exchange(&format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {key}\r\n{extra}\
                 content-length: 2\r\nconnection: close\r\n\r\n{{}}"
            ))
            .await;
        assert!(
            text.starts_with(&format!("HTTP/1.1 {status}")),
            "{}: {text}",
            extra.len()
        );
    }
    assert_eq!(
        mock.count(),
        1,
        "only the request within the limits was forwarded"
    );
}

both_dbs!(pipelined_requests_are_each_answered, pipelined);
async fn pipelined(db: Db) {
    let mock = MockUpstream::json_ok().await;
    let mut gw = gateway(db, "").await;
    gw.add_user("alice@example.com");
    gw.add_account("main", "openai", &mock.url(), "sk", 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;
    // Two requests in one write; the second asks to close, so the exchange ends after it.
    let one = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {key}\r\ncontent-length: 2\r\n\r\n{{}}"
    );
    let two = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {key}\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
    );
    let text = gw.raw_exchange(&format!("{one}{two}")).await;
    assert_eq!(
        text.matches("HTTP/1.1 200").count(),
        2,
        "both pipelined requests answered: {text}"
    );
    assert_eq!(mock.count(), 2);
}
