//! Plans and subscriptions: a named plan carries rate limits (migration 0010) and budgets
//! (`budgets.plan_id`); a user subscribed to it (`subscriptions`, one per user) gets the plan's
//! limits where they have none of their own (read with the key: `store/catalog.rs`) and each of
//! its budgets on their own, in periods anchored at `current_period_start` (`store/spend.rs`).
//!
//! Every change is one [`Tx`] with its audit row, and bumps `users.updated_at` of the users it
//! affects (and NOTIFYs their keys) so running gateways reload them within a second.
//!
//! A subscription that starts again (another plan, or another start) forgets the user's
//! periods of the plans involved and writes the new current periods with what the user already
//! used in them, as a new budget does; so every period's `spent` stays the sum of its rows (the
//! spend invariants) whatever the history of the subscription.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::spend::{
    budget_row, drop_plan_periods, owner_keys_changed, seed_period, touch_owner, BUDGET_COLUMNS, R,
    V,
};
use super::{
    Actor, BudgetOwner, BudgetRow, LimitColumns, LimitPatch, Store, StoreError, Target, Tx,
};
use crate::budget::{Metric, Period};

/// A plan as listed and as its audit snapshots show it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PlanRow {
    pub id: i64,
    pub name: String,
    /// Per subscriber, over all of their keys (`None` = none).
    pub limits: LimitColumns,
    pub budgets: Vec<BudgetRow>,
    /// Active subscriptions.
    pub subscribers: i64,
}

/// A user's subscription.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SubscriptionRow {
    pub user_id: i64,
    pub plan_id: i64,
    pub plan: String,
    /// `active`, or `canceled` after `users unsubscribe`.
    pub status: String,
    /// Where the plan's budget periods are anchored.
    pub current_period_start: DateTime<Utc>,
    /// Recorded (the billing system's period end); the periods roll over by themselves.
    pub current_period_end: Option<DateTime<Utc>>,
}

/// A budget of a new plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanBudget {
    pub metric: Metric,
    pub period: Period,
    pub limit: Decimal,
}

fn limits_of(r: &R) -> Result<LimitColumns, sqlx::Error> {
    Ok(LimitColumns {
        rpm: r.oi64("rpm")?,
        rpd: r.oi64("rpd")?,
        tpm: r.oi64("tpm")?,
        max_concurrent: r.oi64("max_concurrent")?,
    })
}

fn subscription_of(r: &R) -> Result<SubscriptionRow, sqlx::Error> {
    Ok(SubscriptionRow {
        user_id: r.i64("user_id")?,
        plan_id: r.i64("plan_id")?,
        plan: r.text("plan")?,
        status: r.text("status")?,
        current_period_start: r.ts("current_period_start")?,
        current_period_end: r.ots("current_period_end")?,
    })
}

impl Tx {
    /// A plan with its budgets and active subscribers; `None`: no such plan.
    async fn plan(&mut self, id: i64) -> Result<Option<PlanRow>, StoreError> {
        let Some(r) = self
            .row(
                "SELECT p.id, p.name, p.rpm, p.rpd, p.tpm, p.max_concurrent, \
                 (SELECT COUNT(*) FROM subscriptions s WHERE s.plan_id = p.id AND s.status = 'active') AS subscribers \
                 FROM plans p WHERE p.id = $1",
                &[V::I(id)],
            )
            .await?
        else {
            return Ok(None);
        };
        let budgets = self
            .rows(
                &format!(
                    "SELECT {BUDGET_COLUMNS} FROM budgets b WHERE b.plan_id = $1 ORDER BY b.id"
                ),
                &[V::I(id)],
            )
            .await?
            .iter()
            .map(budget_row)
            .collect::<Result<_, _>>()?;
        Ok(Some(PlanRow {
            id: r.i64("id")?,
            name: r.text("name")?,
            limits: limits_of(&r)?,
            budgets,
            subscribers: r.i64("subscribers")?,
        }))
    }

    /// A user's subscription (active or not), locked on PostgreSQL.
    async fn subscription(&mut self, user_id: i64) -> Result<Option<SubscriptionRow>, StoreError> {
        let lock = self.for_update();
        let locked = format!("SELECT id FROM subscriptions WHERE user_id = $1{lock}");
        if self.row(&locked, &[V::I(user_id)]).await?.is_none() {
            return Ok(None);
        }
        let r = self
            .row(
                "SELECT s.user_id, s.plan_id, p.name AS plan, s.status, s.current_period_start, \
                 s.current_period_end FROM subscriptions s JOIN plans p ON p.id = s.plan_id WHERE s.user_id = $1",
                &[V::I(user_id)],
            )
            .await?;
        Ok(r.as_ref().map(subscription_of).transpose()?)
    }
}

