//! Upstream credentials at rest: sealed in the database (a dump shows no secret), opened once
//! where accounts load, databases from before encryption sealed in place at start, a wrong key
//! refused at start in one line, `accounts rotate-encryption`, and credentials checked as header
//! values before anything is written.

mod common;

use std::time::Duration;

use common::{Db, Gateway, MockUpstream, BIN};
use reqwest::Method;

const KEY_A: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const KEY_B: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";
const TOKEN: &str = "test-admin-token-0123456789";

/// The credentials column of every account (deleted ones too), as stored.
async fn stored_credentials(gw: &Gateway) -> Vec<String> {
    let sql = match gw.db.url.starts_with("sqlite") {
        true => "SELECT credentials FROM upstream_accounts ORDER BY id",
        false => "SELECT credentials::text FROM upstream_accounts ORDER BY id",
    };
    gw.db.texts(sql).await
}

/// Where the zero-setup key file is: beside the SQLite file, beside the config for PostgreSQL.
fn default_key_file(gw: &Gateway) -> std::path::PathBuf {
    match gw.db.url.strip_prefix("sqlite://") {
        Some(file) => format!("{file}.key").into(),
        None => gw.dir.path().join("tollgate.key"),
    }
}

/// Runs `tollgate serve`, which must exit (not get ready) within 60 s: its exit code and stderr.
async fn start_fails(gw: &Gateway) -> (Option<i32>, String) {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("--config")
        .arg(&gw.config)
        .arg("serve")
        .env_remove("TOLLGATE_DATABASE_URL")
        .env_remove("TOLLGATE_MASTER_KEY")
        .env_remove("TOLLGATE_OLD_MASTER_KEY")
        .envs(gw.env.iter().map(|(k, v)| (*k, v.as_str())))
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("tollgate serve should have exited")
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Stronger than a dump, for SQLite: the bytes of the file and its WAL, free pages included.
fn not_on_disk(gw: &Gateway, secrets: &[&str]) {
    let Some(file) = gw.db.url.strip_prefix("sqlite://") else {
        return;
    };
    for path in [file.to_string(), format!("{file}-wal")] {
        let bytes = std::fs::read(&path).unwrap_or_default();
        for secret in secrets {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret} is in {path}"
            );
        }
    }
}

/// The one-line error `main` prints (log lines aside).
fn error_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("tollgate: "))
        .collect()
}

