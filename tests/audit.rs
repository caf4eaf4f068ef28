//! The audit log (`admin_log`): every change made with the CLI or the admin API writes one row,
//! in the transaction of the change, naming the actor (`cli:<OS user>`, `admin-token:<name>`,
//! `system:*`), the action, the target, and the target before and after; a refused action
//! writes nothing; a change whose row cannot be written does not happen; no secret (client key,
//! its hash, upstream credential, admin token, master key) is ever in the log. Read back with
//! `tollgate audit` and `GET /admin/audit`.

mod common;

use common::{Db, Gateway, TestDb};
use reqwest::Method;
use serde_json::{json, Value};

const TOKEN: &str = "audit-admin-token-5f0c1e2d3b4a";
const KEY_A: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const KEY_B: &str = "1f1e1d1c1b1a191817161514131211100f0e0d0c0b0a09080706050403020100";

/// The login name of the user running the tests: what the CLI's actor names.
fn os_user() -> String {
    let out = std::process::Command::new("id")
        .arg("-un")
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Every row of `tollgate audit --json` (oldest first, for reading the tests in order).
fn cli_rows(gw: &Gateway, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["audit", "--json", "--limit", "10000"];
    args.extend_from_slice(extra);
    let out = gw.cli(&args);
    assert!(
        out.status.success(),
        "tollgate audit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    rows.reverse();
    rows
}

/// The whole `admin_log` as text, every column: what a secret must never be found in.
async fn log_text(db: &TestDb) -> String {
    db.texts(
        "SELECT actor || ' ' || action || ' ' || target_type || ' ' || target_id || ' ' \
         || COALESCE(CAST(before AS TEXT), '-') || ' ' || COALESCE(CAST(after AS TEXT), '-') \
         FROM admin_log ORDER BY id",
    )
    .await
    .join("\n")
}

async fn count(db: &TestDb, table: &str) -> i64 {
    db.scalar(&format!("SELECT COUNT(*) FROM {table}")).await
}

/// The one row of `rows` with this action and target id.
fn row<'a>(rows: &'a [Value], action: &str, target_id: &str) -> &'a Value {
    let found: Vec<&Value> = rows
        .iter()
        .filter(|r| r["action"] == action && r["target_id"] == target_id)
        .collect();
    assert_eq!(found.len(), 1, "{action} {target_id} in {rows:#?}");
    found[0]
}

