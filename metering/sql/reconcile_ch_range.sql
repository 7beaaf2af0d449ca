-- `apifast reconcile` (ClickHouse): each generation id with a request time in the range, with
-- how many rows it has (more than one is a duplicate) and its cost.
SELECT generation_id, any(key_hash) AS key, count() AS copies,
       min(cost_usd) AS min_cost, max(cost_usd) AS max_cost
FROM usage_events
WHERE ts >= {start:DateTime64(3)} AND ts < {end:DateTime64(3)}
GROUP BY generation_id
