-- The ledger keyed by (user_id, id): credit_transactions is read by user (history, the balance's
-- sum) or by request id (its own unique index), so the primary key serves the first and
-- credit_transactions_user_idx goes. A charged request writes one ledger row in the usage write's
-- transaction; with two indexes instead of three, that row costs PostgreSQL less (benches/README.md,
-- "Spend admission"). request_id stays UNIQUE: one ledger row per charged request. `id` is still
-- the identity the rows are ordered by (unique by its sequence).
ALTER TABLE credit_transactions DROP CONSTRAINT credit_transactions_pkey;
ALTER TABLE credit_transactions ADD PRIMARY KEY (user_id, id);
DROP INDEX IF EXISTS credit_transactions_user_idx;
