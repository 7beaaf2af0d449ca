-- `apifast reconcile --repair`: rebuild these usage_hourly groups (deleted just before) from
-- the raw events, FINAL, latency digest included.
INSERT INTO usage_hourly
SELECT toDateTime(toStartOfHour(ts), 'UTC') AS period, model, provider,
       count() AS requests, countIf(status >= 400) AS errors,
       sum(toUInt64(input_tokens)) AS input_tokens, sum(toUInt64(output_tokens)) AS output_tokens,
       sum(cost_usd) AS cost_usd, sum(upstream_cost_usd) AS upstream_cost_usd,
       quantilesTDigestState(0.5, 0.95)(latency_ms) AS latency
FROM usage_events FINAL
WHERE ts >= {lo:DateTime64(3, 'UTC')} AND ts < {hi:DateTime64(3, 'UTC')}
  AND (period, model, provider) IN {groups:Array(Tuple(DateTime('UTC'), String, String))}
GROUP BY period, model, provider
