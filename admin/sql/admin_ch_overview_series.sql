-- All keys per time bucket ($bucket_s seconds) in [start, end), from usage_hourly or usage_daily.
SELECT toStartOfInterval(period, toIntervalSecond({bucket_s:UInt32})) AS bucket,
       sum(requests) AS requests, sum(errors) AS errors,
       sum(cost_usd) AS cost_usd, sum(upstream_cost_usd) AS upstream_cost_usd
FROM {table:Identifier}
WHERE period >= {start:DateTime} AND period < {end:DateTime}
GROUP BY bucket
ORDER BY bucket
