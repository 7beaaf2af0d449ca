-- $1 a LIKE pattern over the key prefix (already escaped), $2 the row limit.
SELECT id, prefix, balance_usd, reserved_usd, spent_usd, disabled, created_at
FROM api_keys WHERE prefix LIKE $1 ESCAPE '\'
ORDER BY created_at DESC
LIMIT $2
