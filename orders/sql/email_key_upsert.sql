INSERT INTO email_keys (key_id, email_hash, key_ciphertext, nonce, enc_key_id)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (key_id) DO UPDATE
SET email_hash = EXCLUDED.email_hash,
    key_ciphertext = EXCLUDED.key_ciphertext,
    nonce = EXCLUDED.nonce,
    enc_key_id = EXCLUDED.enc_key_id,
    created_at = now()
