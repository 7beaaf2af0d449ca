SELECT count(*) FROM api_keys WHERE parent_id = $1 AND deleted_at IS NULL
