-- Rate limits of a key and of a user (all of the user's keys together), read with the key by the
-- request path (limits.rs). NULL = the default: for a key the `[limits]` section of config.toml,
-- for a user no limit; 0 = explicitly unlimited.
--   rpm             requests per minute
--   rpd             requests per day
--   tpm             tokens (input + output) per minute
--   max_concurrent  requests in flight at once (a stream holds its slot until it ends)
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS rpm BIGINT;
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS rpd BIGINT;
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS tpm BIGINT;
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS max_concurrent BIGINT;
ALTER TABLE users ADD COLUMN IF NOT EXISTS rpm BIGINT;
ALTER TABLE users ADD COLUMN IF NOT EXISTS rpd BIGINT;
ALTER TABLE users ADD COLUMN IF NOT EXISTS tpm BIGINT;
ALTER TABLE users ADD COLUMN IF NOT EXISTS max_concurrent BIGINT;
