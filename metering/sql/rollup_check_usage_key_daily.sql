-- usage_key_daily groups (key x day x model) on these days whose sums differ from the raw
-- events (FINAL: a duplicate counts once), with both sides. The meter's repair and
-- `apifast reconcile` read it; {all_keys} or the keys in {keys}; {lo, hi} only prune.
SELECT key_hash, day, model,
       raw.requests AS raw_requests, r.requests AS rollup_requests,
       raw.input_tokens AS raw_input_tokens, r.input_tokens AS rollup_input_tokens,
       raw.output_tokens AS raw_output_tokens, r.output_tokens AS rollup_output_tokens,
       raw.cached_tokens AS raw_cached_tokens, r.cached_tokens AS rollup_cached_tokens,
       raw.reasoning_tokens AS raw_reasoning_tokens, r.reasoning_tokens AS rollup_reasoning_tokens,
       raw.cost_usd AS raw_cost_usd, r.cost_usd AS rollup_cost_usd
FROM (
    SELECT key_hash, toDate(ts) AS day, model,
           count() AS requests,
           sum(toUInt64(input_tokens)) AS input_tokens, sum(toUInt64(output_tokens)) AS output_tokens,
           sum(toUInt64(cached_tokens)) AS cached_tokens,
           sum(toUInt64(reasoning_tokens)) AS reasoning_tokens,
           sum(cost_usd) AS cost_usd
    FROM usage_events FINAL
    WHERE ts >= {lo:DateTime64(3, 'UTC')} AND ts < {hi:DateTime64(3, 'UTC')}
      AND toDate(ts) IN {days:Array(Date)}
      AND ({all_keys:Bool} OR key_hash IN {keys:Array(String)})
    GROUP BY key_hash, day, model
) AS raw
FULL OUTER JOIN (
    SELECT key_hash, day, model,
           sum(requests) AS requests,
           sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
           sum(cached_tokens) AS cached_tokens, sum(reasoning_tokens) AS reasoning_tokens,
           sum(cost_usd) AS cost_usd
    FROM usage_key_daily
    WHERE day IN {days:Array(Date)} AND ({all_keys:Bool} OR key_hash IN {keys:Array(String)})
    GROUP BY key_hash, day, model
) AS r USING (key_hash, day, model)
WHERE raw.requests != r.requests OR raw.input_tokens != r.input_tokens
   OR raw.output_tokens != r.output_tokens OR raw.cached_tokens != r.cached_tokens
   OR raw.reasoning_tokens != r.reasoning_tokens OR raw.cost_usd != r.cost_usd
ORDER BY key_hash, day, model
