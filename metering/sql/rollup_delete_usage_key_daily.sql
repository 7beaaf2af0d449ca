-- `apifast reconcile --repair`: drop usage_key_daily groups that count more than the raw
-- events (a duplicate collapsed since), to be rebuilt by rollup_rebuild_usage_key_daily.
DELETE FROM usage_key_daily
WHERE (key_hash, day, model) IN {groups:Array(Tuple(String, Date, String))}
