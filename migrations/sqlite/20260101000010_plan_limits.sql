-- See migrations/postgres/20260101000010_plan_limits.sql for the column meanings.
ALTER TABLE plans ADD COLUMN rpm INTEGER;
ALTER TABLE plans ADD COLUMN rpd INTEGER;
ALTER TABLE plans ADD COLUMN tpm INTEGER;
ALTER TABLE plans ADD COLUMN max_concurrent INTEGER;
