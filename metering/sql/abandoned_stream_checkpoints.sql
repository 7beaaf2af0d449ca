-- Streams whose router died: the hold expired (nobody kept it alive) and the final event
-- never came. Their latest checkpoint is what gets billed. A stream served from a balance
-- lease is held by the lease's row.
SELECT c.event
FROM stream_checkpoints c
JOIN reservations r ON r.generation_id = coalesce(nullif(c.event->>'lease', ''), c.generation_id)
WHERE r.expires_at < now()
