-- Distinct keys per time bucket ($bucket_s seconds), from active_keys_hourly or _daily.
SELECT toStartOfInterval(period, toIntervalSecond({bucket_s:UInt32})) AS bucket,
       uniqCombinedMerge(12)(keys) AS active_keys
FROM {table:Identifier}
WHERE period >= {start:DateTime} AND period < {end:DateTime}
GROUP BY bucket
ORDER BY bucket
