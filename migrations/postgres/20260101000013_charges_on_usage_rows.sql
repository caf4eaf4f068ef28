-- A charge is carried by its usage row: the ledger entry of a prepaid request (its id in the
-- ledger's order, the amount taken from the balance, the balance before it, and what could not be
-- collected) is four columns of the row the usage writer inserts anyway, and
-- `credit_transactions` becomes a view of the whole ledger: the entries that are not charges
-- (grants, refunds, expiries, adjustments: table `credit_entries`) and the charges on usage rows.
--
-- Why: a separate ledger row per charged request cost PostgreSQL ~9 µs of CPU a request (its heap
-- tuple and two index entries, benches/README.md "Third pass"); these columns and a partial index
-- cost ~2 µs ("Fourth pass"). It also makes "each charged request has one ledger entry, and each
-- charge entry has its request" hold by construction: a charge cannot exist without its row.
--
-- Ledger ids: one sequence (`credit_ledger_id_seq`, the base table's identity sequence renamed)
-- numbers both kinds, so the ledger reads in the order its entries were written, and each entry's
-- balance_before is the balance_after of the user's entry before it.
--
-- Existing charge rows move onto their usage rows; a charge row without one (none is expected:
-- `tollgate usage --check` counts them as orphans) stays in credit_entries. The update rewrites
-- the charged usage rows: run it at a quiet moment.
ALTER TABLE credit_transactions RENAME TO credit_entries;
ALTER SEQUENCE credit_transactions_id_seq RENAME TO credit_ledger_id_seq;
ALTER TABLE credit_entries RENAME CONSTRAINT credit_transactions_pkey TO credit_entries_pkey;
ALTER TABLE credit_entries RENAME CONSTRAINT credit_transactions_request_id_key TO credit_entries_request_id_key;
ALTER TABLE credit_entries RENAME CONSTRAINT credit_transactions_action_check TO credit_entries_action_check;
ALTER TABLE credit_entries RENAME CONSTRAINT credit_transactions_grant_id_fkey TO credit_entries_grant_id_fkey;

ALTER TABLE usage_records
    ADD COLUMN ledger_id             BIGINT,
    ADD COLUMN ledger_amount         NUMERIC(20, 10),
    ADD COLUMN ledger_balance_before NUMERIC(20, 10),
    ADD COLUMN ledger_metadata       JSONB,
    ADD CONSTRAINT usage_records_ledger_check CHECK (
        (ledger_id IS NULL) = (ledger_amount IS NULL)
        AND (ledger_id IS NULL) = (ledger_balance_before IS NULL)
        AND (ledger_id IS NOT NULL OR ledger_metadata IS NULL));

UPDATE usage_records u
   SET ledger_id = t.id, ledger_amount = t.amount, ledger_balance_before = t.balance_before,
       ledger_metadata = NULLIF(t.metadata, '{}'::jsonb)
  FROM credit_entries t
 WHERE t.action = 'charge' AND u.request_id = CAST(t.request_id AS TEXT);
DELETE FROM credit_entries t USING usage_records u WHERE t.action = 'charge' AND u.ledger_id = t.id;

-- A user's charges in ledger order (history, the balance's sum); only charged rows are indexed.
CREATE INDEX usage_records_ledger_idx ON usage_records (user_id, ledger_id) WHERE ledger_id IS NOT NULL;

CREATE VIEW credit_transactions AS
SELECT id, user_id, action, amount, balance_before, balance_after, grant_id,
       CAST(request_id AS TEXT) AS request_id, idempotency_key, metadata, created_at
  FROM credit_entries
UNION ALL
SELECT ledger_id, user_id, 'charge', ledger_amount, ledger_balance_before,
       ledger_balance_before + ledger_amount, NULL, request_id, NULL,
       COALESCE(ledger_metadata, '{}'::jsonb), created_at
  FROM usage_records
 WHERE ledger_id IS NOT NULL;
