-- `apifast reconcile`: the usage debits of these generation ids, whenever booked.
SELECT l.ref AS generation_id, k.key_hash, k.prefix, -l.amount_usd AS cost_usd, l.created_at
FROM ledger l JOIN api_keys k ON k.id = l.key_id
WHERE l.kind = 'usage' AND l.ref = ANY($1::text[])
