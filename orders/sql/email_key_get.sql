SELECT email_hash FROM email_keys WHERE key_id = $1
