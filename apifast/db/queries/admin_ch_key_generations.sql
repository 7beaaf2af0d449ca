-- One key's most recent requests; LIMIT 1 BY hides a duplicate not yet merged away.
SELECT generation_id, model, endpoint, stream, input_tokens, output_tokens, cached_tokens,
       reasoning_tokens, cost_usd, latency_ms, ttft_ms, status, outcome, ts
FROM usage_events
WHERE key_hash = {key_hash:String}
ORDER BY ts DESC
LIMIT 1 BY generation_id
LIMIT {limit:UInt32}