fn snapshot<T: serde::Serialize>(v: &T) -> Option<serde_json::Value> {
    Some(serde_json::to_value(v).unwrap_or_default())
}

impl Store {
    pub async fn plan_id_by_name(&self, name: &str) -> Result<i64, StoreError> {
        let mut tx = self.begin_read().await?;
        let r = tx
            .row("SELECT id FROM plans WHERE name = $1", &[V::T(name.into())])
            .await?;
        tx.commit_unaudited().await?;
        r.ok_or_else(|| StoreError::NotFound(format!("plan {name}")))?
            .i64("id")
            .map_err(StoreError::from)
    }

    /// Makes a plan with its limits and budgets, in one transaction (audited `plan.create`).
    pub async fn create_plan(
        &self,
        actor: &Actor,
        name: &str,
        limits: &LimitColumns,
        budgets: &[PlanBudget],
        now: DateTime<Utc>,
    ) -> Result<PlanRow, StoreError> {
        let mut tx = self.begin().await?;
        let id = tx
            .row(
                "INSERT INTO plans (name, rpm, rpd, tpm, max_concurrent, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $6) RETURNING id",
                &[
                    V::T(name.into()),
                    V::OI(limits.rpm),
                    V::OI(limits.rpd),
                    V::OI(limits.tpm),
                    V::OI(limits.max_concurrent),
                    V::Ts(now),
                ],
            )
            .await
            .map_err(|e| match e {
                StoreError::Db(sqlx::Error::Database(d)) if d.is_unique_violation() => {
                    StoreError::Conflict(format!("plan {name}"))
                }
                e => e,
            })?
            .ok_or_else(|| StoreError::Invalid("plan insert returned nothing".into()))?
            .i64("id")?;
        for b in budgets {
            tx.set_budget(BudgetOwner::Plan(id), b.metric, b.period, b.limit, now)
                .await?;
        }
        let after = tx
            .plan(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("plan {id}")))?;
        tx.audit(
            actor,
            "plan.create",
            &Target::new("plan", id),
            None,
            snapshot(&after),
        )
        .await?;
        tx.commit().await?;
        Ok(after)
    }

    /// Changes a plan's rate limits (`Some(None)` removes one); every subscriber's keys are
    /// reloaded by running gateways within a second (audited `plan.update`).
    pub async fn update_plan(
        &self,
        actor: &Actor,
        plan_id: i64,
        patch: &LimitPatch,
        now: DateTime<Utc>,
    ) -> Result<PlanRow, StoreError> {
        let mut tx = self.begin().await?;
        let lock = format!("SELECT id FROM plans WHERE id = $1{}", tx.for_update());
        tx.row(&lock, &[V::I(plan_id)])
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("plan {plan_id}")))?;
        let before = tx.plan(plan_id).await?;
        let mut sets = String::new();
        let mut args = vec![V::I(plan_id), V::Ts(now)];
        for (name, v) in patch.fields() {
            if let Some(v) = v {
                args.push(V::OI(v));
                sets.push_str(&format!("{name} = ${}, ", args.len()));
            }
        }
        tx.exec(
            &format!("UPDATE plans SET {sets}updated_at = $2 WHERE id = $1"),
            &args,
        )
        .await?;
        touch_owner(&mut tx, BudgetOwner::Plan(plan_id), now).await?;
        owner_keys_changed(&mut tx, BudgetOwner::Plan(plan_id)).await?;
        let after = tx
            .plan(plan_id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("plan {plan_id}")))?;
        tx.audit(
            actor,
            "plan.update",
            &Target::new("plan", plan_id),
            before.as_ref().and_then(snapshot),
            snapshot(&after),
        )
        .await?;
        tx.commit().await?;
        Ok(after)
    }

    /// Every plan with its budgets and subscriber count.
    pub async fn list_plans(&self) -> Result<Vec<PlanRow>, StoreError> {
        let mut tx = self.begin_read().await?;
        let mut out = Vec::new();
        for r in tx.rows("SELECT id FROM plans ORDER BY id", &[]).await? {
            if let Some(p) = tx.plan(r.i64("id")?).await? {
                out.push(p);
            }
        }
        tx.commit_unaudited().await?;
        Ok(out)
    }

    /// Subscribes a user to a plan from `start` (replacing any subscription they have); audited
    /// `user.subscribe`. The same plan and start again changes only the recorded end. Otherwise
    /// the user's periods of the old and the new plan start afresh: each budget of the new plan
    /// gets its current period (from `start`) with what the user already used in it.
    pub async fn subscribe(
        &self,
        actor: &Actor,
        user_id: i64,
        plan_id: i64,
        start: DateTime<Utc>,
        end: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<SubscriptionRow, StoreError> {
        let mut tx = self.begin().await?;
        tx.hold_usage_writes().await?;
        let plan = tx
            .plan(plan_id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("plan {plan_id}")))?;
        let before = tx.subscription(user_id).await?;
        let args = [
            V::I(user_id),
            V::I(plan_id),
            V::Ts(start),
            V::OTs(end),
            V::Ts(now),
        ];
        match &before {
            Some(_) => {
                tx.exec(
                    "UPDATE subscriptions SET plan_id = $2, status = 'active', current_period_start = $3, \
                     current_period_end = $4, updated_at = $5 WHERE user_id = $1",
                    &args,
                )
                .await?;
            }
            None => {
                tx.exec(
                    "INSERT INTO subscriptions (user_id, plan_id, status, current_period_start, \
                     current_period_end, created_at, updated_at) VALUES ($1, $2, 'active', $3, $4, $5, $5)",
                    &args,
                )
                .await
                .map_err(|e| match e {
                    StoreError::Db(sqlx::Error::Database(d)) if d.is_foreign_key_violation() => {
                        StoreError::NotFound(format!("user {user_id}"))
                    }
                    e => e,
                })?;
            }
        }
        let unchanged = before.as_ref().is_some_and(|b| {
            b.status == "active" && b.plan_id == plan_id && b.current_period_start == start
        });
        if !unchanged {
            if let Some(b) = &before {
                drop_plan_periods(&mut tx, b.plan_id, user_id).await?;
            }
            drop_plan_periods(&mut tx, plan_id, user_id).await?;
            for b in &plan.budgets {
                seed_period(
                    &mut tx,
                    b.id,
                    "user_id",
                    user_id,
                    b.metric,
                    b.period,
                    Some(start),
                    now,
                )
                .await?;
            }
        }
        touch_owner(&mut tx, BudgetOwner::User(user_id), now).await?;
        owner_keys_changed(&mut tx, BudgetOwner::User(user_id)).await?;
        let after = tx
            .subscription(user_id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("subscription of user {user_id}")))?;
        tx.audit(
            actor,
            "user.subscribe",
            &Target::user(user_id),
            before.as_ref().and_then(snapshot),
            snapshot(&after),
        )
        .await?;
        tx.commit().await?;
        Ok(after)
    }

    /// Ends a user's subscription (status `canceled`; the row is kept): the plan's limits and
    /// budgets no longer apply to the user, and the user's periods of the plan are forgotten.
    /// Audited `user.unsubscribe`.
    pub async fn unsubscribe(
        &self,
        actor: &Actor,
        user_id: i64,
        now: DateTime<Utc>,
    ) -> Result<SubscriptionRow, StoreError> {
        let mut tx = self.begin().await?;
        let before = tx
            .subscription(user_id)
            .await?
            .filter(|s| s.status == "active")
            .ok_or_else(|| StoreError::NotFound(format!("subscription of user {user_id}")))?;
        tx.exec(
            "UPDATE subscriptions SET status = 'canceled', updated_at = $2 WHERE user_id = $1",
            &[V::I(user_id), V::Ts(now)],
        )
        .await?;
        drop_plan_periods(&mut tx, before.plan_id, user_id).await?;
        touch_owner(&mut tx, BudgetOwner::User(user_id), now).await?;
        owner_keys_changed(&mut tx, BudgetOwner::User(user_id)).await?;
        let after = tx.subscription(user_id).await?;
        tx.audit(
            actor,
            "user.unsubscribe",
            &Target::user(user_id),
            snapshot(&before),
            after.as_ref().and_then(snapshot),
        )
        .await?;
        tx.commit().await?;
        Ok(before)
    }
}
