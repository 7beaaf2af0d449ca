-- Streams whose router died: the hold expired (nobody kept it alive) and the final event
-- never came. Their latest checkpoint is what gets billed.
SELECT c.event
FROM stream_checkpoints c JOIN reservations r ON r.generation_id = c.generation_id
WHERE r.expires_at < now()
