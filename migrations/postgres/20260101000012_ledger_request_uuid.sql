-- A charge's request id stored as `uuid` (16 bytes) instead of its 36-character text: every
-- charged request writes a ledger row in the usage write's transaction, and the unique index on
-- request_id was the dearest part of that row for PostgreSQL (a bench of the insert alone,
-- benches/README.md "Spend admission": ~8 µs a row with the text index, ~5.5 with the uuid one).
-- Request ids are the gateway's own UUIDs (ctx.rs), so every existing value converts; reads cast
-- the column back to text, which gives the same lowercase, hyphenated spelling.
ALTER TABLE credit_transactions ALTER COLUMN request_id TYPE uuid USING request_id::uuid;
