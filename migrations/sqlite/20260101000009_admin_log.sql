-- See migrations/postgres/20260101000009_admin_log.sql for the column meanings.
CREATE TABLE IF NOT EXISTS admin_log (
    id          INTEGER PRIMARY KEY,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target_type TEXT NOT NULL,
    target_id   TEXT NOT NULL,
    before      TEXT,
    after       TEXT,
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX IF NOT EXISTS admin_log_created_at_idx ON admin_log (created_at);
CREATE INDEX IF NOT EXISTS admin_log_target_idx ON admin_log (target_type, target_id);
