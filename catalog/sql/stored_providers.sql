SELECT name, type, base_url, options, api_key_ciphertext, api_key_nonce, api_key_kid, updated_at
FROM db_providers ORDER BY name
