SELECT provider AS name, sum(requests) AS requests, sum(errors) AS errors,
       sum(cost_usd) AS cost_usd, sum(upstream_cost_usd) AS upstream_cost_usd,
       quantilesTDigestMerge(0.5, 0.95)(latency) AS latency
FROM {table:Identifier}
WHERE period >= {start:DateTime} AND period < {end:DateTime}
GROUP BY provider
ORDER BY requests DESC
