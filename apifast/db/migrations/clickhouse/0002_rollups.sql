-- Rollups for the dashboards, filled on insert by materialized views. The meter inserts only
-- events not already stored, so a view sees each event once and its sums stay exact.
-- Existing events are copied in before the views exist: run this migration (it runs at start)
-- before the meter consumes, as `apifast dev`, `apifast meter` and `apifast migrate` do.

-- All keys, per hour x model x provider: the admin overview.
CREATE TABLE IF NOT EXISTS usage_hourly (
    hour               DateTime('UTC'),
    model              LowCardinality(String),
    provider           LowCardinality(String),
    requests           SimpleAggregateFunction(sum, UInt64),
    errors             SimpleAggregateFunction(sum, UInt64),
    input_tokens       SimpleAggregateFunction(sum, UInt64),
    output_tokens      SimpleAggregateFunction(sum, UInt64),
    cost_usd           SimpleAggregateFunction(sum, Decimal(38, 12)),
    upstream_cost_usd  SimpleAggregateFunction(sum, Decimal(38, 12)),
    keys               AggregateFunction(uniq, FixedString(64)),
    latency            AggregateFunction(quantilesTDigest(0.5, 0.95), UInt32)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, model, provider);

-- One key, per day x model: the key holder's dashboard and GET /v1/usage.
CREATE TABLE IF NOT EXISTS usage_key_daily (
    key_hash          FixedString(64),
    day               Date,
    model             LowCardinality(String),
    requests          SimpleAggregateFunction(sum, UInt64),
    input_tokens      SimpleAggregateFunction(sum, UInt64),
    output_tokens     SimpleAggregateFunction(sum, UInt64),
    cached_tokens     SimpleAggregateFunction(sum, UInt64),
    reasoning_tokens  SimpleAggregateFunction(sum, UInt64),
    cost_usd          SimpleAggregateFunction(sum, Decimal(38, 12))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (key_hash, day, model);

INSERT INTO usage_hourly
SELECT toStartOfHour(ts) AS hour, model, provider,
       count() AS requests, countIf(status >= 400) AS errors,
       sum(toUInt64(input_tokens)) AS input_tokens, sum(toUInt64(output_tokens)) AS output_tokens,
       sum(cost_usd) AS cost_usd, sum(upstream_cost_usd) AS upstream_cost_usd,
       uniqState(key_hash) AS keys, quantilesTDigestState(0.5, 0.95)(latency_ms) AS latency
FROM usage_events FINAL
GROUP BY hour, model, provider;

INSERT INTO usage_key_daily
SELECT key_hash, toDate(ts) AS day, model,
       count() AS requests,
       sum(toUInt64(input_tokens)) AS input_tokens, sum(toUInt64(output_tokens)) AS output_tokens,
       sum(toUInt64(cached_tokens)) AS cached_tokens,
       sum(toUInt64(reasoning_tokens)) AS reasoning_tokens,
       sum(cost_usd) AS cost_usd
FROM usage_events FINAL
GROUP BY key_hash, day, model;

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_hourly_mv TO usage_hourly AS
SELECT toStartOfHour(ts) AS hour, model, provider,
       count() AS requests, countIf(status >= 400) AS errors,
       sum(toUInt64(input_tokens)) AS input_tokens, sum(toUInt64(output_tokens)) AS output_tokens,
       sum(cost_usd) AS cost_usd, sum(upstream_cost_usd) AS upstream_cost_usd,
       uniqState(key_hash) AS keys, quantilesTDigestState(0.5, 0.95)(latency_ms) AS latency
FROM usage_events
GROUP BY hour, model, provider;

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_key_daily_mv TO usage_key_daily AS
SELECT key_hash, toDate(ts) AS day, model,
       count() AS requests,
       sum(toUInt64(input_tokens)) AS input_tokens, sum(toUInt64(output_tokens)) AS output_tokens,
       sum(toUInt64(cached_tokens)) AS cached_tokens,
       sum(toUInt64(reasoning_tokens)) AS reasoning_tokens,
       sum(cost_usd) AS cost_usd
FROM usage_events
GROUP BY key_hash, day, model
