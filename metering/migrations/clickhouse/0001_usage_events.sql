-- One row per request: counts, cost, model and timestamps. No content of any kind.
CREATE TABLE IF NOT EXISTS usage_events (
    generation_id       String,
    key_hash            FixedString(64),
    model               LowCardinality(String),
    provider            LowCardinality(String),
    upstream_model      LowCardinality(String),
    endpoint            LowCardinality(String),
    input_tokens        UInt32,
    output_tokens       UInt32,
    cached_tokens       UInt32,
    cache_write_tokens  UInt32,
    reasoning_tokens    UInt32,
    usage_estimated     Bool,
    cost_usd            Decimal(38, 12),
    upstream_cost_usd   Decimal(38, 12),
    latency_ms          UInt32,
    ttft_ms             UInt32,
    status              UInt16,
    outcome             LowCardinality(String),
    stream              Bool,
    ts                  DateTime64(3, 'UTC')
)
-- Replacing on the full sort key: a duplicate that slipped past the meter's check
-- collapses on merge, and FINAL reads never count it twice.
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (key_hash, ts, generation_id)
