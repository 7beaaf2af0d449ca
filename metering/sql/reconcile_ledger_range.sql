-- `apifast reconcile`: the usage debits booked in [$1, $2), with their key.
SELECT l.ref AS generation_id, k.key_hash, k.prefix, -l.amount_usd AS cost_usd, l.created_at
-- The key that made the request: a sub-key's debit is booked on its parent, named in
-- sub_key_id; ClickHouse has the sub-key's own hash.
FROM ledger l JOIN api_keys k ON k.id = coalesce(l.sub_key_id, l.key_id)
WHERE l.kind = 'usage' AND l.created_at >= $1 AND l.created_at < $2
