-- Retention deletes sub_key_daily rows by day (router/sql/sub_key_daily_delete_past.sql);
-- without this index each pass would scan the whole table to find the past days.
CREATE INDEX IF NOT EXISTS sub_key_daily_day ON sub_key_daily (day);
