-- See migrations/postgres/20260101000007_account_limits.sql for the column meanings.
ALTER TABLE upstream_accounts ADD COLUMN rpm INTEGER;
ALTER TABLE upstream_accounts ADD COLUMN tpm INTEGER;
ALTER TABLE upstream_accounts ADD COLUMN max_concurrent INTEGER;
