-- What a row's numbers rest on:
--   requested_model  the `model` the client asked for (`model` is what the upstream says served
--                    it, e.g. a dated snapshot); `tollgate usage --by model` groups by this one.
--   usage_source     where the tokens come from: 'provider' (reported by the upstream),
--                    'partial' (the stream ended before the upstream reported usage: what was
--                    counted), 'estimated' (nothing reported: the prompt counted by tollgate),
--                    'none' (nothing was served). NULL on rows written before this column.
--   upstream_error   the provider's error type/code when a passed-through upstream error sent one.
ALTER TABLE usage_records ADD COLUMN IF NOT EXISTS requested_model TEXT;
ALTER TABLE usage_records ADD COLUMN IF NOT EXISTS usage_source TEXT;
ALTER TABLE usage_records ADD COLUMN IF NOT EXISTS upstream_error TEXT;
