//! Plans and subscriptions end to end (`store/plans.rs`; the limits stage and the spend stage
//! read them with the key): a plan's rate limit holding a subscriber's keys together and a
//! change to it reaching the running gateway, a plan's budget applying to each subscriber on
//! their own, periods anchored at each subscription's start rolling over with nothing to run
//! (a store-level test on an injected clock), `usage --check` holding, and the audit rows of
//! plan actions; on SQLite and PostgreSQL.

mod common;

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::{client, dec, header, post, rows, usage_row, Db, Gateway, MockUpstream, BODY};

use tollgate::record::{Metric, Period, Pool};
use tollgate::store::{Actor, LeaseOutcome, LimitColumns, PlanBudget, Store};

both_dbs!(a_plans_rpm_limits_a_subscriber, plan_rpm);
async fn plan_rpm(db: Db) {
    let mock = MockUpstream::json_ok().await;
    let mut gw = Gateway::new(db, "", "").await.unwrap();
    gw.add_user("alice@example.com");
    gw.add_user("bob@example.com");
    gw.add_account("main", "openai", &mock.url(), "sk-up", 1, 1);
    let k1 = gw.create_key("alice@example.com", &[]);
    let k2 = gw.create_key("alice@example.com", &[]);
    let other = gw.create_key("bob@example.com", &[]);
    gw.cli_ok(&["plans", "add", "basic", "--rpm", "5"]);
    // Bad values change nothing and say what is wrong in one line.
    for (args, want) in [
        (
            vec!["plans", "add", "bad", "--rpm", "-1"],
            "--rpm: -1 is negative",
        ),
        (
            vec!["plans", "add", "bad", "--budget", "tokens:10"],
            "want METRIC:LIMIT:PERIOD",
        ),
        (
            vec!["plans", "add", "bad", "--budget", "tokens:1.5:day"],
            "--budget: tokens are counted whole",
        ),
        (vec!["plans", "add", "basic"], "plan basic already exists"),
        (
            vec!["users", "subscribe", "alice@example.com", "--plan", "gold"],
            "plan gold not found",
        ),
        (
            vec!["users", "unsubscribe", "alice@example.com"],
            "not found",
        ),
    ] {
        let out = gw.cli(&args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    gw.cli_ok(&["users", "subscribe", "alice@example.com", "--plan", "basic"]);
    let plans = gw.cli_json(&["plans", "list", "--json"]);
    assert_eq!(plans.as_array().unwrap().len(), 1, "{plans}");
    assert_eq!(plans[0]["name"], "basic");
    assert_eq!(plans[0]["limits"]["rpm"], 5);
    assert_eq!(plans[0]["subscribers"], 1);
    gw.start().await;

    // Five between the subscriber's two keys, then 429: the plan's limit is the user's.
    let c = client();
    let mut sent = 0;
    for key in [&k1, &k2, &k1, &k2, &k1] {
        sent += 1;
        let r = post(&gw, &c, key, BODY).await;
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(
            header(&r, "x-ratelimit-limit-requests").as_deref(),
            Some("5")
        );
    }
    let r = post(&gw, &c, &k2, BODY).await;
    sent += 1;
    assert_eq!(r.status().as_u16(), 429);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("this API key's user"),
        "{v}"
    );
    assert_eq!(mock.count(), 5, "the refusal never reached the upstream");
    // A user who is not subscribed is not limited.
    for _ in 0..6 {
        assert_eq!(post(&gw, &c, &other, BODY).await.status(), 200);
        sent += 1;
    }

    // Raising the plan's limit reaches the running gateway (the change poll, ~1 s).
    gw.cli_ok(&["plans", "update", "basic", "--rpm", "1000"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = post(&gw, &c, &k1, BODY).await;
        sent += 1;
        if r.status() == 200 {
            assert_eq!(
                header(&r, "x-ratelimit-limit-requests").as_deref(),
                Some("1000")
            );
            break;
        }
        assert!(Instant::now() < deadline, "the new limit never arrived");
    }
    // The user's own limit wins over the plan's. (Until it arrives the bucket may still be
    // full from the first five: at 1000 rpm it lets one through every 60 ms.)
    gw.cli_ok(&["users", "update", "alice@example.com", "--rpm", "0"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = post(&gw, &c, &k1, BODY).await;
        sent += 1;
        if r.status() == 200 && header(&r, "x-ratelimit-limit-requests").is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the user's own limit never arrived"
        );
    }
    rows(&gw, sent).await;
    gw.assert_invariants();
}

both_dbs!(a_plans_budget_applies_to_each_subscriber, plan_budget);
async fn plan_budget(db: Db) {
    let mock = MockUpstream::json_ok().await;
    let mut gw = Gateway::new(db, "", "").await.unwrap();
    gw.add_user("alice@example.com");
    gw.add_user("bob@example.com");
    gw.add_account("main", "openai", &mock.url(), "sk-up", 1, 1);
    let alice = gw.create_key("alice@example.com", &[]);
    let bob = gw.create_key("bob@example.com", &[]);
    gw.cli_ok(&[
        "plans",
        "add",
        "trial",
        "--budget",
        "requests:3:day",
        "--budget",
        "cost:50:month",
    ]);
    for email in ["alice@example.com", "bob@example.com"] {
        gw.cli_ok(&["users", "subscribe", email, "--plan", "trial"]);
    }
    let plans = gw.cli_json(&["plans", "list", "--json"]);
    assert_eq!(plans[0]["budgets"].as_array().unwrap().len(), 2, "{plans}");
    assert_eq!(plans[0]["subscribers"], 2);
    gw.start().await;

    let c = client();
    let mut sent = 0;
    for key in [&alice, &bob] {
        for _ in 0..3 {
            assert_eq!(post(&gw, &c, key, BODY).await.status(), 200);
            sent += 1;
        }
        let r = post(&gw, &c, key, BODY).await;
        sent += 1;
        assert_eq!(r.status(), 429);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "budget_exceeded", "{v}");
    }
    assert_eq!(mock.count(), 6, "three each, separately");
    rows(&gw, sent).await;
    gw.assert_invariants();

    // Changing the plan's budget reaches the running gateway: one more each.
    let out = gw.cli_ok(&[
        "budgets", "set", "--plan", "trial", "--metric", "requests", "--limit", "4", "--period",
        "day",
    ]);
    assert!(out.parse::<i64>().is_ok(), "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while post(&gw, &c, &alice, BODY).await.status() != 200 {
        sent += 1;
        assert!(Instant::now() < deadline, "the new budget never arrived");
    }
    sent += 1;
    assert_eq!(post(&gw, &c, &alice, BODY).await.status(), 429);
    sent += 1;
    // Unsubscribed: the plan's budget no longer applies.
    gw.cli_ok(&["users", "unsubscribe", "bob@example.com"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while post(&gw, &c, &bob, BODY).await.status() != 200 {
        sent += 1;
        assert!(
            Instant::now() < deadline,
            "the unsubscription never arrived"
        );
    }
    sent += 1;
    rows(&gw, sent).await;
    gw.assert_invariants();

    // Every plan action is in the audit log, in its transaction.
    let log = gw.cli_json(&["audit", "--json", "--limit", "10000"]);
    let actions: Vec<(&str, &str)> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap(),
                r["target_type"].as_str().unwrap(),
            )
        })
        .collect();
    for want in [
        ("plan.create", "plan"),
        ("user.subscribe", "user"),
        ("budget.set", "budget"),
        ("user.unsubscribe", "user"),
    ] {
        assert!(actions.contains(&want), "{want:?} in {actions:?}");
    }
    let created = log
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["action"] == "plan.create")
        .unwrap();
    assert_eq!(created["after"]["name"], "trial");
    assert_eq!(created["after"]["budgets"].as_array().unwrap().len(), 2);
    let sub = log
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["action"] == "user.unsubscribe")
        .unwrap();
    assert_eq!(sub["before"]["status"], "active", "{sub}");
    assert_eq!(sub["after"]["status"], "canceled", "{sub}");
    gw.cli_ok(&["plans", "update", "trial", "--rpm", "100"]);
    let log = gw.cli_json(&["audit", "--json", "--target", "plan"]);
    let update = &log[0];
    assert_eq!(update["action"], "plan.update");
    assert_eq!(update["before"]["limits"]["rpm"], serde_json::Value::Null);
    assert_eq!(update["after"]["limits"]["rpm"], 100);
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

