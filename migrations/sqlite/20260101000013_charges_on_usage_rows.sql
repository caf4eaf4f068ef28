-- A charge is carried by its usage row and `credit_transactions` becomes a view of the whole
-- ledger: see migrations/postgres/20260101000013_charges_on_usage_rows.sql for why. Differences
-- here: the balance after a charge is stored too (amounts are decimal text, which SQLite cannot
-- add exactly), and ledger ids come from the one-row counter credit_ledger_seq (SQLite has no
-- sequences), which every ledger write takes its ids from.
ALTER TABLE credit_transactions RENAME TO credit_entries;
DROP INDEX IF EXISTS credit_transactions_user_idx;
CREATE INDEX credit_entries_user_idx ON credit_entries (user_id, id);

CREATE TABLE credit_ledger_seq (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    last INTEGER NOT NULL
);
INSERT INTO credit_ledger_seq (id, last) SELECT 1, COALESCE(MAX(id), 0) FROM credit_entries;

ALTER TABLE usage_records ADD COLUMN ledger_id INTEGER;
ALTER TABLE usage_records ADD COLUMN ledger_amount TEXT;
ALTER TABLE usage_records ADD COLUMN ledger_balance_before TEXT;
ALTER TABLE usage_records ADD COLUMN ledger_balance_after TEXT;
ALTER TABLE usage_records ADD COLUMN ledger_metadata TEXT;

UPDATE usage_records
   SET ledger_id = t.id, ledger_amount = t.amount, ledger_balance_before = t.balance_before,
       ledger_balance_after = t.balance_after, ledger_metadata = NULLIF(t.metadata, '{}')
  FROM credit_entries t
 WHERE t.action = 'charge' AND t.request_id = usage_records.request_id;
DELETE FROM credit_entries
 WHERE action = 'charge' AND id IN (SELECT ledger_id FROM usage_records WHERE ledger_id IS NOT NULL);

CREATE INDEX usage_records_ledger_idx ON usage_records (user_id, ledger_id) WHERE ledger_id IS NOT NULL;

CREATE VIEW credit_transactions AS
SELECT id, user_id, action, amount, balance_before, balance_after, grant_id, request_id,
       idempotency_key, metadata, created_at
  FROM credit_entries
UNION ALL
SELECT ledger_id, user_id, 'charge', ledger_amount, ledger_balance_before, ledger_balance_after,
       NULL, request_id, NULL, COALESCE(ledger_metadata, '{}'), created_at
  FROM usage_records
 WHERE ledger_id IS NOT NULL;
