-- See migrations/postgres/20260101000003_change_tracking.sql.
ALTER TABLE upstream_accounts ADD COLUMN deleted_at TEXT;
CREATE INDEX IF NOT EXISTS api_keys_updated_at_idx ON api_keys (updated_at);
CREATE INDEX IF NOT EXISTS users_updated_at_idx ON users (updated_at);