both_dbs!(
    credentials_are_sealed_at_rest_and_still_forwarded,
    sealed_at_rest
);
async fn sealed_at_rest(db: Db) {
    let (cli_secret, config_secret, admin_secret) = (
        "sk-cli-8c1d3e5f7a9b",
        "sk-config-2f4e6a8c0b1d",
        "sk-admin-4a6c8e0f2b3d",
    );
    let mock = MockUpstream::json_ok().await;
    let mut gw = Gateway::new(
        db,
        "",
        &format!(
            "[[upstream_accounts]]\nname = \"from-config\"\ntype = \"openai\"\nbase_url = \"{}\"\napi_key = \"{config_secret}\"\npriority = 9\n",
            mock.url()
        ),
    )
    .await
    .unwrap();
    gw.admin_token = Some(TOKEN.into());
    gw.add_user("alice@example.com");
    gw.add_account("main", "openai", &mock.url(), cli_secret, 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    gw.start().await;

    // The zero-setup key: created by the first command that needed it, 0600, never logged.
    let key_file = default_key_file(&gw);
    let master = std::fs::read_to_string(&key_file).unwrap();
    assert_eq!(master.trim().len(), 64);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", key_file.display());
    }

    let added = gw
        .admin(Method::POST, "/admin/accounts")
        .json(&serde_json::json!({"name": "via-admin", "type": "openai",
            "base_url": mock.url(), "api_key": admin_secret, "priority": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), 201);

    assert_eq!(gw.chat_status(&key).await, 200);
    assert_eq!(
        mock.recorded()[0].headers["authorization"],
        format!("Bearer {cli_secret}"),
        "the gateway forwards the opened credential"
    );

    let stored = stored_credentials(&gw).await;
    assert_eq!(stored.len(), 3);
    for c in &stored {
        assert!(c.contains("enc:v1:"), "sealed: {c}");
    }
    let dump = gw.db.dump().await;
    assert!(
        dump.contains("upstream_accounts"),
        "the dump reads the tables: {dump}"
    );
    for secret in [cli_secret, config_secret, admin_secret, master.trim()] {
        assert!(
            !dump.contains(secret),
            "{secret} is in the database: {dump}"
        );
    }
    not_on_disk(&gw, &[cli_secret, config_secret, admin_secret]);
    let log = gw.log();
    assert!(
        !log.contains(master.trim()),
        "the master key is never logged"
    );
    assert_eq!(gw.terminate().code(), Some(0));
}

both_dbs!(
    plaintext_credentials_from_before_are_sealed_on_start,
    plaintext_from_before
);
async fn plaintext_from_before(db: Db) {
    let secret = "sk-legacy-9d8c7b6a5f4e";
    let mock = MockUpstream::json_ok().await;
    let mut gw = Gateway::new(db, "", "").await.unwrap();
    gw.add_user("alice@example.com");
    let key = gw.create_key("alice@example.com", &[]);
    // As a tollgate from before encryption wrote it (a deleted account too).
    gw.db
        .exec(&format!(
            "INSERT INTO upstream_accounts (name, type, base_url, credentials) VALUES \
             ('legacy', 'openai', '{}', '{{\"api_key\":\"{secret}\"}}'), \
             ('gone', 'openai', '{}', '{{\"api_key\":\"{secret}-gone\"}}')",
            mock.url(),
            mock.url()
        ))
        .await;
    gw.db
        .exec("UPDATE upstream_accounts SET deleted_at = created_at, is_active = false WHERE name = 'gone'")
        .await;
    assert!(gw.db.dump().await.contains(secret));

    gw.start().await;
    assert!(
        gw.log().contains("are now sealed"),
        "the start says it sealed them: {}",
        gw.log()
    );
    assert!(!gw.db.dump().await.contains(secret), "sealed in place");
    not_on_disk(&gw, &[secret]);
    assert_eq!(gw.chat_status(&key).await, 200);
    assert_eq!(
        mock.recorded()[0].headers["authorization"],
        format!("Bearer {secret}")
    );

    // Once: the next start finds nothing to seal, and still serves.
    assert_eq!(gw.terminate().code(), Some(0));
    let sealed = stored_credentials(&gw).await;
    gw.start().await;
    assert!(!gw.log().contains("are now sealed"), "{}", gw.log());
    assert_eq!(stored_credentials(&gw).await, sealed, "nothing rewritten");
    assert_eq!(gw.chat_status(&key).await, 200);
    assert_eq!(
        mock.recorded()[1].headers["authorization"],
        format!("Bearer {secret}")
    );
}

both_dbs!(a_wrong_master_key_fails_the_start_in_one_line, wrong_key);
async fn wrong_key(db: Db) {
    let mock = MockUpstream::json_ok().await;
    let mut gw = Gateway::new(db, "", "").await.unwrap();
    gw.env = vec![("TOLLGATE_MASTER_KEY", KEY_A.into())];
    gw.add_account("main", "openai", &mock.url(), "sk-main-0a1b2c", 1, 1);
    assert!(
        !default_key_file(&gw).exists(),
        "no key file when the key comes from the environment"
    );

    gw.env = vec![("TOLLGATE_MASTER_KEY", KEY_B.into())];
    let (code, stderr) = start_fails(&gw).await;
    assert_eq!(code, Some(1), "{stderr}");
    let lines = error_lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("the master key (id ")
            && lines[0]
                .contains("from TOLLGATE_MASTER_KEY) does not open the upstream credentials"),
        "{stderr}"
    );
    assert!(!stderr.contains(KEY_A) && !stderr.contains(KEY_B));
    // CLI commands that write accounts refuse too, writing nothing.
    let out = gw.cli(&["accounts", "disable", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        gw.db
            .scalar("SELECT count(*) FROM upstream_accounts WHERE is_active")
            .await,
        1
    );

    // No key at all, while the database holds sealed credentials: no new key file is made up.
    gw.env.clear();
    let (code, stderr) = start_fails(&gw).await;
    assert_eq!(code, Some(1), "{stderr}");
    let lines = error_lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("there is no master key"), "{stderr}");
    assert!(!default_key_file(&gw).exists());

    // Not a key.
    gw.env = vec![("TOLLGATE_MASTER_KEY", "hunter2".into())];
    let (code, stderr) = start_fails(&gw).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        error_lines(&stderr),
        ["tollgate: TOLLGATE_MASTER_KEY: a master key is 64 hex digits (32 bytes, e.g. `openssl rand -hex 32`); this one has 7 characters"]
    );

    // The right one starts.
    gw.env = vec![("TOLLGATE_MASTER_KEY", KEY_A.into())];
    gw.start().await;
}

