-- PostgreSQL drops usage_records' foreign keys here (see its migration for why). SQLite cannot drop
-- a constraint without rebuilding the table, and its per-row cost is small, so they stay.
SELECT 1;
