SELECT payment_id, parent_payment_id, status, credited_usd, created_at, updated_at
FROM payments WHERE order_id = $1
ORDER BY created_at, payment_id
