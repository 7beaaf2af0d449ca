-- The calling key's summary. sub_key_status: NULL for a key holder's own key; for a
-- sub-key 'ok', or why it no longer works ('disabled', 'expired', 'parent_disabled'), as the
-- holds answer it (router/migrations/postgres/0019_reserve_counts_once.sql).
SELECT a.id, a.balance_usd, a.reserved_usd, a.spent_usd, a.created_at, a.rpm_limit,
       a.tpm_limit, a.disabled, a.parent_id,
       CASE
           WHEN a.parent_id IS NULL THEN NULL
           WHEN a.disabled THEN 'disabled'
           WHEN a.expires_at IS NOT NULL AND a.expires_at <= now() THEN 'expired'
           WHEN (SELECT p.disabled FROM api_keys p WHERE p.id = a.parent_id) THEN 'parent_disabled'
           ELSE 'ok'
       END AS sub_key_status
FROM api_keys a WHERE a.key_hash = $1 AND a.deleted_at IS NULL
