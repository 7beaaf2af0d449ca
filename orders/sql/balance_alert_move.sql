-- A rotation's copy of the alert for the new key (whose row has none yet): the address
-- re-encrypted for it ($3-$5), and the state as it was, so that an alert already sent for
-- this crossing is not sent again. $1 new key id, $2 old key id.
INSERT INTO balance_alerts (key_id, threshold_usd, email_ciphertext, nonce, enc_key_id, armed,
                            sent_at, created_at)
SELECT $1, a.threshold_usd, $3, $4, $5, a.armed, a.sent_at, a.created_at
FROM balance_alerts a WHERE a.key_id = $2
