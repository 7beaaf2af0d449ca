-- Delete a sub-key: it stops working at once; its row stays (disabled, hidden) so that its
-- requests still in flight are debited to the parent. $1 parent id, $2 public id.
UPDATE api_keys SET disabled = true, deleted_at = now()
WHERE parent_id = $1 AND public_id = $2 AND deleted_at IS NULL
RETURNING id
