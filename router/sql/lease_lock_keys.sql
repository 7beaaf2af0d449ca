-- Lock the keys of these leases in key-hash order, the order holds and the meter lock in.
SELECT 1 FROM api_keys a JOIN reservations r ON r.key_id = a.id
WHERE r.generation_id = ANY($1::text[]) ORDER BY a.key_hash FOR UPDATE OF a
