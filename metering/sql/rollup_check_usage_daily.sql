-- usage_daily groups (period x model x provider) in these days (periods at UTC midnight) whose sums differ from the
-- raw events (FINAL: a duplicate counts once), with both sides. The latency digest is not
-- compared. The meter's repair and `apifast reconcile` read it; {lo, hi} only prune.
SELECT period, model, provider,
       raw.requests AS raw_requests, r.requests AS rollup_requests,
       raw.errors AS raw_errors, r.errors AS rollup_errors,
       raw.input_tokens AS raw_input_tokens, r.input_tokens AS rollup_input_tokens,
       raw.output_tokens AS raw_output_tokens, r.output_tokens AS rollup_output_tokens,
       raw.cost_usd AS raw_cost_usd, r.cost_usd AS rollup_cost_usd,
       raw.upstream_cost_usd AS raw_upstream_cost_usd, r.upstream_cost_usd AS rollup_upstream_cost_usd
FROM (
    SELECT toDateTime(toDate(ts), 'UTC') AS period, model, provider,
           count() AS requests, countIf(status >= 400) AS errors,
           sum(toUInt64(input_tokens)) AS input_tokens, sum(toUInt64(output_tokens)) AS output_tokens,
           sum(cost_usd) AS cost_usd, sum(upstream_cost_usd) AS upstream_cost_usd
    FROM usage_events FINAL
    WHERE ts >= {lo:DateTime64(3, 'UTC')} AND ts < {hi:DateTime64(3, 'UTC')}
      AND toDateTime(toDate(ts), 'UTC') IN {periods:Array(DateTime('UTC'))}
    GROUP BY period, model, provider
) AS raw
FULL OUTER JOIN (
    SELECT period, model, provider,
           sum(requests) AS requests, sum(errors) AS errors,
           sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
           sum(cost_usd) AS cost_usd, sum(upstream_cost_usd) AS upstream_cost_usd
    FROM usage_daily
    WHERE period IN {periods:Array(DateTime('UTC'))}
    GROUP BY period, model, provider
) AS r USING (period, model, provider)
WHERE raw.requests != r.requests OR raw.errors != r.errors
   OR raw.input_tokens != r.input_tokens OR raw.output_tokens != r.output_tokens
   OR raw.cost_usd != r.cost_usd OR raw.upstream_cost_usd != r.upstream_cost_usd
ORDER BY period, model, provider
