-- How each model's traffic split across its routes (by route index, from the raw events:
-- the rollups have no route). Requests no route was admitted for (attempts = 0) are left out.
SELECT model, route_index, any(provider) AS provider, count() AS requests,
       countIf(status >= 400) AS errors, countIf(attempts > 1) AS retried
FROM usage_events FINAL
WHERE ts >= {start:DateTime} AND ts < {end:DateTime} AND attempts > 0
GROUP BY model, route_index
ORDER BY model, route_index
