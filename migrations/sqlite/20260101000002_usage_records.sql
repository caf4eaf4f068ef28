-- See migrations/postgres for the column meanings. cost is TEXT here: an exact decimal string
-- (SQLite has no exact decimal type); src/store.rs converts it in one place.
CREATE TABLE IF NOT EXISTS usage_records (
    id                    INTEGER PRIMARY KEY,
    request_id            TEXT NOT NULL UNIQUE,
    user_id               INTEGER REFERENCES users(id),
    api_key_id            INTEGER NOT NULL REFERENCES api_keys(id),
    upstream_account_id   INTEGER REFERENCES upstream_accounts(id),
    method                TEXT NOT NULL,
    endpoint              TEXT NOT NULL,
    model                 TEXT,
    status_code           INTEGER NOT NULL,
    response_time         INTEGER NOT NULL,
    prompt_tokens         INTEGER NOT NULL DEFAULT 0,
    completion_tokens     INTEGER NOT NULL DEFAULT 0,
    cached_tokens         INTEGER NOT NULL DEFAULT 0,
    cache_creation_tokens INTEGER NOT NULL DEFAULT 0,
    tokens_used           INTEGER NOT NULL DEFAULT 0,
    cost                  TEXT NOT NULL DEFAULT '0',
    error_message         TEXT,
    created_at            TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX IF NOT EXISTS usage_records_created_at_idx ON usage_records (created_at);
CREATE INDEX IF NOT EXISTS usage_records_key_idx ON usage_records (api_key_id, created_at);
CREATE INDEX IF NOT EXISTS usage_records_account_idx ON usage_records (upstream_account_id, created_at);
