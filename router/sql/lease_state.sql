-- The leases of this router that still exist, with their keys' state. $1 lease ids.
SELECT r.generation_id, k.disabled, k.balance_usd - k.reserved_usd AS available,
       k.rpm_limit, k.tpm_limit
FROM reservations r JOIN api_keys k ON k.id = r.key_id
WHERE r.generation_id = ANY($1::text[])
