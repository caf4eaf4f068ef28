-- A plan's rate limits (plans: migration 0008). They apply to each subscriber as the user's own
-- limits do (all of the user's keys together), limit by limit where the user has none of their
-- own (users.rpm etc. NULL); read with the key by the key lookup (store/catalog.rs).
-- NULL = none; 0 = none either (explicitly).
--   rpm             requests per minute
--   rpd             requests per day
--   tpm             tokens (input + output) per minute
--   max_concurrent  requests in flight at once
ALTER TABLE plans ADD COLUMN IF NOT EXISTS rpm BIGINT;
ALTER TABLE plans ADD COLUMN IF NOT EXISTS rpd BIGINT;
ALTER TABLE plans ADD COLUMN IF NOT EXISTS tpm BIGINT;
ALTER TABLE plans ADD COLUMN IF NOT EXISTS max_concurrent BIGINT;
