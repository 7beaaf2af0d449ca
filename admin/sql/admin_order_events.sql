SELECT order_id, payment_id, status, raw_status, credited_usd, source, created_at
FROM order_events WHERE order_id = ANY($1::text[])
ORDER BY order_id, id
