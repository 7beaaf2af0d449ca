-- Lock the keys of a settle batch in key-hash order first, the order the reservation
-- batches and the meter lock them in, so that settling can never deadlock with either.
SELECT 1 FROM api_keys WHERE key_hash = ANY($1::bytea[]) ORDER BY key_hash FOR UPDATE
