-- Shrink finished requests' holds to their exact cost, so that the rest of each hold (an
-- upper bound) stops blocking the key's balance before the meter debits it. A hold already
-- gone (debited, released) is skipped; the meter's debit stays the only change to balances.
-- $1 generation ids, $2 exact costs.
WITH s AS (
    SELECT * FROM unnest($1::text[], $2::numeric[]) AS s(generation_id, cost)
), old AS (
    SELECT r.generation_id, r.key_id, r.amount_usd - s.cost AS freed, s.cost
    FROM reservations r JOIN s ON s.generation_id = r.generation_id
    WHERE r.amount_usd > s.cost
    ORDER BY r.key_id
    FOR UPDATE OF r
), shrunk AS (
    UPDATE reservations r SET amount_usd = old.cost
    FROM old WHERE r.generation_id = old.generation_id
    RETURNING old.key_id, old.freed
), per_key AS (
    SELECT key_id, sum(freed) AS freed FROM shrunk GROUP BY key_id
)
UPDATE api_keys k SET reserved_usd = greatest(k.reserved_usd - per_key.freed, 0)
FROM per_key WHERE k.id = per_key.key_id
