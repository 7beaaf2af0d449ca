-- The key being rotated, locked, with what still holds money on it and how many keys it
-- was already rotated from (the lineage is bounded: key_history.sql reads it whole).
SELECT a.id, a.balance_usd, a.reserved_usd, a.rpm_limit, a.tpm_limit,
       (SELECT count(*) FROM reservations r WHERE r.key_id = a.id) AS holds,
       (SELECT count(*) FROM key_predecessors p WHERE p.key_id = a.id) AS predecessors
FROM api_keys a WHERE a.id = $1 FOR UPDATE
