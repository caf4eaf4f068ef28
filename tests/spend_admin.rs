//! Spend control through the admin API (`admin.rs`, `ops.rs`): credit grants with an
//! `Idempotency-Key` (the same key and body answer the first receipt again and grant nothing;
//! the same key with another body is refused, 409, and grants nothing), amounts refused with
//! 400 naming the field and nothing written, balances and the ledger, budgets set, listed and
//! deleted, and every change in the audit log as done by `admin-token:<name>`. The real binary
//! on SQLite and PostgreSQL.

mod common;

use common::{Db, Gateway, TestDb};
use reqwest::Method;
use serde_json::{json, Value};

const TOKEN: &str = "spend-admin-token-8e7d6c5b4a39";
const ACTOR: &str = "admin-token:money";

async fn count(db: &TestDb, sql: &str) -> i64 {
    db.scalar(sql).await
}

/// A gateway with the admin API on, a user (id 1) and a key of theirs (id 1).
async fn gateway(db: Db) -> Gateway {
    let mut gw = Gateway::new(db, "", "").await.unwrap();
    gw.admin_token = Some(TOKEN.into());
    gw.set_admin("token_name = \"money\"");
    gw.add_user("alice@example.com");
    gw.create_key("alice@example.com", &[]);
    gw.start().await;
    gw
}

/// Sends a request to the admin API: (status, `Idempotent-Replayed`, body as JSON or Null).
async fn send(
    gw: &Gateway,
    method: Method,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Option<String>, Value) {
    let mut r = gw.admin(method, path);
    if let Some(k) = key {
        r = r.header("Idempotency-Key", k);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let replayed = r
        .headers()
        .get("idempotent-replayed")
        .map(|v| v.to_str().unwrap().to_string());
    let text = r.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    };
    (status, replayed, body)
}

/// An amount of a response: a decimal string (its scale may differ between the backends:
/// PostgreSQL's NUMERIC keeps 10 places).
fn dec(v: &Value) -> rust_decimal::Decimal {
    v.as_str()
        .unwrap_or_else(|| panic!("{v} is not a string"))
        .parse()
        .unwrap()
}

fn d(s: &str) -> rust_decimal::Decimal {
    s.parse().unwrap()
}

fn grant(amount: &str) -> Value {
    json!({ "amount": amount, "note": "top-up" })
}

