-- Take a lease on a key's balance, or grow this router's lease: add up to $3 (at most the
-- share $4 of what is available, and nothing below $5) to the lease's hold, and keep it
-- alive for $6 seconds. The key is locked first, as by every change to a lease.
-- A lease whose row is gone (it expired) is never grown again: it is only taken anew ($7).
-- $1 key hash, $2 lease id, $3 wanted, $4 share, $5 smallest grant, $6 ttl seconds,
-- $7 true to take a new lease.
WITH k AS (
    SELECT id, balance_usd - reserved_usd AS available, disabled, rpm_limit, tpm_limit,
           parent_id IS NOT NULL AS sub
    FROM api_keys WHERE key_hash = $1 FOR UPDATE
), g AS (
    -- Never a sub-key (parent_id set): its holds are per request, on its parent's row.
    SELECT id, trunc(least($3::numeric, available * $4::numeric), 12) AS amount
    FROM k WHERE NOT disabled AND NOT sub
), had AS (
    SELECT EXISTS (SELECT 1 FROM reservations WHERE generation_id = $2) AS found
), ok AS (
    SELECT id, amount FROM g, had
    WHERE amount >= $5::numeric AND amount > 0 AND had.found <> $7::boolean
), lease AS (
    INSERT INTO reservations (generation_id, key_id, amount_usd, expires_at)
    SELECT $2, id, amount, now() + make_interval(secs => $6) FROM ok
    ON CONFLICT (generation_id) DO UPDATE
        SET amount_usd = reservations.amount_usd + excluded.amount_usd,
            expires_at = greatest(reservations.expires_at, excluded.expires_at)
    RETURNING key_id
), held AS (
    UPDATE api_keys a SET reserved_usd = a.reserved_usd + ok.amount FROM ok WHERE a.id = ok.id
)
SELECT k.id AS key_id, k.disabled, k.available, k.rpm_limit, k.tpm_limit,
       coalesce(ok.amount, 0) AS granted, had.found AS existed
FROM k CROSS JOIN had LEFT JOIN ok ON ok.id = k.id
