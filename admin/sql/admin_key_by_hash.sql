SELECT id FROM api_keys WHERE key_hash = $1
