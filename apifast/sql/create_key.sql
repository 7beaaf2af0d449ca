INSERT INTO api_keys (key_hash, prefix) VALUES ($1, $2) RETURNING id, created_at
