-- Change only the threshold of an existing alert, and arm it. $1 key id, $2 threshold.
UPDATE balance_alerts SET threshold_usd = $2, armed = true WHERE key_id = $1 RETURNING key_id
