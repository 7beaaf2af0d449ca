-- Give back the unused part of leases: $1 lease ids, $2 amounts (never more than the lease
-- row holds: what is left covers requests in flight and costs the meter has not debited).
-- The caller locks the keys first (lease_lock_keys.sql).
WITH g AS (
    SELECT * FROM unnest($1::text[], $2::numeric[]) AS g(lease_id, amount)
), cut AS (
    SELECT r.generation_id, least(g.amount, r.amount_usd) AS amount
    FROM reservations r JOIN g ON g.lease_id = r.generation_id
), shrunk AS (
    UPDATE reservations r SET amount_usd = r.amount_usd - cut.amount
    FROM cut WHERE r.generation_id = cut.generation_id
    RETURNING r.key_id, cut.amount
), per_key AS (
    SELECT key_id, sum(amount) AS amount FROM shrunk GROUP BY key_id
)
UPDATE api_keys a SET reserved_usd = greatest(a.reserved_usd - per_key.amount, 0)
FROM per_key WHERE a.id = per_key.key_id