/// A CLI command that must fail, and write no audit row.
async fn refused(gw: &Gateway, args: &[&str]) {
    let rows = count(&gw.db, "admin_log").await;
    let out = gw.cli(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert_eq!(
        count(&gw.db, "admin_log").await,
        rows,
        "{args:?} failed but wrote an audit row"
    );
}

both_dbs!(cli_actions_are_audited, cli_actions);
async fn cli_actions(db: Db) {
    let mut gw = Gateway::new(db, "", "").await.unwrap();
    gw.env = vec![("TOLLGATE_MASTER_KEY", KEY_A.into())];
    let actor = format!("cli:{}", os_user());
    let secret = "sk-audit-cli-secret-9d8c7b6a";

    gw.add_user("alice@example.com");
    gw.cli_ok(&["users", "update", "alice@example.com", "--rpm", "5"]);
    gw.cli_ok(&["users", "deactivate", "1"]);
    gw.cli_ok(&["users", "activate", "1"]);
    let key = gw.create_key("alice@example.com", &[]);
    gw.cli_ok(&["keys", "update", "1", "--rpm", "7"]);
    gw.cli_ok(&["keys", "revoke", "1"]);
    let account = gw.add_account("main", "openai", "http://127.0.0.1:9", secret, 1, 1);
    assert_eq!(account, 1);
    gw.cli_ok(&[
        "accounts",
        "update",
        "main",
        "--priority",
        "2",
        "--rpm",
        "10",
    ]);
    gw.cli_ok(&["accounts", "disable", "1"]);
    gw.cli_ok(&["accounts", "enable", "1"]);
    gw.cli_ok(&["accounts", "delete", "1"]);

    let rows = cli_rows(&gw, &[]);
    let actions: Vec<&str> = rows.iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        [
            "user.create",
            "user.update",
            "user.deactivate",
            "user.activate",
            "key.create",
            "key.update",
            "key.revoke",
            "account.create",
            "account.update",
            "account.update",
            "account.update",
            "account.delete",
        ]
    );
    for r in &rows {
        assert_eq!(r["actor"], actor.as_str(), "{r}");
        assert!(r["created_at"].as_str().unwrap().ends_with('Z'), "{r}");
    }

    let created = row(&rows, "user.create", "1");
    assert_eq!(created["target_type"], "user");
    assert_eq!(created["before"], Value::Null);
    assert_eq!(created["after"]["email"], "alice@example.com");
    assert_eq!(created["after"]["is_active"], true);
    let updated = row(&rows, "user.update", "1");
    assert_eq!(
        (&updated["before"]["rpm"], &updated["after"]["rpm"]),
        (&Value::Null, &json!(5))
    );
    let deactivated = row(&rows, "user.deactivate", "1");
    assert_eq!(
        (
            &deactivated["before"]["is_active"],
            &deactivated["after"]["is_active"]
        ),
        (&json!(true), &json!(false))
    );

    let key_created = row(&rows, "key.create", "1");
    assert_eq!(key_created["target_type"], "key");
    assert_eq!(key_created["after"]["user_id"], 1);
    assert_eq!(key_created["after"]["name"], "test");
    assert_eq!(key_created["after"]["key_prefix"], &key[..9]);
    assert!(key_created["after"].get("key_hash").is_none());
    let revoked = row(&rows, "key.revoke", "1");
    assert_eq!(revoked["before"]["is_active"], true);
    assert_eq!(revoked["after"]["is_active"], false);
    assert_eq!(revoked["after"]["rpm"], 7, "the update before it");

    let account_created = row(&rows, "account.create", "1");
    assert_eq!(account_created["target_type"], "account");
    assert_eq!(
        account_created["after"]["credentials"],
        json!({"api_key": "[sealed]"})
    );
    assert_eq!(account_created["after"]["base_url"], "http://127.0.0.1:9");
    let account_updated = &rows[8];
    assert_eq!(
        (
            &account_updated["before"]["priority"],
            &account_updated["after"]["priority"]
        ),
        (&json!(1), &json!(2))
    );
    assert_eq!(account_updated["after"]["rpm"], 10);
    assert_eq!(rows[9]["after"]["is_active"], false);
    let deleted = row(&rows, "account.delete", "1");
    assert_eq!(deleted["before"]["name"], "main");
    assert_eq!(deleted["after"], Value::Null);

    // Filters: a target type, one target; the table form; bad filters.
    let key_rows = cli_rows(&gw, &["--target", "key:1"]);
    assert_eq!(key_rows.len(), 3);
    assert!(key_rows.iter().all(|r| r["target_type"] == "key"));
    assert_eq!(cli_rows(&gw, &["--target", "account"]).len(), 5);
    assert!(cli_rows(&gw, &["--target", "key:2"]).is_empty());
    let out = gw.cli(&["audit", "--limit", "2"]);
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(
        lines[0].contains("account.delete") && lines[0].contains("account:1"),
        "{table}"
    );
    assert!(lines[1].contains("is_active: false → true"), "{table}");
    for (args, message) in [
        (
            ["audit", "--limit", "0"],
            "--limit: 0 is not between 1 and 10000",
        ),
        (["audit", "--target", " "], "--target: must not be empty"),
    ] {
        let out = gw.cli(&args);
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(message), "{stderr}");
    }

    // Refused actions write nothing.
    refused(
        &gw,
        &["users", "add", "--email", "nobody", "--username", "x"],
    )
    .await;
    refused(
        &gw,
        &[
            "users",
            "add",
            "--email",
            "alice@example.com",
            "--username",
            "a2",
        ],
    )
    .await;
    refused(&gw, &["users", "deactivate", "99"]).await;
    refused(
        &gw,
        &["users", "update", "alice@example.com", "--rpm", "-1"],
    )
    .await;
    refused(
        &gw,
        &[
            "keys",
            "create",
            "--user",
            "nobody@example.com",
            "--name",
            "k",
        ],
    )
    .await;
    refused(&gw, &["keys", "revoke", "99"]).await;
    refused(&gw, &["keys", "update", "1", "--rpm", "-1"]).await;
    refused(&gw, &["accounts", "update", "1", "--priority", "3"]).await; // deleted
    refused(
        &gw,
        &[
            "accounts",
            "add",
            "--name",
            "bad",
            "--type",
            "openai",
            "--base-url",
            "ftp://x",
            "--api-key",
            "k",
        ],
    )
    .await;
    refused(&gw, &["accounts", "delete", "99"]).await;

    // A change whose audit row cannot be written does not happen.
    gw.db
        .exec("ALTER TABLE admin_log RENAME TO admin_log_away")
        .await;
    let users = count(&gw.db, "users").await;
    let out = gw.cli(&[
        "users",
        "add",
        "--email",
        "bob@example.com",
        "--username",
        "bob",
    ]);
    assert!(!out.status.success());
    assert_eq!(
        count(&gw.db, "users").await,
        users,
        "a user without its row"
    );
    let out = gw.cli(&["keys", "revoke", "1"]);
    assert!(!out.status.success());
    gw.db
        .exec("ALTER TABLE admin_log_away RENAME TO admin_log")
        .await;

    // Master key operations: legacy plaintext sealed in place (by the command that unlocked the
    // keyring), then a rotation; the rows name key ids, never a key.
    let legacy = "sk-legacy-plaintext-4b3a2c1d";
    gw.db
        .exec(&format!(
            "INSERT INTO upstream_accounts (name, type, base_url, credentials) \
             VALUES ('legacy', 'openai', 'http://127.0.0.1:9', '{{\"api_key\": \"{legacy}\"}}')"
        ))
        .await;
    gw.cli_ok(&["accounts", "disable", "2"]);
    gw.env = vec![
        ("TOLLGATE_MASTER_KEY", KEY_B.into()),
        ("TOLLGATE_OLD_MASTER_KEY", KEY_A.into()),
    ];
    gw.cli_ok(&["accounts", "rotate-encryption"]);
    let rows = cli_rows(&gw, &["--target", "keyring"]);
    assert_eq!(rows.len(), 2, "{rows:#?}");
    let (sealed, rotated) = (&rows[0], &rows[1]);
    assert_eq!(sealed["action"], "keyring.seal_plaintext");
    assert_eq!(sealed["actor"], actor.as_str());
    assert_eq!(sealed["after"]["sealed"], 1);
    let id_a = sealed["target_id"].as_str().unwrap();
    assert_eq!(rotated["action"], "keyring.rotate");
    assert_eq!(rotated["before"]["key_ids"], json!([id_a]));
    assert_eq!(rotated["after"]["resealed"], 2);
    let id_b = rotated["target_id"].as_str().unwrap();
    assert_ne!(id_a, id_b);
    assert_eq!(rotated["after"]["key_id"], id_b);
    let disabled = cli_rows(&gw, &["--target", "account:2"]);
    assert_eq!(disabled.len(), 1);
    assert_eq!(disabled[0]["before"]["credentials"]["api_key"], "[sealed]");

    let text = log_text(&gw.db).await;
    let hash = tollgate::keys::hash_hex(&key);
    for s in [key.as_str(), &hash, secret, legacy, KEY_A, KEY_B, "enc:v1"] {
        assert!(!text.contains(s), "{s} in the audit log:\n{text}");
    }
}

