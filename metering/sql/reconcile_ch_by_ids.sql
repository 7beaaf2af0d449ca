-- `apifast reconcile` (ClickHouse): the rows of these generation ids, whenever they happened.
SELECT generation_id, any(key_hash) AS key, count() AS copies,
       min(cost_usd) AS min_cost, max(cost_usd) AS max_cost
FROM usage_events
WHERE generation_id IN {ids:Array(String)}
GROUP BY generation_id
