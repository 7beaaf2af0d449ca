-- Change only the threshold of an existing alert, and arm it (the same threshold again
-- keeps its state: balance_alert_upsert.sql). $1 key id, $2 threshold.
UPDATE balance_alerts SET armed = armed OR threshold_usd <> $2, threshold_usd = $2
WHERE key_id = $1 RETURNING key_id
