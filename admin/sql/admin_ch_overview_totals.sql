SELECT sum(requests) AS requests, sum(errors) AS errors,
       sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
       sum(cost_usd) AS cost_usd, sum(upstream_cost_usd) AS upstream_cost_usd
FROM {table:Identifier}
WHERE period >= {start:DateTime} AND period < {end:DateTime}
