DELETE FROM balance_alerts WHERE key_id = $1
