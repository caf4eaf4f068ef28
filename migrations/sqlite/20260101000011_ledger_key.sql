-- Nothing to change on SQLite: the PostgreSQL migration of this number makes (user_id, id) the
-- ledger's primary key in place of a separate per-user index. Here `id` is the rowid (a key that
-- costs no index) and credit_transactions_user_idx stays. Kept so both backends number their
-- migrations alike.
SELECT 1;
