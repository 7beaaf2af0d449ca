-- Rollups for the dashboards, filled on insert by materialized views. The meter inserts only
-- events not already stored, so a view sees each event once and its sums stay exact.
-- Existing events are copied in before the views exist: run this migration (it runs at start)
-- before the meter consumes, as `apifast dev`, `apifast meter` and `apifast migrate` do.

-- All keys, per period x model x provider: the admin overview reads the hourly tables for
-- short ranges and the daily ones (periods starting at UTC midnight) for long ranges.
CREATE TABLE IF NOT EXISTS usage_hourly (
    period             DateTime('UTC'),
    model              LowCardinality(String),
    provider           LowCardinality(String),
    requests           SimpleAggregateFunction(sum, UInt64),
    errors             SimpleAggregateFunction(sum, UInt64),
    input_tokens       SimpleAggregateFunction(sum, UInt64),
    output_tokens      SimpleAggregateFunction(sum, UInt64),
    cost_usd           SimpleAggregateFunction(sum, Decimal(38, 12)),
    upstream_cost_usd  SimpleAggregateFunction(sum, Decimal(38, 12)),
    latency            AggregateFunction(quantilesTDigest(0.5, 0.95), UInt32)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(period)
ORDER BY (period, model, provider);

CREATE TABLE IF NOT EXISTS usage_daily AS usage_hourly
ENGINE = AggregatingMergeTree
PARTITION BY toYear(period)
ORDER BY (period, model, provider);

-- Distinct keys per period, apart: one state per period merges far faster than one per
-- period x model x provider. uniqCombined(12) is exact for small sets and a 4096-cell
-- HyperLogLog (about 1.6 % error) beyond, so a month of states merges in milliseconds.
CREATE TABLE IF NOT EXISTS active_keys_hourly (
    period  DateTime('UTC'),
    keys    AggregateFunction(uniqCombined(12), FixedString(64))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(period)
ORDER BY period;

CREATE TABLE IF NOT EXISTS active_keys_daily AS active_keys_hourly
ENGINE = AggregatingMergeTree
PARTITION BY toYear(period)
ORDER BY period;

-- One key, per day x model: the key holder's dashboard.
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
SELECT toStartOfHour(ts) AS period, model, provider,
       count() AS requests, countIf(status >= 400) AS errors,
       sum(toUInt64(input_tokens)) AS input_tokens, sum(toUInt64(output_tokens)) AS output_tokens,
       sum(cost_usd) AS cost_usd, sum(upstream_cost_usd) AS upstream_cost_usd,
       quantilesTDigestState(0.5, 0.95)(latency_ms) AS latency
FROM usage_events FINAL
GROUP BY period, model, provider;

INSERT INTO usage_daily
SELECT toDateTime(toDate(ts), 'UTC') AS period, model, provider,
       count() AS requests, countIf(status >= 400) AS errors,
       sum(toUInt64(input_tokens)) AS input_tokens, sum(toUInt64(output_tokens)) AS output_tokens,
       sum(cost_usd) AS cost_usd, sum(upstream_cost_usd) AS upstream_cost_usd,
       quantilesTDigestState(0.5, 0.95)(latency_ms) AS latency
FROM usage_events FINAL
GROUP BY period, model, provider;

INSERT INTO active_keys_hourly
SELECT toStartOfHour(ts) AS period, uniqCombinedState(12)(key_hash) AS keys
FROM usage_events FINAL
GROUP BY period;

INSERT INTO active_keys_daily
SELECT toDateTime(toDate(ts), 'UTC') AS period, uniqCombinedState(12)(key_hash) AS keys
FROM usage_events FINAL
GROUP BY period;

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
SELECT toStartOfHour(ts) AS period, model, provider,
       count() AS requests, countIf(status >= 400) AS errors,
       sum(toUInt64(input_tokens)) AS input_tokens, sum(toUInt64(output_tokens)) AS output_tokens,
       sum(cost_usd) AS cost_usd, sum(upstream_cost_usd) AS upstream_cost_usd,
       quantilesTDigestState(0.5, 0.95)(latency_ms) AS latency
FROM usage_events
GROUP BY period, model, provider;

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_daily_mv TO usage_daily AS
SELECT toDateTime(toDate(ts), 'UTC') AS period, model, provider,
       count() AS requests, countIf(status >= 400) AS errors,
       sum(toUInt64(input_tokens)) AS input_tokens, sum(toUInt64(output_tokens)) AS output_tokens,
       sum(cost_usd) AS cost_usd, sum(upstream_cost_usd) AS upstream_cost_usd,
       quantilesTDigestState(0.5, 0.95)(latency_ms) AS latency
FROM usage_events
GROUP BY period, model, provider;

CREATE MATERIALIZED VIEW IF NOT EXISTS active_keys_hourly_mv TO active_keys_hourly AS
SELECT toStartOfHour(ts) AS period, uniqCombinedState(12)(key_hash) AS keys
FROM usage_events
GROUP BY period;

CREATE MATERIALIZED VIEW IF NOT EXISTS active_keys_daily_mv TO active_keys_daily AS
SELECT toDateTime(toDate(ts), 'UTC') AS period, uniqCombinedState(12)(key_hash) AS keys
FROM usage_events
GROUP BY period;

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_key_daily_mv TO usage_key_daily AS
SELECT key_hash, toDate(ts) AS day, model,
       count() AS requests,
       sum(toUInt64(input_tokens)) AS input_tokens, sum(toUInt64(output_tokens)) AS output_tokens,
       sum(toUInt64(cached_tokens)) AS cached_tokens,
       sum(toUInt64(reasoning_tokens)) AS reasoning_tokens,
       sum(cost_usd) AS cost_usd
FROM usage_events
GROUP BY key_hash, day, model
