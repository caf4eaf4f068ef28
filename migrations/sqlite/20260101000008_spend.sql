-- Spend control (spend.rs, store/spend.rs): budgets, prepaid credits with a ledger, plans and
-- subscriptions, and the leases instances take from budgets and balances. Names follow the
-- product family's schemas (credit_transactions with balance_before/balance_after, idempotency
-- records, subscriptions with current_period_start/end). Amounts are exact decimal text here (NUMERIC on
-- PostgreSQL), converted in one place (store/spend.rs); timestamps the fixed-width UTC text
-- of usage_records. See migrations/postgres/20260101000008_spend.sql for the meanings.

-- A named plan: its budgets (budgets.plan_id) apply to every subscriber, each on their own.
CREATE TABLE IF NOT EXISTS plans (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- A user's plan. A plan budget's periods run from current_period_start (every day, week or
-- month after it), so usage starts from zero at each period's end without a job running.
CREATE TABLE IF NOT EXISTS subscriptions (
    id                   INTEGER PRIMARY KEY,
    user_id              INTEGER NOT NULL UNIQUE REFERENCES users(id),
    plan_id              INTEGER NOT NULL REFERENCES plans(id),
    status               TEXT NOT NULL DEFAULT 'active',
    current_period_start TEXT NOT NULL,
    current_period_end   TEXT,
    created_at           TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at           TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- A limit on what a key, a user (all their keys) or a plan's subscribers (each) may use in a
-- period: metric cost (USD), tokens or requests; period day, week, month (UTC calendar, or from
-- the subscription's start for a plan) or total. One per owner, metric and period.
CREATE TABLE IF NOT EXISTS budgets (
    id           INTEGER PRIMARY KEY,
    api_key_id   INTEGER REFERENCES api_keys(id),
    user_id      INTEGER REFERENCES users(id),
    plan_id      INTEGER REFERENCES plans(id),
    metric       TEXT NOT NULL CHECK (metric IN ('cost', 'tokens', 'requests')),
    period       TEXT NOT NULL CHECK (period IN ('day', 'week', 'month', 'total')),
    limit_amount TEXT NOT NULL,
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    CHECK ((api_key_id IS NOT NULL) + (user_id IS NOT NULL) + (plan_id IS NOT NULL) = 1)
);
CREATE UNIQUE INDEX IF NOT EXISTS budgets_owner_idx ON budgets
    (COALESCE(api_key_id, 0), COALESCE(user_id, 0), COALESCE(plan_id, 0), metric, period);

-- One period of one budget for one subject (the key, or the user): spent = the billable usage
-- rows of the subject in [period_start, next period) (settled by the usage writer in the row's
-- transaction); leased = what instances hold in leases and have not spent. spent + leased never
-- passes the limit through a lease.
CREATE TABLE IF NOT EXISTS budget_usage (
    budget_id    INTEGER NOT NULL REFERENCES budgets(id),
    subject_id   INTEGER NOT NULL,
    period_start TEXT NOT NULL,
    spent        TEXT NOT NULL DEFAULT '0',
    leased       TEXT NOT NULL DEFAULT '0',
    PRIMARY KEY (budget_id, subject_id, period_start)
);

-- A prepaid user's balance (the row exists once the user has been granted credits: from then
-- on requests are admitted only against it). balance = the sum of the user's ledger; leased as
-- above; overdraft = how far below zero it may go (0: never).
CREATE TABLE IF NOT EXISTS credit_balances (
    user_id    INTEGER PRIMARY KEY REFERENCES users(id),
    balance    TEXT NOT NULL DEFAULT '0',
    leased     TEXT NOT NULL DEFAULT '0',
    overdraft  TEXT NOT NULL DEFAULT '0',
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- Each grant and what is left of it: charges consume the earliest-expiring grant first.
CREATE TABLE IF NOT EXISTS credit_grants (
    id         INTEGER PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users(id),
    amount     TEXT NOT NULL,
    remaining  TEXT NOT NULL,
    expires_at TEXT,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX IF NOT EXISTS credit_grants_user_idx ON credit_grants (user_id, expires_at);

-- The ledger: every change of a balance, signed (grant +, charge −, expire −, refund +,
-- adjust ±), with the balance before and after. A charge names its request (unique: one ledger
-- row per charged request); a grant may carry the idempotency key it was made with. Like
-- usage_records (migration 0004), a row per request and no foreign key on user_id: a charge's user
-- comes from the usage row it is written with, users are never deleted, and the check cost a
-- lookup and a row lock on users for every charge.
CREATE TABLE IF NOT EXISTS credit_transactions (
    id              INTEGER PRIMARY KEY,
    user_id         INTEGER NOT NULL,  -- no foreign key: see above
    action          TEXT NOT NULL CHECK (action IN ('grant', 'charge', 'expire', 'refund', 'adjust')),
    amount          TEXT NOT NULL,
    balance_before  TEXT NOT NULL,
    balance_after   TEXT NOT NULL,
    grant_id        INTEGER REFERENCES credit_grants(id),
    request_id      TEXT UNIQUE,
    idempotency_key TEXT,
    metadata        TEXT NOT NULL DEFAULT '{}',
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX IF NOT EXISTS credit_transactions_user_idx ON credit_transactions (user_id, id);

-- Idempotency-Key records of admin actions (grants): the same key and body give the same answer,
-- the same key with another body is refused; a record is forgotten after expires_at.
CREATE TABLE IF NOT EXISTS idempotency_records (
    key          TEXT PRIMARY KEY,
    request_hash TEXT NOT NULL,
    response     TEXT NOT NULL,
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    expires_at   TEXT NOT NULL
);

-- A slice of a budget period or a balance held by one instance: amount = what it may still
-- admit from it (shrunk by each charge the usage writer settles, returned when idle or at
-- shutdown). A lease not renewed by expires_at (a dead instance) is taken back by the next
-- instance that leases from the same pool, or by any instance's sweep.
CREATE TABLE IF NOT EXISTS spend_leases (
    id           INTEGER PRIMARY KEY,
    instance     TEXT NOT NULL,
    pool         TEXT NOT NULL CHECK (pool IN ('budget', 'credit')),
    budget_id    INTEGER,
    subject_id   INTEGER,
    period_start TEXT,
    user_id      INTEGER,
    amount       TEXT NOT NULL,
    expires_at   TEXT NOT NULL,
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX IF NOT EXISTS spend_leases_expiry_idx ON spend_leases (expires_at);

-- Scans of one user's rows (a user's budget, the credit check) by time.
CREATE INDEX IF NOT EXISTS usage_records_user_idx ON usage_records (user_id, created_at);
