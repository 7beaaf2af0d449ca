-- `apifast reconcile --repair`: rebuild these usage_key_daily groups (deleted just before)
-- from the raw events, FINAL.
INSERT INTO usage_key_daily
SELECT key_hash, toDate(ts) AS day, model,
       count() AS requests,
       sum(toUInt64(input_tokens)) AS input_tokens, sum(toUInt64(output_tokens)) AS output_tokens,
       sum(toUInt64(cached_tokens)) AS cached_tokens,
       sum(toUInt64(reasoning_tokens)) AS reasoning_tokens,
       sum(cost_usd) AS cost_usd
FROM usage_events FINAL
WHERE ts >= {lo:DateTime64(3, 'UTC')} AND ts < {hi:DateTime64(3, 'UTC')}
  AND (toString(key_hash), day, model) IN {groups:Array(Tuple(String, Date, String))}
GROUP BY key_hash, day, model
