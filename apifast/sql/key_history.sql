-- The calling key for the history endpoints (/v1/usage, /v1/receipts, /v1/generation(s)):
-- whether it was rotated away, and the hashes of the keys it was rotated from, newest first;
-- for a sub-key, whether it still works (sub_key_status, as in key_summary.sql).
SELECT a.id,
       EXISTS (SELECT 1 FROM key_predecessors s WHERE s.predecessor_id = a.id) AS rotated,
       array(SELECT p.key_hash FROM key_predecessors kp JOIN api_keys p ON p.id = kp.predecessor_id
             WHERE kp.key_id = a.id ORDER BY p.id DESC) AS predecessors,
       CASE
           WHEN a.parent_id IS NULL THEN NULL
           WHEN a.disabled THEN 'disabled'
           WHEN a.expires_at IS NOT NULL AND a.expires_at <= now() THEN 'expired'
           WHEN (SELECT p.disabled FROM api_keys p WHERE p.id = a.parent_id) THEN 'parent_disabled'
           ELSE 'ok'
       END AS sub_key_status
FROM api_keys a WHERE a.key_hash = $1 AND a.deleted_at IS NULL