both_dbs!(
    rotate_encryption_moves_every_credential_to_the_new_key,
    rotate
);
async fn rotate(db: Db) {
    let secret = "sk-rotated-3e5d7c9b1a0f";
    let mock = MockUpstream::json_ok().await;
    let mut gw = Gateway::new(db, "", "").await.unwrap();
    // Sealed under the zero-setup key file.
    gw.add_user("alice@example.com");
    gw.add_account("main", "openai", &mock.url(), secret, 1, 1);
    let key = gw.create_key("alice@example.com", &[]);
    let old_file = gw.dir.path().join("old.key");
    std::fs::rename(default_key_file(&gw), &old_file).unwrap();

    // No old key named: refused.
    gw.env = vec![("TOLLGATE_MASTER_KEY", KEY_B.into())];
    let out = gw.cli(&["accounts", "rotate-encryption"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        error_lines(&stderr)[0].contains("--old-key-file"),
        "{stderr}"
    );

    // File → TOLLGATE_MASTER_KEY (B).
    let before = stored_credentials(&gw).await;
    let out = gw.cli(&[
        "accounts",
        "rotate-encryption",
        "--old-key-file",
        old_file.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("1 upstream credentials re-sealed"),
        "{stderr}"
    );
    assert_ne!(stored_credentials(&gw).await, before);
    std::fs::remove_file(&old_file).unwrap();
    gw.start().await;
    assert_eq!(gw.chat_status(&key).await, 200);
    assert_eq!(
        mock.recorded()[0].headers["authorization"],
        format!("Bearer {secret}")
    );
    assert_eq!(gw.terminate().code(), Some(0));

    // TOLLGATE_OLD_MASTER_KEY (B) → TOLLGATE_MASTER_KEY (A); B no longer opens anything.
    gw.env = vec![
        ("TOLLGATE_MASTER_KEY", KEY_A.into()),
        ("TOLLGATE_OLD_MASTER_KEY", KEY_B.into()),
    ];
    let out = gw.cli(&["accounts", "rotate-encryption"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    gw.env = vec![("TOLLGATE_MASTER_KEY", KEY_B.into())];
    let (code, stderr) = start_fails(&gw).await;
    assert_eq!(code, Some(1), "{stderr}");
    gw.env = vec![("TOLLGATE_MASTER_KEY", KEY_A.into())];
    gw.start().await;
    assert_eq!(gw.chat_status(&key).await, 200);
    assert_eq!(
        mock.recorded()[1].headers["authorization"],
        format!("Bearer {secret}")
    );
    assert!(!gw.db.dump().await.contains(secret));
}

both_dbs!(
    a_credential_that_is_not_a_header_value_is_refused_at_the_door,
    header_values
);
async fn header_values(db: Db) {
    let injected = "abc\r\nX-Injected: 1";
    let mock = MockUpstream::json_ok().await;
    let mut gw = Gateway::new(db, "", "").await.unwrap();
    gw.admin_token = Some(TOKEN.into());
    let out = gw.cli(&[
        "accounts",
        "add",
        "--name",
        "bad",
        "--type",
        "openai",
        "--base-url",
        &mock.url(),
        "--api-key",
        injected,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        error_lines(&String::from_utf8_lossy(&out.stderr)),
        ["tollgate: --api-key: must not contain control characters (it is sent in a header)"]
    );
    assert_eq!(
        gw.db.scalar("SELECT count(*) FROM upstream_accounts").await,
        0
    );
    assert!(
        !default_key_file(&gw).exists(),
        "refused before the keyring is opened"
    );

    gw.add_account("good", "openai", &mock.url(), "sk-good", 1, 1);
    gw.start().await;
    let added = gw
        .admin(Method::POST, "/admin/accounts")
        .json(&serde_json::json!({"name": "bad", "type": "openai",
            "base_url": mock.url(), "api_key": injected}))
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), 400);
    let body = added.text().await.unwrap();
    assert!(
        body.contains("must not contain control characters"),
        "{body}"
    );
    let patched = gw
        .admin(Method::PATCH, "/admin/accounts/1")
        .json(&serde_json::json!({"api_key": injected}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 400);
    assert_eq!(
        gw.db.scalar("SELECT count(*) FROM upstream_accounts").await,
        1
    );
    let stored = stored_credentials(&gw).await;
    assert!(!stored[0].contains("X-Injected"));
    assert_eq!(mock.count(), 0);
}
