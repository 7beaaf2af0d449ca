-- Lock these keys in key-hash order, the order reservation batches lock them in, so that a
-- settlement touching many keys can never deadlock with them.
SELECT 1 FROM api_keys WHERE key_hash = ANY($1::bytea[]) ORDER BY key_hash FOR UPDATE
