-- One key's usage per day and model (with the keys it was rotated from), inclusive dates:
-- the rollup behind the dashboard.
SELECT day, model,
       sum(requests) AS requests,
       sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
       sum(cached_tokens) AS cached_tokens, sum(reasoning_tokens) AS reasoning_tokens,
       sum(cost_usd) AS cost_usd
FROM usage_key_daily
WHERE key_hash IN {key_hashes:Array(String)} AND day >= {start:Date} AND day <= {end:Date}
GROUP BY day, model
ORDER BY day, model
