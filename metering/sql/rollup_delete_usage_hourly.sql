-- `apifast reconcile --repair`: drop usage_hourly groups that count more than the raw events
-- (a duplicate collapsed since), to be rebuilt by rollup_rebuild_usage_hourly.
DELETE FROM usage_hourly
WHERE (period, model, provider) IN {groups:Array(Tuple(DateTime('UTC'), String, String))}
