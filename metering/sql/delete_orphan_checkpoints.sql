-- Checkpoints whose request is settled (debited, billed or released): nothing to keep. A
-- stream served from a balance lease is held by the lease's row.
DELETE FROM stream_checkpoints c
WHERE NOT EXISTS (
    SELECT 1 FROM reservations r
    WHERE r.generation_id = coalesce(nullif(c.event->>'lease', ''), c.generation_id)
)
