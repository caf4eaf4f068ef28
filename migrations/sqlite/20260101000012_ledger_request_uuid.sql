-- Nothing to change on SQLite: the PostgreSQL migration of this number stores the ledger's
-- request_id as `uuid`; SQLite has no such type and keeps the text. Kept so both backends
-- number their migrations alike.
SELECT 1;
