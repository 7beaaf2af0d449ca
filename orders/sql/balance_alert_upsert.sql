-- Set a key's low-balance alert (armed). $1 key id, $2 threshold, $3 ciphertext, $4 nonce,
-- $5 key ring id. A NULL ciphertext keeps the stored address (only the threshold changes).
-- The same threshold again (a setup script run on a schedule) keeps the alert's state: one
-- mail per crossing, however often it is set; a new threshold is a new ask, armed.
INSERT INTO balance_alerts AS a (key_id, threshold_usd, email_ciphertext, nonce, enc_key_id)
SELECT $1, $2, $3, $4, $5 WHERE $3::bytea IS NOT NULL
ON CONFLICT (key_id) DO UPDATE
SET threshold_usd = excluded.threshold_usd,
    email_ciphertext = excluded.email_ciphertext,
    nonce = excluded.nonce,
    enc_key_id = excluded.enc_key_id,
    armed = a.armed OR a.threshold_usd <> excluded.threshold_usd
