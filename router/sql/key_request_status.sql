-- What a hold would answer for key $1 on the public model $2 before any money is looked at
-- (apifast_reserve_batch, migration 0019, checks the same, in this order): 'ok', 'disabled',
-- and for a sub-key 'expired', 'model_not_allowed' or 'parent_disabled'. For the free
-- counting endpoints, which take no hold. No row: an unknown key.
SELECT CASE
           WHEN s.parent_id IS NULL THEN CASE WHEN s.disabled THEN 'disabled' ELSE 'ok' END
           WHEN s.disabled THEN 'disabled'
           WHEN s.expires_at IS NOT NULL AND s.expires_at <= now() THEN 'expired'
           WHEN s.allowed_models IS NOT NULL AND $2 <> '' AND NOT ($2 = ANY (s.allowed_models))
               THEN 'model_not_allowed'
           WHEN p.disabled THEN 'parent_disabled'
           ELSE 'ok'
       END AS status
FROM api_keys s LEFT JOIN api_keys p ON p.id = s.parent_id
WHERE s.key_hash = $1 AND s.deleted_at IS NULL
