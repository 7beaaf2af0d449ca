SELECT count(*) FROM reservations WHERE key_id = $1
