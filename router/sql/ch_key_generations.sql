-- One key's most recent requests (with the keys it was rotated from). The inner query reads
-- the sort key; LIMIT 1 BY hides a duplicate that a merge has not yet collapsed.
SELECT *
FROM (
    SELECT generation_id, model, endpoint, stream, input_tokens, output_tokens, cached_tokens,
           reasoning_tokens, cost_usd, latency_ms, ttft_ms, status, outcome, ts, api
    FROM usage_events
    WHERE key_hash IN {key_hashes:Array(String)}
    ORDER BY ts DESC
    LIMIT {limit:UInt32} * 2
)
ORDER BY ts DESC
LIMIT 1 BY generation_id
LIMIT {limit:UInt32}
