-- Change tracking for other instances: revocations and account edits are found by updated_at
-- (the periodic safety net; LISTEN/NOTIFY is the fast path), and accounts are deleted softly.
ALTER TABLE upstream_accounts ADD COLUMN IF NOT EXISTS deleted_at TIMESTAMPTZ;
CREATE INDEX IF NOT EXISTS api_keys_updated_at_idx ON api_keys (updated_at);
CREATE INDEX IF NOT EXISTS users_updated_at_idx ON users (updated_at);
