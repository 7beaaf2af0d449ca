-- Lock these keys in key-hash order, the order reservation batches lock them in, so that a
-- settlement touching many keys can never deadlock with them. A sub-key is billed to its
-- parent: the parent's row is the one locked (its own row is updated after, under it). A
-- rotated key is billed to the key it was rotated to (settle_usage_batch.sql): that row too.
SELECT 1 FROM api_keys
WHERE id IN (
    SELECT coalesce(k.parent_id, s.key_id, k.id)
    FROM api_keys k LEFT JOIN key_predecessors s ON s.predecessor_id = k.id
    WHERE k.key_hash = ANY($1::bytea[])
)
ORDER BY key_hash FOR UPDATE
