INSERT INTO order_events (order_id, payment_id, status, raw_status, credited_usd, source)
VALUES ($1, $2, $3, $4, $5, $6)
