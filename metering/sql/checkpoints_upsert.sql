-- Keep the latest checkpoint of each running stream; one already debited is not kept.
-- $1 generation ids (unique), $2 checkpoint numbers, $3 the published events (jsonb text).
INSERT INTO stream_checkpoints (generation_id, checkpoint, event)
SELECT c.generation_id, c.checkpoint, c.event
FROM unnest($1::text[], $2::integer[], $3::jsonb[]) AS c(generation_id, checkpoint, event)
WHERE NOT EXISTS (SELECT 1 FROM ledger l WHERE l.kind = 'usage' AND l.ref = c.generation_id)
ON CONFLICT (generation_id) DO UPDATE
    SET checkpoint = excluded.checkpoint, event = excluded.event, updated_at = now()
    WHERE stream_checkpoints.checkpoint < excluded.checkpoint
