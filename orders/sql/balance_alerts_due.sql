-- The alerts to send now, disarmed in the same statement so each crossing mails at most
-- once, however many sweeps (or processes) run: the balance is at or below the threshold.
UPDATE balance_alerts a SET armed = false, sent_at = now()
FROM api_keys k
WHERE k.id = a.key_id AND a.armed AND k.balance_usd <= a.threshold_usd
  AND NOT k.disabled AND k.deleted_at IS NULL
RETURNING a.key_id, a.threshold_usd, a.email_ciphertext, a.nonce, a.enc_key_id,
          k.balance_usd, k.prefix
