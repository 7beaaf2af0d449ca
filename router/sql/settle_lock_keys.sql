-- Lock the keys of a settle batch in key-hash order first, the order the reservation
-- batches and the meter lock them in, so that settling can never deadlock with either. A
-- sub-key's holds are on its parent's row: the parent is the one locked.
SELECT 1 FROM api_keys
WHERE id IN (SELECT coalesce(k.parent_id, k.id) FROM api_keys k WHERE k.key_hash = ANY($1::bytea[]))
ORDER BY key_hash FOR UPDATE
