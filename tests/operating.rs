//! Operating tollgate: metrics move as requests flow, health probes, the admin API and its token,
//! revocation across instances, accounts added at run time, and config reload.

mod common;

use std::time::{Duration, Instant};

use common::{Db, Gateway, MockUpstream};
use reqwest::Method;

const TOKEN: &str = "test-admin-token-0123456789";

async fn started(db: Db, extra: &str) -> (Gateway, MockUpstream, String) {
    let mock = MockUpstream::json_ok().await;
    let mut gw = Gateway::new(db, "", extra).await.unwrap();
    gw.admin_token = Some(TOKEN.into());
    gw.add_user("alice@example.com");
    gw.add_account("main", "openai", &mock.url(), "sk-main", 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;
    (gw, mock, key)
}

const PRICES: &str = "[prices.\"gpt-4o-mini\"]\ninput = \"0.15\"\noutput = \"0.60\"\n";

both_dbs!(metrics_move_as_requests_flow, metrics_flow);
async fn metrics_flow(db: Db) {
    let (gw, _mock, key) = started(db, PRICES).await;
    assert_eq!(gw.scrape("/healthz").await.0, 200);
    let (status, body) = gw.scrape("/readyz").await;
    assert_eq!(status, 200, "{body}");

    let (_, before) = gw.scrape("/metrics").await;
    for _ in 0..3 {
        assert_eq!(gw.chat_status(&key).await, 200);
    }
    assert_eq!(gw.chat_status("tg_not_a_real_key").await, 401);
    // A request is counted in its logging phase, just after its last byte went out: wait for it.
    let series = "tollgate_request_duration_seconds_count";
    let want = Gateway::sample(&before, series) + 4.0;
    let t = Instant::now();
    let after = loop {
        let (_, m) = gw.scrape("/metrics").await;
        if Gateway::sample(&m, series) >= want {
            break m;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "requests never counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let delta = |series: &str| Gateway::sample(&after, series) - Gateway::sample(&before, series);
    assert_eq!(
        delta("tollgate_requests_total{status_class=\"2xx\",upstream_type=\"openai\"}"),
        3.0
    );
    assert_eq!(
        delta("tollgate_requests_total{status_class=\"4xx\",upstream_type=\"none\"}"),
        1.0
    );
    assert_eq!(
        delta("tollgate_auth_failures_total{reason=\"malformed\"}"),
        1.0
    );
    // chat_completion.json: 12 prompt + 3 completion tokens per request.
    assert_eq!(delta("tollgate_tokens_total{kind=\"prompt\"}"), 36.0);
    assert_eq!(delta("tollgate_tokens_total{kind=\"completion\"}"), 9.0);
    assert_eq!(
        delta("tollgate_upstream_attempts_total{account=\"main\"}"),
        3.0
    );
    assert!(
        Gateway::sample(
            &after,
            "tollgate_cost_total{account_type=\"openai\",model=\"gpt-4o-mini\"}"
        ) > 0.0
    );
    assert_eq!(delta("tollgate_request_duration_seconds_count"), 4.0);
    assert!(Gateway::sample(&after, "tollgate_overhead_seconds_count") >= 3.0);
    assert!(after.contains("tollgate_build_info{version="));
    for line in after.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            !line.contains(&key) && !line.contains("sk-main"),
            "a secret in a label: {line}"
        );
    }
    // The usage writer's flushes show up too (rows, batch sizes, flush durations).
    let t = Instant::now();
    loop {
        let (_, m) = gw.scrape("/metrics").await;
        if Gateway::sample(&m, "tollgate_writer_rows_written_total") >= 3.0 {
            assert!(
                Gateway::sample(&m, "tollgate_writer_batch_rows_count") >= 1.0,
                "batch histogram fed"
            );
            assert!(Gateway::sample(&m, "tollgate_writer_flush_duration_seconds_count") >= 1.0);
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "usage rows never written"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    promtool_check(&after);
}

/// `promtool check metrics` on a scrape, when promtool is installed (CI installs it).
fn promtool_check(exposition: &str) {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(_) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("promtool is not installed in CI")
        }
        Err(_) => {
            eprintln!(
                "skipped promtool check: promtool not installed (apt-get install prometheus)"
            );
            return;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

both_dbs!(admin_api_needs_the_token, admin_token);
async fn admin_token(db: Db) {
    let (gw, _mock, _key) = started(db, "").await;
    let no_token = reqwest::Client::new()
        .get(format!("http://{}/admin/users", gw.admin_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), 401);
    let wrong = reqwest::Client::new()
        .get(format!("http://{}/admin/users", gw.admin_addr))
        .bearer_auth("wrong-token")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let openapi = reqwest::Client::new()
        .get(format!("http://{}/openapi.json", gw.admin_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(openapi.status(), 401);

    let users: serde_json::Value = gw
        .admin(Method::GET, "/admin/users")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(users[0]["email"], "alice@example.com");
    let created = gw
        .admin(Method::POST, "/admin/users")
        .json(&serde_json::json!({"email": "bob@example.com", "username": "bob"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let dup = gw
        .admin(Method::POST, "/admin/users")
        .json(&serde_json::json!({"email": "bob@example.com", "username": "bob"}))
        .send()
        .await
        .unwrap();
    assert_eq!(dup.status(), 409);
    let bad = gw
        .admin(Method::POST, "/admin/keys")
        .json(
            &serde_json::json!({"user": "bob@example.com", "name": "k", "permissions": {"no": 1}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let key: serde_json::Value = gw
        .admin(Method::POST, "/admin/keys")
        .json(&serde_json::json!({"user": "bob@example.com", "name": "ci", "expires_in": "30d"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let plaintext = key["key"].as_str().unwrap();
    assert_eq!(gw.chat_status(plaintext).await, 200);
    let listing = gw
        .admin(Method::GET, "/admin/keys")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!listing.contains(plaintext), "listings never show the key");
    assert!(
        !listing.contains(&tollgate::keys::hash_hex(plaintext)),
        "nor its hash"
    );
    assert!(!gw.log().contains(plaintext), "the key is never logged");

    // Revoked on this instance: refused at once, although it is cached.
    let id = key["id"].as_i64().unwrap();
    let revoke = gw
        .admin(Method::POST, &format!("/admin/keys/{id}/revoke"))
        .send()
        .await
        .unwrap();
    assert_eq!(revoke.status(), 200);
    assert_eq!(gw.chat_status(plaintext).await, 401);

    let usage: serde_json::Value = gw
        .admin(Method::GET, "/admin/usage?since=1d&by=key")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(usage["groups"].is_array());
    let openapi = gw.admin(Method::GET, "/openapi.json").send().await.unwrap();
    assert_eq!(openapi.status(), 200);
}

both_dbs!(
    revocation_reaches_a_second_instance_within_a_second,
    revocation_across_instances
);
async fn revocation_across_instances(db: Db) {
    // The change poll runs every 200 ms here, so the 1 s bound leaves room for the poll's query
    // and the request (with the default 1 s period the bound would be the period itself).
    let mock = MockUpstream::json_ok().await;
    let mut a = Gateway::new(db, "", "").await.unwrap();
    a.admin_token = Some(TOKEN.into());
    a.set_admin("key_refresh_ms = 200");
    a.add_user("alice@example.com");
    a.add_account("main", "openai", &mock.url(), "sk-main", 1, 1);
    let key = a.create_key("alice@example.com", &[]);
    a.start().await;
    let mut b = a.sibling().await;
    b.start().await;
    assert_eq!(
        b.chat_status(&key).await,
        200,
        "instance B serves (and caches) the key"
    );
    let revoke = a
        .admin(Method::POST, "/admin/keys/1/revoke")
        .send()
        .await
        .unwrap();
    assert_eq!(revoke.status(), 200);
    let revoked_at = Instant::now();
    loop {
        let status = b.chat_status(&key).await;
        if status == 401 {
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "instance B still accepts the key after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "instance B refused the revoked key after {:?}",
        revoked_at.elapsed()
    );
}

both_dbs!(
    an_account_added_at_run_time_gets_traffic,
    account_added_live
);
async fn account_added_live(db: Db) {
    let (gw, first, key) = started(db, "").await;
    let second = MockUpstream::json_ok().await;
    // A tier above the current one: once loaded, it takes all traffic.
    gw.cli_ok(&[
        "accounts",
        "add",
        "--name",
        "new",
        "--type",
        "openai",
        "--base-url",
        &second.url(),
        "--api-key",
        "sk-new",
        "--priority",
        "0",
    ]);
    let added_at = Instant::now();
    while second.count() == 0 {
        assert_eq!(gw.chat_status(&key).await, 200);
        // Picked up as fast as a key change: the change poll (1 s) or NOTIFY, then a reload.
        assert!(
            added_at.elapsed() < Duration::from_secs(3),
            "the new account got no traffic within 3 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("new account served after {:?}", added_at.elapsed());
    let before = first.count();
    for _ in 0..5 {
        assert_eq!(gw.chat_status(&key).await, 200);
    }
    assert_eq!(
        first.count(),
        before,
        "the new, preferred account takes the traffic"
    );
}

both_dbs!(a_broken_config_on_sighup_keeps_the_old_one, reload);
async fn reload(db: Db) {
    let (gw, mock, key) = started(db, "").await;
    let good = std::fs::read_to_string(&gw.config).unwrap();
    std::fs::write(&gw.config, format!("{good}\n[server\nbroken = ")).unwrap();
    let (_, before) = gw.scrape("/metrics").await;
    gw.signal("HUP");
    let failed = "tollgate_config_reloads_total{result=\"error\"}";
    let t = Instant::now();
    loop {
        let (_, m) = gw.scrape("/metrics").await;
        if Gateway::sample(&m, failed) > Gateway::sample(&before, failed) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the failed reload was not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        gw.chat_status(&key).await,
        200,
        "still serving on the old config"
    );

    // A valid file is applied: a route change takes effect without a restart.
    std::fs::write(
        &gw.config,
        format!("{good}\n[[routes]]\nprefix = \"/openai/\"\ntype = \"openai\"\n"),
    )
    .unwrap();
    let reloaded = gw
        .admin(Method::POST, "/admin/reload")
        .send()
        .await
        .unwrap();
    assert_eq!(reloaded.status(), 200, "{}", reloaded.text().await.unwrap());
    let r = reqwest::Client::new()
        .post(gw.url("/openai/chat"))
        .bearer_auth(&key)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(mock.recorded().iter().any(|r| r.path == "/openai/chat"));
    // And the CLI reaches the same endpoint.
    let out = std::process::Command::new(common::BIN)
        .args(["--config", gw.config.to_str().unwrap(), "reload"])
        .args(["--admin", &gw.admin_addr.to_string()])
        .env("TOLLGATE_ADMIN_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
