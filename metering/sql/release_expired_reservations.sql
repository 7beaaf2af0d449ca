-- Holds whose request was never metered (a crashed router) stop blocking the key.
WITH gone AS (
    DELETE FROM reservations WHERE expires_at < now() RETURNING key_id, amount_usd
), per_key AS (
    SELECT key_id, sum(amount_usd) AS amount FROM gone GROUP BY key_id
)
UPDATE api_keys k SET reserved_usd = greatest(k.reserved_usd - per_key.amount, 0)
FROM per_key WHERE k.id = per_key.key_id
