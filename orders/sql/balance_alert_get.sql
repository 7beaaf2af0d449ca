SELECT key_id, threshold_usd, email_ciphertext, nonce, enc_key_id, armed, sent_at, created_at
FROM balance_alerts WHERE key_id = $1
