-- `apifast reconcile --repair`: drop usage_daily groups that count more than the raw events
-- (a duplicate collapsed since), to be rebuilt by rollup_rebuild_usage_daily.
DELETE FROM usage_daily
WHERE (period, model, provider) IN {groups:Array(Tuple(DateTime('UTC'), String, String))}
