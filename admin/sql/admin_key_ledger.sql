SELECT id, kind, ref, amount_usd, reason, created_at
FROM ledger WHERE key_id = $1
ORDER BY id DESC
LIMIT $2