both_dbs!(
    plan_periods_are_anchored_at_the_subscription_start,
    anchored
);
async fn anchored(db: Db) {
    let test_db = common::TestDb::new(db).await.unwrap();
    let store = Store::connect(&test_db.url, 2).await.unwrap();
    let actor = Actor::system("test");
    let mut tx = store.begin().await.unwrap();
    let (mut users, mut keys) = (Vec::new(), Vec::new());
    for (i, email) in ["alice@example.com", "bob@example.com"].iter().enumerate() {
        let u = tx
            .create_user(email, &format!("u{i}"), "user")
            .await
            .unwrap();
        let k = tx
            .create_key(
                u,
                "k",
                &format!("h{i}"),
                &format!("tg_{i}"),
                &serde_json::json!([]),
                None,
                &Default::default(),
            )
            .await
            .unwrap();
        users.push(u);
        keys.push(k);
    }
    tx.commit_unaudited().await.unwrap();
    let (alice, bob) = (users[0], users[1]);
    // The injected clock: alice subscribes to a monthly plan on January 31st, bob on the 10th.
    let jan31 = at("2026-01-31T10:00:00Z");
    let plan = store
        .create_plan(
            &actor,
            "monthly",
            &LimitColumns::default(),
            &[PlanBudget {
                metric: Metric::Tokens,
                period: Period::Month,
                limit: dec("100"),
            }],
            jan31,
        )
        .await
        .unwrap();
    let budget = plan.budgets[0].id;
    store
        .subscribe(&actor, alice, plan.id, jan31, None, jan31)
        .await
        .unwrap();
    store
        .subscribe(
            &actor,
            bob,
            plan.id,
            at("2026-01-10T00:00:00Z"),
            None,
            jan31,
        )
        .await
        .unwrap();
    let pool = |user: i64, start: &str| Pool::Budget {
        budget_id: budget,
        subject_id: user,
        metric: Metric::Tokens,
        period_start: at(start),
    };
    let ttl = chrono::Duration::seconds(30);
    // Alice's first period runs to February 28th (a month from the 31st ends on the last day of
    // a shorter month): 90 of it used on the 27th, 10 left.
    let feb27 = at("2026-02-27T12:00:00Z");
    store
        .insert_usage(&[usage_row("a1", keys[0], alice, 90, feb27)])
        .await
        .unwrap();
    assert_eq!(
        store
            .take_lease(
                "i1",
                &pool(alice, "2026-01-31T10:00:00Z"),
                dec("20"),
                dec("20"),
                ttl,
                feb27
            )
            .await
            .unwrap(),
        LeaseOutcome::Exhausted {
            available: dec("10")
        }
    );
    // Bob's own period (from the 10th) is untouched by alice's use.
    assert!(matches!(
        store
            .take_lease("i1", &pool(bob, "2026-02-10T00:00:00Z"), dec("100"), dec("100"), ttl, feb27)
            .await
            .unwrap(),
        LeaseOutcome::Granted { amount, .. } if amount == dec("100")
    ));
    // At 10:00 on February 28th alice's period rolls over with nothing run: the whole limit
    // again, and a row just after is charged to the new period.
    let feb28 = at("2026-02-28T10:00:01Z");
    assert!(matches!(
        store
            .take_lease("i1", &pool(alice, "2026-02-28T10:00:00Z"), dec("100"), dec("100"), ttl, feb28)
            .await
            .unwrap(),
        LeaseOutcome::Granted { amount, .. } if amount == dec("100")
    ));
    store
        .insert_usage(&[usage_row("a2", keys[0], alice, 30, feb28)])
        .await
        .unwrap();
    let listing = store.list_budgets(None, feb28).await.unwrap();
    let alice_now: Vec<_> = listing[0]
        .periods
        .iter()
        .filter(|p| p.subject_id == alice)
        .map(|p| (p.period_start, p.spent))
        .collect();
    assert_eq!(alice_now, vec![(at("2026-02-28T10:00:00Z"), dec("30"))]);
    let report = store.spend_invariants().await.unwrap();
    assert!(report.holds(), "{report:?}");

    // A budget added to the plan later counts what each subscriber already used in their
    // current period (alice: 30 since February 28th; bob: nothing since the 10th).
    let later = at("2026-03-01T00:00:00Z");
    let requests = store
        .set_budget(
            &actor,
            tollgate::store::BudgetOwner::Plan(plan.id),
            Metric::Requests,
            Period::Month,
            dec("10"),
            later,
        )
        .await
        .unwrap();
    let listing = store.list_budgets(None, later).await.unwrap();
    let seeded: Vec<_> = listing
        .iter()
        .find(|b| b.budget.id == requests.id)
        .unwrap()
        .periods
        .iter()
        .map(|p| (p.subject_id, p.period_start, p.spent))
        .collect();
    assert!(
        seeded.contains(&(alice, at("2026-02-28T10:00:00Z"), dec("1"))),
        "{seeded:?}"
    );
    assert!(
        seeded.contains(&(bob, at("2026-02-10T00:00:00Z"), dec("0"))),
        "{seeded:?}"
    );
    assert!(store.spend_invariants().await.unwrap().holds());

    // Subscribing again from another start: the periods start afresh from it, counting what
    // was used since (alice: 90 + 30 tokens from February 15th on, over the limit).
    store
        .subscribe(
            &actor,
            alice,
            plan.id,
            at("2026-02-15T00:00:00Z"),
            Some(at("2026-03-15T00:00:00Z")),
            later,
        )
        .await
        .unwrap();
    let listing = store.list_budgets(None, later).await.unwrap();
    let tokens: Vec<_> = listing
        .iter()
        .find(|b| b.budget.id == budget)
        .unwrap()
        .periods
        .iter()
        .filter(|p| p.subject_id == alice)
        .map(|p| (p.period_start, p.spent, p.leased))
        .collect();
    assert_eq!(
        tokens,
        vec![(at("2026-02-15T00:00:00Z"), dec("120"), dec("0"))]
    );
    let report = store.spend_invariants().await.unwrap();
    assert!(report.holds(), "{report:?}");
    // Unsubscribed: the plan's budgets no longer reach alice's keys, and nothing is left to
    // disagree with her rows.
    store.unsubscribe(&actor, alice, later).await.unwrap();
    let spend = store.spend_of_keys(&[(keys[0], alice)]).await.unwrap();
    assert!(spend[0].budgets.is_empty(), "{:?}", spend[0]);
    let spend = store.spend_of_keys(&[(keys[1], bob)]).await.unwrap();
    assert_eq!(spend[0].budgets.len(), 2);
    assert_eq!(spend[0].budgets[0].1, Some(at("2026-01-10T00:00:00Z")));
    assert!(store.spend_invariants().await.unwrap().holds());
    store.close().await;
}