both_dbs!(admin_api_actions_are_audited, api_actions);
async fn api_actions(db: Db) {
    let config_secret = "sk-audit-config-secret-1a2b3c";
    let mut gw = Gateway::new(
        db,
        "",
        &format!(
            "[[upstream_accounts]]\nname = \"from-config\"\ntype = \"openai\"\nbase_url = \"http://127.0.0.1:9\"\napi_key = \"{config_secret}\"\n"
        ),
    )
    .await
    .unwrap();
    gw.admin_token = Some(TOKEN.into());
    gw.set_admin("token_name = \"ops\"");
    gw.start().await;
    let actor = "admin-token:ops";
    let send = |method: Method, path: &str, body: Option<Value>| {
        let r = gw.admin(method, path);
        let r = match body {
            Some(b) => r.json(&b),
            None => r,
        };
        async move {
            let r = r.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let audit = |query: &str| send(Method::GET, &format!("/admin/audit{query}"), None);

    // The config's account, saved at start.
    let (status, rows) = audit("?target_type=config").await;
    assert_eq!(status, 200, "{rows}");
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0]["actor"], "system:start");
    assert_eq!(rows[0]["action"], "config.load");
    assert_eq!(
        rows[0]["after"]["upstream_accounts"],
        json!(["from-config"])
    );

    let secret = "sk-audit-api-secret-7e6f5d4c";
    let replaced = "sk-audit-api-replaced-3c2b1a0f";
    let ok = |(status, body): (u16, Value), want: u16| {
        assert_eq!(status, want, "{body}");
        body
    };
    ok(
        send(
            Method::POST,
            "/admin/users",
            Some(json!({"email": "ada@example.com", "username": "ada"})),
        )
        .await,
        201,
    );
    ok(
        send(Method::PATCH, "/admin/users/1", Some(json!({"tpm": 1000}))).await,
        200,
    );
    ok(
        send(Method::POST, "/admin/users/1/deactivate", None).await,
        200,
    );
    ok(
        send(Method::POST, "/admin/users/1/activate", None).await,
        200,
    );
    let created = ok(
        send(
            Method::POST,
            "/admin/keys",
            Some(json!({"user": "ada@example.com", "name": "ci", "permissions": ["/v1/chat"]})),
        )
        .await,
        201,
    );
    let key = created["key"].as_str().unwrap().to_string();
    let key_id = created["id"].as_i64().unwrap();
    ok(
        send(
            Method::PATCH,
            &format!("/admin/keys/{key_id}"),
            Some(json!({"permissions": []})),
        )
        .await,
        200,
    );
    ok(
        send(Method::POST, &format!("/admin/keys/{key_id}/revoke"), None).await,
        200,
    );
    let account = ok(
        send(
            Method::POST,
            "/admin/accounts",
            Some(json!({"name": "api", "type": "openai", "base_url": "http://127.0.0.1:9", "api_key": secret})),
        )
        .await,
        201,
    );
    let account_id = account["id"].as_i64().unwrap();
    ok(
        send(
            Method::PATCH,
            &format!("/admin/accounts/{account_id}"),
            Some(json!({"api_key": replaced, "header": "x-api-key", "weight": 3})),
        )
        .await,
        200,
    );
    ok(
        send(
            Method::DELETE,
            &format!("/admin/accounts/{account_id}"),
            None,
        )
        .await,
        200,
    );
    ok(send(Method::POST, "/admin/reload", None).await, 200);

    // Refused requests write nothing.
    let before = count(&gw.db, "admin_log").await;
    for (method, path, body, status) in [
        (
            Method::POST,
            "/admin/users",
            json!({"email": "x", "username": "x"}),
            400,
        ),
        (
            Method::POST,
            "/admin/users",
            json!({"email": "ada@example.com", "username": "ada"}),
            409,
        ),
        (Method::PATCH, "/admin/users/1", json!({"rpm": -1}), 400),
        (Method::POST, "/admin/users/99/deactivate", json!({}), 404),
        (Method::PATCH, "/admin/keys/99", json!({"rpm": 1}), 404),
        (
            Method::POST,
            "/admin/keys",
            json!({"user": "nobody@example.com", "name": "k"}),
            404,
        ),
        (
            Method::POST,
            "/admin/accounts",
            json!({"name": "w", "type": "openai", "base_url": "http://a", "api_key": "k", "weight": 0}),
            400,
        ),
        (
            Method::PATCH,
            &format!("/admin/accounts/{account_id}"),
            json!({"weight": 2}),
            404,
        ),
    ] {
        ok(send(method, path, Some(body)).await, status);
    }
    assert_eq!(count(&gw.db, "admin_log").await, before);

    let (status, all) = audit("?limit=10000").await;
    assert_eq!(status, 200);
    let mut all = all.as_array().unwrap().clone();
    all.reverse();
    let actions: Vec<&str> = all.iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        [
            "config.load",
            "user.create",
            "user.update",
            "user.deactivate",
            "user.activate",
            "key.create",
            "key.update",
            "key.revoke",
            "account.create",
            "account.update",
            "account.delete",
            "config.reload",
        ]
    );
    assert!(all[1..].iter().all(|r| r["actor"] == actor), "{all:#?}");
    let key_id = key_id.to_string();
    let updated = row(&all, "key.update", &key_id);
    assert_eq!(
        (
            &updated["before"]["permissions"],
            &updated["after"]["permissions"]
        ),
        (&json!(["/v1/chat"]), &json!([]))
    );
    let account_id = account_id.to_string();
    let changed = row(&all, "account.update", &account_id);
    assert_eq!(
        changed["before"]["credentials"],
        json!({"api_key": "[sealed]"})
    );
    assert_eq!(
        changed["after"]["credentials"],
        json!({"api_key": "[sealed, replaced]", "header": "x-api-key"})
    );
    assert_eq!(changed["after"]["weight"], 3);
    let config_path = all[0]["target_id"].as_str().unwrap();
    let reloaded = row(&all, "config.reload", config_path);
    assert_eq!(reloaded["target_type"], "config");
    assert_eq!(reloaded["before"], reloaded["after"]);

    // Filters, newest first.
    let (_, rows) = audit(&format!("?target_type=key&target_id={key_id}")).await;
    let actions: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["key.revoke", "key.update", "key.create"]);
    let (_, rows) = audit("?limit=1").await;
    assert_eq!(rows.as_array().unwrap().len(), 1);
    assert_eq!(rows[0]["action"], "config.reload");
    for query in [
        "?limit=0",
        "?limit=10001",
        "?limit=x",
        "?target_type=%20",
        "?target_id=a%00b",
    ] {
        let (status, body) = audit(query).await;
        assert_eq!(status, 400, "{query}: {body}");
    }

    // A reload on SIGHUP is the gateway's own doing.
    gw.signal("HUP");
    let t = std::time::Instant::now();
    loop {
        let (_, rows) = audit("?limit=1").await;
        if rows[0]["action"] == "config.reload" && rows[0]["actor"] == "system:sighup" {
            break;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "no audit row for the SIGHUP reload: {rows}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let text = log_text(&gw.db).await;
    let hash = tollgate::keys::hash_hex(&key);
    for s in [
        key.as_str(),
        &hash,
        secret,
        replaced,
        config_secret,
        TOKEN,
        "enc:v1",
    ] {
        assert!(!text.contains(s), "{s} in the audit log:\n{text}");
    }
}
