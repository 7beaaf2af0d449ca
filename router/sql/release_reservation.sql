-- Give back a hold that will never be metered (the request failed before any usage).
WITH gone AS (
    DELETE FROM reservations WHERE generation_id = $1 RETURNING key_id, amount_usd
)
UPDATE api_keys k SET reserved_usd = k.reserved_usd - gone.amount_usd
FROM gone WHERE k.id = gone.key_id
