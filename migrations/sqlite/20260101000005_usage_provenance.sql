-- See migrations/postgres for the column meanings.
ALTER TABLE usage_records ADD COLUMN requested_model TEXT;
ALTER TABLE usage_records ADD COLUMN usage_source TEXT;
ALTER TABLE usage_records ADD COLUMN upstream_error TEXT;
