-- Requests per client protocol (chat | messages | responses; embeddings apart) in a window.
-- From the raw events: the rollups do not carry the protocol, and a protocol split is read
-- far less often than the charts.
SELECT if(endpoint = 'embeddings', 'embeddings', api) AS name,
       count() AS requests, countIf(status >= 400) AS errors,
       sum(cost_usd) AS cost_usd, sum(upstream_cost_usd) AS upstream_cost_usd,
       quantilesTDigest(0.5, 0.95)(latency_ms) AS latency
FROM usage_events
WHERE ts >= {start:DateTime} AND ts < {end:DateTime}
GROUP BY name
ORDER BY requests DESC
