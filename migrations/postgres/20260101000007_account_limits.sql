-- The limits an upstream account's provider enforces, declared so the selector skips the account
-- at its limit instead of forwarding into a 429 (account_limits.rs). NULL or 0 = none declared.
-- Each gateway instance counts its own use of the account.
--   rpm             requests per minute
--   tpm             tokens (input + output) per minute
--   max_concurrent  requests in flight at once (a stream holds its slot until it ends)
ALTER TABLE upstream_accounts ADD COLUMN IF NOT EXISTS rpm BIGINT;
ALTER TABLE upstream_accounts ADD COLUMN IF NOT EXISTS tpm BIGINT;
ALTER TABLE upstream_accounts ADD COLUMN IF NOT EXISTS max_concurrent BIGINT;
