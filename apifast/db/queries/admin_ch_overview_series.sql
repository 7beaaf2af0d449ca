-- All keys per time bucket ($bucket_s seconds: 3600 or 86400) in [start, end).
SELECT toStartOfInterval(hour, toIntervalSecond({bucket_s:UInt32})) AS bucket,
       sum(requests) AS requests, sum(errors) AS errors,
       sum(cost_usd) AS cost_usd, sum(upstream_cost_usd) AS upstream_cost_usd,
       uniqMerge(keys) AS active_keys
FROM usage_hourly
WHERE hour >= {start:DateTime} AND hour < {end:DateTime}
GROUP BY bucket
ORDER BY bucket
