-- Checkpoints whose request is settled (debited, billed or released): nothing to keep.
DELETE FROM stream_checkpoints c
WHERE NOT EXISTS (SELECT 1 FROM reservations r WHERE r.generation_id = c.generation_id)
