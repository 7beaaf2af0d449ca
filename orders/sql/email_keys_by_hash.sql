SELECT e.key_id, e.key_ciphertext, e.nonce, e.enc_key_id
FROM email_keys e JOIN api_keys k ON k.id = e.key_id
WHERE e.email_hash = $1 AND NOT k.disabled
ORDER BY e.created_at, e.key_id
