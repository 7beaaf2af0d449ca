-- The key being rotated, locked, with what still holds money on it.
SELECT a.id, a.balance_usd, a.reserved_usd, a.rpm_limit, a.tpm_limit,
       (SELECT count(*) FROM reservations r WHERE r.key_id = a.id) AS holds
FROM api_keys a WHERE a.id = $1 FOR UPDATE