both_dbs!(credits_through_the_admin_api, credits);
async fn credits(db: Db) {
    let gw = gateway(db).await;
    let ledger_rows = "SELECT COUNT(*) FROM credit_transactions";

    // Never granted: not prepaid, amounts 0 as strings.
    let (status, _, balance) = send(&gw, Method::GET, "/admin/users/1/credits", None, None).await;
    assert_eq!(status, 200, "{balance}");
    assert_eq!(
        balance,
        json!({"user_id": 1, "prepaid": false, "balance": "0", "leased": "0", "overdraft": "0"})
    );

    // A grant with a key: 201 and the receipt.
    let path = "/admin/users/1/credits";
    let (status, replayed, first) = send(
        &gw,
        Method::POST,
        path,
        Some("topup-1"),
        Some(grant("5.00")),
    )
    .await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(replayed, None);
    assert_eq!(first["user_id"], 1);
    assert_eq!(first["amount"], "5", "{first}");
    assert!(first["transaction_id"].is_i64() && first["grant_id"].is_i64());
    assert_eq!(first["expires_at"], Value::Null);
    assert_eq!(dec(&first["balance"]), d("5"), "{first}");

    // The same key and body (the amount written otherwise): the same receipt, marked, nothing
    // granted again, no audit row.
    gw.add_user("bob@example.com");
    let audit_rows = count(&gw.db, "SELECT COUNT(*) FROM admin_log").await;
    for amount in ["5.00", "5"] {
        let (status, replayed, again) = send(
            &gw,
            Method::POST,
            path,
            Some("topup-1"),
            Some(grant(amount)),
        )
        .await;
        assert_eq!(status, 201, "{again}");
        assert_eq!(replayed.as_deref(), Some("true"));
        assert_eq!(again, first);
    }
    assert_eq!(count(&gw.db, ledger_rows).await, 1, "one ledger row");
    assert_eq!(
        count(&gw.db, "SELECT COUNT(*) FROM admin_log").await,
        audit_rows
    );

    // The same key with another body, or for another user: 409, nothing granted.
    for (path, body) in [
        (path, grant("6")),
        (path, json!({"amount": "5.00", "note": "another note"})),
        (
            path,
            json!({"amount": "5.00", "note": "top-up", "refund": true}),
        ),
        (
            path,
            json!({"amount": "5.00", "note": "top-up", "expires_in": "30d"}),
        ),
        ("/admin/users/2/credits", grant("5.00")),
    ] {
        let (status, replayed, body) =
            send(&gw, Method::POST, path, Some("topup-1"), Some(body)).await;
        assert_eq!(status, 409, "{path}: {body}");
        assert_eq!(replayed, None);
        assert_eq!(body["error"]["type"], "idempotency_error", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("\"topup-1\"") && message.contains("different request"),
            "{message}"
        );
    }
    assert_eq!(count(&gw.db, ledger_rows).await, 1);
    assert_eq!(
        count(&gw.db, "SELECT COUNT(*) FROM admin_log").await,
        audit_rows
    );

    // Bad input: 400 naming the field, nothing written (not even an idempotency record: the
    // same key works afterwards).
    let records = "SELECT COUNT(*) FROM idempotency_records";
    let before_records = count(&gw.db, records).await;
    for (body, field) in [
        (json!({"amount": "-1"}), "amount"),
        (json!({"amount": "0"}), "amount"),
        (json!({"amount": "0.00"}), "amount"),
        (json!({"amount": "0.00000000001"}), "amount"),
        (json!({"amount": "1e3"}), "amount"),
        (json!({"amount": " 5"}), "amount"),
        (json!({"amount": "+5"}), "amount"),
        (json!({"amount": "05"}), "amount"),
        (json!({"amount": ".5"}), "amount"),
        (json!({"amount": "abc"}), "amount"),
        (json!({"amount": "1000000000.5"}), "amount"),
        (json!({"amount": 5}), "amount"),
        (json!({"amount": 5.5}), "amount"),
        (json!({"amount": null}), "amount"),
        (json!({}), "amount"),
        (json!({"amount": "5", "expires_in": "soon"}), "expires_in"),
        (json!({"amount": "5", "note": "a\u{0}b"}), "note"),
        (json!({"amount": "5", "user": "bob@example.com"}), "user"),
        (json!({"amount": "5", "refund": null}), "body"),
    ] {
        let (status, _, answer) = send(
            &gw,
            Method::POST,
            path,
            Some("fresh-key"),
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"]["type"], "invalid_request_error");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{body}: {message}");
    }
    let long_key = "k".repeat(256);
    for key in [long_key.as_str(), "a\tb"] {
        let (status, _, answer) = send(&gw, Method::POST, path, Some(key), Some(grant("1"))).await;
        assert_eq!(status, 400, "{key:?}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.starts_with("idempotency_key: "), "{message}");
    }
    let (status, _, answer) = send(&gw, Method::POST, path, None, None).await;
    assert_eq!(status, 400, "{answer}");
    for (path, status) in [
        ("/admin/users/99/credits", 404),
        ("/admin/users/x/credits", 400),
    ] {
        let (got, _, answer) = send(&gw, Method::POST, path, None, Some(grant("1"))).await;
        assert_eq!(got, status, "{path}: {answer}");
    }
    assert_eq!(count(&gw.db, ledger_rows).await, 1);
    assert_eq!(count(&gw.db, records).await, before_records);
    assert_eq!(
        count(&gw.db, "SELECT COUNT(*) FROM admin_log").await,
        audit_rows
    );

    // A grant without a key, a refund with a lifetime: each its own row.
    let (status, _, second) = send(&gw, Method::POST, path, None, Some(grant("2.5"))).await;
    assert_eq!(status, 201, "{second}");
    let (status, _, refund) = send(
        &gw,
        Method::POST,
        path,
        Some("fresh-key"),
        Some(json!({"amount": "0.0000000001", "refund": true, "expires_in": "30d"})),
    )
    .await;
    assert_eq!(status, 201, "{refund}");
    assert!(refund["expires_at"].is_string(), "{refund}");

    // The balance and the ledger, newest first, amounts as strings.
    let (status, _, balance) = send(&gw, Method::GET, path, None, None).await;
    assert_eq!(status, 200);
    assert_eq!(balance["prepaid"], true);
    assert_eq!(dec(&balance["balance"]), d("7.5000000001"), "{balance}");
    for field in ["leased", "overdraft"] {
        assert_eq!(dec(&balance[field]), d("0"), "{balance}");
    }
    let history = format!("{path}/history");
    let (status, _, rows) = send(&gw, Method::GET, &history, None, None).await;
    assert_eq!(status, 200, "{rows}");
    let rows = rows.as_array().unwrap();
    let actions: Vec<&str> = rows.iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["refund", "grant", "grant"]);
    assert_eq!(rows[2]["idempotency_key"], "topup-1");
    assert_eq!(rows[2]["metadata"]["note"], "top-up");
    assert_eq!(rows[2]["id"], first["transaction_id"]);
    assert_eq!(rows[1]["idempotency_key"], Value::Null);
    for r in rows {
        for field in ["amount", "balance_before", "balance_after"] {
            dec(&r[field]);
        }
    }
    let (_, _, one) = send(&gw, Method::GET, &format!("{history}?limit=1"), None, None).await;
    assert_eq!(one.as_array().unwrap().len(), 1);
    assert_eq!(one[0]["action"], "refund");
    for (path, status) in [
        (format!("{history}?limit=0"), 400),
        (format!("{history}?limit=100001"), 400),
        (format!("{history}?limit=x"), 400),
        ("/admin/users/99/credits/history".into(), 404),
        ("/admin/users/99/credits".into(), 404),
    ] {
        let (got, _, answer) = send(&gw, Method::GET, &path, None, None).await;
        assert_eq!(got, status, "{path}: {answer}");
    }

    // The audit log: one row per grant, as the admin token, the receipt as the after.
    let (status, _, audit) = send(
        &gw,
        Method::GET,
        "/admin/audit?target_type=user&target_id=1",
        None,
        None,
    )
    .await;
    assert_eq!(status, 200);
    let credit_rows: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"].as_str().unwrap().starts_with("credits."))
        .collect();
    let actions: Vec<&str> = credit_rows
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["credits.refund", "credits.grant", "credits.grant"]
    );
    for r in &credit_rows {
        assert_eq!(r["actor"], ACTOR, "{r}");
    }
    assert_eq!(credit_rows[2]["after"], first);
    assert_eq!(credit_rows[0]["after"], refund);

    // The CLI shares the key space: the same key and request answer the API's receipt.
    let out = gw.cli(&[
        "credits",
        "grant",
        "--user",
        "alice@example.com",
        "--amount",
        "5",
        "--note",
        "top-up",
        "--idempotency-key",
        "topup-1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("already granted"));
    assert_eq!(count(&gw.db, ledger_rows).await, 3);

    // Eight at once with one new key: one grant; the others answer its receipt, or 409 while
    // it is being made (PostgreSQL), never a second grant or a 500.
    let answers = futures_util::future::join_all(
        (0..8).map(|_| send(&gw, Method::POST, path, Some("race-1"), Some(grant("1")))),
    )
    .await;
    let granted: Vec<&Value> = answers
        .iter()
        .filter(|(status, replayed, _)| *status == 201 && replayed.is_none())
        .map(|(_, _, body)| body)
        .collect();
    assert_eq!(granted.len(), 1, "{answers:?}");
    for (status, replayed, body) in &answers {
        match (status, replayed.as_deref()) {
            (201, None) => {}
            (201, Some("true")) => assert_eq!(body, granted[0]),
            (409, None) => assert_eq!(body["error"]["type"], "idempotency_error"),
            _ => panic!("{status} {replayed:?} {body}"),
        }
    }
    assert_eq!(count(&gw.db, ledger_rows).await, 4);

    gw.assert_invariants();
}

both_dbs!(budgets_through_the_admin_api, budgets);
async fn budgets(db: Db) {
    let gw = gateway(db).await;
    let (status, _, list) = send(&gw, Method::GET, "/admin/budgets", None, None).await;
    assert_eq!((status, list), (200, json!([])));

    let (status, _, key_budget) = send(
        &gw,
        Method::POST,
        "/admin/budgets",
        None,
        Some(json!({"key": 1, "metric": "cost", "limit": "5.00", "period": "day"})),
    )
    .await;
    assert_eq!(status, 200, "{key_budget}");
    assert_eq!(dec(&key_budget["limit"]), d("5"));
    assert_eq!(
        key_budget,
        json!({"id": key_budget["id"], "api_key_id": 1, "user_id": null, "plan_id": null,
               "metric": "cost", "period": "day", "limit": key_budget["limit"]})
    );
    let (status, _, user_budget) = send(
        &gw,
        Method::POST,
        "/admin/budgets",
        None,
        Some(json!({"user": "alice@example.com", "metric": "requests", "limit": "100", "period": "month"})),
    )
    .await;
    assert_eq!(status, 200, "{user_budget}");
    assert_eq!(user_budget["user_id"], 1);
    // Set again: the same budget, its limit replaced.
    let (status, _, replaced) = send(
        &gw,
        Method::POST,
        "/admin/budgets",
        None,
        Some(json!({"key": 1, "metric": "cost", "limit": "7.5", "period": "day"})),
    )
    .await;
    assert_eq!(status, 200, "{replaced}");
    assert_eq!(replaced["id"], key_budget["id"]);
    assert_eq!(dec(&replaced["limit"]), d("7.5"));

    let (status, _, list) = send(&gw, Method::GET, "/admin/budgets", None, None).await;
    assert_eq!(status, 200);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2, "{list:#?}");
    assert_eq!(list[0]["id"], key_budget["id"]);
    assert_eq!(list[0]["owner"], "1");
    assert_eq!(dec(&list[0]["limit"]), d("7.5"));
    assert_eq!(list[1]["owner"], "alice@example.com");
    for b in list {
        let periods = b["periods"].as_array().unwrap();
        assert_eq!(periods.len(), 1, "the current period, started at set: {b}");
        assert_eq!(dec(&periods[0]["spent"]), d("0"));
        assert_eq!(dec(&periods[0]["leased"]), d("0"));
        assert!(periods[0]["period_start"].is_string());
    }

    // Refused: nothing written.
    let budgets_rows = "SELECT COUNT(*) FROM budgets";
    let audit_rows = count(&gw.db, "SELECT COUNT(*) FROM admin_log").await;
    for (body, status, field) in [
        (
            json!({"metric": "cost", "limit": "1", "period": "day"}),
            400,
            "owner",
        ),
        (
            json!({"key": 1, "user": "alice@example.com", "metric": "cost", "limit": "1", "period": "day"}),
            400,
            "owner",
        ),
        (
            json!({"key": 1, "metric": "cost", "limit": 1, "period": "day"}),
            400,
            "limit",
        ),
        (
            json!({"key": 1, "metric": "cost", "limit": "-1", "period": "day"}),
            400,
            "limit",
        ),
        (
            json!({"key": 1, "metric": "requests", "limit": "1.5", "period": "day"}),
            400,
            "limit",
        ),
        (
            json!({"key": 1, "metric": "dollars", "limit": "1", "period": "day"}),
            400,
            "metric",
        ),
        (
            json!({"key": 1, "metric": "cost", "limit": "1", "period": "year"}),
            400,
            "period",
        ),
        (
            json!({"key": 1, "metric": "cost", "limit": "1", "period": "day", "plan": "pro"}),
            400,
            "exactly one",
        ),
        (
            json!({"key": 1, "metric": "cost", "limit": "1", "period": "day", "bogus": 1}),
            400,
            "bogus",
        ),
        (
            json!({"key": 99, "metric": "cost", "limit": "1", "period": "day"}),
            404,
            "99",
        ),
        (
            json!({"user": "nobody@example.com", "metric": "cost", "limit": "1", "period": "day"}),
            404,
            "nobody",
        ),
    ] {
        let (got, _, answer) = send(
            &gw,
            Method::POST,
            "/admin/budgets",
            None,
            Some(body.clone()),
        )
        .await;
        assert_eq!(got, status, "{body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{body}: {message}");
    }
    assert_eq!(count(&gw.db, budgets_rows).await, 2);
    assert_eq!(
        count(&gw.db, "SELECT COUNT(*) FROM admin_log").await,
        audit_rows
    );

    // Delete: 204 with no body, then 404.
    let path = format!("/admin/budgets/{}", key_budget["id"]);
    let (status, _, body) = send(&gw, Method::DELETE, &path, None, None).await;
    assert_eq!((status, body), (204, Value::Null));
    let (status, _, body) = send(&gw, Method::DELETE, &path, None, None).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["type"], "not_found");
    let (status, _, _) = send(&gw, Method::DELETE, "/admin/budgets/x", None, None).await;
    assert_eq!(status, 400);
    let (_, _, list) = send(&gw, Method::GET, "/admin/budgets", None, None).await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], user_budget["id"]);

    // Audited as the admin token: set, set (replaced), set, delete.
    let (_, _, audit) = send(
        &gw,
        Method::GET,
        "/admin/audit?target_type=budget",
        None,
        None,
    )
    .await;
    let mut rows = audit.as_array().unwrap().clone();
    rows.reverse();
    let summary: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap(),
                r["target_id"].as_str().unwrap(),
            )
        })
        .collect();
    let (k, u) = (key_budget["id"].to_string(), user_budget["id"].to_string());
    assert_eq!(
        summary,
        [
            ("budget.set", k.as_str()),
            ("budget.set", u.as_str()),
            ("budget.set", k.as_str()),
            ("budget.delete", k.as_str()),
        ]
    );
    for r in &rows {
        assert_eq!(r["actor"], ACTOR, "{r}");
    }
    assert_eq!(rows[0]["before"], Value::Null);
    assert_eq!(rows[0]["after"], key_budget);
    assert_eq!(dec(&rows[2]["before"]["limit"]), d("5"));
    assert_eq!(rows[2]["after"], replaced);
    assert_eq!(rows[3]["before"], replaced);
    assert_eq!(rows[3]["after"], Value::Null);
}
