-- A charge's request id stored as `uuid` (16 bytes) instead of its 36-character text: every
-- charged request writes a ledger row in the usage write's transaction, and its unique index
-- holds one entry per charge (a bench of the insert alone, benches/README.md "Spend admission":
-- ~10 % less of PostgreSQL's CPU a row, and an index less than half the size). Request ids are
-- the gateway's own UUIDs (ctx.rs), so every existing value converts; reads cast the column back
-- to text, which gives the same lowercase, hyphenated spelling. The table is rewritten under an
-- exclusive lock (~3 s a million rows on the bench VM): run it at a quiet moment.
ALTER TABLE credit_transactions ALTER COLUMN request_id TYPE uuid USING request_id::uuid;
