INSERT INTO db_providers (name, type, base_url, options, api_key_ciphertext, api_key_nonce, api_key_kid)
VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7)
ON CONFLICT (name) DO UPDATE SET
    type = EXCLUDED.type, base_url = EXCLUDED.base_url, options = EXCLUDED.options,
    api_key_ciphertext = EXCLUDED.api_key_ciphertext, api_key_nonce = EXCLUDED.api_key_nonce,
    api_key_kid = EXCLUDED.api_key_kid, updated_at = now()
